"""Optimisers by name, configured from a Config."""
from __future__ import annotations

from typing import Iterable

import torch

from ..config import Config


def make_optimizer(cfg: Config, params: Iterable[torch.nn.Parameter], *, capturable: bool = False) -> torch.optim.Optimizer:
    """SGD (optional momentum), Adam or RMSprop.

    With ``capturable=True`` (CUDA-graph engine) the learning rate is a device
    tensor so that it can change between graph replays without recapture.
    """
    params = list(params)
    lr = torch.tensor(cfg.lr, device=params[0].device) if capturable else cfg.lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        if not capturable and params[0].device.type == "cpu":
            try:  # the fused CPU kernel (torch >= 2.4) halves the optimiser's share of a fused-engine step
                return torch.optim.Adam(params, lr=lr, fused=True)
            except (RuntimeError, TypeError):
                pass
        return torch.optim.Adam(params, lr=lr, capturable=capturable)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=cfg.momentum, capturable=capturable)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def constrain_after_each_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A model's own constraint (``model.constrain_()``, e.g. IndRNN's bound on |u|), applied after every
    step of ``optimizer``; a model without one is left alone."""
    constrain = getattr(model, "constrain_", None)
    if callable(constrain):
        optimizer.register_step_post_hook(lambda *_: constrain())
