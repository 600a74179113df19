"""The IRNN's successors that are a plain ``nn.RNN``/``nn.LSTM`` with their paper's initialisation, so the
fused engines run them as they run the IRNN and the LSTM:

* ``np-rnn`` (Talathi & Vartak 2016): a ReLU RNN whose recurrent matrix is the normalised positive-
  definite ``W = (I + R^T R / N) / lambda_max``, ``R ~ N(0, 1)`` of size ``N x N``: symmetric, positive
  definite, largest eigenvalue 1 (the others in (0, 1)).
* ``rnn-orth`` (Henaff et al. 2016; the orthogonal baseline of Arjovsky et al. 2016): a random
  orthogonal recurrent matrix (``nn.init.orthogonal_``: Haar-distributed), ReLU or tanh.
* ``chrono-lstm`` (Tallec & Ollivier 2018): an LSTM with forget-gate bias ``log U[1, T_max - 1]`` per
  unit and input-gate bias its negative; the other weights keep PyTorch's initialisation.

The plain RNNs take their input weights from ``N(0, input_std^2)`` and zero biases, like the IRNN, so
that the recurrent matrix is what differs between them.
"""
from __future__ import annotations

import torch

from .. import registry
from .recurrent import RecurrentModel, build_recurrent


def np_matrix(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(I + R^T R / n) / lambda_max`` with ``R ~ N(0, 1)``: symmetric positive definite, top eigenvalue 1."""
    r = torch.randn(n, n, generator=generator, dtype=torch.float64)
    a = torch.eye(n, dtype=torch.float64) + r.T @ r / n
    return (a / torch.linalg.eigvalsh(a)[-1]).float()


class NpRNN(RecurrentModel):
    def init_layer(self, layer, w_ih, w_hh, b_ih, b_hh):
        w_hh.copy_(np_matrix(self.hidden_size))
        w_ih.normal_(0.0, self.input_std)
        b_ih.zero_(), b_hh.zero_()


class OrthRNN(RecurrentModel):
    def init_layer(self, layer, w_ih, w_hh, b_ih, b_hh):
        torch.nn.init.orthogonal_(w_hh)
        w_ih.normal_(0.0, self.input_std)
        b_ih.zero_(), b_hh.zero_()


class ChronoLSTM(RecurrentModel):
    """``t_max``: the longest dependency the forget gates should span at initialisation (>= 2)."""

    def __init__(self, *args, t_max: int, **kw):
        if t_max < 2:
            raise ValueError(f"chrono-lstm needs T_max >= 2, got {t_max}")
        self.t_max = t_max
        super().__init__(*args, **kw)

    def init_layer(self, layer, w_ih, w_hh, b_ih, b_hh):
        h = self.hidden_size  # PyTorch's gate order: input, forget, cell, output
        b_ih.zero_(), b_hh.zero_()
        forget = torch.empty(h).uniform_(1.0, self.t_max - 1.0).log_()
        b_ih[h:2 * h].copy_(forget)
        b_ih[:h].copy_(-forget)


def build_np_rnn(cfg, input_size, output_size, per_step=False):
    return build_recurrent(cfg, input_size, output_size, per_step, cls=NpRNN, cell="relu")


def build_rnn_orth(cfg, input_size, output_size, per_step=False):
    return build_recurrent(cfg, input_size, output_size, per_step, cls=OrthRNN,
                           cell=registry.option(cfg, "orth_nonlinearity"))


def build_chrono_lstm(cfg, input_size, output_size, per_step=False):
    t_max = registry.option(cfg, "chrono_tmax") or cfg.sequence_length()
    return build_recurrent(cfg, input_size, output_size, per_step, cls=ChronoLSTM, cell="lstm", t_max=t_max)
