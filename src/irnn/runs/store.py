"""The run store: one folder per run, written so that nothing is ever half-written or lost.

A run folder holds::

    config.json      the fully resolved config plus versions, git revision, device
    metrics.jsonl    one JSON object per logging event, each with "step" and "kind"
    summary.json     status and the final numbers
    checkpoints/     ckpt-<step>.pt (the last K) and best.pt: state_dicts, RNG states, guard state

Every file except the append-only metrics log is written atomically
(temporary file, flush, fsync, rename).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..config import Config, ConfigError, from_dict

CONFIG, METRICS, SUMMARY, CKPT_DIR = "config.json", "metrics.jsonl", "summary.json", "checkpoints"
# Keys of a metrics line that measure wall-clock time; everything else is deterministic.
WALL_CLOCK_KEYS = ("time_s", "samples_per_s", "wall_time_s")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj: Any) -> str:
    """JSON with non-finite floats written as null-safe strings (JSON has no NaN)."""
    return json.dumps(_clean(obj), default=_json_default, sort_keys=False)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, default=_json_default) + "\n").encode())


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def git_revision() -> str | None:
    """The git revision of the package's source tree, when it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    if out.returncode != 0 or not rev:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return rev + ("-dirty" if dirty else "")


def default_run_name(cfg: Config, task_name: str | None = None) -> str:
    """``<model>-<T>__<optimizer>__s<seed>__<time>``, as the prototype named runs (``irnn-150``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{model_label(cfg)}__{cfg.optimizer}__s{cfg.seed}__{stamp}"


def model_label(cfg: Config) -> str:
    """``irnn-150`` for the adding problem, ``irnn-mnist`` / ``lstm-pmnist`` otherwise."""
    return f"{cfg.model}-{cfg.seq_len}" if cfg.task == "adding" else f"{cfg.model}-{cfg.task}"


def writable_dir(path: str | Path, what: str) -> Path:
    """``path``, created if need be; a ConfigError naming ``what`` when it cannot be made or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {what} {str(path)!r}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {str(path)!r} is not writable; choose another with --out")
    return path


@dataclass
class RunDir:
    """One run's folder and its files."""

    path: Path
    # the folder that --overwrite moved aside, until the new run has started
    replaced: Path | None = None

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def ckpt_dir(self) -> Path:
        return self.path / CKPT_DIR

    # -- creation -------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, name: str, *, overwrite: bool = False) -> "RunDir":
        """Make a fresh run folder; refuses an existing one unless ``overwrite``."""
        root = writable_dir(root, "runs folder")
        path = root / name
        replaced = None
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise ConfigError(f"run folder {str(path)!r} already exists; use --resume {path} to continue it, "
                                  f"--overwrite to replace it, or another --name")
            # Moved aside, not deleted: the caller deletes it once the new run has really started
            # (commit_overwrite) and puts it back if the new run fails to start (undo_create).
            replaced = path.with_name(f".{name}.replaced-{os.getpid()}-{time.time_ns()}")
            try:
                os.replace(path, replaced)
            except OSError as e:
                raise ConfigError(f"cannot replace {str(path)!r}: {e.strerror}") from None
        try:
            path.mkdir(parents=True)
            (path / CKPT_DIR).mkdir()
        except OSError as e:
            if replaced is not None:
                os.replace(replaced, path)
            raise ConfigError(f"cannot create run folder {str(path)!r}: {e.strerror}") from None
        return cls(path, replaced)

    def commit_overwrite(self) -> None:
        """Delete the run folder that ``create(overwrite=True)`` replaced."""
        if self.replaced is not None:
            import shutil

            if self.replaced.is_dir() and not self.replaced.is_symlink():
                shutil.rmtree(self.replaced, ignore_errors=True)
            else:
                self.replaced.unlink(missing_ok=True)
            self.replaced = None

    def undo_create(self) -> None:
        """Remove a just-created folder in which nothing was trained, restoring any replaced one."""
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
        if self.replaced is not None:
            os.replace(self.replaced, self.path)
            self.replaced = None

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run folder; a one-line ConfigError when it is missing or not a run."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"run folder {str(path)!r} does not exist")
        if not path.is_dir():
            raise ConfigError(f"{str(path)!r} is not an irnn run folder (not a folder)")
        if not (path / CONFIG).is_file():
            raise ConfigError(f"{str(path)!r} is not an irnn run folder (no {CONFIG})")
        return cls(path)

    # -- files ----------------------------------------------------------------
    def write_config(self, cfg: Config, **extra: Any) -> None:
        atomic_write_json(self.config_path, {"config": cfg.to_dict(), **extra})

    def read_config(self) -> Config:
        try:
            data = read_json(self.config_path)
            return from_dict(data["config"])
        except ConfigError as e:
            raise ConfigError(f"{self.config_path}: not a valid irnn config ({e})") from None
        except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bad UTF-8
            why = "no 'config' table" if isinstance(e, (KeyError, TypeError)) else "not valid JSON"
            raise ConfigError(f"{self.config_path}: not a valid irnn config ({why}); "
                              f"the run cannot be resumed") from None
        except OSError as e:
            raise ConfigError(f"{self.config_path}: cannot be read ({e.strerror})") from None

    def read_config_extra(self) -> dict[str, Any]:
        return read_json(self.config_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any] | None:
        try:
            summary = read_json(self.summary_path)
        except (OSError, ValueError):  # missing, unreadable, not JSON or not UTF-8
            return None
        return summary if isinstance(summary, dict) else None

    def metrics(self) -> list[dict[str, Any]]:
        return list(iter_metrics(self.metrics_path))

    def truncate_metrics(self, max_step: int, *, keep_events: bool = False) -> int:
        """Keep only whole lines with ``step <= max_step`` (used on resume and rollback); returns lines kept.

        ``keep_events`` also keeps later ``kind: event`` lines: a rollback drops the abandoned
        trajectory's train/eval lines but keeps the record of why it was abandoned.
        """
        if not self.metrics_path.exists():
            return 0
        kept = []
        for line in _read_lines(self.metrics_path):
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
                continue
            if obj["step"] <= max_step or (keep_events and obj.get("kind") == "event"):
                kept.append(line)
        atomic_write_bytes(self.metrics_path, "".join(line + "\n" for line in kept).encode())
        return len(kept)

    def remove_temp_files(self) -> list[Path]:
        """Delete the temporary files of atomic writes cut short by a kill; returns what was removed."""
        removed = []
        for folder in (self.path, self.ckpt_dir):
            if not folder.is_dir():
                continue
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as fh:
        data = fh.read()
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # a line cut short by a kill
        yield line


def iter_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every whole line of a metrics.jsonl (a line cut short by a kill is skipped)."""
    path = Path(path)
    if not path.exists():
        return
    for line in _read_lines(path):
        yield json.loads(line)


class MetricsLog:
    """Append-only JSON-lines log, flushed (and fsync'd) after every write."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
