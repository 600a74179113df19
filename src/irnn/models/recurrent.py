"""IRNN and its baselines, all ``[B, T, I] -> [B, out]`` through a linear readout of the last hidden state.

Models are plain ``nn.Module``s on top of ``torch.nn.RNN/LSTM/GRU`` (so cuDNN is
used on GPU); they do no I/O. Fast engines (``irnn.engine``) reuse these very
parameters, so checkpoints and optimisers do not depend on the engine.
"""
from __future__ import annotations

import torch
from torch import nn

RNN_KINDS = {"irnn": "relu", "rnn-relu": "relu", "rnn-tanh": "tanh"}
MODEL_KINDS = ("irnn", "rnn-relu", "rnn-tanh", "lstm", "gru")


class RecurrentModel(nn.Module):
    """A recurrent network with a linear readout of the final hidden state.

    Args:
        kind: ``irnn``, ``rnn-relu``, ``rnn-tanh``, ``lstm`` or ``gru``.
        input_size, hidden_size, output_size, num_layers: sizes.
        init_scale: IRNN recurrent matrix starts as ``init_scale * I`` (Le et al. 2015, section 3).
        recurrent_std: std of the Gaussian recurrent weights of ``rnn-relu``/``rnn-tanh``.
        input_std: std of the Gaussian input weights of the plain RNNs (the paper's 0.001).
        forget_bias: LSTM forget-gate bias.

    Shape:
        input ``[B, T, input_size]`` -> output ``[B, output_size]``.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int = 100, output_size: int = 1, num_layers: int = 1,
                 init_scale: float = 1.0, recurrent_std: float = 0.001, input_std: float = 0.001,
                 forget_bias: float = 1.0):
        super().__init__()
        if kind not in MODEL_KINDS:
            raise ValueError(f"unknown model {kind!r}; choose one of: {', '.join(MODEL_KINDS)}")
        self.kind = kind
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.init_scale, self.recurrent_std, self.input_std, self.forget_bias = init_scale, recurrent_std, input_std, forget_bias
        if kind in RNN_KINDS:
            self.nonlinearity = RNN_KINDS[kind]
            self.rnn = nn.RNN(input_size, hidden_size, num_layers, nonlinearity=self.nonlinearity, batch_first=True)
        elif kind == "lstm":
            self.nonlinearity = None
            self.rnn = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        else:
            self.nonlinearity = None
            self.rnn = nn.GRU(input_size, hidden_size, num_layers, batch_first=True)
        self.readout = nn.Linear(hidden_size, output_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.rnn.reset_parameters()
        self.readout.reset_parameters()
        for layer in range(self.num_layers):
            w_ih, w_hh = getattr(self.rnn, f"weight_ih_l{layer}"), getattr(self.rnn, f"weight_hh_l{layer}")
            b_ih, b_hh = getattr(self.rnn, f"bias_ih_l{layer}"), getattr(self.rnn, f"bias_hh_l{layer}")
            if self.kind == "irnn":
                # Le et al. 2015: W_hh = I (scaled), biases 0, input weights N(0, 0.001^2).
                w_hh.copy_(torch.eye(self.hidden_size) * self.init_scale)
                w_ih.normal_(0.0, self.input_std)
                b_ih.zero_(), b_hh.zero_()
            elif self.kind in RNN_KINDS:
                w_hh.normal_(0.0, self.recurrent_std)
                w_ih.normal_(0.0, self.input_std)
                b_ih.zero_(), b_hh.zero_()
            elif self.kind == "lstm":
                # Gate order in PyTorch is (input, forget, cell, output); the summed bias of the forget gate is forget_bias.
                h = self.hidden_size
                b_ih.zero_(), b_hh.zero_()
                b_ih[h:2 * h].fill_(self.forget_bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the top layer, ``[B, H]``."""
        out, _ = self.rnn(x)  # [B, T, H]
        return out[:, -1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))


def build_model(cfg, input_size: int, output_size: int) -> RecurrentModel:
    """The model a :class:`irnn.config.Config` names, for a task's input and output sizes."""
    return RecurrentModel(cfg.model, input_size, cfg.hidden_size, output_size, cfg.num_layers,
                          init_scale=cfg.init_scale, recurrent_std=cfg.recurrent_std, input_std=cfg.input_std,
                          forget_bias=cfg.forget_bias)
