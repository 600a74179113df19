"""N independent models of one architecture trained in one stacked step.

Each member keeps its own ``nn.Module`` and its own optimiser, so its
state_dicts, checkpoints and trajectory are those of training it alone. Only
the arithmetic is shared: the members' weights are stacked ``[N, ...]`` for
the forward and backward pass (the fused engine's stacked time loop on the
CPU). The readout, the loss and gradient clipping run per member with the very
calls a member makes alone, so each member's numbers are bitwise those of training
it alone (the fused engine gives a stacked model what it gives it alone). Gradients
flow back through ``torch.stack`` into each member's own parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import RecurrentModel
from . import update


def stackable(models: list[RecurrentModel]) -> bool:
    """Whether these models can share one stacked forward pass (same kind and shapes, ReLU/tanh RNNs)."""
    from . import RNN_CELLS, cell_of

    first = models[0]
    if cell_of(first) not in RNN_CELLS or any(getattr(m, "per_step", False) for m in models):
        return False
    shape = [(n, p.shape, p.dtype, p.device) for n, p in first.named_parameters()]
    return all(m.nonlinearity == first.nonlinearity and
               [(n, p.shape, p.dtype, p.device) for n, p in m.named_parameters()] == shape for m in models)


def stacked_forward(models: list[RecurrentModel], x: torch.Tensor, impl: str = "auto") -> list[torch.Tensor]:
    """``x [N, B, T, I] -> [pred [B, out]] * N`` for N stackable models.

    The time loop runs in the fused C++ engine on the CPU and in the Triton kernel
    (one program per model, fp32-grade ``tf32x3``) on CUDA.
    """
    if x.is_cuda:
        from .triton_rnn import rnn_layer_triton

        def layer(*args, nonlinearity, last_only):
            out = rnn_layer_triton(*args, nonlinearity=nonlinearity)
            return out[:, :, -1] if last_only else out
    else:
        from .fused import rnn_layer

        def layer(*args, nonlinearity, last_only):
            return rnn_layer(*args, nonlinearity=nonlinearity, impl=impl, last_only=last_only)

    first = models[0]
    h = x
    for l in range(first.num_layers):
        w = [torch.stack([getattr(m.rnn, f"{name}_l{l}") for m in models])
             for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        # [N, B, T, H]; the last layer only its last state [N, B, H]
        h = layer(h, *w, nonlinearity=first.nonlinearity, last_only=l == first.num_layers - 1)
    # Each member's own readout on its [B, H] (as alone: one baddbmm for all rounds differently)
    return [m.readout(h[k]) for k, m in enumerate(models)]


def clip_per_member(params: list[list[nn.Parameter]], max_norms: list[float]) -> torch.Tensor:
    """``clip_grad_norm_`` for each member, with the arithmetic of a member trained alone
    (:func:`irnn.engine.update.clip_grad_norm`); returns the norms before clipping, ``[N]``."""
    return torch.stack([update.clip_grad_norm(group, limit) for group, limit in zip(params, max_norms)])


class StackedStep:
    """One optimisation step of N members: shared forward/backward, per-member clip and optimiser.

    Args:
        models, optimizers, clip_norms: one per member (each member's own objects).
        loss_fn: the task's loss, ``loss_fn(pred [B, out], y) -> scalar``.
    """

    def __init__(self, loss_fn, impl: str = "auto"):
        self.loss_fn, self.impl = loss_fn, impl

    def __call__(self, models: list[RecurrentModel], optimizers: list[torch.optim.Optimizer], clip_norms: list[float],
                 x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, B, T, I]``, ``y [N, B, ...]`` -> losses ``[N]`` and pre-clip gradient norms ``[N]``."""
        params = [[p for p in m.parameters() if p.requires_grad] for m in models]
        for group in params:
            for p in group:
                p.grad = None
        preds = stacked_forward(models, x, self.impl)
        losses = torch.stack([self.loss_fn(pred, y[k]) for k, pred in enumerate(preds)])
        losses.sum().backward()  # members are independent: d(sum)/d(theta_k) = d(loss_k)/d(theta_k)
        norms = clip_per_member(params, clip_norms)
        update.adam_steps(optimizers)  # members with equal Adam hyperparameters in one kernel call
        return losses.detach(), norms
