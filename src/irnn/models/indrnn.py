"""IndRNN (Li et al. 2018, "Independently Recurrent Neural Network"): each unit recurs only on itself,

    h_t = relu(W x_t + u * h_{t-1} + b),     u in R^H (elementwise),

stacked ``num_layers`` deep (each layer reads the one below), with a linear readout of the top layer.

The paper's constraint: over T steps a unit's gradient scales like u^T, so |u| is kept at most
``gamma^(1/T)`` (gamma = 2: a gradient may at most double over the sequence), by clipping after every
optimiser step (:meth:`IndRNN.constrain_`, which the trainer calls through an optimiser post-step hook).
Initialisation: u ~ U(0, gamma^(1/T)) (inside the paper's range, no unit starting above the bound),
input weights N(0, input_std^2) (the config's, 0.001 as for irnn's other RNNs, so that the recurrence is
what differs between models), biases 0.

The recurrence is elementwise, so it has no matrix product to speed up; run step by step in PyTorch it
costs a few tiny ops per time step. :meth:`IndRNN.features` takes the recurrence as an argument: the
plain PyTorch loop here (the reference), or the fused C++ loop of :mod:`irnn.engine.indrnn`, which the
``fused`` engine passes in.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import registry

Recurrence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference_recurrence(pre: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h_t = relu(pre_t + u * h_{t-1})`` over ``pre [B, T, H]`` in plain PyTorch (autograd does BPTT)."""
    h = pre.new_zeros(pre.shape[0], pre.shape[2])
    out = []
    for t in range(pre.shape[1]):
        h = torch.relu(pre[:, t] + u * h)
        out.append(h)
    return torch.stack(out, 1)


class IndRNN(nn.Module):
    cell = "indrnn"  # what the engines run (engine.cell_of): the fused engine has an IndRNN loop

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1, *,
                 seq_len: int, gamma: float = 2.0, input_std: float = 0.001, per_step: bool = False):
        super().__init__()
        if seq_len < 1 or gamma < 1.0:
            raise ValueError(f"indrnn needs seq_len >= 1 and gamma >= 1, got {seq_len}, {gamma}")
        self.kind, self.per_step = "indrnn", per_step
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.bound = gamma ** (1.0 / seq_len)  # |u| <= gamma^(1/T)
        self.input = nn.ModuleList(nn.Linear(input_size if i == 0 else hidden_size, hidden_size)
                                   for i in range(num_layers))
        self.u = nn.ParameterList(nn.Parameter(torch.empty(hidden_size)) for _ in range(num_layers))
        self.readout = nn.Linear(hidden_size, output_size)
        with torch.no_grad():
            for lin, u in zip(self.input, self.u):
                lin.weight.normal_(0.0, input_std)
                lin.bias.zero_()
                u.uniform_(0.0, self.bound)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clip every ``u`` to ``[-gamma^(1/T), gamma^(1/T)]`` (after each optimiser step)."""
        for u in self.u:
            u.clamp_(-self.bound, self.bound)

    def features(self, x: torch.Tensor, recurrence: Recurrence = reference_recurrence) -> torch.Tensor:
        """The top layer's last state ``[B, H]`` (every state ``[B, T, H]`` with ``per_step``)."""
        h = x
        for lin, u in zip(self.input, self.u):
            h = recurrence(lin(h), u)
        return h if self.per_step else h[:, -1]

    def forward(self, x: torch.Tensor, recurrence: Recurrence = reference_recurrence) -> torch.Tensor:
        return self.readout(self.features(x, recurrence))


def build_indrnn(cfg, input_size: int, output_size: int, per_step: bool = False) -> IndRNN:
    return IndRNN(input_size, cfg.hidden_size, output_size, cfg.num_layers, seq_len=cfg.sequence_length(),
                  gamma=registry.option(cfg, "indrnn_gamma"), input_std=cfg.input_std, per_step=per_step)
