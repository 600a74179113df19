"""Optional mirrors of the run store: Weights & Biases and TensorBoard.

The local run store is always written; a tracker only mirrors what it logs,
under the same metric names (``train_loss``, ``test_mse``, ``grad_norm``, ...).
Each tracker is an optional extra: a missing package is a one-line
:class:`~irnn.config.ConfigError` that says what to install, raised before any
training starts (:func:`check_trackers`).

* ``wandb``: one W&B run per run folder, named like the folder
  (``irnn-150__adam__s0__<time>``, the prototype's ``irnn-150`` first), grouped
  by sweep, in project ``$WANDB_PROJECT`` (default ``irnn``). Its files go to
  ``<run>/wandb/`` (or ``$WANDB_DIR``); with ``WANDB_MODE=offline`` that is a
  local run to upload later with ``wandb sync <run>/wandb/offline-run-*``.
* ``tensorboard``: event files under ``<run>/tensorboard/``
  (``tensorboard --logdir runs``).
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import sys
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..runs.store import model_label

INSTALL_HINT = {
    "wandb": '--track wandb needs the wandb package: pip install "irnn[wandb]"',
    "tensorboard": '--track tensorboard needs the tensorboard package: pip install "irnn[tensorboard]"',
}


class Tracker:
    """What the trainer calls: one ``log`` per metrics.jsonl line, ``log_image`` per figure, ``finish`` once."""

    def log(self, record: dict[str, Any]) -> None:  # pragma: no cover - interface
        pass

    def log_image(self, name: str, path: str | Path, step: int) -> None:  # pragma: no cover - interface
        pass

    def finish(self, summary: dict[str, Any]) -> None:  # pragma: no cover - interface
        pass


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics line, under their metrics.jsonl names."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "kind") and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _event_scalars(record: dict[str, Any]) -> dict[str, float]:
    # A divergence event carries its own loss/grad_norm/lr: keep them apart from the training curves.
    name = record.get("event", "event")
    return {f"{name}/{k}": v for k, v in _scalars(record).items()}


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError(INSTALL_HINT["wandb"]) from None
    return wandb


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(INSTALL_HINT["tensorboard"]) from None
    return SummaryWriter


class WandbTracker(Tracker):
    """Logs config, metrics, summary and figures through the ``wandb`` package.

    The W&B run id is a hash of the run folder (and its creation time), so
    ``irnn train --resume`` continues the same W&B run when online. Metrics are
    plotted against their ``step`` key (not W&B's internal step), so the rows a
    divergence rollback writes again are kept rather than dropped.
    """

    def __init__(self, cfg: Config, run_path: Path, name: str, group: str | None = None):
        wandb = _import_wandb()
        self._wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "irnn"), name=name, group=group,
                              id=_stable_id(run_path), resume="allow", job_type="train", tags=[model_label(cfg)],
                              config={**cfg.to_dict(), "run_dir": str(run_path)},
                              dir=os.environ.get("WANDB_DIR") or str(run_path), reinit="finish_previous")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any]) -> None:
        vals = _event_scalars(record) if record.get("kind") == "event" else _scalars(record)
        if vals:
            self.run.log({"step": int(record["step"]), **vals})

    def log_image(self, name: str, path: str | Path, step: int) -> None:
        self.run.log({"step": step, name: self._wandb.Image(str(path))})

    def finish(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (numbers.Real, str)) and not isinstance(v, bool):
                self.run.summary[k] = v
        ok = summary.get("status") in ("completed", "diverged")  # a diverged run is a result, not a crash
        self.run.finish(exit_code=0 if ok else 1)


def _stable_id(run_path: Path) -> str:
    """One W&B id per run folder; a folder replaced with --overwrite gets a new one."""
    created = ""
    try:
        created = json.loads((run_path / "config.json").read_text()).get("created", "")
    except (OSError, ValueError):
        pass
    return hashlib.sha1(f"{run_path.resolve()}|{created}".encode()).hexdigest()[:16]


class TensorBoardTracker(Tracker):
    """Writes event files with ``torch.utils.tensorboard`` under ``<run>/tensorboard``."""

    def __init__(self, cfg: Config, run_path: Path, name: str, group: str | None = None):
        SummaryWriter = _import_summary_writer()
        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        # Markdown code block: TensorBoard renders the config as a readable table of lines.
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in cfg.to_dict().items()), 0)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if record.get("kind") == "event":
            self.writer.add_text("events", "    " + json.dumps(record, default=str), step)
            vals = _event_scalars(record)
        else:
            vals = _scalars(record)
        for k, v in vals.items():
            self.writer.add_scalar(k, v, step)

    def log_image(self, name: str, path: str | Path, step: int) -> None:
        import matplotlib.image as mpimg
        import numpy as np

        img = np.asarray(mpimg.imread(str(path)))  # [H, W, 3 or 4], floats in [0, 1] for PNG
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        self.writer.add_image(name, img[..., :3], step, dataformats="HWC")

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", "\n".join(f"    {k} = {v!r}" for k, v in summary.items()),
                             int(summary.get("steps") or 0))
        self.writer.flush()
        self.writer.close()


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}
_IMPORTS = {"wandb": _import_wandb, "tensorboard": _import_summary_writer}


def tracker_names(cfg: Config) -> list[str]:
    return [t.strip() for t in cfg.track.split(",") if t.strip()]


def check_trackers(cfg: Config) -> None:
    """Fail in one line, before anything is trained, when a requested tracker's package is missing."""
    for t in tracker_names(cfg):
        _IMPORTS[t]()


def make_trackers(cfg: Config, run_path: Path, name: str, group: str | None = None) -> list[Tracker]:
    return [TRACKERS[t](cfg, run_path, name, group) for t in tracker_names(cfg)]


def finish_trackers(trackers: list[Tracker], run_path: Path, summary: dict[str, Any]) -> None:
    """Log the run's figures (drawn by ``irnn.results.figures``), then close every tracker."""
    if not trackers:
        return
    step = int(summary.get("steps") or 0)
    for path in run_figures(run_path):
        for t in trackers:
            t.log_image(f"figures/{path.stem}", path, step)
    for t in trackers:
        t.finish(summary)


def run_figures(run_path: Path) -> list[Path]:
    """PNG figures of one finished run (those of ``irnn plot RUN``), written to ``<run>/figures/``.

    Drawn by ``irnn.results.figures`` (imported here, at the end of a run: matplotlib costs a second
    at start-up). Drawing is best effort: a tracker must never turn a finished run into a failed one.
    """
    from ..results import aggregate, figures

    try:
        member = aggregate.load_run(run_path)
        written = figures.run_figures(member, run_path / "figures") if member.evals or member.train_loss else []
    except Exception as e:  # noqa: BLE001 - figures are a bonus; say why and go on
        print(f"irnn: warning: could not draw the figures of {run_path}: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    return [Path(p) for p in written if str(p).endswith(".png") and Path(p).is_file()]
