"""Aggregation: read run folders, reduce seeds to mean ± std, pick the best setting, write tables.

Numbers come from each run's ``metrics.jsonl`` (the evaluation curve) and ``summary.json``
(status, final values, wall time). Standard deviations are sample standard deviations
(``ddof=1``) over seeds; one seed has no spread and shows none.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from collections.abc import Mapping

from .. import registry
from ..config import ENV_KEYS, ConfigError, from_dict, setting_key, solved_threshold
from ..runs.store import atomic_write_bytes, iter_metrics, read_json, run_label


class _ModelNames(Mapping):
    """A model's name in tables and legends, from the registry (an unregistered name stays as it is)."""

    def __getitem__(self, name: str) -> str:
        return registry.model_label(name)

    def __iter__(self):
        return iter(registry.model_names())

    def __len__(self) -> int:
        return len(registry.model_names())


MODEL_NAMES = _ModelNames()


def _num(v: Any) -> Optional[float]:
    """A finite float, or None (JSON stores NaN/inf as strings)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    return None


@dataclass
class Member:
    """One run, as aggregation sees it."""

    name: str
    path: Path
    config: dict[str, Any]
    state: str  # pending, running, completed, failed, diverged
    summary: dict[str, Any] = field(default_factory=dict)
    task_info: dict[str, Any] = field(default_factory=dict)  # what the task recorded in config.json (sizes, permutation)
    error: Optional[str] = None
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, primary metric)
    test_loss: list[tuple[int, float]] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        if self.summary.get("seq_len"):
            return int(self.summary["seq_len"])
        try:  # not started yet: what the config will run (784 for pixel MNIST, not its unused seq_len)
            cfg = from_dict(self.config)
            return cfg.seq_len if registry.task_spec(cfg.task).by_length else cfg.sequence_length()
        except ConfigError:
            return int(self.config.get("seq_len", 0))

    @property
    def model(self) -> str:
        return str(self.config.get("model", "?"))

    @property
    def task(self) -> str:
        return str(self.config.get("task", "adding"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def label(self) -> str:
        return self.summary.get("label") or run_label(self.model, self.task, int(self.config.get("seq_len") or 0))

    @property
    def steps_per_epoch(self) -> float:
        """Batches in one pass over the training set that the run really had (a source may hold fewer
        examples than ``train_size`` asks for)."""
        n = self.task_info.get("train_size")
        n = int(n) if isinstance(n, int) and n > 0 else int(self.config.get("train_size", 1))
        return max(n / int(self.config.get("batch_size", 1)), 1e-9)

    @property
    def primary_metric(self) -> str:
        return self.summary.get("primary_metric") or ("test_acc" if self.config.get("task") in ("mnist", "pmnist")
                                                      else "test_mse")

    @property
    def higher_is_better(self) -> bool:
        return self.primary_metric == "test_acc"

    @property
    def threshold(self) -> float:
        t = _num(self.summary.get("solved_threshold"))
        return t if t is not None else solved_threshold(self.primary_metric)

    @property
    def baseline(self) -> Optional[float]:
        return _num(self.summary.get(f"baseline_{self.primary_metric}", self.summary.get("baseline_mse")))

    @property
    def total_steps(self) -> int:
        t = self.summary.get("total_steps")
        if isinstance(t, int):
            return t
        c = self.config
        if c.get("epochs"):
            return int(c["epochs"]) * math.ceil(int(c.get("train_size", 1)) / int(c.get("batch_size", 1)))
        return int(c.get("steps", 0))

    @property
    def steps_done(self) -> int:
        s = self.summary.get("steps")
        return int(s) if isinstance(s, int) else (self.evals[-1][0] if self.evals else 0)

    @property
    def final(self) -> Optional[float]:
        v = _num(self.summary.get(f"final_{self.primary_metric}"))
        if v is None and self.evals:
            v = _num(self.evals[-1][1])
        return v

    @property
    def best(self) -> Optional[float]:
        vals = [v for _, v in self.evals if _num(v) is not None]
        if vals:
            return max(vals) if self.higher_is_better else min(vals)
        return _num(self.summary.get(f"best_{self.primary_metric}"))

    @property
    def wall_time_s(self) -> Optional[float]:
        return _num(self.summary.get("wall_time_s"))

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "diverged")

    @property
    def guard_rollbacks(self) -> int:
        """How often the divergence guard rolled this run back ("divergences" in older summaries)."""
        n = self.summary.get("guard_interventions", self.summary.get("divergences"))
        return n if isinstance(n, int) and not isinstance(n, bool) else 0

    def steps_to_threshold(self, threshold: Optional[float] = None) -> Optional[int]:
        return steps_to_threshold(self.evals, self.threshold if threshold is None else threshold, self.higher_is_better)


def steps_to_threshold(evals: Iterable[tuple[int, float]], threshold: float, higher_is_better: bool = False) -> Optional[int]:
    """The first evaluated step whose value is below ``threshold`` (above, when higher is better)."""
    for step, value in evals:
        v = _num(value)
        if v is not None and (v > threshold if higher_is_better else v < threshold):
            return int(step)
    return None


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (``ddof=1``); ``(x, 0.0)`` for one value, ``(None, None)`` for none."""
    vals = [float(v) for v in values if _num(v) is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# -- reading -----------------------------------------------------------------------------------------
def load_run(path: str | Path, *, name: Optional[str] = None, state: Optional[str] = None,
             error: Optional[str] = None, config: Optional[dict[str, Any]] = None) -> Member:
    """Read one run folder (it may be missing or half-written: a pending member)."""
    path = Path(path)
    try:
        summary = read_json(path / "summary.json")
        summary = summary if isinstance(summary, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        summary = {}
    try:
        stored = read_json(path / "config.json")
        stored = stored if isinstance(stored, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        stored = {}
    if config is None:
        config = stored.get("config", {}) if isinstance(stored.get("config"), dict) else {}
    if state is None:
        status = summary.get("status")
        state = {"completed": "completed", "diverged": "diverged", "failed": "failed",
                 "running": "running"}.get(status, "pending")
    task_info = stored.get("task") if isinstance(stored.get("task"), dict) else {}
    m = Member(name=name or path.name, path=path, config=dict(config), state=state, summary=summary, task_info=task_info,
               error=error if error is not None else (summary.get("reason") if state in ("failed", "diverged") else None))
    pm = m.primary_metric
    evals: dict[int, float] = {}
    test_loss: dict[int, float] = {}
    train_loss: dict[int, float] = {}
    # A step logged twice (a rollback that replayed it) keeps its last value: the accepted trajectory.
    for row in iter_metrics(path / "metrics.jsonl"):
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        kind = row.get("kind")
        if kind == "eval":
            if pm in row:
                evals[step] = _as_float(row[pm])
            if "test_loss" in row:
                test_loss[step] = _as_float(row["test_loss"])
        elif kind == "train" and "train_loss" in row:
            train_loss[step] = _as_float(row["train_loss"])
    m.evals, m.test_loss, m.train_loss = (sorted(d.items()) for d in (evals, test_loss, train_loss))
    return m


def _as_float(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return math.nan
    return math.nan


def collect(sweep_dir: str | Path) -> list[Member]:
    """Every member of a sweep, in the sweep's order, with its state from the index."""
    sweep_dir = Path(sweep_dir)
    spec = read_json(sweep_dir / "sweep.json")
    try:
        index = read_json(sweep_dir / "index.json").get("members", {})
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        index = {}
    out = []
    for name, cfg in spec["members"].items():
        entry = index.get(name, {})
        m = load_run(sweep_dir / "members" / name, name=name, config=cfg, state=entry.get("state"),
                     error=entry.get("error"))
        out.append(m)
    return out


# -- settings: members that differ only in seed ---------------------------------------------------------
def group_settings(members: Iterable[Member]) -> list[list[Member]]:
    groups: dict[tuple, list[Member]] = {}
    for m in members:
        groups.setdefault(setting_key(m.config), []).append(m)
    return list(groups.values())


def varied_keys(members: Sequence[Member]) -> list[str]:
    """Config keys (besides seed, model and seq_len) whose value differs between members; a model's or
    task's options count as keys of their own."""
    flat = [{**{k: v for k, v in m.config.items() if k != "options"}, **(m.config.get("options") or {})}
            for m in members]
    keys: set[str] = set()
    for k in {k for c in flat for k in c}:
        if k in ("seed", "name", "out") + ENV_KEYS:
            continue
        if len({json.dumps(c.get(k)) for c in flat}) > 1:
            keys.add(k)
    return sorted(keys - {"model", "seq_len"})


def _model_keys(model: Any) -> tuple[str, ...]:
    """The config fields and options a model's tables show (its registry entry's ``hparams``)."""
    return registry.model_spec(model).hparams if model in registry.model_names() else ()


_SHORT = {"optimizer": "", "lr": "lr", "clip_norm": "clip", "batch_size": "batch", "init_scale": "init",
          "forget_bias": "forget bias", "recurrent_std": "W_hh std", "hidden_size": "hidden", "momentum": "momentum"}


def hparams(cfg: dict[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """The hyper-parameters worth showing for one setting: the optimiser's, the model's own, and any varied."""
    own = _model_keys(cfg.get("model"))
    keys = ["optimizer", "lr", "clip_norm", "batch_size", *own]
    # a key that belongs to some model (its hparams or options) is shown only for that model
    belongs = {k for m in registry.model_names() for k in (*registry.model_spec(m).hparams,
                                                           *(o.name for o in registry.model_spec(m).options))}
    for k in extra:
        if k not in keys and k not in ("task", "options") and not (k in belongs and k not in own):
            keys.append(k)
    options = cfg.get("options") or {}
    return {k: cfg.get(k, options.get(k)) for k in keys}


def hparams_text(hp: dict[str, Any]) -> str:
    parts = []
    for k, v in hp.items():
        label = _SHORT.get(k, k)
        text = format(v, "g") if isinstance(v, float) else str(v)
        parts.append(f"{label} {text}".strip() if label else text)
    return ", ".join(parts)


@dataclass
class SettingStats:
    """Seeds of one setting reduced to numbers."""

    members: list[Member]
    hparams: dict[str, Any]

    @property
    def first(self) -> Member:
        return self.members[0]

    @property
    def seq_len(self) -> int:
        return self.first.seq_len

    @property
    def model(self) -> str:
        return self.first.model

    @property
    def task(self) -> str:
        return self.first.task

    @property
    def label(self) -> str:
        return self.first.label

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def finished(self) -> list[Member]:
        return [m for m in self.members if m.finished]

    @property
    def budget(self) -> int:
        return max(m.total_steps for m in self.members)

    @property
    def solved_steps(self) -> list[int]:
        return [s for s in (m.steps_to_threshold() for m in self.members) if s is not None]

    @property
    def n_solved(self) -> int:
        return len(self.solved_steps)

    @property
    def steps(self) -> tuple[Optional[float], Optional[float]]:
        return mean_std(self.solved_steps)

    @property
    def final(self) -> tuple[Optional[float], Optional[float]]:
        return mean_std([m.final for m in self.finished if m.final is not None])

    @property
    def best(self) -> tuple[Optional[float], Optional[float]]:
        return mean_std([m.best for m in self.members if m.best is not None])

    @property
    def wall_total(self) -> float:
        return sum(m.wall_time_s or 0.0 for m in self.members)

    @property
    def guard_rollbacks(self) -> int:
        return sum(m.guard_rollbacks for m in self.members)

    def guard_text(self) -> str:
        """``0``, or ``3 (2 of 3 seeds)``: the guard's rollbacks over the seeds, and how many seeds needed it."""
        needed = sum(m.guard_rollbacks > 0 for m in self.members)
        return f"{self.guard_rollbacks} ({needed} of {self.n} seeds)" if needed else "0"

    @property
    def baseline(self) -> Optional[float]:
        for m in self.members:
            if m.baseline is not None:
                return m.baseline
        return None

    @property
    def threshold(self) -> float:
        return self.first.threshold

    @property
    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.members:
            out[m.state] = out.get(m.state, 0) + 1
        return out

    def selection_score(self) -> float:
        """Lower is better: the mean final metric over seeds; a diverged, failed or unfinished seed
        counts as infinitely bad (higher-is-better metrics are negated)."""
        vals = []
        for m in self.members:
            if m.state != "completed" or m.final is None:
                return math.inf
            vals.append(-m.final if m.higher_is_better else m.final)
        return sum(vals) / len(vals) if vals else math.inf

    def steps_text(self) -> str:
        budget = self.budget
        k, n = self.n_solved, self.n
        mean, std = self.steps
        if k == 0:
            unfinished = n - len(self.finished)
            return f"not solved within {budget:,} steps (0 of {n} seeds)" + (
                f"; {unfinished} not finished" if unfinished else "")
        text = f"{mean:,.0f}" + (f" ± {std:,.0f}" if k > 1 else "")
        return text + (f" ({k}/{n} seeds)" if k == n else f" ({k} of {n} seeds solved within {budget:,})")

    def row(self) -> dict[str, Any]:
        fm, fs = self.final
        bm, bs = self.best
        sm, ss = self.steps
        return {
            "task": self.task, "seq_len": self.seq_len, "model": self.model, "label": self.label,
            "hparams": hparams_text(self.hparams),
            **{f"hp_{k}": v for k, v in self.hparams.items()},
            "seeds": self.n, "finished": len(self.finished), "diverged": self.states.get("diverged", 0),
            "failed": self.states.get("failed", 0), "solved": self.n_solved, "budget_steps": self.budget,
            "steps_to_threshold_mean": sm, "steps_to_threshold_std": ss,
            "final_mean": fm, "final_std": fs, "best_mean": bm, "best_std": bs,
            "baseline": self.baseline, "threshold": self.threshold,
            "wall_time_total_s": self.wall_total, "wall_time_mean_s": self.wall_total / max(self.n, 1),
            "guard_rollbacks": self.guard_rollbacks,
            "members": " ".join(m.name for m in self.members),
        }


def settings(members: Sequence[Member]) -> list[SettingStats]:
    extra = varied_keys(members)
    out = [SettingStats(g, hparams(g[0].config, extra)) for g in group_settings(members)]
    out.sort(key=lambda s: (_task_order(s.task), s.seq_len, _model_order(s.model), s.label, hparams_text(s.hparams)))
    return out


def _model_order(model: str) -> int:
    order = registry.model_names()  # the built-ins first, in the order the registry declares them
    return order.index(model) if model in order else len(order)


def _task_order(task: str) -> int:
    order = registry.task_names()
    return order.index(task) if task in order else len(order)


TASK_NAMES = {"adding": "adding problem", "mnist": "pixel-by-pixel MNIST", "pmnist": "permuted MNIST"}


def panel_title(task: str, seq_len: int) -> str:
    """``adding problem, T = 150`` / ``permuted MNIST (784 steps)``: what one cell of a study is."""
    if task == "adding":
        return f"adding problem, T = {seq_len}"
    name = TASK_NAMES.get(task) or (registry.task_spec(task).title if task in registry.task_names() else task)
    return f"{name} ({seq_len} steps)"


def best_settings(stats: Sequence[SettingStats]) -> list[SettingStats]:
    """One setting per (task, sequence length, model): the best mean final metric over seeds (see
    :meth:`SettingStats.selection_score`); ties go to more seeds solved, then fewer steps to solve."""
    cells: dict[tuple[str, int, str], list[SettingStats]] = {}
    for s in stats:
        cells.setdefault((s.task, s.seq_len, s.model), []).append(s)

    def key(s: SettingStats):
        sm = s.steps[0]
        return (s.selection_score(), -s.n_solved, sm if sm is not None else math.inf, hparams_text(s.hparams))

    return [min(group, key=key) for _, group in
            sorted(cells.items(), key=lambda kv: (_task_order(kv[0][0]), kv[0][1], _model_order(kv[0][2])))]


def find_cell(cells: Sequence[SettingStats], model: str, *, task: Optional[str] = None,
              seq_len: Optional[int] = None) -> Optional[SettingStats]:
    """The chosen setting of ``model`` (for ``task`` and/or ``seq_len`` when given), or None if not run."""
    for c in cells:
        if c.model == model and task in (None, c.task) and seq_len in (None, c.seq_len):
            return c
    return None


# -- tables -------------------------------------------------------------------------------------------
def _pm(mean: Optional[float], std: Optional[float], n: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3g}" + (f" ± {std:.2g}" if n > 1 and std is not None else "")


@dataclass
class Table:
    """Rows of results with a Markdown and a CSV rendering (what ``irnn.experiments.sweep`` returns)."""

    rows: list[dict[str, Any]]
    stats: list[SettingStats] = field(default_factory=list, repr=False)
    metric: str = "test_mse"

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def markdown(self) -> str:
        metric = self.metric.replace("test_", "test ").replace("mse", "MSE").replace("acc", "accuracy")
        thr = self.stats[0].threshold if self.stats else 0.01
        rel = ">" if self.metric == "test_acc" else "<"
        adding = all(s.task == "adding" for s in self.stats)
        head = ["T" if adding else "task", "model", "hyper-parameters", "seeds", f"steps to {metric} {rel} {thr:g}",
                f"final {metric}", f"best {metric}", "guard rollbacks", "wall time"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for s in self.stats:
            notes = []
            if s.states.get("diverged"):
                notes.append(f"{s.states['diverged']} diverged")
            if s.states.get("failed"):
                notes.append(f"{s.states['failed']} failed")
            pending = s.n - len(s.finished) - s.states.get("failed", 0)
            if pending:
                notes.append(f"{pending} unfinished")
            seeds = f"{s.n}" + (f" ({', '.join(notes)})" if notes else "")
            wall = f"{s.wall_total:,.0f} s ({s.wall_total / max(s.n, 1):,.0f} s/seed)"
            lines.append("| " + " | ".join([
                str(s.seq_len) if adding else panel_title(s.task, s.seq_len), MODEL_NAMES.get(s.model, s.model),
                hparams_text(s.hparams), seeds, s.steps_text(),
                _pm(*s.final, len(s.finished)), _pm(*s.best, s.n), s.guard_text(), wall]) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        cols: list[str] = []
        for r in self.rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        return buf.getvalue()

    def __repr__(self) -> str:
        return self.markdown()


def make_table(stats: Sequence[SettingStats]) -> Table:
    metric = stats[0].first.primary_metric if stats else "test_mse"
    return Table(rows=[s.row() for s in stats], stats=list(stats), metric=metric)


def settings_table(members: Sequence[Member]) -> Table:
    """One row per setting (seeds aggregated)."""
    return make_table(settings(members))


def members_csv(members: Sequence[Member]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "state", "seq_len", "model", "seed", "steps", "total_steps", "steps_to_threshold",
                "final", "best", "baseline", "guard_rollbacks", "wall_time_s", "error"])
    for m in members:
        w.writerow([m.name, m.state, m.seq_len, m.model, m.seed, m.steps_done, m.total_steps,
                    _blank(m.steps_to_threshold()), _blank(m.final), _blank(m.best), _blank(m.baseline),
                    m.guard_rollbacks, _blank(m.wall_time_s), m.error or ""])
    return buf.getvalue()


def _blank(v: Any) -> Any:
    return "" if v is None else v


def write_tables(sweep_dir: str | Path, members: Sequence[Member], table: Table, *, stem: str = "results") -> list[Path]:
    """``results.md``, ``results.csv`` and ``members.csv`` in the sweep folder."""
    sweep_dir = Path(sweep_dir)
    paths = [sweep_dir / f"{stem}.md", sweep_dir / f"{stem}.csv", sweep_dir / "members.csv"]
    atomic_write_bytes(paths[0], table.markdown().encode())
    atomic_write_bytes(paths[1], table.csv().encode())
    atomic_write_bytes(paths[2], members_csv(members).encode())
    return paths
