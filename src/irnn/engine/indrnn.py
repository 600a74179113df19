"""The fused CPU loop of IndRNN's elementwise recurrence ``h_t = relu(p_t + u * h_{t-1})``.

``csrc/indrnn.cpp`` runs the whole time loop, forward and backward, one scalar loop per (sequence, unit):
no per-step op dispatch, which is all the PyTorch loop (:func:`irnn.models.indrnn.reference_recurrence`)
costs. Bitwise the same numbers for any thread count (no reduction crosses threads; du sums rows in
order). Built on first use like the other engines; ``IRNN_NO_EXTENSION=1`` turns it off.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from ..models.indrnn import reference_recurrence
from .build import Extension

_EXT = Extension("irnn_indrnn", Path(__file__).with_name("csrc") / "indrnn.cpp", "irnn_indrnn", "IndRNN")


def available() -> bool:
    return _EXT.available()


class _CppIndRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, u):
        out = _EXT.ops.forward(pre, u)
        ctx.save_for_backward(out, u)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        out, u = ctx.saved_tensors
        dpre, du = _EXT.ops.backward(grad_out, out, u)
        return dpre, du.to(u.dtype)


def recurrence(pre: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h [B, T, H]`` for ``pre [B, T, H]`` and ``u [H]``: the C++ loop on the CPU, else PyTorch's."""
    if pre.device.type == "cpu" and pre.dtype in (torch.float32, torch.float64) and available():
        return _CppIndRNN.apply(pre, u)
    return reference_recurrence(pre, u)
