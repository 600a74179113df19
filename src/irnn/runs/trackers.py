"""Optional mirrors of the run store: Weights & Biases and TensorBoard.

The local run store is always written; a tracker only mirrors what it logs,
under the same metric names (``train_loss``, ``test_mse``, ``grad_norm``, ...).
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError


class Tracker:
    def log(self, record: dict[str, Any]) -> None:  # pragma: no cover - interface
        pass

    def log_image(self, name: str, path: str | Path) -> None:  # pragma: no cover - interface
        pass

    def finish(self, summary: dict[str, Any]) -> None:  # pragma: no cover - interface
        pass


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "kind") and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class WandbTracker(Tracker):
    """Logs config, metrics and figures through the ``wandb`` package (``WANDB_MODE=offline`` works)."""

    def __init__(self, cfg: Config, run_path: Path, name: str, group: str | None = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError('--track wandb needs the wandb package: pip install "irnn[wandb]"') from None
        self._wandb = wandb
        self.run = wandb.init(project="irnn", name=name, group=group, config=cfg.to_dict(), dir=str(run_path),
                              reinit="finish_previous", job_type="train")

    def log(self, record: dict[str, Any]) -> None:
        vals = _scalars(record)
        if vals:
            self.run.log(vals, step=int(record["step"]))

    def log_image(self, name: str, path: str | Path) -> None:
        self.run.log({name: self._wandb.Image(str(path))})

    def finish(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (numbers.Real, str)):
                self.run.summary[k] = v
        self.run.finish()


class TensorBoardTracker(Tracker):
    """Writes event files with ``torch.utils.tensorboard`` under ``<run>/tensorboard``."""

    def __init__(self, cfg: Config, run_path: Path, name: str, group: str | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError('--track tensorboard needs the tensorboard package: pip install "irnn[tensorboard]"') from None
        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in cfg.to_dict().items()), 0)

    def log(self, record: dict[str, Any]) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, int(record["step"]))

    def log_image(self, name: str, path: str | Path) -> None:
        import matplotlib.image as mpimg
        import numpy as np

        img = mpimg.imread(str(path))
        self.writer.add_image(name, np.asarray(img)[..., :3], dataformats="HWC")

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.flush()
        self.writer.close()


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}


def make_trackers(cfg: Config, run_path: Path, name: str, group: str | None = None) -> list[Tracker]:
    names = [t.strip() for t in cfg.track.split(",") if t.strip()]
    return [TRACKERS[t](cfg, run_path, name, group) for t in names]
