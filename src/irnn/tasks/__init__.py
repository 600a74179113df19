"""Benchmarks: each defines its data, its loss, its metrics and its constant-prediction baseline."""
from __future__ import annotations

import torch

from ..config import Config
from .adding import BASELINE_MSE, generate as generate_adding, make_adding
from .base import Task

__all__ = ["Task", "make_task", "make_adding", "generate_adding", "BASELINE_MSE"]


def make_task(cfg: Config, device: torch.device | str = "cpu") -> Task:
    """Materialise the benchmark a config names, with its data on ``device``."""
    if cfg.task == "adding":
        return make_adding(cfg.seq_len, cfg.variant, train_size=cfg.train_size, test_size=cfg.test_size,
                           seed=cfg.seed, stream=cfg.stream, device=device)
    if cfg.task in ("mnist", "pmnist"):
        from .mnist import make_mnist

        return make_mnist(cfg, device=device)
    raise ValueError(f"unknown task {cfg.task!r}")
