"""The training loop: step, evaluate, log, checkpoint, guard against divergence, resume exactly.

Steps run in chunks that end at the next logging, evaluation or checkpoint
boundary; each chunk syncs with the device once, hands its losses to the
divergence guard, and only then is accepted. A run killed at any moment (even
by SIGKILL) resumes from its last good checkpoint and, on the CPU, ends with the
same ``metrics.jsonl`` and parameters as an uninterrupted run: data is a pure
function of ``(seed, step)`` and the checkpoint holds model, optimiser, step,
RNG and guard state.
"""
from __future__ import annotations

import copy
import math
import platform
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import Config, ConfigError, from_dict
from ..engine import make_forward, make_train_step, resolve_engine
from ..models import build_model
from ..runs import checkpoint as ckpt
from ..runs.store import MetricsLog, RunDir, default_run_name, git_revision, model_label
from ..runs.trackers import Tracker, make_trackers
from ..tasks import Task, make_task
from .guard import DivergenceGuard
from .optim import make_optimizer


@dataclass
class Run:
    """A finished (or stopped) run: its folder, config and summary."""

    path: Path
    config: Config
    summary: dict[str, Any]

    def metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        rows = RunDir(self.path).metrics()
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.metrics() if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def __repr__(self) -> str:
        s = self.summary
        return f"Run({str(self.path)!r}, status={s.get('status')!r}, steps={s.get('steps')})"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    """One seed drives python, numpy and torch (the data has its own seeded generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, Any]:
    from .. import __version__

    return {"irnn": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "git": git_revision()}


@dataclass
class LoopState:
    """Everything besides model and optimiser that a resume must restore."""

    step: int = 0
    lr_scale: float = 1.0
    retries: int = 0
    divergences: int = 0
    best: float | None = None
    best_step: int | None = None
    solved_step: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    last_train_loss: float | None = None
    wall_time_s: float = 0.0
    # the open logging window (a checkpoint may fall inside one)
    acc_loss: float = 0.0
    acc_grad: float = 0.0
    acc_grad_max: float = 0.0
    acc_n: int = 0
    recent: list[float] = field(default_factory=list)


class Trainer:
    """Owns one run. Use :func:`train` unless you need the pieces."""

    def __init__(self, cfg: Config, run: RunDir, *, resume: bool, group: str | None = None,
                 progress: bool | None = None, on_record: Callable[[dict[str, Any]], None] | None = None):
        self.cfg, self.run, self.group = cfg, run, group
        self.on_record = on_record
        torch.set_flush_denormal(True)  # ReLU-RNN gradients decay into denormals: 6x slower CPU without this
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.task: Task = make_task(cfg, self.device)
        self.model = build_model(cfg, self.task.input_size, self.task.output_size).to(self.device)
        try:
            self.engine = resolve_engine(cfg.engine, self.model, self.device, cfg.optimizer)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.optimizer = make_optimizer(cfg, self.model.parameters(), capturable=self.engine == "cuda-graph")
        self.eval_forward = make_forward(self.model, "fused" if self.engine == "fused" else "torch")
        self.state = LoopState()
        self.guard = DivergenceGuard(cfg.guard_factor, cfg.guard_window, self.task.baseline_loss) if cfg.guard else None
        self.total = cfg.total_steps()
        self.ckpt_every = cfg.ckpt_every or cfg.eval_every
        self.progress = (not cfg.quiet) if progress is None else progress
        self.notes: list[str] = []
        if resume:
            self._restore_for_resume()
        else:
            self._write_config()
        example = self.task.batch(self.state.step, cfg.batch_size, cfg.seed)
        self.train_step = make_train_step(self.model, self.engine, self.task.loss_fn, self.optimizer,
                                          cfg.clip_norm, example)
        self.snapshot = self._state_dict()
        self.trackers: list[Tracker] = []

    # -- state ---------------------------------------------------------------
    def _state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return copy.deepcopy({
            "format": 1, "step": self.state.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "loop": asdict(self.state), "rng": rng,
            "config": self.cfg.to_dict(), "versions": versions(), "engine": self.engine,
        })

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{self.run.path}: checkpoint does not fit this run's model ({first})") from None
        self.state = LoopState(**state["loop"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        random.setstate(_tuplify(rng["python"]))
        np.random.set_state(_np_restore(rng["numpy"]))

    def _write_config(self) -> None:
        self.run.write_config(self.cfg, versions=versions(), device=str(self.device), engine=self.engine,
                              threads=torch.get_num_threads(), host=platform.node(), argv=sys.argv,
                              task={"name": self.task.name, "seq_len": self.task.seq_len,
                                    "baseline": self.task.baseline, "primary_metric": self.task.primary_metric,
                                    **(self.task.extra or {})},
                              label=model_label(self.cfg), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def _restore_for_resume(self) -> None:
        state, notes = ckpt.load_latest(self.run)
        self.notes.extend(notes)
        if state is not None:
            self._check_foreign(state)
            self._load_state_dict(state)
            self.notes.append(f"resuming from step {self.state.step}")
        else:
            self.notes.append("no usable checkpoint: starting from step 0")
        # Lines written after the checkpoint will be written again, identically: drop them.
        self.run.truncate_metrics(self.state.step if state is not None else -1)

    def _check_foreign(self, state: dict[str, Any]) -> None:
        theirs = state.get("config", {})
        for key in ("model", "hidden_size", "num_layers", "task", "seq_len", "seed"):
            if theirs.get(key) != getattr(self.cfg, key):
                raise ConfigError(f"{self.run.path}: checkpoint was made for {key}={theirs.get(key)!r}, "
                                  f"this run has {key}={getattr(self.cfg, key)!r}")

    # -- the loop --------------------------------------------------------------
    def _lr(self, step: int) -> float:
        lr = self.cfg.lr * self.state.lr_scale
        if self.cfg.inject_lr_spike:
            a, b, f = self.cfg.inject_lr_spike.split(":")
            if int(a) <= step < int(b):
                lr *= float(f)
        return lr

    def _next_boundary(self, step: int) -> int:
        cands = [self.total]
        for every in (self.cfg.log_every, self.cfg.eval_every, self.ckpt_every):
            cands.append((step // every + 1) * every)
        if self.cfg.inject_lr_spike:
            a, b, _ = self.cfg.inject_lr_spike.split(":")
            cands += [int(x) for x in (a, b) if int(x) > step]
        return min(cands)

    def emit(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        for t in self.trackers:
            t.log(record)
        if self.on_record is not None:
            self.on_record(record)

    def fit(self) -> Run:
        cfg, s = self.cfg, self.state
        prior = self.run.read_summary()
        if prior and prior.get("status") in ("completed", "diverged") and s.step >= self.total:
            return Run(self.run.path, cfg, prior)
        self.log = MetricsLog(self.run.metrics_path)
        self.trackers = make_trackers(cfg, self.run.path, self.run.path.name, self.group)
        status, reason = "running", None
        if s.step == 0 and not ckpt.list_checkpoints(self.run):
            self._checkpoint()  # the rollback target before the first real checkpoint
        self._write_summary(status)
        bar = _progress(self.total, s.step, self.run.path.name, self.progress)
        t_chunk = time.perf_counter()
        try:
            while s.step < self.total:
                end = self._next_boundary(s.step)
                lr = self._lr(s.step)
                self.train_step.set_lr(lr)
                losses, norms = [], []
                for step in range(s.step, end):
                    x, y = self.task.batch(step, cfg.batch_size, cfg.seed)
                    loss, norm = self.train_step(x, y)
                    losses.append(loss)
                    norms.append(norm)
                losses_h = torch.stack(losses).double().tolist()  # the chunk's one host sync
                norms_h = torch.stack(norms).double().tolist()
                bad = self._check(losses_h, norms_h)
                if bad is not None:
                    idx, why = bad
                    if not self._rollback(s.step + idx, why, losses_h[idx], norms_h[idx]):
                        status, reason = "diverged", why
                        break
                    bar.n = s.step
                    bar.refresh()
                    t_chunk = time.perf_counter()
                    continue
                now = time.perf_counter()
                dt = now - t_chunk
                t_chunk = now
                s.wall_time_s += dt
                s.acc_loss += sum(losses_h)
                s.acc_grad += sum(norms_h)
                s.acc_grad_max = max([s.acc_grad_max] + norms_h)
                s.acc_n += len(losses_h)
                if self.guard is not None:
                    s.recent = self.guard.accept(s.recent, losses_h)
                s.step = end
                bar.update(end - bar.n)
                if s.step % cfg.log_every == 0 or s.step == self.total:
                    s.last_train_loss = s.acc_loss / s.acc_n
                    self.emit({"step": s.step, "kind": "train", "train_loss": s.last_train_loss,
                               "grad_norm": s.acc_grad / s.acc_n, "grad_norm_max": s.acc_grad_max, "lr": lr,
                               "samples_per_s": len(losses_h) * cfg.batch_size / max(dt, 1e-9),
                               "time_s": s.wall_time_s})
                    s.acc_loss = s.acc_grad = s.acc_grad_max = 0.0
                    s.acc_n = 0
                if s.step % cfg.eval_every == 0 or s.step == self.total:
                    self._evaluate()
                    t_chunk = time.perf_counter()  # evaluation is not training time
                if s.step % self.ckpt_every == 0 or s.step == self.total:
                    self._checkpoint()
                    t_chunk = time.perf_counter()
                bar.set_postfix_str(self._postfix(), refresh=False)
            else:
                status = "completed"
        except KeyboardInterrupt:
            status, reason = "interrupted", "KeyboardInterrupt"
            raise
        except BaseException as e:
            status, reason = "failed", f"{type(e).__name__}: {e}"
            raise
        finally:
            bar.close()
            summary = self._write_summary(status, reason)
            for t in self.trackers:
                t.finish(summary)
            self.log.close()
        return Run(self.run.path, cfg, summary)

    def _check(self, losses: list[float], norms: list[float]) -> tuple[int, str] | None:
        if self.guard is not None:
            return self.guard.check(self.state.recent, losses, norms)
        for i, (l, g) in enumerate(zip(losses, norms)):
            if not (math.isfinite(l) and math.isfinite(g)):
                return i, "non-finite loss or gradient (guard off)"
        return None

    def _rollback(self, bad_step: int, why: str, loss: float, norm: float) -> bool:
        """Restore the last good checkpoint with a lower learning rate; False once retries are spent."""
        s = self.state
        cfg = self.cfg
        give_up = not cfg.guard or s.retries >= cfg.guard_retries
        record = {"step": bad_step + 1, "kind": "event", "event": "divergence", "reason": why,
                  "loss": loss, "grad_norm": norm, "lr": self._lr(bad_step)}
        if give_up:
            record["action"] = "stop"
            s.divergences += 1
            self.emit(record)
            return False
        retries, divergences, lr_scale = s.retries + 1, s.divergences + 1, s.lr_scale * cfg.guard_lr_decay
        self._load_state_dict(self.snapshot)
        self.train_step.reset()
        s = self.state
        s.retries, s.divergences, s.lr_scale = retries, divergences, lr_scale
        record.update(action="rollback", rollback_to=s.step, new_lr=cfg.lr * lr_scale, retry=retries)
        self.emit(record)
        return True

    @torch.no_grad()
    def _evaluate(self) -> None:
        s, task = self.state, self.task
        self.model.eval()
        metrics = task.evaluate(self.eval_forward)
        self.model.train()
        s.last_eval = metrics
        value = metrics[task.primary_metric]
        better = math.isfinite(value) and (s.best is None or (value > s.best if task.higher_is_better else value < s.best))
        solved = value > task.solved_threshold if task.higher_is_better else value < task.solved_threshold
        if solved and s.solved_step is None:
            s.solved_step = s.step
        if better:
            s.best, s.best_step = value, s.step
        self.emit({"step": s.step, "kind": "eval", **metrics})
        if better:
            ckpt.atomic_write_bytes(self.run.ckpt_dir / "best.pt", ckpt.encode(self._state_dict()))

    def _checkpoint(self) -> None:
        self.snapshot = self._state_dict()
        ckpt.save(self.run, self.snapshot, keep=self.cfg.keep_checkpoints)
        self._write_summary("running")

    def _postfix(self) -> str:
        s = self.state
        parts = []
        if s.last_train_loss is not None:
            parts.append(f"loss={s.last_train_loss:.4g}")
        if s.last_eval:
            parts.append(f"{self.task.primary_metric}={s.last_eval[self.task.primary_metric]:.4g}")
        if s.divergences:
            parts.append(f"rollbacks={s.divergences}")
        return " ".join(parts)

    def _write_summary(self, status: str, reason: str | None = None) -> dict[str, Any]:
        s, task, cfg = self.state, self.task, self.cfg
        pm = task.primary_metric
        summary: dict[str, Any] = {
            "status": status, "reason": reason, "name": self.run.path.name, "label": model_label(cfg),
            "task": task.name, "model": cfg.model, "seq_len": task.seq_len, "seed": cfg.seed,
            "steps": s.step, "total_steps": self.total,
            "primary_metric": pm, f"best_{pm}": s.best, "best_step": s.best_step,
            f"final_{pm}": s.last_eval.get(pm), f"baseline_{pm}": task.baseline,
            "final_test_loss": s.last_eval.get("test_loss"), "baseline_loss": task.baseline_loss,
            "solved_step": s.solved_step, "solved_threshold": task.solved_threshold,
            "final_train_loss": s.last_train_loss, "divergences": s.divergences, "lr_final": cfg.lr * s.lr_scale,
            "wall_time_s": s.wall_time_s, "engine": self.engine, "device": str(self.device),
        }
        if task.primary_metric == "test_mse":
            summary["baseline_mse"] = task.baseline
        self.run.write_summary(summary)
        return summary


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, unit="step",
                dynamic_ncols=True, leave=True, mininterval=0.5)


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]


def _np_restore(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def train(cfg: Config | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          group: str | None = None, progress: bool | None = None, out_dir: str | Path | None = None,
          on_record: Callable[[dict[str, Any]], None] | None = None, **overrides: Any) -> Run:
    """Train one model and return its :class:`Run`.

    Args:
        cfg: a :class:`~irnn.config.Config` (default: the ``quick`` preset); ``overrides`` replace its fields.
        resume: an existing run folder to continue from its last good checkpoint.
        overwrite: replace an existing run folder of the same name instead of refusing.
        group: a tracker group name (sweeps use their own name).
        out_dir: put the run exactly here (used by sweeps); default ``<cfg.out>/<cfg.name or generated>``.
    """
    if resume is not None:
        run = RunDir.open(resume)
        cfg = run.read_config()
        if overrides:
            cfg = cfg.replace(**overrides)
        return Trainer(cfg, run, resume=True, group=group, progress=progress, on_record=on_record).fit()
    if cfg is None:
        cfg = from_dict(overrides, preset=overrides.pop("preset", "quick"))
    elif overrides:
        cfg = cfg.replace(**overrides)
    if out_dir is not None:
        out_dir = Path(out_dir)
        run = RunDir.create(out_dir.parent, out_dir.name, overwrite=overwrite)
    else:
        run = RunDir.create(cfg.out, cfg.name or default_run_name(cfg), overwrite=overwrite)
    try:
        trainer = Trainer(cfg, run, resume=False, group=group, progress=progress, on_record=on_record)
    except BaseException:
        # Nothing was trained: do not leave an empty folder that blocks the same name.
        import shutil

        if not any(run.ckpt_dir.iterdir()) and not run.metrics_path.exists():
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    return trainer.fit()




def train_many(cfgs: list[Config], out_dirs: list[str | Path], *, group: str | None = None,
               progress: bool | None = None, resume: bool = True) -> list[Run]:
    """Train several runs into the given folders (resuming any that already started).

    This is the entry point sweeps use; compatible members may be trained
    together as one stacked ensemble (see ``irnn.engine.ensemble``).
    """
    runs = []
    for cfg, out in zip(cfgs, out_dirs):
        out = Path(out)
        if resume and (out / "config.json").is_file():
            runs.append(train(resume=out, group=group, progress=progress))
        else:
            runs.append(train(cfg, out_dir=out, overwrite=True, group=group, progress=progress))
    return runs
