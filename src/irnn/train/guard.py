"""The divergence guard: tell a transient loss spike from a run that is really diverging.

One batch's loss is no evidence: an adding-problem run at T=150 throws losses of
300-2000 on single batches and goes on to solve the task. So a spike (a loss
above ``factor`` x the median of the recent losses, and above the loss of the
best constant prediction) only opens a *watch* over the next ``window`` steps.
The run is diverging when more than half of the watched steps stay above
``sqrt(factor)`` x that median (and that loss floor), or when any loss or
gradient norm is not finite; otherwise the spike is *absorbed*: counted, logged,
and training goes on untouched, exactly as without the guard. What the loop does
about a diverging run (roll back, skip the batches, lower the lr) is in
:mod:`irnn.train.loop`.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Scan:
    """What the guard saw in one chunk of steps (indices are positions in the chunk).

    ``bad``: ``(index, reason, finite)`` of the step that shows divergence, or None (then the
    loop throws the chunk away and the rest of the scan does not matter).
    ``closed``: ``(index, watch)`` for each watch that ended without a rollback, its ``outcome``
    ``absorbed`` or ``continued``.
    ``recent``/``watch``: the guard state after the chunk.
    """

    recent: list[float]
    watch: dict[str, Any] | None
    closed: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    bad: tuple[int, str, bool] | None = None


class DivergenceGuard:
    """Scans the losses and gradient norms of each chunk before the loop accepts it.

    Args:
        factor: a loss above ``factor`` x the recent median is a spike and opens a watch.
        window: steps in the recent-median window, and the length of a watch.
        floor: the loss of the best constant prediction; a loss below it is never a spike
            nor counted as high: it is still better than having learnt nothing.
    """

    MIN_HISTORY = 10

    def __init__(self, factor: float, window: int, floor: float):
        self.factor, self.window, self.floor = factor, window, floor

    def scan(self, recent: list[float], watch: dict[str, Any] | None, first_step: int, losses: list[float],
             norms: list[float], *, tolerate: bool = False, final: bool = False) -> Scan:
        """Scan one chunk whose first step is ``first_step``.

        ``tolerate``: a watch that shows sustained high loss closes as ``continued`` instead
        of reporting ``bad`` (the loop's retries for this incident are spent); non-finite
        values are ``bad`` regardless. ``final``: the chunk ends the run, so an open watch is
        judged on the steps it saw.
        """
        history = list(recent)
        watch = dict(watch) if watch is not None else None
        out = Scan(recent=list(recent), watch=watch)
        for i, (loss, norm) in enumerate(zip(losses, norms)):
            if not math.isfinite(loss):
                out.bad = (i, f"non-finite loss ({loss})", False)
                return out
            if not math.isfinite(norm):
                out.bad = (i, f"non-finite gradient norm ({norm})", False)
                return out
            if watch is None and len(history) >= self.MIN_HISTORY:
                median = statistics.median(history[-self.window:])
                if loss > max(self.factor * median, self.floor):
                    watch = {"step": first_step + i, "loss": loss, "median": median,
                             "high": max(math.sqrt(self.factor) * median, self.floor), "seen": 0, "above": 0}
            if watch is not None:
                watch["seen"] += 1
                watch["above"] += loss > watch["high"]
                verdict = self._verdict(watch, final and i == len(losses) - 1)
                if verdict == "diverging" and not tolerate:
                    out.bad = (i, self.describe(watch), True)
                    return out
                if verdict is not None:
                    out.closed.append((i, {**watch, "outcome": "absorbed" if verdict == "absorbed" else "continued"}))
                    watch = None
            history.append(loss)
        out.recent, out.watch = history[-self.window:], watch
        return out

    def _verdict(self, watch: dict[str, Any], last: bool) -> str | None:
        """diverging / absorbed once the watch's evidence decides it, else None (keep watching)."""
        above, seen = watch["above"], watch["seen"]
        if above > self.window / 2 or (last and above > seen / 2):
            return "diverging"
        if seen - above >= self.window - self.window // 2 or last:  # more than half can no longer be high
            return "absorbed"
        return None

    def describe(self, watch: dict[str, Any]) -> str:
        return (f"loss stayed above {watch['high']:.4g} for {watch['above']} of {watch['seen']} steps after a spike "
                f"to {watch['loss']:.4g} at step {watch['step']} ({self.factor:g} x recent median {watch['median']:.4g})")
