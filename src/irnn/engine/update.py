"""The update half of a CPU training step, without the per-call Python of the generic torch paths.

Once the fused engine has made forward and backward cheap (~1.5 ms for an IRNN at T=150), the
generic ``clip_grad_norm_``, ``Optimizer.zero_grad`` and ``Adam.step`` cost ~150 us of Python a step
(device grouping, hooks, profiler scopes). These do the same arithmetic with the same kernels, so
results are bitwise those of torch's functions, and fall back to them wherever a case is not covered.
"""
from __future__ import annotations

import torch
from torch import nn


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` for parameters on one device and dtype."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(g.device != grads[0].device or g.dtype != grads[0].dtype or g.is_sparse for g in grads):
        return nn.utils.clip_grad_norm_(params, max_norm)
    with torch.no_grad():  # as clip_grad_norm_: no graph even after backward(create_graph=True)
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        torch._foreach_mul_(grads, torch.clamp(float(max_norm) / (total + 1e-6), max=1.0))
    return total


def _lean_adam_group(optimizer: torch.optim.Optimizer) -> dict | None:
    """The single param group of a plain fused Adam whose state exists, or None (then use ``step()``)."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    # a step() replaced on the instance (an LR scheduler's wrapper, a user's) or AMP's grad scaling: use step()
    if "step" in vars(optimizer) or getattr(optimizer, "grad_scale", None) is not None \
            or getattr(optimizer, "found_inf", None) is not None:
        return None
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return None
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    if _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
        return None
    group = optimizer.param_groups[0]
    if (not group.get("fused") or group["amsgrad"] or group["maximize"] or group["differentiable"]
            or group["capturable"] or group.get("decoupled_weight_decay") or isinstance(group["lr"], torch.Tensor)
            or any(isinstance(b, torch.Tensor) for b in group["betas"])):
        return None
    params = group["params"]
    if any(p.grad is None or p.grad.is_sparse or p.is_complex() or "exp_avg" not in optimizer.state.get(p, ())
           or p.device.type != "cpu" for p in params):
        return None  # the first step initialises the state; params without grads are skipped by step()
    return group


def adam_steps(optimizers: list[torch.optim.Optimizer]) -> None:
    """``opt.step()`` for each optimiser; plain fused CPU Adams with equal hyperparameters in one kernel call.

    The fused kernel updates each tensor independently, so one call over several optimisers' tensors
    gives each exactly what its own ``step()`` would.
    """
    batches: dict[tuple, list[dict]] = {}
    for opt in optimizers:
        group = _lean_adam_group(opt)
        if group is None:
            opt.step()
            continue
        key = (group["lr"], *group["betas"], group["weight_decay"], group["eps"])
        batches.setdefault(key, []).append((opt, group))
    for (lr, beta1, beta2, weight_decay, eps), members in batches.items():
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for opt, group in members:
            for p in group["params"]:
                state = opt.state[p]
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1,
                               beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None,
                               found_inf=None)
