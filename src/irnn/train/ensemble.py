"""Train many runs at once: compatible members step together as one stacked ensemble.

Each member is an ordinary :class:`~irnn.train.loop.Trainer` with its own run
folder, data, model, optimiser, divergence guard, metrics and checkpoints; only
the training step is shared (:class:`irnn.engine.ensemble.StackedStep`). Each
member's chunk goes through the same :meth:`Trainer.after_chunk` as a run alone,
so a member that diverges rolls back alone (and skips its own batches), and then
simply trails the others by some steps: every member draws the batch of its own
step (:meth:`Trainer.batch`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..engine.ensemble import StackedStep, stackable
from ..models import RNN_KINDS
from ..runs.store import WriteError
from .loop import Interrupted, Run, Trainer, open_trainer, train

MAX_ENSEMBLE = 16
# On the CPU a stack shares no arithmetic between its models (each has its own W_hh), only per-step
# overhead, and it pays in cache: every member's forward runs before any backward, so a member's hidden
# states have left the core's L2 (1 MiB here) by the time its backward reads them, where a model trained
# alone runs its backward straight after its forward, newest states first. Measured on the 2-core CPU
# against the same models one after another (2026-11-29, in-loop dW_hh engine; 1 / 2 threads):
#   per member <= 1 MiB of states: 16 at T=150, B=16: 1.0-1.3x / 1.1-1.3x; 16 at T=50, B=32: 1.11x / 1.37x
#   1.2 MiB: 8 at T=100, B=32: 0.93x / 1.12x; 8 at T=200, B=16: 1.01x / 1.17x
#   1.8-2.4 MiB: 4 at T=150, B=32: 0.86x / 1.00x; 2, 3 or 6 at T=400, B=16: 0.79-0.90x / 1.00-1.04x
# and a 16-model stack at T=400 (39 MiB in all, past the 32 MiB L3): 0.61-0.81x. So a CPU stack only
# takes members with at most MEMBER_BYTES of hidden states each (16 of them then fit in 16 MiB).
MEMBER_BYTES = 2**20


def stack_limit(cfg: Config) -> int:
    """How many members like ``cfg`` one stack may hold: ``MAX_ENSEMBLE``, except on the CPU when a
    member's hidden states pass ``MEMBER_BYTES``: then 1 (each trains alone)."""
    if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()):
        return MAX_ENSEMBLE
    per_model = cfg.batch_size * cfg.sequence_length() * cfg.hidden_size * cfg.num_layers * 4  # float32 states
    return 1 if per_model > MEMBER_BYTES else MAX_ENSEMBLE


def plan(cfgs: list[Config], *, ensemble: bool = True, max_ensemble: int = MAX_ENSEMBLE) -> list[list[int]]:
    """The order of training: lists of indices into ``cfgs``, each trained as one stack (or alone)."""
    groups: dict[Any, list[int]] = {}
    order: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        key = ensemble_key(cfg) if ensemble else None
        if key is None:
            order.append([i])
            continue
        members = groups.setdefault(key, [])
        members.append(i)
        if len(members) == 1:
            order.append(members)
        if len(members) >= min(max_ensemble, stack_limit(cfg)):
            groups[key] = []  # the next compatible member starts a new stack
    return order


def ensemble_key(cfg: Config) -> tuple | None:
    """Members with the same key can share a stacked step; None: train this one alone.

    Stacking needs ReLU/tanh RNNs and equal tensor shapes, and the fused C++ engine
    on the CPU or the Triton kernel on CUDA; seeds, learning rates, clipping,
    initialisation, optimisers and budgets may differ.
    """
    from .. import registry

    task = registry.task_spec(cfg.task)
    if cfg.model not in RNN_KINDS or cfg.engine not in ("auto", "fused") or task.per_step:
        return None
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        from ..engine import triton_rnn

        if cfg.engine == "fused" or not triton_rnn.available():
            return None
    else:
        from ..engine import fused

        if not fused.available():
            return None
    nonlinearity = RNN_KINDS[cfg.model]
    return (cfg.task, cfg.seq_len if task.by_length else cfg.data_source, nonlinearity, cfg.hidden_size,
            cfg.num_layers, cfg.batch_size, cfg.threads, cfg.device, cfg.isa)


def _trainer(cfg: Config, out: Path, group: str | None, resume: bool) -> Trainer:
    if resume and (out / "config.json").is_file():
        return open_trainer(resume=out, group=group, progress=False)
    return open_trainer(cfg, out_dir=out, overwrite=True, group=group, progress=False)


def fit_together(trainers: list[Trainer], progress: bool = False) -> list[Run]:
    """Step the trainers' models as one ensemble until each finishes (or diverges)."""
    from tqdm.auto import tqdm

    runs: dict[int, Run] = {}
    active: list[Trainer] = []
    try:
        for t in trainers:
            done = t.begin()
            if done is not None:
                runs[id(t)] = done
            else:
                active.append(t)
        if active and not stackable([t.model for t in active]):
            raise ValueError("these members cannot be stacked into one ensemble")
    except BaseException:
        for t in active:  # begun, so holding their runs' locks
            t.run.release()
        raise
    step = StackedStep(active[0].task.loss_fn) if active else None
    for t in active:  # recorded in each member's summary
        t.engine = f"ensemble-{'triton' if t.device.type == 'cuda' else 'fused'}"
    total = sum(t.total - t.state.step for t in active)
    bar = tqdm(total=total, desc=f"ensemble of {len(active)}", unit="model-step", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        while active:
            plans = [(t._next_boundary(t.state.step), t._lr(t.state.step)) for t in active]
            n = min(end - t.state.step for t, (end, _) in zip(active, plans))
            for t, (_, lr) in zip(active, plans):
                t.train_step.set_lr(lr)
            models = [t.model for t in active]
            opts = [t.optimizer for t in active]
            clips = [t.cfg.clip_norm for t in active]
            losses, norms = [], []
            for i in range(n):
                xs, ys = zip(*(t.batch(t.state.step + i) for t in active))
                loss, norm = step(models, opts, clips, torch.stack(xs), torch.stack(ys))
                losses.append(loss)
                norms.append(norm)
            losses_h = torch.stack(losses).double().T.tolist()  # [members][n]: one host sync
            norms_h = torch.stack(norms).double().T.tolist()
            still = []
            for k, (t, (_, lr)) in enumerate(zip(active, plans)):
                before = t.state.step
                try:
                    ok = t.after_chunk(losses_h[k], norms_h[k], lr)
                except WriteError:
                    raise  # the storage refused (disk full...): it would refuse the others too
                except Exception as e:  # noqa: BLE001 - one member's failure must not stop the others
                    runs[id(t)] = t.end("failed", f"{type(e).__name__}: {e}")
                    continue
                bar.update(max(t.state.step - before, 0))
                if not ok:
                    runs[id(t)] = t.end("diverged", t.reason)
                elif t.done:
                    runs[id(t)] = t.end("completed")
                else:
                    still.append(t)
            active = still
    except KeyboardInterrupt as e:
        for t in active:
            runs[id(t)] = t.end("interrupted", str(e) or "SIGINT")
        raise Interrupted(active[0].run.path if active else Path("."), 0, str(e) or "SIGINT") from None
    except BaseException as e:
        for t in active:
            runs[id(t)] = t.end("failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
    return [runs[id(t)] for t in trainers]


def train_many(cfgs: list[Config], out_dirs: list[str | Path], *, group: str | None = None,
               progress: bool | None = None, resume: bool = True, ensemble: bool = True,
               max_ensemble: int = MAX_ENSEMBLE) -> list[Run]:
    """Train several runs into the given folders, resuming any that already started.

    Members that can share a stacked step (same architecture, sequence length and
    batch size, on the fused CPU engine) are trained together, up to ``max_ensemble``
    at a time (fewer on the CPU for long sequences, see :func:`stack_limit`); the others
    one after another. Every member's folder is an ordinary run.
    """
    out_dirs = [Path(o) for o in out_dirs]
    order = plan(cfgs, ensemble=ensemble, max_ensemble=max_ensemble)
    runs: dict[int, Run] = {}
    for idx in order:
        if len(idx) == 1:
            i = idx[0]
            if resume and (out_dirs[i] / "config.json").is_file():
                runs[i] = train(resume=out_dirs[i], group=group, progress=progress)
            else:
                runs[i] = train(cfgs[i], out_dir=out_dirs[i], overwrite=True, group=group, progress=progress)
            continue
        trainers = [_trainer(cfgs[i], out_dirs[i], group, resume) for i in idx]
        show = progress if progress is not None else not all(cfgs[i].quiet for i in idx)
        for i, run in zip(idx, fit_together(trainers, progress=show)):
            runs[i] = run
    return [runs[i] for i in range(len(cfgs))]
