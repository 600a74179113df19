"""What every benchmark provides to the trainer: data, loss, metrics and a baseline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import solved_threshold


@dataclass
class Task:
    """A benchmark, fully materialised for one run.

    The trainer only ever calls :meth:`batch` and :meth:`evaluate`, and reads
    ``input_size``/``output_size``/``baseline``; each task decides its data,
    its loss and its metrics.

    Data is a pure function of ``(seed, step)``: that makes resume and
    ensembles exact without saving any data-loader state.
    """

    name: str  # e.g. "adding-150", "mnist", "pmnist"
    input_size: int
    output_size: int
    seq_len: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # metrics_fn(pred, y) -> {"test_loss": ..., "test_mse": ...}; sums, not means (see evaluate)
    metrics_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    primary_metric: str  # e.g. "test_mse" or "test_acc"
    higher_is_better: bool
    baseline: float  # the primary metric of the best constant prediction
    baseline_loss: float  # the loss of the best constant prediction
    train_x: torch.Tensor | None  # [N, T, I] fixed training set, or None when streaming
    train_y: torch.Tensor | None
    test_x: torch.Tensor  # [M, T, I]
    test_y: torch.Tensor
    stream_fn: Callable[[int, torch.Generator, torch.device], tuple[torch.Tensor, torch.Tensor]] | None = None
    extra: dict | None = None  # stored in the run's config.json (e.g. the pmnist permutation seed)
    # a target at every time step: y is [B, T] (or [B, T, out]) and the model reads out every state
    per_step: bool = False
    solved_at: float | None = None  # where a run counts as solved (default: by the primary metric)

    @property
    def solved_threshold(self) -> float:
        return self.solved_at if self.solved_at is not None else solved_threshold(self.primary_metric)

    def to(self, device: torch.device) -> "Task":
        for k in ("train_x", "train_y", "test_x", "test_y"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.to(device))
        return self

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of 0-based ``step``: a reshuffled epoch order, or fresh samples."""
        device = self.test_x.device
        if self.train_x is None:
            g = torch.Generator().manual_seed(_mix(seed, step, 0x5EED))
            return self.stream_fn(batch_size, g, device)
        n = self.train_x.shape[0]
        per_epoch = n // batch_size if n >= batch_size else 1
        epoch, i = divmod(step, per_epoch)
        order = self._epoch_order(epoch, seed, n)
        idx = order[i * batch_size:(i + 1) * batch_size]
        if idx.numel() < batch_size:  # training set smaller than one batch
            idx = order.repeat(batch_size // n + 1)[:batch_size]
        idx = idx.to(device)
        return self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)

    def _epoch_order(self, epoch: int, seed: int, n: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_order_cache", {})
        key = (epoch, seed, n)
        if key not in cache:
            cache.clear()
            g = torch.Generator().manual_seed(_mix(seed, epoch, 0xE90C))
            cache[key] = torch.randperm(n, generator=g)
        return cache[key]

    @torch.no_grad()
    def evaluate(self, forward: Callable[[torch.Tensor], torch.Tensor], eval_batch: int = 2000) -> dict[str, float]:
        """Mean test metrics over the whole test set, in chunks of ``eval_batch``."""
        totals: dict[str, float] = {}
        n = self.test_x.shape[0]
        for s in range(0, n, eval_batch):
            pred = forward(self.test_x[s:s + eval_batch])
            for k, v in self.metrics_fn(pred.double(), self.test_y[s:s + eval_batch]).items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: v / n for k, v in totals.items()}


def _mix(*xs: int) -> int:
    """A stable 63-bit hash of integers, for deriving independent seeds."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
