"""The divergence guard: spot a non-finite or exploding loss so the loop can roll back.

The prototype's users restarted exploding runs by hand; the loop instead rolls
back to the last good checkpoint and lowers the learning rate.
"""
from __future__ import annotations

import math
import statistics


class DivergenceGuard:
    """Flags the first bad step of a chunk.

    A step is bad when its loss or gradient norm is not finite, or when its loss
    exceeds ``factor`` times the median of the last ``window`` accepted losses
    *and* the loss of the best constant prediction (``floor``): a loss still
    below what predicting the mean would give is noise, not an explosion.
    """

    MIN_HISTORY = 10

    def __init__(self, factor: float, window: int, floor: float):
        self.factor, self.window, self.floor = factor, window, floor

    def check(self, recent: list[float], losses: list[float], norms: list[float]) -> tuple[int, str] | None:
        history = list(recent)
        for i, (loss, norm) in enumerate(zip(losses, norms)):
            if not math.isfinite(loss):
                return i, f"non-finite loss ({loss})"
            if not math.isfinite(norm):
                return i, f"non-finite gradient norm ({norm})"
            if len(history) >= self.MIN_HISTORY:
                median = statistics.median(history[-self.window:])
                if loss > max(self.factor * median, self.floor):
                    return i, f"loss {loss:.4g} above {self.factor:g} x recent median {median:.4g}"
            history.append(loss)
        return None

    def accept(self, recent: list[float], losses: list[float]) -> list[float]:
        return (list(recent) + list(losses))[-self.window:]
