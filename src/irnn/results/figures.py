"""Figures (matplotlib, Agg): each written as PNG and SVG.

* :func:`paper_grid`: Le et al. Figure 2 (or 3) — the test metric against steps, one panel
  per task and sequence length, one line per model (mean over seeds) with a min–max band,
  the constant-prediction baseline, the solved threshold and the paper's figures drawn.
* :func:`loss_per_epoch`: the prototype's "validation loss per epoch" plot, one line per
  ``<model>-<T>`` label (``irnn-150``, ``irnn-200``, ...).
* :func:`overfit_check`: train and test loss against step for one run.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional, Sequence

from ..runs.store import write_error
from .aggregate import MODEL_NAMES, Member, SettingStats, panel_title

def model_color(model: str, default=None):
    """A model's colour from its registry entry (``default``, None: matplotlib's next colour)."""
    from .. import registry

    return registry.model_color(model) or default
# The two baselines often lie on top of each other at the plateau: draw the ReLU RNN wide and the tanh RNN thin.
WIDTHS = {"rnn-relu": 3.2, "rnn-tanh": 1.3}
METRIC_LABELS = {"test_mse": "test MSE", "test_acc": "test accuracy", "test_ce": "test cross-entropy"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "svg"):
            p = out_dir / f"{stem}.{ext}"
            tmp = out_dir / f".{stem}.tmp.{ext}"
            try:
                fig.savefig(tmp, dpi=130, bbox_inches="tight", format=ext)
                tmp.replace(p)
            except OSError as e:  # a full disk, say: the old figure stays, no half-written one is left
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                raise write_error(e, p) from None
            paths.append(p)
    except OSError as e:
        raise write_error(e, out_dir) from None
    finally:
        _plt().close(fig)
    return paths


def _curve_band(members: Sequence[Member], attr: str = "evals") -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max over seeds at every step that any seed evaluated. A seed that stopped once
    solved (``stop_when_solved``) keeps its last value to the end, so the mean stays a mean over all
    seeds; seeds that stopped for other reasons (diverged, unfinished) drop out of later steps."""
    by_step: dict[int, list[float]] = {}
    for m in members:
        for step, v in getattr(m, attr):
            if isinstance(v, float) and math.isfinite(v):
                by_step.setdefault(step, []).append(v)
    last = max(by_step, default=0)
    for m in members:
        points = [(step, v) for step, v in getattr(m, attr) if isinstance(v, float) and math.isfinite(v)]
        if m.summary.get("stopped_early") and points:
            end, value = points[-1]
            for step in sorted(by_step):
                if end < step <= last:
                    by_step[step].append(value)
    steps = sorted(by_step)
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    lo = [min(by_step[s]) for s in steps]
    hi = [max(by_step[s]) for s in steps]
    return [float(s) for s in steps], mean, lo, hi


def _constant(member: Optional[Member]) -> str:
    """What the dashed baseline line of a loss plot is."""
    return "predict the class frequencies" if member is not None and member.higher_is_better else "predict the mean"


def _use_log(values: Sequence[float], metric: str) -> bool:
    pos = [v for v in values if v > 0]
    return metric != "test_acc" and bool(pos) and max(pos) / min(pos) > 20


def paper_grid(cells: Sequence[SettingStats], out_dir: str | Path, *, stem: str = "fig_paper_grid",
               title: Optional[str] = None,
               references: Optional[dict[str, Sequence[tuple[str, float]]]] = None) -> list[Path]:
    """Le et al. Figure 2 (or 3): one panel per task and sequence length, one line per model (its chosen setting).

    Args:
        cells: one :class:`SettingStats` per (task, length, model), e.g. from ``best_settings``.
        references: per task, ``(model, value)`` pairs the paper reports, drawn as dotted lines in the model's colour.
    """
    plt = _plt()
    panels = sorted({(c.task, c.seq_len) for c in cells}, key=lambda p: (p[0] != "adding", p[0], p[1]))
    if not panels:
        raise ValueError("no runs to plot")
    n = len(panels)
    ncols = min(n, 2) if n == 4 else min(n, 3)
    nrows = math.ceil(n / ncols)
    size = (8.0, 5.2) if n == 1 else (5.2 * ncols, 3.9 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    metrics = []
    for ax, (task, T) in zip(axes.flat, panels):
        row = [c for c in cells if (c.task, c.seq_len) == (task, T)]
        metric = row[0].first.primary_metric  # each panel its own: a benchmark mixes MSE, cross-entropy, accuracy
        metrics.append(metric)
        name = METRIC_LABELS.get(metric, metric.replace("_", " "))
        # one scale for the panels of one metric (the lengths of Figure 2 side by side)
        vals = [v for c in cells if c.first.primary_metric == metric for m in c.members for _, v in m.evals
                if isinstance(v, float) and math.isfinite(v)]
        baseline = next((c.baseline for c in row if c.baseline is not None), None)
        for c in row:
            steps, mean, lo, hi = _curve_band(c.members)
            if not steps:
                continue
            color = model_color(c.model)
            ax.plot(steps, mean, color=color, lw=WIDTHS.get(c.model, 1.8),
                    label=f"{MODEL_NAMES.get(c.model, c.model)} ({len(c.members)} seeds)")
            if len(c.members) > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)
                for m in c.members:  # each seed, thin: a mean over seeds hides when each one left the plateau
                    pts = [(st, v) for st, v in m.evals if math.isfinite(v)]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=0.6, alpha=0.45)
        for model, value in (references or {}).get(task, ()):
            ax.axhline(value, color=model_color(model, "0.2"), ls=(0, (1, 2)), lw=1.4,
                       label=f"Le et al.: {MODEL_NAMES.get(model, model)} {value:.0%}")
        if baseline is not None:
            what = {"test_acc": "most frequent class", "test_ce": "memoryless"}.get(metric, "predict the mean")
            ax.axhline(baseline, color="0.35", ls="--", lw=1.1, label=f"{what} ({baseline:.3g})")
        if metric != "test_acc":
            thr = row[0].threshold
            short = {"test_mse": "MSE", "test_ce": "CE"}.get(metric, name)
            ax.axhline(thr, color="0.6", ls=":", lw=1.0, label=f"solved: {short} < {thr:.3g}")
        else:
            ax.set_ylim(0, 1)
        if _use_log(vals, metric):
            ax.set_yscale("log")
        ax.set_title(panel_title(task, T))
        ax.set_xlabel("training steps")
        ax.set_ylabel(name)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    # one legend for all panels, below them
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            key = label.split(" (")[0] if not label.startswith(("predict", "solved", "most", "Le et al.")) else label
            handles.setdefault(key, (h, label))
    what = ("Test accuracy" if metrics[0] == "test_acc" else "Test MSE") if len(set(metrics)) == 1 else "Test metric"
    fig.suptitle(title or f"{what} against training steps\n(thick: mean over seeds; thin: each seed; band: min–max)",
                 fontsize=11)
    legend_rows = math.ceil(len(handles) / 3)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.08) / size[1], 1, 1))
    fig.legend([h for h, _ in handles.values()], [lab for _, lab in handles.values()], loc="lower center",
               ncol=min(len(handles), 3), fontsize=9, frameon=False)
    return _save(fig, Path(out_dir), stem)


def loss_per_epoch(groups: Sequence[Sequence[Member]], out_dir: str | Path, *, stem: str = "fig_loss_per_epoch",
                   title: Optional[str] = None) -> list[Path]:
    """The prototype's plot: test ("validation") loss against epochs, one line per run label.

    An epoch is ``train_size / batch_size`` steps; several seeds of one label are averaged.

    Args:
        groups: members grouped by label (each group drawn as one line, mean over seeds).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    vals = []
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
    groups = [g for g in groups if g]
    groups = sorted(groups, key=lambda g: (g[0].model, g[0].seq_len))
    for i, g in enumerate(groups):
        per_epoch = g[0].steps_per_epoch
        steps, mean, lo, hi = _curve_band(g, "test_loss")
        if not steps:
            continue
        epochs = [s / per_epoch for s in steps]
        vals += mean
        color = palette[i % len(palette)] if len({m.model for gg in groups for m in gg}) == 1 \
            else model_color(g[0].model)
        ax.plot(epochs, mean, lw=1.8, color=color, label=g[0].label + (f" (mean of {len(g)} seeds; thin: each)" if len(g) > 1 else ""))
        if len(g) > 1:
            for m in g:
                pts = [(st / per_epoch, v) for st, v in m.test_loss if math.isfinite(v)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.6, alpha=0.45, color=color)
                vals += [p[1] for p in pts]
    base = next((m.summary.get("baseline_loss") for g in groups for m in g if m.summary.get("baseline_loss")), None)
    if isinstance(base, (int, float)):
        ax.axhline(base, color="0.35", ls="--", lw=1.1, label=f"{_constant(groups[0][0] if groups else None)} ({base:.3g})")
    if _use_log(vals, "test_loss"):
        ax.set_yscale("log")
    ax.set_xlabel("epoch (passes over the training set)")
    ax.set_ylabel("validation (test) loss")
    ax.set_title(title or "Validation loss per epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(out_dir), stem)


def overfit_check(member: Member, out_dir: str | Path, *, stem: str = "fig_overfit_check") -> list[Path]:
    """Train loss (mean over each logging window) and test loss against step for one run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    tr = [(s, v) for s, v in member.train_loss if math.isfinite(v)]
    te = [(s, v) for s, v in member.test_loss if math.isfinite(v)]
    if tr:
        ax.plot([s for s, _ in tr], [v for _, v in tr], color="#1f77b4", lw=1.2, alpha=0.9, label="train loss")
    if te:
        ax.plot([s for s, _ in te], [v for _, v in te], color="#d62728", lw=1.8, marker="o", ms=2.5, label="test loss")
    base = member.summary.get("baseline_loss")
    if isinstance(base, (int, float)):
        ax.axhline(base, color="0.35", ls="--", lw=1.1, label=f"{_constant(member)} ({base:.3g})")
    if _use_log([v for _, v in tr + te], "test_loss"):
        ax.set_yscale("log")
    if isinstance(base, (int, float)) and tr and max(v for _, v in tr) > 3 * base:
        # the first logging window can hold a huge loss: keep the interesting range readable
        top = max([3 * base] + [v for _, v in te if v < 10 * base])
        ax.set_ylim(top=top * 1.3)
        ax.text(0.5, 0.99, "(train loss above the top edge clipped)", transform=ax.transAxes, ha="center",
                va="top", fontsize=7, color="0.4")
    ax.set_xlabel("training steps")
    ax.set_ylabel("loss (MSE)" if member.primary_metric == "test_mse" else "loss")
    ax.set_title(f"Overfitting check: {member.label}, seed {member.seed} ({member.name})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(out_dir), stem)


def run_figures(member: Member, out_dir: str | Path) -> list[Path]:
    """One run's figures (``irnn plot RUN`` and the trackers' end of run): the loss per epoch, if it has
    evaluations, and the overfitting check; PNG and SVG each."""
    written = loss_per_epoch([[member]], out_dir) if member.evals else []
    return written + overfit_check(member, out_dir)
