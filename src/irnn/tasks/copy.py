"""The copy-memory task (Hochreiter & Schmidhuber 1997; in the form of Arjovsky et al. 2016, section 4.1).

With K = ``copy_symbols`` (10) and T = ``seq_len``, a sequence has T + 2K steps. The input is K symbols
drawn uniformly from an alphabet of 8, then T - 1 blanks, a delimiter, and K more blanks; the target is
T + K blanks followed by the K symbols: after the delimiter the model must replay what it saw T steps
earlier. Inputs are one-hot over 10 classes (0 blank, 1-8 the symbols, 9 the delimiter), targets are
classes 0-8, and the loss is the cross-entropy averaged over every step of every sequence (the readout is
per time step: the model returns ``[B, T + 2K, 9]``).

The memoryless baseline predicts blanks until the delimiter and then a uniform guess among the 8
symbols: a cross-entropy of ``K log 8 / (T + 2K)`` (Arjovsky et al.'s 10 log 8 / (T + 20)). A run counts
as *solved* once its test cross-entropy is below a tenth of that baseline (``SOLVED_FRACTION``), which
needs most recalled symbols right and confident; ``test_acc`` is the fraction of the K recalled symbols
that the argmax gets right.

Training sequences are drawn fresh at every step (a pure function of seed and step, like the streamed
adding task; at T = 1000 a stored set of 100,000 one-hot sequences would take 4 GB), so ``train_size``
and ``stream`` do not apply; the test set is fixed by the seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Task, _mix

ALPHABET = 8
CLASSES_IN, CLASSES_OUT = ALPHABET + 2, ALPHABET + 1  # + blank (0) and delimiter (9); targets: blank + symbols
DELIMITER = ALPHABET + 1
SOLVED_FRACTION = 0.1


def baseline_ce(seq_len: int, symbols: int = 10) -> float:
    """The cross-entropy of the memoryless strategy: ``K log 8 / (T + 2K)``."""
    return symbols * math.log(ALPHABET) / (seq_len + 2 * symbols)


def generate(n: int, seq_len: int, symbols: int = 10, *, generator: torch.Generator,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` copy sequences: ``x [n, T + 2K, 10]`` one-hot (float32) and ``y [n, T + 2K]`` classes (int64)."""
    if seq_len < 1 or symbols < 1:
        raise ValueError(f"the copy task needs T >= 1 and K >= 1, got T={seq_len}, K={symbols}")
    length = seq_len + 2 * symbols
    data = torch.randint(1, ALPHABET + 1, (n, symbols), generator=generator)
    x_idx = torch.zeros(n, length, dtype=torch.long)
    x_idx[:, :symbols] = data
    x_idx[:, seq_len + symbols - 1] = DELIMITER
    y = torch.zeros(n, length, dtype=torch.long)
    y[:, -symbols:] = data
    x = F.one_hot(x_idx, CLASSES_IN).float()
    return x.to(device), y.to(device)


def _loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))


def make_metrics(symbols: int):
    def metrics(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        # per-sequence mean cross-entropy, summed over the sequences (Task.evaluate divides by their number)
        ce = F.cross_entropy(pred.transpose(1, 2), y, reduction="none").mean(1).sum()
        right = (pred[:, -symbols:].argmax(-1) == y[:, -symbols:]).double().mean(1).sum()
        return {"test_loss": float(ce), "test_ce": float(ce), "test_acc": float(right)}

    return metrics


def make_copy(seq_len: int, symbols: int = 10, *, test_size: int = 1000, seed: int = 0,
              device: torch.device | str = "cpu") -> Task:
    test_x, test_y = generate(test_size, seq_len, symbols,
                              generator=torch.Generator().manual_seed(_mix(seed, 0xC097, 2)), device=device)

    def stream_fn(batch_size: int, g: torch.Generator, dev: torch.device):
        return generate(batch_size, seq_len, symbols, generator=g, device=dev)

    baseline = baseline_ce(seq_len, symbols)
    return Task(name=f"copy-{seq_len}", input_size=CLASSES_IN, output_size=CLASSES_OUT,
                seq_len=seq_len + 2 * symbols, loss_fn=_loss, metrics_fn=make_metrics(symbols),
                primary_metric="test_ce", higher_is_better=False, baseline=baseline, baseline_loss=baseline,
                train_x=None, train_y=None, test_x=test_x, test_y=test_y, stream_fn=stream_fn,
                extra={"copy_symbols": symbols}, per_step=True, solved_at=SOLVED_FRACTION * baseline)


def build(cfg, device: torch.device | str = "cpu") -> Task:
    from .. import registry

    return make_copy(cfg.seq_len, registry.option(cfg, "copy_symbols"), test_size=cfg.test_size, seed=cfg.seed,
                     device=device)
