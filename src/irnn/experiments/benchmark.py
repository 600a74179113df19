"""``irnn benchmark``: the IRNN and its successors ranked on the standard long-memory tasks.

Every model trains every task with the same budget: the same steps, batch, learning rate,
seeds, hidden size and divergence guard (on), so that a row of the leaderboard differs from
the next only in the model. The tasks are the adding problem (Le et al. 2015), the copy-memory
task (Arjovsky et al. 2016) and pixel-by-pixel MNIST (the 5,000-image sample offline; all of
MNIST, and the permuted task, in ``--budget full``). The output is one sweep folder with:

* ``leaderboard.md`` / ``leaderboard.csv``: per task, each model's rank, seeds solved, steps to
  solve, final metric, milliseconds per training step and the guard's rollbacks, and an overall
  rank (the mean of the task ranks);
* ``figures/fig_benchmark.png``: the test metric against steps, one panel per task;
* ``report.md``: the budget, the leaderboard, the figure, and published results beside ours.

A model from outside the package joins with ``IRNN_PLUGINS=mymodel.py irnn benchmark --models
irnn,lstm,my-rnn`` (see :mod:`irnn.registry`).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import registry
from ..config import ENV_KEYS, ConfigError, subset
from ..results.aggregate import (MODEL_NAMES, SettingStats, best_settings, collect, make_table, panel_title,
                                 settings, write_tables)
from .sweep import SweepSpec, create, open_sweep, train_sweep

BUDGETS = ("quick", "full")
# Every model registered by the package, in its order (a plugin's joins through --models).
MODELS = ("irnn", "rnn-relu", "rnn-tanh", "lstm", "gru", "np-rnn", "rnn-orth", "exprnn", "indrnn", "chrono-lstm")


@dataclass
class TaskBudget:
    """One task of the benchmark and the budget every model gets on it."""

    task: str
    seq_len: int  # T of adding and copy (MNIST sets its own)
    steps: int
    lr: float
    eval_every: int
    config: dict[str, Any] = field(default_factory=dict)  # the task's own config values (data source, sizes)

    @property
    def key(self) -> str:
        """The task's name in ``--tasks``: ``adding``, ``copy``, ``mnist``, ``pmnist``."""
        return self.task


@dataclass
class Budget:
    tasks: tuple[TaskBudget, ...]
    seeds: tuple[int, ...]
    models: tuple[str, ...] = MODELS
    batch_size: int = 32
    hidden_size: int = 100
    workers: int = 2
    threads: int = 1
    notes: tuple[str, ...] = ()


# The quick budget, sized on the 2-core AMD EPYC of 2026-12-05 (running at about 1/6 of its usual matmul
# speed, 21 GFLOP/s one thread): one training step of all ten models together costs about 160 ms on copy
# T=50 (benchmarks/bench_models.py), a similar amount on adding T=100, and several times that at MNIST's
# 784 steps, so two seeds of 2,000 / 2,000 / 300 steps fill two cores for under 30 minutes (the README
# gives the measured wall time).
QUICK_ADDING = TaskBudget("adding", 100, 2_000, 1e-3, 250, {"train_size": 100_000, "test_size": 1_000})
QUICK_COPY = TaskBudget("copy", 50, 2_000, 1e-3, 250, {"test_size": 1_000})
QUICK_MNIST = TaskBudget("mnist", 784, 300, 1e-3, 100, {"data_source": "sample5k", "input_std": 1.0,
                                                         "train_size": 60_000, "test_size": 10_000})


def _quick() -> Budget:
    return Budget(tasks=(QUICK_ADDING, QUICK_COPY, QUICK_MNIST), seeds=(0, 1))


def _full() -> Budget:
    # Meant for a GPU or a Ray cluster: the adding problem at the paper's longest length, the copy task at
    # the length of nnRNN_release's figures, and both MNIST tasks on all of MNIST (about 50 epochs).
    mnist = {"data_source": "idx", "input_std": 1.0, "train_size": 60_000, "test_size": 10_000}
    return Budget(tasks=(TaskBudget("adding", 400, 100_000, 5e-4, 1_000, {"train_size": 100_000,
                                                                            "test_size": 10_000}),
                         TaskBudget("copy", 200, 30_000, 1e-3, 500, {"test_size": 10_000}),
                         TaskBudget("mnist", 784, 100_000, 1e-3, 5_000, dict(mnist)),
                         TaskBudget("pmnist", 784, 100_000, 1e-3, 5_000, dict(mnist))),
                  seeds=(0, 1, 2, 3, 4), workers=1, threads=0)


def budget_for(budget: str) -> Budget:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of: {', '.join(BUDGETS)}")
    return _quick() if budget == "quick" else _full()


def benchmark_spec(budget: str = "quick", *, name: Optional[str] = None, models: Optional[Sequence[str]] = None,
                   tasks: Optional[Sequence[str]] = None, seeds: Optional[int] = None, steps: Optional[int] = None,
                   data_dir: Optional[str] = None, download: bool = False,
                   env: Optional[dict[str, Any]] = None) -> tuple[SweepSpec, dict[str, Any]]:
    """The benchmark's sweep (one grid table per task and model) and its metadata.

    Args:
        models: any registered models (default: the package's ten); a plugin's model is allowed.
        tasks: some of the budget's tasks (quick: adding, copy, mnist; full: also pmnist).
        seeds / steps: override the budget's (every task gets ``steps``; the report says so).
        data_dir / download: where the MNIST IDX files are (the full budget reads all of MNIST).
    """
    b = budget_for(budget)
    custom: list[str] = []
    if models is not None:
        b.models = subset("--models", models, registry.model_names())
        custom.append(f"models {', '.join(b.models)} (chosen with --models)")
    if tasks is not None:
        chosen = subset("--tasks", tasks, tuple(t.key for t in b.tasks))
        b.tasks = tuple(t for t in b.tasks if t.key in chosen)
        custom.append(f"tasks {', '.join(chosen)} (chosen with --tasks)")
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        b.seeds = tuple(range(seeds))
        custom.append(f"{seeds} seed{'s' if seeds > 1 else ''} (chosen with --seeds)")
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        b.tasks = tuple(TaskBudget(t.task, t.seq_len, steps, t.lr, min(t.eval_every, max(steps // 4, 1)), t.config)
                        for t in b.tasks)
        custom.append(f"{steps:,} steps per run on every task (chosen with --steps)")
    reads_idx = any(t.config.get("data_source") == "idx" for t in b.tasks)
    if reads_idx and data_dir is None:
        raise ConfigError("--budget full reads all of MNIST: give --data-dir, the folder holding the IDX files "
                          "(add --download to fetch them there), or leave MNIST out with --tasks adding,copy")
    if data_dir is not None and not reads_idx:
        raise ConfigError("--data-dir is for --budget full's MNIST tasks; this budget reads the offline sample")
    base: dict[str, Any] = {"hidden_size": b.hidden_size, "batch_size": b.batch_size, "optimizer": "adam",
                            "clip_norm": 1.0, "init_scale": 1.0, "guard": True, "quiet": True,
                            "log_every": 50}
    if b.threads:
        base["threads"] = b.threads
    if reads_idx:
        base["data_dir"] = str(data_dir)
        if download:
            base["download"] = True
    base.update({k: v for k, v in (env or {}).items() if k in ENV_KEYS})
    grid: list[dict[str, list[Any]]] = []
    for t in b.tasks:
        for model in b.models:
            table: dict[str, list[Any]] = {"task": [t.task], "model": [model], "seed": list(b.seeds),
                                           "steps": [t.steps], "lr": [t.lr], "eval_every": [t.eval_every]}
            if t.task in ("adding", "copy"):
                table["seq_len"] = [t.seq_len]
            table.update({k: [v] for k, v in t.config.items()})  # the task's own values (none is in base)
            grid.append(table)
    spec = SweepSpec(name=name or f"benchmark-{budget}", base=base, grid=grid,
                     description=f"irnn benchmark, budget {budget}: {len(b.models)} models x "
                                 f"{len(b.tasks)} tasks x {len(b.seeds)} seeds")
    description = [
        f"Models: {', '.join(MODEL_NAMES[m] for m in b.models)}; each as its paper initialises and constrains it "
        f"(see the README's \"Beyond the paper\"), {b.hidden_size} hidden units, one layer.",
        f"One setting for every model on a task: Adam, gradient clipping 1, batch {b.batch_size}, the divergence "
        f"guard on; seeds {', '.join(map(str, b.seeds))}.",
    ] + [f"{_task_text(t)}: {t.steps:,} steps, lr {t.lr:g}, test metric every {t.eval_every:,} steps; "
         f"{_solved_text(t)}." for t in b.tasks]
    meta = {"study": "benchmark", "budget": budget, "full_budget": budget == "full" and not custom,
            "description": description, "reductions": (_reductions(b) if budget != "full" else []) + custom,
            "workers": b.workers, "tasks": [t.key for t in b.tasks], "models": list(b.models)}
    return spec, meta


def _task_text(t: TaskBudget) -> str:
    if t.task == "adding":
        return f"Adding problem, T = {t.seq_len} ({t.config.get('train_size', 100_000):,} training sequences)"
    if t.task == "copy":
        return f"Copy memory, T = {t.seq_len} (10 symbols from 8, {t.seq_len + 20} steps)"
    source = {"sample5k": "the 5,000-image MNIST sample (4,000 training, 1,000 test)",
              "idx": "all of MNIST", "digits": "scikit-learn's 8x8 digits"}.get(t.config.get("data_source"), "MNIST")
    what = "Permuted pixel MNIST" if t.task == "pmnist" else "Pixel-by-pixel MNIST"
    return f"{what} on {source}"


def _solved_text(t: TaskBudget) -> str:
    if t.task == "adding":
        return "solved: test MSE < 0.01 (predicting the mean: 0.167)"
    if t.task == "copy":
        from ..tasks.copy import SOLVED_FRACTION, baseline_ce

        base = baseline_ce(t.seq_len)
        return (f"solved: test cross-entropy < {SOLVED_FRACTION:g} x the memoryless baseline 10 log 8 / (T + 20) "
                f"= {base:.4f}")
    return "solved: test accuracy > 0.9 (the most frequent class: about 0.1)"


def _reductions(b: Budget) -> list[str]:
    f = _full()
    out = [f"{len(b.seeds)} seeds (full: {len(f.seeds)})"]
    full = {t.key: t for t in f.tasks}
    for t in b.tasks:
        g = full.get(t.key)
        if g is None:
            continue
        if t.task in ("adding", "copy") and t.seq_len != g.seq_len:
            out.append(f"{t.task}: T = {t.seq_len} (full: {g.seq_len}), {t.steps:,} steps (full: {g.steps:,})")
        elif t.steps != g.steps:
            out.append(f"{t.task}: {t.steps:,} steps (full: {g.steps:,})")
        if t.config.get("data_source") != g.config.get("data_source"):
            out.append(f"{t.task}: {_task_text(t).split(' on ', 1)[-1]} instead of all of MNIST")
    missing = [k for k in full if k not in {t.key for t in b.tasks}]
    if missing:
        out.append(f"tasks {', '.join(missing)} left out (full runs them)")
    return out


# -- the leaderboard -----------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One model on one task: its seeds reduced to the leaderboard's numbers."""

    cell: SettingStats
    rank: int = 0

    @property
    def solved(self) -> int:
        return self.cell.n_solved

    @property
    def median_steps(self) -> Optional[float]:
        s = self.cell.solved_steps
        return statistics.median(s) if s else None

    @property
    def ms_per_step(self) -> Optional[float]:
        """The median over seeds of training time per step (evaluation excluded)."""
        vals = [m.wall_time_s / m.steps_done * 1e3 for m in self.cell.members if m.wall_time_s and m.steps_done]
        return statistics.median(vals) if vals else None

    def sort_key(self) -> tuple:
        """More seeds solved, then a lower median of steps to solve (an unsolved seed counts as never),
        then a better mean final metric (a seed without one as the worst)."""
        c = self.cell
        steps = sorted(m.steps_to_threshold() if m.steps_to_threshold() is not None else math.inf for m in c.members)
        fm, _ = c.final
        final = math.inf if fm is None else (-fm if c.first.higher_is_better else fm)
        return (-self.solved, statistics.median(steps) if steps else math.inf, final)


def leaderboard(cells: Sequence[SettingStats]) -> dict[str, list[Entry]]:
    """Per task (``adding-100``, ``copy-50``, ``mnist``), the models ranked best first (ties share a rank)."""
    boards: dict[str, list[Entry]] = {}
    for c in cells:
        boards.setdefault(_task_id(c), []).append(Entry(c))
    for entries in boards.values():
        entries.sort(key=lambda e: e.sort_key())
        for i, e in enumerate(entries):
            e.rank = entries[i - 1].rank if i and e.sort_key() == entries[i - 1].sort_key() else i + 1
    return boards


def overall(boards: dict[str, list[Entry]]) -> list[tuple[str, float, int]]:
    """(model, mean rank over the tasks it ran, tasks), best first."""
    ranks: dict[str, list[int]] = {}
    for entries in boards.values():
        for e in entries:
            ranks.setdefault(e.cell.model, []).append(e.rank)
    rows = [(m, sum(r) / len(r), len(r)) for m, r in ranks.items()]
    return sorted(rows, key=lambda r: (-r[2], r[1], r[0]))


def _task_id(c: SettingStats) -> str:
    return f"{c.task}-{c.seq_len}" if registry.task_spec(c.task).by_length else c.task


def _metric_name(metric: str) -> str:
    return {"test_mse": "test MSE", "test_ce": "test cross-entropy", "test_acc": "test accuracy"}.get(
        metric, metric.replace("_", " "))


def _fmt(v: Optional[float], metric: str) -> str:
    if v is None:
        return "—"
    return f"{v:.1%}" if metric == "test_acc" else f"{v:.3g}"


def leaderboard_markdown(boards: dict[str, list[Entry]]) -> str:
    lines: list[str] = []
    if len(boards) > 1:
        lines += ["**Overall** (mean of the ranks on each task; lower is better)", "",
                  "| rank | model | mean rank | tasks |", "|---|---|---|---|"]
        for i, (m, r, n) in enumerate(overall(boards), 1):
            lines.append(f"| {i} | {MODEL_NAMES[m]} | {r:.2f} | {n} |")
        lines.append("")
    for task_id, entries in boards.items():
        first = entries[0].cell
        metric = first.first.primary_metric
        rel = ">" if first.first.higher_is_better else "<"
        base = first.baseline
        lines += [f"**{panel_title(first.task, first.seq_len)}**: solved = {_metric_name(metric)} {rel} "
                  f"{first.threshold:.3g}" + (f"; constant baseline {_fmt(base, metric)}" if base is not None else ""),
                  "", f"| rank | model | solved | median steps to solve | final {_metric_name(metric)} | "
                  f"best | ms / step | guard rollbacks | diverged |", "|---|---|---|---|---|---|---|---|---|"]
        for e in entries:
            c = e.cell
            fm, fs = c.final
            final = _fmt(fm, metric) + (f" ± {_fmt(fs, metric)}" if fs is not None and len(c.finished) > 1 else "")
            steps = f"{e.median_steps:,.0f}" if e.median_steps is not None else f"— (budget {c.budget:,})"
            pending = c.n - len(c.finished) - c.states.get("failed", 0)
            notes = "".join(f", {k} {v}" for k, v in (("failed", c.states.get("failed", 0)),
                                                       ("unfinished", pending)) if v)
            ms = f"{e.ms_per_step:.1f}" if e.ms_per_step is not None else "—"
            lines.append(f"| {e.rank} | {MODEL_NAMES[c.model]} | {c.n_solved}/{c.n}{notes} | {steps} | {final} | "
                         f"{_fmt(c.best[0], metric)} | {ms} | {c.guard_text()} | {c.states.get('diverged', 0)} |")
        lines.append("")
    return "\n".join(lines)


def leaderboard_csv(boards: dict[str, list[Entry]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "rank", "model", "seeds", "solved", "median_steps_to_solve", "final_mean", "final_std",
                "best_mean", "ms_per_step", "guard_rollbacks", "diverged", "metric", "threshold", "baseline"])
    for task_id, entries in boards.items():
        for e in entries:
            c = e.cell
            fm, fs = c.final
            w.writerow([task_id, e.rank, c.model, c.n, c.n_solved, _blank(e.median_steps), _blank(fm), _blank(fs),
                        _blank(c.best[0]), _blank(e.ms_per_step), c.guard_rollbacks, c.states.get("diverged", 0),
                        c.first.primary_metric, c.threshold, _blank(c.baseline)])
    return buf.getvalue()


def _blank(v: Any) -> Any:
    return "" if v is None else v


# -- published results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    model: str
    task: str  # adding, copy, mnist, pmnist
    setting: str  # their length, width, budget
    result: str
    source: str


_UTEX = "Arjovsky, Shah & Bengio 2016, the uRNN paper (authors' LaTeX, amarshah/complex_RNN paper/uRNN/uRNN.tex)"
PUBLISHED: tuple[Published, ...] = (
    Published("irnn", "mnist", "100 units, SGD, about 1M steps", "97%", "Le, Jaitly & Hinton 2015, section 4.2"),
    Published("irnn", "pmnist", "100 units, SGD, about 1M steps", "82%", "Le, Jaitly & Hinton 2015, section 4.2"),
    Published("irnn", "adding", "128 units, T = 100 to 750", "did not beat the 0.167 baseline at any T", _UTEX),
    Published("rnn-tanh", "adding", "128 units, T = 100 to 750", "did not beat the 0.167 baseline at any T", _UTEX),
    Published("lstm", "adding", "128 units, T = 100 to 750", "beat the baseline up to T = 400", _UTEX),
    Published("lstm", "copy", "128 units, T = 100 to 500", "beat the memoryless baseline only at T = 100", _UTEX),
    Published("lstm", "mnist", "128 units, RMSprop", "98.2%", _UTEX),
    Published("lstm", "pmnist", "128 units, RMSprop", "88%", _UTEX),
    Published("exprnn", "mnist", "512 units", "98.7%", "Lezcano-Casado & Martinez-Rubio 2019, Table 2 (as "
              "tabulated in the asRNN README, ndminhkhoi46/asRNN, and the S4 paper's Table 12)"),
    Published("exprnn", "pmnist", "512 units", "96.6%", "Lezcano-Casado & Martinez-Rubio 2019, Table 2 (as above)"),
    Published("indrnn", "mnist", "6 layers of 128", "99.04% (one run's log)", "Sunnydreamrain/IndRNN_pytorch "
              "pixelMNIST/result/9904_plain_logindrnn_6layers_128_*.log (Li et al. 2018 report 99.0%)"),
    Published("indrnn", "pmnist", "6 layers of 128", "95.64% (one run's log)", "Sunnydreamrain/IndRNN_pytorch "
              "pixelMNIST/result/9563_plain_permutelogindrnn_*.log (Li et al. 2018 report 96.0%)"),
    Published("indrnn", "adding", "T up to 5,000", "processes sequences of over 5,000 steps",
              "Li et al. 2018, abstract; Sunnydreamrain/IndRNN_pytorch README"),
)
# Searched and not found as text (2026-12-05): np-RNN's and chrono-LSTM's numbers, Henaff et al.'s orthogonal
# RNN's, and any final copy-task cross-entropy (nnRNN_release shows its copy T=200 results as images only).
UNPUBLISHED_NOTE = ("No text number was found for np-RNN, the chrono-LSTM, the orthogonal-init RNN or any model's "
                    "final copy-task cross-entropy (nnRNN_release draws its copy T=200 results as images only); "
                    "those rows are missing rather than guessed.")


def published_markdown(boards: dict[str, list[Entry]]) -> str:
    if not PUBLISHED:
        return ""
    ours: dict[tuple[str, str], Entry] = {}
    for entries in boards.values():
        for e in entries:
            ours[(e.cell.model, e.cell.task)] = e
    lines = ["| model | task | their setting | their result | ours (this budget) | source |",
             "|---|---|---|---|---|---|"]
    for p in PUBLISHED:
        e = ours.get((p.model, p.task))
        if e is None:
            mine = "not run"
        else:
            c = e.cell
            mine = (f"{_fmt(c.final[0], c.first.primary_metric)} final ({c.n_solved}/{c.n} solved, "
                    f"{panel_title(c.task, c.seq_len)}, {c.budget:,} steps)")
        lines.append(f"| {MODEL_NAMES[p.model]} | {p.task} | {p.setting} | {p.result} | {mine} | {p.source} |")
    return "\n".join(lines) + "\n"


# -- report ----------------------------------------------------------------------------------------------
def write_benchmark_report(sweep_dir: str | Path, *, command: Optional[str] = None) -> Path:
    """Leaderboard, tables, figure and ``report.md`` of a (finished or partly finished) benchmark."""
    from ..results import figures
    from ..runs.store import atomic_write_bytes

    sweep = open_sweep(sweep_dir)
    meta = dict(sweep.meta)
    if command:
        meta["command"] = command
    members = collect(sweep.path)
    cells = best_settings(settings(members))  # one setting per model and task: the cell is its seeds
    write_tables(sweep.path, members, make_table(cells))
    boards = leaderboard(cells)
    board_md = leaderboard_markdown(boards)
    atomic_write_bytes(sweep.path / "leaderboard.md", board_md.encode())
    atomic_write_bytes(sweep.path / "leaderboard.csv", leaderboard_csv(boards).encode())
    fig = None
    started = [c for c in cells if any(m.evals for m in c.members)]
    if started:
        fig = figures.paper_grid(started, sweep.path / "figures", stem="fig_benchmark",
                                 title="Test metric against training steps, every model at one budget\n"
                                       "(thick: mean over seeds; thin: each seed; band: min–max)")[0]
    states: dict[str, int] = {}
    for m in members:
        states[m.state] = states.get(m.state, 0) + 1
    wall = meta.get("wall_time_s")
    train_time = sum(m.wall_time_s or 0.0 for m in members)
    lines = ["# irnn benchmark: the IRNN and its successors on long-memory tasks", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{meta.get('command', 'irnn benchmark')}`.", ""]
    if wall is not None:
        runs = int(meta.get("invocations") or 1)
        lines += [f"Wall time: **{wall / 60:.1f} min**" + (f" over {runs} invocations (resumed)" if runs > 1 else "")
                  + (f" ({meta['workers']} worker processes)" if int(meta.get("workers") or 1) > 1 else "")
                  + f". Summed training time of all runs: {train_time / 60:.1f} min.", ""]
    lines += ["## Budget", ""] + [f"- {d}" for d in meta.get("description", [])]
    if meta.get("reductions"):
        lines += ["", f"**Cut for the `{meta.get('budget')}` budget** (compared with `full`):", ""]
        lines += [f"- {r}" for r in meta["reductions"]]
    lines += ["", f"Runs: {len(members)} (" + ", ".join(f"{v} {k}" for k, v in sorted(states.items())) + ")."]
    failures = [f"`{m.name}`: {m.state}" + (f" — {m.error}" if m.error else "") for m in members
                if m.state in ("failed", "diverged")]
    if failures:
        lines += ["", "Failed or diverged runs:", ""] + [f"- {f}" for f in failures]
    lines += ["", "## Leaderboard", "", RANK_RULE, "", board_md,
              "Tables: [leaderboard.md](leaderboard.md), [leaderboard.csv](leaderboard.csv), "
              "[results.csv](results.csv); every run: [members.csv](members.csv).", ""]
    if fig is not None:
        rel = fig.relative_to(sweep.path)
        lines += ["## Figure", "", f"![test metric against steps]({rel})", ""]
    pub = published_markdown(boards)
    if pub:
        lines += ["## Published results beside ours", "", PUBLISHED_NOTE, "", pub, UNPUBLISHED_NOTE, ""]
    path = sweep.path / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


RANK_RULE = ("Ranking on each task: more seeds solved first, then the lower median of steps to solve over all "
             "seeds (a seed that never solved counts as never), then the better mean final metric; equal keys "
             "share a rank. Steps to solve: the first evaluation past the threshold. ms / step: the median over "
             "seeds of training time per step, evaluation excluded, one thread per run. Guard rollbacks: how "
             "often the divergence guard rolled a run back, summed over seeds (and how many seeds needed it); "
             "diverged: runs the guard could not save.")
PUBLISHED_NOTE = ("Their numbers come from their own settings (width, length, optimiser, many more steps), so they "
                  "say where a model ends, not how it compares at this budget.")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def benchmark(budget: str = "quick", *, out: str | Path = "runs", name: Optional[str] = None,
              models: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None,
              seeds: Optional[int] = None, steps: Optional[int] = None, data_dir: Optional[str] = None,
              download: bool = False, backend: str = "local", address: Optional[str] = None,
              workers: Optional[int] = None, overwrite: bool = False, env: Optional[dict[str, Any]] = None,
              echo: bool = False, command: Optional[str] = None) -> Path:
    """Run (or finish) the benchmark and write its report; returns the path of ``report.md``."""
    spec, meta = benchmark_spec(budget, name=name, models=models, tasks=tasks, seeds=seeds, steps=steps,
                                data_dir=data_dir, download=download, env=env)
    mnist = next((t for t in spec.grid if t["task"][0] in ("mnist", "pmnist")), None)
    if mnist is not None:  # missing or damaged MNIST files: one line now, not every MNIST run failing later
        from .mnist_study import check_data

        found = check_data({**spec.base, **{k: v[0] for k, v in mnist.items()}})
        if echo:
            print(f"data: {found}")
    if workers is not None:
        meta["workers"] = workers
    if command:
        meta["command"] = command
    sw = create(spec, out, overwrite=overwrite, meta=meta, env={k: v for k, v in spec.base.items() if k in ENV_KEYS})
    earlier = dict(sw.meta)
    if echo:
        print(f"benchmark: {spec.description}; {len(sw.names)} runs in {sw.path}")
        if budget == "full" and backend == "local" and not _has_cuda():
            print("irnn: warning: --budget full is meant for a GPU or --backend ray on a cluster; on this CPU it "
                  "takes days. Interrupt it at any time and re-run to resume.", file=sys.stderr)
        for r in meta["reductions"]:
            print(f"  cut: {r}")
        if backend == "local":
            print(f"  training with {meta['workers']} local worker process(es)")
    t0 = time.perf_counter()
    train_sweep(sw, backend=backend, address=address, workers=int(meta["workers"]), echo=echo)
    total = float(earlier.get("wall_time_s") or 0.0) + time.perf_counter() - t0
    sw.update_meta(wall_time_s=total, invocations=int(earlier.get("invocations") or 0) + 1)
    return write_benchmark_report(sw.path, command=command)
