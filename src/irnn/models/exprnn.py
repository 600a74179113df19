"""expRNN (Lezcano-Casado & Martinez-Rubio 2019): an RNN whose recurrent matrix stays orthogonal for the
whole of training, ``h_t = modrelu(W x_t + Q h_{t-1}, b)`` with ``Q`` in SO(H).

``Q`` is kept orthogonal by ``geotorch.orthogonal`` (its default trivialisation is the matrix
exponential of a skew-symmetric matrix, the paper's): the optimiser moves an unconstrained parameter and
``Q`` is always its image on the orthogonal group, never re-projected by hand. As in the authors' code
(``Lezcano/expRNN``): the Henaff et al. (2016) initialisation (``Q = expm(A)`` for a block-diagonal
skew-symmetric ``A`` with 2x2 blocks ``[[0, s], [-s, 0]]``, ``s ~ U[-pi, pi]``), input weights He-normal
with no bias, and the modReLU ``modrelu(z, b) = sign(z) * relu(|z| + b)`` with ``b ~ U[-0.01, 0.01]``.

The loop runs in PyTorch (no fused engine: ``Q`` is dense, so each step is one ``[B, H] x [H, H]``
product, and ``Q`` is computed once per forward pass through ``parametrize.cached``).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


def henaff_matrix(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``expm(A)`` for the Henaff et al. block-diagonal skew-symmetric ``A`` (odd ``n``: a last 1 x 1 zero)."""
    a = torch.zeros(n, n, dtype=torch.float64)
    s = torch.empty(n // 2, dtype=torch.float64).uniform_(-math.pi, math.pi, generator=generator)
    i = torch.arange(0, 2 * (n // 2), 2)
    a[i, i + 1], a[i + 1, i] = s, -s
    return torch.matrix_exp(a).float()


def modrelu(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sign(z) * torch.relu(z.abs() + b)


class ExpRNN(nn.Module):
    cell = None  # the torch engine runs it as model(x)

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 per_step: bool = False):
        super().__init__()
        import geotorch  # a dependency of irnn, loaded only for this model

        self.kind, self.per_step, self.hidden_size, self.num_layers = "exprnn", per_step, hidden_size, num_layers
        self.input = nn.ModuleList(nn.Linear(input_size if i == 0 else hidden_size, hidden_size, bias=False)
                                   for i in range(num_layers))
        self.recurrent = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(num_layers))
        self.bias = nn.ParameterList(nn.Parameter(torch.empty(hidden_size)) for _ in range(num_layers))
        self.readout = nn.Linear(hidden_size, output_size)
        for lin, rec, b in zip(self.input, self.recurrent, self.bias):
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            geotorch.orthogonal(rec, "weight")
            rec.weight = henaff_matrix(hidden_size)  # geotorch finds the parameter that maps to it
            with torch.no_grad():
                b.uniform_(-0.01, 0.01)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h_in = x
        with parametrize.cached():  # each Q once per forward pass, not once per time step
            for lin, rec, b in zip(self.input, self.recurrent, self.bias):
                pre, q_t = lin(h_in), rec.weight.T
                h = pre.new_zeros(pre.shape[0], self.hidden_size)
                states = []
                for t in range(pre.shape[1]):
                    h = modrelu(pre[:, t] + h @ q_t, b)
                    states.append(h)
                h_in = torch.stack(states, 1)
        return h_in if self.per_step else h_in[:, -1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))


def build_exprnn(cfg, input_size: int, output_size: int, per_step: bool = False) -> ExpRNN:
    return ExpRNN(input_size, cfg.hidden_size, output_size, cfg.num_layers, per_step)
