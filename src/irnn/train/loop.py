"""The training loop: step, evaluate, log, checkpoint, guard against divergence, resume exactly.

Steps run in chunks that end at the next logging, evaluation or checkpoint
boundary; each chunk syncs with the device once, hands its losses to the
divergence guard, and only then is accepted. A run killed at any moment (even
by SIGKILL) resumes from its last good checkpoint and, on the CPU, ends with the
same ``metrics.jsonl`` and parameters as an uninterrupted run: data is a pure
function of ``(seed, step + data_offset)`` and the checkpoint holds model,
optimiser, step, RNG, guard state and how many metrics lines it has seen.

The guard (:mod:`irnn.train.guard`) absorbs loss spikes that pass and flags a run
that diverges. Then the loop rolls back to the last checkpoint, skips every
batch that the abandoned attempt drew (so the retry meets other data, not the
batches that spiked again) and lowers the learning rate. Retries count per
incident: once the run has trained ``guard_window`` steps past the trouble and
checkpointed, it has recovered, and the learning rate and the retry count are
reset. With the retries of an incident spent, a run whose loss is still finite
goes on as it would without the guard; only a non-finite one stops as
``diverged``. While a spike is under watch no checkpoint (nor ``best.pt``) is
written, so a rollback always lands before the spike.
"""
from __future__ import annotations

import copy
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import Config, ConfigError, from_dict
from ..engine import make_forward, make_train_step, numerics, resolve_engine
from ..engine.build import set_isa
from ..models import build_model
from ..runs import checkpoint as ckpt
from ..runs.store import MetricsLog, RunDir, WriteError, check_idle, default_run_name, git_revision, model_label
from ..tracking import Tracker, check_trackers, finish_trackers, make_trackers
from ..tasks import Task, make_task
from .guard import DivergenceGuard, Scan
from .optim import constrain_after_each_step, make_optimizer


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

    # str(): torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses to unpickle.
    return {"irnn": __version__, "torch": str(torch.__version__), "numpy": str(np.__version__),
            "python": platform.python_version(), "git": git_revision()}


class Interrupted(KeyboardInterrupt):
    """Training was stopped by SIGINT or SIGTERM; the run is saved as ``interrupted`` and can be resumed."""

    def __init__(self, path: Path, step: int, signal_name: str):
        super().__init__(f"{signal_name} at step {step}; resume with: irnn train --resume {path}")
        self.path, self.step, self.signal_name = path, step, signal_name


@dataclass
class LoopState:
    """Everything besides model and optimiser that a resume must restore."""

    step: int = 0
    lr_scale: float = 1.0
    # the guard (see the module docstring)
    data_offset: int = 0  # the batch of step s is batch s + data_offset; each rollback skips ahead
    skipped: int = 0  # batches skipped by rollbacks
    retries: int = 0  # rollbacks in the open incident
    incident_until: int | None = None  # an incident is open until a checkpoint at or after this step
    interventions: int = 0  # rollbacks over the whole run
    absorbed: int = 0  # spikes that passed without a rollback
    watch: dict[str, Any] | None = None  # the spike under watch (DivergenceGuard.scan)
    metrics_lines: int = 0  # metrics.jsonl lines written so far: a resume keeps exactly these
    best: float | None = None
    best_step: int | None = None
    solved_step: int | None = None
    solved_streak: int = 0  # evaluations in a row past the solved threshold (stop_when_solved)
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
        set_isa(cfg.isa)  # every run sets it: a worker process trains members of different isa in turn
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            # TF32 compounds over long recurrences with W ~ I (PERF_NOTES): keep fp32-grade matmuls.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        seed_everything(cfg.seed)
        self.task: Task = make_task(cfg, self.device)
        # per_step: a target at every time step; the model then reads out every state, and the engines
        # and this loop need not know (a prediction is whatever shape the task's loss takes)
        self.model = build_model(cfg, self.task.input_size, self.task.output_size,
                                 per_step=self.task.per_step).to(self.device)
        try:
            self.engine = resolve_engine(cfg.engine, self.model, self.device, cfg.optimizer)
            if self.engine == "fused":
                from ..engine import fused

                fused.check_isa(cfg.isa)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.optimizer = make_optimizer(cfg, self.model.parameters(), capturable=self.engine == "cuda-graph")
        constrain_after_each_step(self.model, self.optimizer)
        self.eval_forward = make_forward(self.model, "fused" if self.engine == "fused" else "torch")
        self.state = LoopState()
        self.versions = versions()  # once: the code that runs is the code loaded now (and git is slow to ask)
        self.guard = DivergenceGuard(cfg.guard_factor, cfg.guard_window, self.task.baseline_loss) if cfg.guard else None
        self.total = cfg.total_steps(None if self.task.train_x is None else self.task.train_x.shape[0])
        self.ckpt_every = cfg.ckpt_every or cfg.eval_every
        self.progress = (not cfg.quiet) if progress is None else progress
        self.notes: list[str] = []
        self.spike = None  # inject_spike: (batch index, input factor)
        if cfg.inject_spike:
            index, factor = cfg.inject_spike.split(":")
            self.spike = (int(index), float(factor))
        self.pending_best: bytes | None = None  # best.pt of a better evaluation, written with the next checkpoint
        if resume:
            self._restore_for_resume()
        else:
            self._write_config()
        example = self.task.batch(self.state.step + self.state.data_offset, cfg.batch_size, cfg.seed)  # shapes
        self.train_step = make_train_step(self.model, self.engine, self.task.loss_fn, self.optimizer,
                                          cfg.clip_norm, example)
        self.snapshot = self._state_dict()
        self.trackers: list[Tracker] = []
        check_trackers(cfg)  # a missing tracker package fails here, before anything is trained

    # -- state ---------------------------------------------------------------
    def _state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return copy.deepcopy({
            "format": 1, "step": self.state.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "loop": asdict(self.state), "rng": rng,
            "config": self.cfg.to_dict(), "versions": self.versions, "engine": self.engine,
        })

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            loop = _loop_state(state["loop"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            random.setstate(_tuplify(rng["python"]))
            np.random.set_state(_np_restore(rng["numpy"]))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{self.run.path}: checkpoint does not fit this run's model ({first})") from None
        self.state = loop

    def _write_config(self) -> None:
        self.run.write_config(self.cfg, versions=self.versions, device=str(self.device), engine=self.engine,
                              threads=torch.get_num_threads(), numerics=numerics(self.engine), host=platform.node(), argv=sys.argv,
                              task={"name": self.task.name, "seq_len": self.task.seq_len,
                                    "baseline": self.task.baseline, "primary_metric": self.task.primary_metric,
                                    **(self.task.extra or {})},
                              label=model_label(self.cfg), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def _restore_for_resume(self) -> None:
        self.run.remove_temp_files()  # of atomic writes cut short by a kill; never read
        self.run.ckpt_dir.mkdir(exist_ok=True)  # a run whose checkpoints were deleted starts again
        state, skipped = ckpt.load_latest(self.run)
        if state is not None:
            self._check_foreign(state)
            self._load_state_dict(state)
        for line in skipped:
            self._note(f"warning: {line}")
        step = self.state.step if state is not None else -1
        if skipped:
            ckpt.set_aside_after(self.run, step)
        if state is not None:
            self._note(f"resuming from step {step}" + (" (the newer, unusable checkpoints were renamed *.corrupt)"
                                                       if skipped else ""))
        else:
            self._note("warning: no usable checkpoint: starting again from step 0")
        # Lines written after the checkpoint will be written again, identically: drop them.
        if state is not None and "metrics_lines" in state["loop"]:
            self.state.metrics_lines = self.run.truncate_metrics(lines=self.state.metrics_lines)
        else:  # a checkpoint from before metrics_lines was kept: its step is the next best cut
            self.state.metrics_lines = self.run.truncate_metrics(step)

    def _note(self, line: str) -> None:
        """One line for the person running this (stderr), kept in ``self.notes`` as well."""
        self.notes.append(line)
        print(f"irnn: {line}", file=sys.stderr, flush=True)

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

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of ``step``: batch ``step + data_offset`` of the task."""
        index = step + self.state.data_offset
        x, y = self.task.batch(index, self.cfg.batch_size, self.cfg.seed)
        if self.spike is not None and index == self.spike[0]:
            x = x * self.spike[1]
        return x, y

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
        self.state.metrics_lines += 1
        for t in self.trackers:
            t.log(record)
        if self.on_record is not None:
            self.on_record(record)

    def begin(self) -> Run | None:
        """Open the run for training. Returns its :class:`Run` when there is nothing left to train."""
        cfg, s = self.cfg, self.state
        prior = self.run.read_summary()
        if prior and prior.get("status") in ("completed", "diverged") and self.done:
            return Run(self.run.path, cfg, prior)
        self.run.claim()  # before anything is written: no second process trains or replaces this run meanwhile
        self.log = MetricsLog(self.run.metrics_path)
        self.trackers = make_trackers(cfg, self.run.path, self.run.path.name, self.group)
        self.reason = None
        if s.step == 0 and not ckpt.list_checkpoints(self.run):
            self._checkpoint()  # the rollback target before the first real checkpoint
        self._write_summary("running")
        self.bar = _progress(self.total, s.step, self.run.path.name, self.progress)
        self._t_chunk = time.perf_counter()
        return None

    def run_chunk(self) -> tuple[list[float], list[float], float]:
        """Train up to the next logging/eval/checkpoint boundary; returns losses, grad norms and the lr."""
        s = self.state
        end = self._next_boundary(s.step)
        lr = self._lr(s.step)
        self.train_step.set_lr(lr)
        losses, norms = [], []
        for step in range(s.step, end):
            x, y = self.batch(step)
            loss, norm = self.train_step(x, y)
            losses.append(loss)
            norms.append(norm)
        # the chunk's one host sync
        return torch.stack(losses).double().tolist(), torch.stack(norms).double().tolist(), lr

    def after_chunk(self, losses_h: list[float], norms_h: list[float], lr: float) -> bool:
        """Accept the chunk just trained (or roll it back); log, evaluate, checkpoint. False: stop the run."""
        cfg = self.cfg
        s = self.state
        scan = self._check(losses_h, norms_h)
        if scan.bad is not None:
            idx, why, _ = scan.bad
            if self.guard is not None and s.retries < cfg.guard_retries:
                self._rollback(idx, why, losses_h[idx], norms_h[idx])
                self.bar.n = self.state.step  # the rollback restored an earlier loop state
                self.bar.refresh()
                self._t_chunk = time.perf_counter()
                return True
            # Non-finite with no retry left (or no guard): nothing to continue from.
            self._divergence_event(s.step + idx, why, losses_h[idx], norms_h[idx], action="stop")
            self.reason = why
            if self.guard is not None:
                self.reason += (f"; gave up after {s.retries} rollbacks in this incident "
                                f"(guard_retries={cfg.guard_retries})")
            return False
        now = time.perf_counter()
        dt = now - self._t_chunk
        self._t_chunk = now
        s.wall_time_s += dt
        s.acc_loss += sum(losses_h)
        s.acc_grad += sum(norms_h)
        s.acc_grad_max = max([s.acc_grad_max] + norms_h)
        s.acc_n += len(losses_h)
        s.recent, s.watch = scan.recent, scan.watch
        for i, watch in scan.closed:
            self._watch_closed(s.step + i, watch)
        s.step += len(losses_h)
        self.bar.update(s.step - self.bar.n)
        if s.step % cfg.log_every == 0 or s.step == self.total:
            s.last_train_loss = s.acc_loss / s.acc_n
            self.emit({"step": s.step, "kind": "train", "train_loss": s.last_train_loss,
                       "grad_norm": s.acc_grad / s.acc_n, "grad_norm_max": s.acc_grad_max, "lr": lr,
                       "samples_per_s": len(losses_h) * cfg.batch_size / max(dt, 1e-9),
                       "time_s": s.wall_time_s})
            s.acc_loss = s.acc_grad = s.acc_grad_max = 0.0
            s.acc_n = 0
        evaluated = s.step % cfg.eval_every == 0 or s.step == self.total
        if evaluated:
            self._evaluate()
        # Also after every evaluation: a rollback then never lands before an eval line or a
        # best.pt, so both always belong to the trajectory that the run continues. Never with a
        # spike under watch: the rollback it may need must land before the spike.
        if (evaluated or s.step % self.ckpt_every == 0) and s.watch is None:
            if s.incident_until is not None and s.step >= s.incident_until:
                self._recovered()
            self._checkpoint()
        self._t_chunk = time.perf_counter()  # evaluation and checkpoints are not training time
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        return True

    def end(self, status: str, reason: str | None = None) -> Run:
        """Close the run: final summary, trackers, log."""
        self.bar.close()
        try:
            if status == "diverged":  # its last evaluations are final: their best.pt too
                self._write_best()
            summary = self._write_summary(status, reason)
            finish_trackers(self.trackers, self.run.path, summary)
        except OSError:
            if status != "failed":
                raise
            # The error that failed the run (a full disk, say) is on its way up; this one would hide it.
            summary = {"status": status, "reason": reason}
        finally:
            self.log.close()
            self.run.release()
        return Run(self.run.path, self.cfg, summary)

    def fit(self) -> Run:
        try:
            done = self.begin()
        except BaseException as e:
            if isinstance(e, WriteError):  # the first checkpoint or summary: say so where the disk still allows
                e.run = e.run or self.run.path
                try:
                    self._write_summary("failed", f"{type(e).__name__}: {e}")
                except OSError:
                    pass
            self.run.release()  # begin() may have taken it
            raise
        if done is not None:
            return done
        status, reason = "running", None
        try:
            while not self.done:
                if not self.after_chunk(*self.run_chunk()):
                    status, reason = "diverged", self.reason
                    break
            else:
                status = "completed"
        except KeyboardInterrupt as e:
            # The CLI turns SIGTERM into KeyboardInterrupt("SIGTERM"); a plain Ctrl-C has no message.
            status, reason = "interrupted", str(e) or "SIGINT"
            raise Interrupted(self.run.path, self.state.step, reason) from None
        except BaseException as e:
            status, reason = "failed", f"{type(e).__name__}: {e}"
            if isinstance(e, WriteError) and e.run is None:
                e.run = self.run.path  # the command line names the run to continue
            raise
        finally:
            run = self.end(status, reason)
        return run

    def _check(self, losses: list[float], norms: list[float]) -> Scan:
        s = self.state
        if self.guard is not None:
            return self.guard.scan(s.recent, s.watch, s.step, losses, norms,
                                   tolerate=s.retries >= self.cfg.guard_retries,
                                   final=s.step + len(losses) >= self.total)
        out = Scan(recent=[], watch=None)
        for i, (l, g) in enumerate(zip(losses, norms)):
            if not math.isfinite(l) or not math.isfinite(g):
                what = f"loss ({l})" if not math.isfinite(l) else f"gradient norm ({g})"
                out.bad = (i, f"non-finite {what} with the guard off", False)
                break
        return out

    def _divergence_event(self, bad_step: int, why: str, loss: float, norm: float, **extra: Any) -> None:
        self.emit({"step": bad_step + 1, "kind": "event", "event": "divergence", "reason": why, "loss": loss,
                   "grad_norm": norm, "lr": self._lr(bad_step), **extra})

    def _watch_closed(self, step: int, watch: dict[str, Any]) -> None:
        """A watch over a spike ended at ``step`` without a rollback: absorbed, or kept because the
        incident's retries are spent (a finite loss then goes on as it would without the guard)."""
        s = self.state
        if watch["outcome"] == "absorbed":
            s.absorbed += 1
            self.emit({"step": step + 1, "kind": "event", "event": "spike_absorbed", "spike_step": watch["step"],
                       "loss": watch["loss"], "median": watch["median"], "above": watch["above"],
                       "watched": watch["seen"]})
        else:
            self.emit({"step": step + 1, "kind": "event", "event": "divergence", "reason": self.guard.describe(watch),
                       "loss": watch["loss"], "lr": self._lr(step), "action": "continue", "retry": s.retries,
                       "spike_step": watch["step"]})
        if s.incident_until is not None:  # a clean stretch counts from here
            s.incident_until = max(s.incident_until, step + 1 + self.cfg.guard_window)

    def _rollback(self, idx: int, why: str, loss: float, norm: float) -> None:
        """Back to the last checkpoint, past every batch the abandoned attempt drew, at a lower lr."""
        s, cfg = self.state, self.cfg
        bad_step = s.step + idx
        target = self.snapshot["step"]
        first, count = target + s.data_offset, bad_step + 1 - target
        lr_scale = s.lr_scale * cfg.guard_lr_decay
        # What outlives the rollback: the guard's own state, and the counts of the events it wrote.
        keep = dict(data_offset=s.data_offset + count, skipped=s.skipped + count, retries=s.retries + 1,
                    interventions=s.interventions + 1, absorbed=s.absorbed, lr_scale=lr_scale,
                    incident_until=max(s.incident_until or 0, bad_step + 1 + cfg.guard_window))
        self._divergence_event(bad_step, why, loss, norm, action="rollback", rollback_to=target,
                               new_lr=cfg.lr * lr_scale, retry=keep["retries"])
        self.emit({"step": bad_step + 1, "kind": "event", "event": "skip_batches", "first": first,
                   "last": first + count - 1, "count": count})
        # A copy: optimisers update their state tensors in place (Adam's moments), and loading the
        # snapshot itself would let the retry rewrite the state that the next rollback restores.
        self._load_state_dict(copy.deepcopy(self.snapshot))
        self.train_step.reset()
        s = self.state
        for k, v in keep.items():
            setattr(s, k, v)
        self.pending_best = None  # measured on the abandoned trajectory
        # The abandoned trajectory's train/eval lines (after the rollback target) would otherwise
        # sit next to the replayed ones at the same steps; the event lines say what happened.
        self.log.close()
        s.metrics_lines = self.run.truncate_metrics(lines=s.metrics_lines, keep_events=True)
        self.log = MetricsLog(self.run.metrics_path)

    def _recovered(self) -> None:
        """The open incident is over: retries and learning rate start afresh."""
        s = self.state
        self.emit({"step": s.step, "kind": "event", "event": "recovered", "retries": s.retries,
                   "lr": self.cfg.lr, "skipped": s.skipped})
        s.retries, s.lr_scale, s.incident_until = 0, 1.0, None

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
        s.solved_streak = s.solved_streak + 1 if solved else 0
        if better:
            s.best, s.best_step = value, s.step
        self.emit({"step": s.step, "kind": "eval", **metrics})
        if better:  # written with the next checkpoint: a rollback never lands before a best.pt
            self.pending_best = ckpt.encode(self._state_dict())

    def _write_best(self) -> None:
        if self.pending_best is not None:
            ckpt.atomic_write_bytes(self.run.ckpt_dir / "best.pt", self.pending_best)
            self.pending_best = None

    def _checkpoint(self) -> None:
        self._write_best()
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
        if s.interventions:
            parts.append(f"rollbacks={s.interventions}")
        return " ".join(parts)

    @property
    def stopped_solved(self) -> bool:
        """``stop_when_solved``: the primary metric has been past the solved threshold long enough."""
        n = self.cfg.stop_when_solved
        return bool(n) and self.state.solved_streak >= n

    @property
    def done(self) -> bool:
        """Nothing left to train: the step budget is spent, or the run stopped once solved."""
        return self.state.step >= self.total or self.stopped_solved

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
            "final_train_loss": s.last_train_loss, "guard_interventions": s.interventions,
            "spikes_absorbed": s.absorbed, "skipped_batches": s.skipped, "lr_final": cfg.lr * s.lr_scale,
            "wall_time_s": s.wall_time_s, "engine": self.engine, "device": str(self.device),
        }
        if self.stopped_solved:
            summary["stopped_early"] = f"solved at {cfg.stop_when_solved} evaluations in a row (stop_when_solved)"
        if task.primary_metric == "test_mse":
            summary["baseline_mse"] = task.baseline
        self.run.write_summary(summary)
        return summary


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, unit="step",
                dynamic_ncols=True, leave=True, mininterval=0.5)


def _loop_state(values: dict[str, Any]) -> LoopState:
    """A checkpoint's loop state; one written before the per-incident guard keeps what still applies."""
    values = dict(values)
    if "divergences" in values:  # its rollbacks; its retries counted over the whole run, not per incident
        values["interventions"], values["retries"] = values.pop("divergences"), 0
    return LoopState(**values)


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]


def _np_restore(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def open_trainer(cfg: Config | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
                 group: str | None = None, progress: bool | None = None, out_dir: str | Path | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None, **overrides: Any) -> Trainer:
    """A :class:`Trainer` for a new run folder, or for continuing ``resume``; see :func:`train`."""
    if resume is not None:
        run = RunDir.open(resume)
        check_idle(run.path)  # begin() takes the lock; this only says so before the resume notes
        cfg = run.read_config()
        if overrides:
            cfg = cfg.replace(**overrides)
        return Trainer(cfg, run, resume=True, group=group, progress=progress, on_record=on_record)
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
        # config.json is written: only now does the folder get its name (and replace an --overwrite'n run)
        run.commit_create()
    except BaseException:
        # Nothing was trained: leave no folder that blocks the name; a replaced run stays as it was.
        run.undo_create()
        raise
    return trainer


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
        on_record: called with every metrics record as it is written.
    """
    return open_trainer(cfg, resume=resume, overwrite=overwrite, group=group, progress=progress, out_dir=out_dir,
                        on_record=on_record, **overrides).fit()
