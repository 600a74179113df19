"""A torch recurrent module's layers through a fused layer function, in the module's own layout.

Shared by ``fused.rnn_forward`` (``nn.RNN``) and ``fused_gates.gates_forward`` (``nn.LSTM`` / ``nn.GRU``):
both take ``x`` exactly as the module does, batched (``[B, T, I]``, or ``[T, B, I]`` when
``batch_first`` is False) or unbatched (``[T, I]``), and return the output sequence in that layout.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def module_layers(rnn: nn.Module, x: torch.Tensor, layer: Callable[..., torch.Tensor],
                  last_only: bool = False) -> torch.Tensor:
    """``layer(x [B, T, I], w_ih, w_hh, b_ih, b_hh, last_only=...)`` over every layer of ``rnn``.

    With ``last_only``, the last layer's last state: ``[B, H]`` (``[H]`` for an unbatched ``x``).
    """
    if x.dim() not in (2, 3):
        order = "[B, T, I]" if rnn.batch_first else "[T, B, I]"
        raise ValueError(f"x must be a sequence {order} (batch_first={rnn.batch_first}) or an unbatched [T, I], "
                         f"got shape {tuple(x.shape)}")
    unbatched = x.dim() == 2
    out = x.unsqueeze(0) if unbatched else x if rnn.batch_first else x.transpose(0, 1)
    for i in range(rnn.num_layers):
        weights = [getattr(rnn, f"{name}_l{i}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        out = layer(out, *weights, last_only=last_only and i == rnn.num_layers - 1)
    if unbatched:
        return out.squeeze(0)
    return out if rnn.batch_first or last_only else out.transpose(0, 1)
