"""Benchmarks (adding, copy, MNIST, and any in irnn.registry): each defines its data, its loss, its metrics and its constant-prediction baseline."""
from __future__ import annotations

import torch

from ..config import Config
from .adding import BASELINE_MSE, generate as generate_adding, make_adding
from .base import Task

__all__ = ["Task", "make_task", "make_adding", "generate_adding", "BASELINE_MSE"]


def make_task(cfg: Config, device: torch.device | str = "cpu") -> Task:
    """Materialise the benchmark a config names (any registered one), with its data on ``device``."""
    from .. import registry

    return registry.resolve(registry.task_spec(cfg.task).build)(cfg, device)
