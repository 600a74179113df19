"""The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015, section 4.1).

Input ``[B, T, 2]``: channel 0 holds values, channel 1 a marker with exactly two
ones. The target ``[B, 1]`` is the sum of the two marked values (or, in the
``hochreiter`` variant, ``0.5 + (X1 + X2) / 4``). Generation is vectorised and
driven by an explicit ``torch.Generator``, so the same seed gives the same data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task, _mix

# MSE of always predicting the target's mean: its variance.
#   anywhere / halves: X1 + X2 with X ~ U[0, 1]       -> 2 * 1/12 = 1/6
#   hochreiter: 0.5 + (X1 + X2) / 4 with X ~ U[-1, 1]  -> 2 * (1/3) / 16 = 1/24
BASELINE_MSE = {"anywhere": 1 / 6, "halves": 1 / 6, "hochreiter": 1 / 24}
BASELINE_MEAN = {"anywhere": 1.0, "halves": 1.0, "hochreiter": 0.5}


def marker_positions(n: int, seq_len: int, variant: str, g: torch.Generator) -> torch.Tensor:
    """Two distinct marker positions per sequence, ``[n, 2]`` (int64), by the variant's rule."""
    if variant == "anywhere":
        lo1, hi1, lo2, hi2 = 0, seq_len, 0, seq_len
    elif variant == "halves":
        half = seq_len // 2
        lo1, hi1, lo2, hi2 = 0, half, half, seq_len
    elif variant == "hochreiter":
        half = seq_len // 2
        lo1, hi1, lo2, hi2 = 0, min(10, half), 0, half
    else:
        raise ValueError(f"unknown adding variant {variant!r}")
    p1 = torch.randint(lo1, hi1, (n,), generator=g)
    if variant == "halves":
        p2 = torch.randint(lo2, hi2, (n,), generator=g)
    else:
        # Uniform over [lo2, hi2) minus {p1}: draw from one fewer slot and skip p1.
        p2 = torch.randint(lo2, hi2 - 1, (n,), generator=g)
        p2 = p2 + (p2 >= p1).long()
    return torch.stack([p1, p2], dim=1)


def generate(n: int, seq_len: int, variant: str = "anywhere", *, generator: torch.Generator,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` adding sequences. Returns ``x [n, T, 2]`` and ``y [n, 1]``."""
    g = generator
    x = torch.zeros(n, seq_len, 2, dtype=dtype)  # [n, T, 2]
    values = x[:, :, 0]
    values.uniform_(-1.0 if variant == "hochreiter" else 0.0, 1.0, generator=g)
    pos = marker_positions(n, seq_len, variant, g)  # [n, 2]
    x[:, :, 1].scatter_(1, pos, 1.0)
    # Sum in float64 so the target is the exact sum of the stored values.
    picked = values.gather(1, pos).double().sum(1, keepdim=True)  # [n, 1]
    y = 0.5 + picked / 4 if variant == "hochreiter" else picked
    return x.to(device=device), y.to(device=device, dtype=dtype)


def _metrics(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    se = float(((pred - y.to(pred.dtype)) ** 2).sum())
    return {"test_loss": se, "test_mse": se}


def make_adding(seq_len: int, variant: str = "anywhere", *, train_size: int = 100_000, test_size: int = 10_000,
                seed: int = 0, stream: bool = False, device: torch.device | str = "cpu") -> Task:
    """The adding task with a fixed (or streamed) training set and a fixed test set."""
    train_x = train_y = None
    if not stream:
        train_x, train_y = generate(train_size, seq_len, variant,
                                    generator=torch.Generator().manual_seed(_mix(seed, 0xADD, 1)), device=device)
    test_x, test_y = generate(test_size, seq_len, variant,
                              generator=torch.Generator().manual_seed(_mix(seed, 0xADD, 2)), device=device)

    def stream_fn(batch_size: int, g: torch.Generator, dev: torch.device):
        return generate(batch_size, seq_len, variant, generator=g, device=dev)

    baseline = BASELINE_MSE[variant]
    return Task(name=f"adding-{seq_len}", input_size=2, output_size=1, seq_len=seq_len,
                loss_fn=F.mse_loss, metrics_fn=_metrics, primary_metric="test_mse", higher_is_better=False,
                baseline=baseline, baseline_loss=baseline, train_x=train_x, train_y=train_y,
                test_x=test_x, test_y=test_y, stream_fn=stream_fn, extra={"variant": variant})


def build(cfg, device: torch.device | str = "cpu") -> Task:
    """The adding task a config names (the registry's builder)."""
    return make_adding(cfg.seq_len, cfg.variant, train_size=cfg.train_size, test_size=cfg.test_size,
                       seed=cfg.seed, stream=cfg.stream, device=device)
