"""IRNN and its baselines, ``[B, T, I] -> [B, out]`` through a linear readout of the last hidden state
(``[B, T, out]``, a readout of every state, for a task with a target at every step).

Models are plain ``nn.Module``s on top of ``torch.nn.RNN/LSTM/GRU`` (so cuDNN is
used on GPU); they do no I/O. Fast engines (``irnn.engine``) reuse these very
parameters, so checkpoints and optimisers do not depend on the engine.
"""
from __future__ import annotations

import torch
from torch import nn

RNN_KINDS = {"irnn": "relu", "rnn-relu": "relu", "rnn-tanh": "tanh"}
MODEL_KINDS = ("irnn", "rnn-relu", "rnn-tanh", "lstm", "gru")
CELLS = ("relu", "tanh", "lstm", "gru")  # the torch.nn layer under a RecurrentModel (what the engines run)
_CELL_OF = {**RNN_KINDS, "lstm": "lstm", "gru": "gru"}


class RecurrentModel(nn.Module):
    """A recurrent network on ``nn.RNN``/``nn.LSTM``/``nn.GRU`` with a linear readout of the final hidden
    state (of every hidden state with ``per_step``).

    A model that is one of these layers with its own initialisation (np-RNN, chrono-LSTM) subclasses
    this and overrides :meth:`init_layer`; the engines then run it as they run the layer.

    Args:
        kind: the registered model name (``irnn``, ``rnn-relu``, ``rnn-tanh``, ``lstm``, ``gru``, ...).
        cell: the layer: ``relu``, ``tanh``, ``lstm`` or ``gru`` (default: the built-in kind's).
        per_step: read out every time step: ``[B, T, I] -> [B, T, output_size]``.
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
                 forget_bias: float = 1.0, per_step: bool = False, cell: str | None = None):
        super().__init__()
        cell = cell or _CELL_OF.get(kind)
        if cell not in CELLS:
            raise ValueError(f"unknown model {kind!r} (cell {cell!r}); the cells are: {', '.join(CELLS)}")
        self.kind, self.cell, self.per_step = kind, cell, per_step
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.init_scale, self.recurrent_std, self.input_std, self.forget_bias = init_scale, recurrent_std, input_std, forget_bias
        if cell in ("relu", "tanh"):
            self.nonlinearity = cell
            self.rnn = nn.RNN(input_size, hidden_size, num_layers, nonlinearity=self.nonlinearity, batch_first=True)
        elif cell == "lstm":
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
            self.init_layer(layer, w_ih, w_hh, b_ih, b_hh)

    def init_layer(self, layer: int, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                   b_hh: torch.Tensor) -> None:
        """Initialise one layer's weights in place (under no_grad); the GRU keeps PyTorch's."""
        if self.kind == "irnn":
            # Le et al. 2015: W_hh = I (scaled), biases 0, input weights N(0, 0.001^2).
            w_hh.copy_(torch.eye(self.hidden_size) * self.init_scale)
            w_ih.normal_(0.0, self.input_std)
            b_ih.zero_(), b_hh.zero_()
        elif self.kind in RNN_KINDS:
            w_hh.normal_(0.0, self.recurrent_std)
            w_ih.normal_(0.0, self.input_std)
            b_ih.zero_(), b_hh.zero_()
        elif self.cell == "lstm":
            # Gate order in PyTorch is (input, forget, cell, output); the summed bias of the forget gate is forget_bias.
            h = self.hidden_size
            b_ih.zero_(), b_hh.zero_()
            b_ih[h:2 * h].fill_(self.forget_bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the top layer, ``[B, H]`` (every state, ``[B, T, H]``, with ``per_step``)."""
        out, _ = self.rnn(x)  # [B, T, H]
        return out if self.per_step else out[:, -1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))


def build_recurrent(cfg, input_size: int, output_size: int, per_step: bool = False, cls: type = None,
                    **kw) -> RecurrentModel:
    """The registry's builder of the built-in models (and, with ``cls``, of a subclass)."""
    return (cls or RecurrentModel)(cfg.model, input_size, cfg.hidden_size, output_size, cfg.num_layers,
                                   init_scale=cfg.init_scale, recurrent_std=cfg.recurrent_std,
                                   input_std=cfg.input_std, forget_bias=cfg.forget_bias, per_step=per_step, **kw)


def build_model(cfg, input_size: int, output_size: int, per_step: bool = False) -> nn.Module:
    """The model a :class:`irnn.config.Config` names (any registered one), for a task's input and output
    sizes; ``per_step``: the task has a target at every time step."""
    from .. import registry

    return registry.resolve(registry.model_spec(cfg.model).build)(cfg, input_size, output_size, per_step)
