"""The run store: one folder per run, written so that nothing is ever half-written or lost.

A run folder holds::

    config.json      the fully resolved config plus versions, git revision, device
    metrics.jsonl    one JSON object per logging event, each with "step" and "kind"
    summary.json     status and the final numbers
    checkpoints/     ckpt-<step>.pt (the last K) and best.pt: state_dicts, RNG states, guard state

Every file except the append-only metrics log is written atomically
(temporary file, flush, fsync, rename); an append that fails is cut back to the last whole
line. A new run folder is built under a hidden name (``.<name>.new.<pid>@<host>.<token>``) and
renamed into place once its ``config.json`` is written, so ``<name>`` is always a resumable run.
A write that fails (disk full, read-only, no permission) raises :class:`WriteError`, which
names the file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..config import Config, ConfigError, from_dict

CONFIG, METRICS, SUMMARY, CKPT_DIR = "config.json", "metrics.jsonl", "summary.json", "checkpoints"
# Keys of a metrics line that measure wall-clock time; everything else is deterministic.
WALL_CLOCK_KEYS = ("time_s", "samples_per_s", "wall_time_s")


class WriteError(OSError):
    """A file could not be written (disk full, read-only filesystem, no permission...).

    ``filename`` is the file that was being written (not its temporary name), ``strerror`` the
    cause. ``run`` is set to the run folder once training has started, so that the command line
    can say how to continue it.
    """

    run: Path | None = None


# The errors that say "the storage refused", as opposed to a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def write_error(e: OSError, path: str | Path) -> WriteError:
    """``e`` as a :class:`WriteError` that names ``path``."""
    if isinstance(e, WriteError):
        return e
    return WriteError(e.errno, e.strerror or str(e), str(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a mix.

    Raises :class:`WriteError` (the old file intact, no temporary file left) when it cannot.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from None
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
    """``irnn-150`` for the adding problem, ``lstm-copy200`` for another task keyed by its length,
    ``irnn-mnist`` / ``lstm-pmnist`` for one that sets its own."""
    return run_label(cfg.model, cfg.task, cfg.seq_len)


def run_label(model: str, task: str, seq_len: int) -> str:
    """:func:`model_label` from the three values (a stored config; a task no longer registered counts as
    one that sets its own length)."""
    from .. import registry

    if task == "adding":
        return f"{model}-{seq_len}"
    by_length = task in registry.task_names() and registry.task_spec(task).by_length
    return f"{model}-{task}{seq_len}" if by_length else f"{model}-{task}"


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


def note(line: str) -> None:
    """One line for the person running this, on stderr."""
    print(f"irnn: {line}", file=sys.stderr, flush=True)


_MY_TOKENS: set[str] = set()  # the hidden folders this process is building (same pid, so alive)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"


def _hidden_name(name: str, kind: str) -> str:
    token = f"{time.time_ns():x}"
    _MY_TOKENS.add(token)
    return f".{name}.{kind}.{os.getpid()}@{_host()}.{token}"


# .<name>.<new|old>.<pid>@<host>.<token>: a run folder being built, or one that --overwrite set aside
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>new|old)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9.-]+)"
                     r"\.(?P<token>[0-9a-f]+)$")


def _owner_gone(m: re.Match) -> bool:
    """Whether the process that named a hidden folder is dead (judged on its own host only)."""
    if m["host"] != _host():
        return False
    pid = int(m["pid"])
    if pid == os.getpid():  # this process, or an earlier one that had the same pid (containers)
        return m["token"] not in _MY_TOKENS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:  # a killed child that nobody has reaped yet still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class FileLock:
    """An exclusive ``fcntl.flock`` on a lock file. The kernel drops it when the process dies, so a
    crashed process never leaves a run or a sweep member claimed."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool = True, create: bool = True) -> bool:
        """Take the lock (False: another process holds it, and ``blocking`` is False). Without ``create``,
        a missing lock file raises FileNotFoundError instead of being made."""
        fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


RUN_LOCK = ".train.lock"  # flock'ed by the process training the run, so that no other one trains or replaces it


def run_busy(path: Path) -> bool:
    """Whether a live process holds ``path``'s run lock (checked without creating a lock file)."""
    lock = FileLock(path / RUN_LOCK)
    try:
        taken = lock.acquire(blocking=False, create=False)
    except OSError:  # no lock file (never trained, or by an older irnn), or not a folder
        return False
    lock.release()
    return not taken


def _busy_error(path: Path) -> ConfigError:
    return ConfigError(f"run folder {str(path)!r} is being trained by another process right now; "
                       f"wait for it to end, or use another --name")


def check_idle(path: Path) -> None:
    """A one-line ConfigError when another process is training the run at ``path`` now."""
    if run_busy(path):
        raise _busy_error(path)


def holds_no_run(path: Path) -> bool:
    """A folder with no files but temporary ones: what a start-up cut short by a kill leaves
    (an older irnn made the run folder and ``checkpoints/`` before ``config.json``)."""
    if path.is_symlink() or not path.is_dir():
        return False
    for sub, dirs, files in os.walk(path):
        if any(Path(sub, d).is_symlink() for d in dirs):
            return False
        if any(not (f.startswith(".") and f.endswith(".tmp")) and f != RUN_LOCK for f in files):
            return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(root: Path, name: str) -> None:
    """Tidy what a kill during the start-up of run ``root/name`` can leave, saying so in one line each.

    A folder being built (``.<name>.new...``) whose process died is removed: it never holds more
    than ``config.json``. A run that ``--overwrite`` had set aside (``.<name>.old...``) is put back
    when the kill came before its replacement was in place, and removed once the replacement is a
    run (anything else there: it is left alone).
    """
    try:
        found = [(p, m) for p in root.iterdir() if (m := _HIDDEN.match(p.name)) and m["name"] == name]
    except OSError:
        return
    for p, m in sorted(found, key=lambda pm: pm[0].name):
        if not _owner_gone(m):
            continue
        target = root / name
        if m["kind"] == "new":
            _remove(p)
            note(f"removed {p}, a run folder whose start-up was cut short")
        elif (target / CONFIG).is_file():
            _remove(p)
            note(f"removed {p}, the run that --overwrite replaced (its replacement had started)")
        elif not (target.exists() or target.is_symlink()):
            os.replace(p, target)
            note(f"put back {target}: the --overwrite that replaced it was stopped before the new run started")


@dataclass
class RunDir:
    """One run's folder and its files."""

    path: Path
    # create(): where commit_create() moves the folder, and whether it may replace a run there
    final: Path | None = None
    overwrite: bool = False
    lock: FileLock | None = None  # held from claim() to release(), while this process trains the run

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
        """A new run folder, built under a hidden name until :meth:`commit_create` moves it to ``root/name``.

        Refuses an existing run unless ``overwrite`` (the old run is kept until the new one is in
        place). A folder that holds no run (:func:`holds_no_run`) is reused, and the leftovers of a
        start-up cut short are tidied (:func:`clean_leftovers`); each says so in one line.
        """
        root = writable_dir(root, "runs folder")
        path = root / name
        clean_leftovers(root, name)
        if path.exists() or path.is_symlink():
            if holds_no_run(path):
                _remove(path)
                note(f"reusing {path}: it held no run (a start-up cut short)")
            elif not overwrite:
                if (path / CONFIG).is_file():
                    raise ConfigError(f"run folder {str(path)!r} already exists; use --resume {path} to continue it, "
                                      f"--overwrite to replace it, or another --name")
                raise ConfigError(f"{str(path)!r} already exists and is not an irnn run (no {CONFIG}); "
                                  f"use --overwrite to replace it, or another --name")
            else:
                check_idle(path)  # --overwrite must not pull a run from under the process training it
        tmp = root / _hidden_name(name, "new")
        try:
            tmp.mkdir()
            (tmp / CKPT_DIR).mkdir()
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(e, tmp) from None
        return cls(tmp, final=path, overwrite=overwrite)

    def commit_create(self) -> None:
        """Move the folder that :meth:`create` built into place (its ``config.json`` written by now).

        A run it replaces (``--overwrite``) is set aside first and deleted once the new folder is in.
        """
        final = self.final
        if final is None:
            return
        replaced = None
        if final.exists() or final.is_symlink():
            if holds_no_run(final):
                _remove(final)
            elif not self.overwrite:  # made meanwhile by another process
                raise ConfigError(f"run folder {str(final)!r} already exists; use --resume {final} to continue it, "
                                  f"--overwrite to replace it, or another --name")
            else:
                check_idle(final)  # started training since create() checked
                replaced = final.with_name(_hidden_name(final.name, "old"))
                try:
                    os.replace(final, replaced)
                except OSError as e:
                    raise ConfigError(f"cannot replace {str(final)!r}: {e.strerror}") from None
        try:
            os.rename(self.path, final)
        except OSError as e:
            if replaced is not None:
                os.replace(replaced, final)
            raise write_error(e, final) from None
        self.path, self.final = final, None
        _fsync_dir(final.parent)
        if replaced is not None:
            _remove(replaced)

    def claim(self) -> None:
        """Take the run's lock for training; a one-line ConfigError when another process holds it."""
        lock = FileLock(self.path / RUN_LOCK)
        try:
            taken = lock.acquire(blocking=False)
        except OSError as e:
            raise write_error(e, self.path / RUN_LOCK) from None
        if not taken:
            raise _busy_error(self.path)
        self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def undo_create(self) -> None:
        """Remove the folder that :meth:`create` built, when its run could not start."""
        if self.final is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run folder; a one-line ConfigError when it is missing or not a run."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"run folder {str(path)!r} does not exist")
        if not path.is_dir():
            raise ConfigError(f"{str(path)!r} is not an irnn run folder (not a folder)")
        if not (path / CONFIG).is_file():
            if holds_no_run(path):
                raise ConfigError(f"{str(path)!r} is not an irnn run folder (no {CONFIG}): it is empty, as a start-up "
                                  f"cut short leaves it; run the command that made it again without --resume, "
                                  f"which reuses the folder")
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

    def truncate_metrics(self, max_step: int | None = None, *, lines: int | None = None,
                         keep_events: bool = False) -> int:
        """Keep only whole lines with ``step <= max_step``, or the first ``lines`` whole lines (used on
        resume and rollback); returns lines kept.

        A checkpoint records how many lines were written before it (``lines``): after a rollback,
        event lines with later steps come before it, and a resume keeps exactly those.
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
            before = len(kept) < lines if lines is not None else obj["step"] <= max_step
            if before or (keep_events and obj.get("kind") == "event"):
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
    """Append-only JSON-lines log, fsync'd after every line.

    A line that cannot be written whole (disk full) is cut off again, so that the file ends
    with a whole line; then :class:`WriteError` is raised. Should even that fail, readers skip
    the torn line and a resume rewrites the file without it (:meth:`RunDir.truncate_metrics`).
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(e, path) from None

    def write(self, record: dict[str, Any]) -> None:
        assert self._fd is not None, "the metrics log is closed"
        data = memoryview((dumps(record) + "\n").encode())
        size = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise write_error(e, self.path) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
