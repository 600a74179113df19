"""Sweeps: a grid of ordinary runs under one folder, resumable and safe to run from several processes.

A sweep folder looks like::

    <out>/<name>/
      sweep.json       the spec (base + grid), every member's resolved config, optional study metadata
      index.json       each member's state: pending, running, completed, failed or diverged
      index.lock       flock'ed while index.json is read-modified-written
      locks/<m>.lock   flock'ed by the process training member <m> (kept outside the run folder,
                       which may be deleted and recreated)
      members/<m>/     an ordinary run folder (config.json, metrics.jsonl, summary.json, checkpoints/)

Every JSON file is written atomically. The run folder's own ``summary.json`` is the
source of truth for whether a member finished; the index is a convenient view of it
that a crash can leave stale (a "running" member whose lock nobody holds), which the
next process repairs.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .. import registry
from ..config import ENV_KEYS, Config, ConfigError, from_dict, load_file, setting_key
from ..runs.store import FileLock, RunDir, WriteError, atomic_write_json, model_label, read_json, writable_dir

SPEC_FILE, INDEX_FILE, INDEX_LOCK, SPEC_LOCK = "sweep.json", "index.json", "index.lock", "sweep.lock"
MEMBERS_DIR, LOCKS_DIR = "members", "locks"
STATES = ("pending", "running", "completed", "failed", "diverged")
FINISHED = ("completed", "diverged")  # a re-run skips these; failed members are tried again
MAX_MEMBERS = 10_000
# Keys the sweep itself sets for each member.
RESERVED_KEYS = ("name", "out")
SPEC_KEYS = ("name", "base", "grid", "description")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Short forms of config keys in member names (``irnn-150__adam__lr0.001__clip10__s0``).
_ABBREV = {"clip_norm": "clip", "init_scale": "init", "forget_bias": "fb", "hidden_size": "h", "batch_size": "b",
           "momentum": "mom", "num_layers": "L", "recurrent_std": "rstd", "input_std": "istd",
           "train_size": "ntrain", "test_size": "ntest"}
_FIELD_NAMES = tuple(f.name for f in fields(Config))


# -- the spec ------------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    """A sweep: fixed ``base`` config keys and a ``grid`` (one table of lists, or a list of such
    tables whose expansions are joined) of values to cross."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: list[dict[str, list[Any]]] = field(default_factory=list)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "grid": self.grid, "description": self.description}


def check_name(name: Any, what: str = "sweep name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 120:
        raise ConfigError(f"{what} must be a plain folder name of letters, digits, '.', '_', '+' or '-' "
                          f"(at most 120 characters), got {name!r}")
    return name


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or (key not in _FIELD_NAMES and key not in registry.all_options()) or key == "options":
        raise ConfigError(f"{where}: unknown config key {key!r}; known keys: {', '.join(_FIELD_NAMES)}")
    if key in RESERVED_KEYS:
        raise ConfigError(f"{where}: {key!r} is set by the sweep for each member; give the sweep's "
                          f"{'--name' if key == 'name' else '--out'} instead")
    return key


def _check_scalar(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: values must be finite numbers, got {value!r}")
        return value
    raise ConfigError(f"{where}: values must be numbers, strings or booleans, got {type(value).__name__} {value!r}")


def parse_spec(data: Any, *, source: str = "sweep", name: Optional[str] = None) -> SweepSpec:
    """Validate a sweep table (from a file or built in Python); any bad input is a :class:`ConfigError`.

    Args:
        data: ``{"name": str, "base": {key: value}, "grid": {key: [values]} | [{key: [values]}, ...]}``.
        source: where the table came from, for error messages.
        name: overrides ``data["name"]`` (the command line's ``--name``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a sweep must be a table with name, base and grid, got {type(data).__name__}")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown sweep key {unknown[0]!r}; a sweep has: {', '.join(SPEC_KEYS)}")
    name = check_name(name if name is not None else data.get("name"), f"{source}: sweep name")
    base = data.get("base", {})
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: base must be a table of config keys, got {type(base).__name__}")
    if isinstance(base.get("options"), dict):  # a Config's to_dict(): its model's options become keys
        base = {**{k: v for k, v in base.items() if k != "options"}, **base["options"]}
    for k, v in base.items():
        _check_scalar(v, f"{source}: base.{_check_key(k, f'{source}: base')}")
    grid = data.get("grid", {})
    if grid is None:
        grid = {}
    tables = grid if isinstance(grid, list) else [grid]
    if isinstance(grid, list) and not grid:
        raise ConfigError(f"{source}: grid is an empty list; give at least one table of key = [values]")
    out: list[dict[str, list[Any]]] = []
    for i, table in enumerate(tables):
        where = f"{source}: grid" + (f"[{i}]" if isinstance(grid, list) else "")
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table of key = [values], got {type(table).__name__}")
        clean: dict[str, list[Any]] = {}
        for k, values in table.items():
            _check_key(k, where)
            if k in base:
                raise ConfigError(f"{where}: {k!r} is set in both base and grid; keep it in one place")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{k} must be a non-empty list of values, e.g. {k} = [{_example(k)}]")
            seen = []
            for v in values:
                _check_scalar(v, f"{where}.{k}")
                if any(type(v) is type(s) and v == s for s in seen):
                    raise ConfigError(f"{where}.{k} lists {v!r} twice")
                seen.append(v)
            clean[k] = list(values)
        out.append(clean)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{source}: description must be a string, got {type(description).__name__}")
    return SweepSpec(name=name, base=dict(base), grid=out, description=description)


def _example(key: str) -> str:
    return {"seq_len": "150, 200", "model": '"irnn", "lstm"', "seed": "0, 1, 2", "lr": "0.001, 0.0001"}.get(key, "...")


def load_spec(path: str | os.PathLike, *, name: Optional[str] = None) -> SweepSpec:
    """Read a TOML or YAML sweep file."""
    return parse_spec(load_file(str(path)), source=str(path), name=name)


def parse_grid_args(items: Iterable[str]) -> dict[str, list[str]]:
    """``["seq_len=50,100", "model=irnn,lstm"]`` -> ``{"seq_len": ["50", "100"], ...}`` (strings; the
    config converts them)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--grid takes KEY=V1,V2,..., got {item!r}")
        if key in grid:
            raise ConfigError(f"--grid {key} given twice; list all its values once: --grid {key}=V1,V2")
        vals = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in vals):
            raise ConfigError(f"--grid {key}: empty value in {values!r}; give KEY=V1,V2,...")
        grid[key] = vals
    return grid


# -- expansion -------------------------------------------------------------------------------------
def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return format(v, "g")
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(v)).strip("-") or "x"


def member_name(cfg: Config, varied: Iterable[str]) -> str:
    """``<model>-<T>__<optimizer>__lr<lr>[__<key><value> for the other varied keys]__s<seed>``."""
    parts = [model_label(cfg), cfg.optimizer, f"lr{_fmt_value(cfg.lr)}"]
    for key in sorted(set(varied) - {"model", "seq_len", "task", "optimizer", "lr", "seed"}):
        value = getattr(cfg, key)
        parts.append(f"{_ABBREV.get(key, key.replace('_', '-'))}{'-' if key not in _ABBREV else ''}{_fmt_value(value)}")
    parts.append(f"s{cfg.seed}")
    name = "__".join(parts)
    if len(name) > 180:  # keep folder names well inside filesystem limits
        name = name[:160] + "__" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def expand(spec: SweepSpec) -> dict[str, Config]:
    """Every member's name and validated config, in grid order.

    A member's name carries the keys of its own grid table whose values differ somewhere in
    the sweep (so an LSTM-only ``forget_bias`` axis does not show up in IRNN names).
    """
    tables = spec.grid or [{}]
    total = sum(math.prod(len(v) for v in t.values()) for t in tables)
    if total > MAX_MEMBERS:
        raise ConfigError(f"sweep {spec.name!r} has {total} members; at most {MAX_MEMBERS} are allowed")
    points: list[tuple[dict[str, Any], Config]] = []
    for table in tables:
        keys = list(table)
        for combo in itertools.product(*(table[k] for k in keys)):
            point = dict(zip(keys, combo))
            values = {**spec.base, **point}
            try:
                cfg = from_dict(values)
            except (TypeError, ValueError, OverflowError) as e:  # ConfigError is a ValueError
                raise ConfigError(f"sweep {spec.name!r}, member {_point_str(point)}: {e}") from None
            points.append((point, cfg))
    grid_keys = {k for t in tables for k in t}
    varied = {k for k in grid_keys if len({json.dumps(getattr(c, k)) for _, c in points}) > 1}
    members: dict[str, Config] = {}
    for point, cfg in points:
        name = member_name(cfg, varied & set(point))
        if name in members:
            raise ConfigError(f"sweep {spec.name!r}: two grid points give the same member {name!r} "
                              f"(values that differ only in formatting?)")
        members[name] = cfg
    return members


def _point_str(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items()) or "(base only)"


def _identity(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """What makes two member configs the same experiment (``ENV_KEYS`` may differ)."""
    return {k: v for k, v in cfg_dict.items() if k not in ENV_KEYS}


# -- the sweep folder ------------------------------------------------------------------------------
@dataclass
class Sweep:
    """An opened sweep folder."""

    path: Path
    spec: SweepSpec
    configs: dict[str, dict[str, Any]]  # member name -> resolved config (as stored)
    meta: dict[str, Any]
    env: dict[str, Any] = field(default_factory=dict)  # this invocation's ENV_KEYS, for members it starts

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def member_dir(self, name: str) -> Path:
        return self.path / MEMBERS_DIR / name

    def member_summary(self, name: str) -> Optional[dict[str, Any]]:
        """The member's summary.json, or None while it has none (or an unreadable one)."""
        return RunDir(self.member_dir(name)).read_summary()

    def lock(self, name: str) -> FileLock:
        return FileLock(self.path / LOCKS_DIR / f"{name}.lock")

    def config(self, name: str) -> Config:
        if name not in self.configs:
            raise ConfigError(f"sweep {self.name!r} has no member {name!r}")
        return from_dict({**self.configs[name], **self.env})

    def update_meta(self, **values: Any) -> None:
        """Merge ``values`` into the study metadata kept in ``sweep.json`` (under its lock)."""
        with FileLock(self.path / SPEC_LOCK):
            data = _read_spec_file(self.path) or {}
            data["meta"] = {**data.get("meta", {}), **values}
            atomic_write_json(self.path / SPEC_FILE, data)
            self.meta = data["meta"]

    # -- index ------------------------------------------------------------------------------------
    def read_index(self) -> dict[str, dict[str, Any]]:
        try:
            data = read_json(self.path / INDEX_FILE)
            members = data.get("members", {}) if isinstance(data, dict) else {}
        except (FileNotFoundError, json.JSONDecodeError):
            members = {}
        if not isinstance(members, dict):
            members = {}
        return {n: members[n] if isinstance(members.get(n), dict) else {"state": "pending"} for n in self.configs}

    def update_index(self, changes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Merge ``changes`` into the index under its lock (read, modify, atomic write)."""
        with FileLock(self.path / INDEX_LOCK):
            index = self.read_index()
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            for name, change in changes.items():
                entry = dict(index.get(name, {}))
                entry.update(change)
                entry["updated"] = stamp
                entry["t"] = time.time()
                index[name] = entry
            atomic_write_json(self.path / INDEX_FILE, {"sweep": self.name, "updated": stamp, "members": index})
            return index

    def refresh_from_runs(self) -> dict[str, dict[str, Any]]:
        """Repair the index from the run folders (a crash may have left it behind them)."""
        index = self.read_index()
        changes = {}
        for name in self.names:
            state = index[name].get("state", "pending")
            summary = self.member_summary(name)
            truth = _state_of(summary)
            if truth in FINISHED and state != truth:
                changes[name] = _entry_from_summary(summary)
            elif state == "running" and truth not in FINISHED:
                lock = self.lock(name)
                if lock.acquire(blocking=False):  # nobody trains it: its worker died
                    lock.release()
                    changes[name] = {"state": "pending", "note": "its worker stopped before it finished"}
        return self.update_index(changes) if changes else index


def _state_of(summary: Optional[dict[str, Any]]) -> str:
    status = (summary or {}).get("status")
    if status == "completed" and (summary.get("steps", 0) >= summary.get("total_steps", 0)
                                  or summary.get("stopped_early")):
        return "completed"
    if status in ("diverged", "failed"):
        return status
    return "pending"


def _entry_from_summary(summary: Optional[dict[str, Any]]) -> dict[str, Any]:
    s = summary or {}
    pm = s.get("primary_metric", "test_mse")
    return {"state": _state_of(s), "error": s.get("reason") if _state_of(s) != "completed" else None,
            "steps": s.get("steps"), "final": s.get(f"final_{pm}"), "best": s.get(f"best_{pm}"),
            "solved_step": s.get("solved_step"), "wall_time_s": s.get("wall_time_s")}


def create(spec: SweepSpec, out: str | os.PathLike = "runs", *, overwrite: bool = False,
           meta: Optional[dict[str, Any]] = None, env: Optional[dict[str, Any]] = None) -> Sweep:
    """Create the sweep folder, or open it when it already holds the same spec.

    A folder holding a different spec is an error unless ``overwrite``, which deletes it.
    ``env`` (``ENV_KEYS`` only) applies to members this process starts, not to the stored spec.
    """
    check_name(spec.name)  # before anything is written: a name like '../x' would leave --out
    members = expand(spec)
    path = writable_dir(Path(out) / spec.name, "sweep folder")
    configs = {n: c.to_dict() for n, c in members.items()}
    record = {"format": 1, "name": spec.name, "spec": spec.to_dict(), "meta": meta or {},
              "members": configs, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with FileLock(path / SPEC_LOCK):
        existing = _read_spec_file(path)
        if existing is not None and not _same_members(existing.get("members", {}), configs):
            if not overwrite:
                raise ConfigError(f"sweep folder {str(path)!r} holds a different sweep ({_diff(existing.get('members', {}), configs)}); "
                                  f"use --overwrite to replace it or choose another --name")
            _clear(path, existing.get("members", {}))
            existing = None
        elif existing is not None and overwrite:
            _clear(path, existing.get("members", {}))
            existing = None
        if existing is None:
            (path / MEMBERS_DIR).mkdir(exist_ok=True)
            (path / LOCKS_DIR).mkdir(exist_ok=True)
            atomic_write_json(path / SPEC_FILE, record)
        else:
            configs = existing["members"]
            # re-creating an existing sweep adds to its metadata (a resumed study keeps its wall time)
            meta = {**existing.get("meta", {}), **(meta or {})}
            if meta != existing.get("meta", {}):
                existing["meta"] = meta
                atomic_write_json(path / SPEC_FILE, existing)
    env = {k: v for k, v in (env or {}).items() if k in ENV_KEYS}
    sweep = Sweep(path=path, spec=spec, configs=configs, meta=meta or {}, env=env)
    if not (path / INDEX_FILE).exists():
        sweep.update_index({})
    return sweep


def _read_spec_file(path: Path) -> Optional[dict[str, Any]]:
    f = path / SPEC_FILE
    if not f.exists():
        return None
    try:
        data = read_json(f)
    except json.JSONDecodeError:
        raise ConfigError(f"{f}: not a valid sweep file (corrupted JSON); use --overwrite to start the sweep again") from None
    if not isinstance(data, dict) or not isinstance(data.get("members"), dict):
        raise ConfigError(f"{f}: not an irnn sweep file; use --overwrite to start the sweep again")
    return data


def _same_members(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return set(a) == set(b) and all(_identity(a[n]) == _identity(b[n]) for n in a)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    if set(old) != set(new):
        extra = sorted(set(new) - set(old))
        gone = sorted(set(old) - set(new))
        if extra:
            return f"it has no member {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
        return f"it has member {gone[0]!r} that this spec lacks"
    for n in old:
        a, b = _identity(old[n]), _identity(new[n])
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f"member {n!r} has {k}={a.get(k)!r} there, {b.get(k)!r} here"
    return "unknown difference"


def _clear(path: Path, old_members: Iterable[str]) -> None:
    """Delete a sweep's members and index (for --overwrite), refusing while anyone trains one."""
    held = []
    try:
        for name in old_members:
            lock = FileLock(path / LOCKS_DIR / f"{name}.lock") if (path / LOCKS_DIR).is_dir() else None
            if lock is None:
                break
            if not lock.acquire(blocking=False):
                raise ConfigError(f"member {name!r} of {str(path)!r} is being trained by another process; "
                                  f"stop it before --overwrite")
            held.append(lock)
        for sub in (MEMBERS_DIR,):
            shutil.rmtree(path / sub, ignore_errors=True)
        for f in (SPEC_FILE, INDEX_FILE):
            with contextlib.suppress(FileNotFoundError):
                (path / f).unlink()
        for extra in ("results.md", "results.csv", "members.csv"):
            with contextlib.suppress(FileNotFoundError):
                (path / extra).unlink()
    finally:
        for lock in held:
            lock.release()


def open_sweep(path: str | os.PathLike) -> Sweep:
    """Open an existing sweep folder (one line of error when it is not one)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"sweep folder {str(path)!r} does not exist")
    data = _read_spec_file(path)
    if data is None:
        raise ConfigError(f"{str(path)!r} is not an irnn sweep folder (no {SPEC_FILE})")
    spec = parse_spec(data.get("spec", {}), source=str(path / SPEC_FILE))
    return Sweep(path=path, spec=spec, configs=data["members"], meta=data.get("meta", {}))


def is_sweep(path: str | os.PathLike) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


# -- training members ------------------------------------------------------------------------------
class MemberBusy(RuntimeError):
    """Another process holds this member's lock."""


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _train(sweep: Sweep, names: list[str], progress: bool) -> None:
    """Train members (whose locks this process holds) through ``train_many``; record each outcome.

    Members go to ``train_many`` together so that compatible ones may be trained as one
    stacked ensemble. When that raises, each unfinished member is tried on its own so that
    one bad member cannot take the others down with it.
    """
    from ..train import train_many

    def outcome(name: str) -> dict[str, Any]:
        return _entry_from_summary(sweep.member_summary(name))

    sweep.update_index({n: {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                            "error": None, "started": time.strftime("%Y-%m-%dT%H:%M:%S")} for n in names})
    settled: dict[str, dict[str, Any]] = {}
    storage_failed = False
    try:
        try:
            train_many([sweep.config(n) for n in names], [sweep.member_dir(n) for n in names],
                       group=sweep.name, progress=progress)
        except WriteError:
            # The storage refused (disk full...), not the member: stop; the same command continues.
            storage_failed = True
            raise
        except Exception as e:  # noqa: BLE001 - a member's failure is data, not a crash
            if len(names) == 1:
                settled[names[0]] = {"state": "failed", "error": _error_line(e)}
            else:
                for n in names:
                    if outcome(n)["state"] in FINISHED:
                        continue
                    try:
                        train_many([sweep.config(n)], [sweep.member_dir(n)], group=sweep.name, progress=progress)
                    except WriteError:
                        storage_failed = True
                        raise
                    except Exception as e1:  # noqa: BLE001
                        settled[n] = {"state": "failed", "error": _error_line(e1)}
        for n in names:
            if n not in settled:
                settled[n] = outcome(n)
                if settled[n]["state"] == "pending":  # train_many returned but the run did not finish
                    summary = sweep.member_summary(n) or {}
                    settled[n] = {"state": "failed", "error": f"run stopped with status {summary.get('status')!r}"}
    finally:
        # An interrupt leaves the rest pending (to resume), never "running" with nobody on it.
        for n in names:
            if n not in settled:
                o = outcome(n)
                why = "stopped: a file could not be written" if storage_failed else "interrupted"
                settled[n] = o if o["state"] in FINISHED else {"state": "pending", "note": why}
        try:
            sweep.update_index(settled)
        except WriteError:
            if not storage_failed:
                raise  # else the error that stopped training says it better (the index is repaired on resume)


def run_member(sweep_dir: str | os.PathLike, name: str, *, progress: bool = False, wait: bool = False) -> dict[str, Any]:
    """Train (or resume, or just read) one member of a sweep and return its summary.

    This is the unit of work of every backend (Ray Tune calls it inside a trial). A member that
    already finished is not trained again. A failed member returns ``{"status": "failed", "reason": ...}``.

    Args:
        sweep_dir: the sweep folder (``<out>/<name>``).
        name: the member's name (a folder under ``members/``).
        wait: when another process is training this member, wait for it instead of raising.

    Raises:
        MemberBusy: another process is training it (and ``wait`` is false).
    """
    sweep = open_sweep(sweep_dir)
    if name not in sweep.configs:
        raise ConfigError(f"sweep {sweep.name!r} has no member {name!r}")
    lock = sweep.lock(name)
    if not lock.acquire(blocking=wait):
        raise MemberBusy(f"member {name!r} is being trained by another process")
    try:
        summary = sweep.member_summary(name)
        if _state_of(summary) not in FINISHED:
            _train(sweep, [name], progress)
            summary = sweep.member_summary(name)
        else:
            sweep.update_index({name: _entry_from_summary(summary)})
        entry = sweep.read_index()[name]
    finally:
        lock.release()
    if entry.get("state") == "failed":
        return {**(summary or {}), "name": name, "status": "failed", "reason": entry.get("error")}
    return summary or {"name": name, "status": entry.get("state")}


# A step's cost against the ReLU RNN's is each model's registry entry's step_cost (measured on the fused
# CPU engines, T = 150-400, batch 32, 1 thread, 2026-12-02: tanh about 2.6x, LSTM about 8.5x, GRU ~6x).
_GENERIC_COST = 2.2  # the baseline kernels (isa=generic) against AVX-512 (IRNN, T=150-400, Intel Xeon)


def _cost(cfg: Config) -> float:
    """A rough relative cost of a member: steps x length x the model's step cost (its registry entry's)."""
    isa = _GENERIC_COST if cfg.isa == "generic" else 1.0
    return cfg.total_steps() * cfg.sequence_length() * registry.step_cost(cfg.model) * isa


def work_loop(sweep: Sweep, names: Optional[list[str]] = None, *, progress: bool = False,
              report: Optional[Callable[[str, dict[str, Any]], None]] = None, group_seeds: bool = True) -> None:
    """Train every unfinished member (of ``names``) that no other process is training.

    With ``group_seeds``, members that differ only in seed are claimed and trained together
    (one ``train_many`` call, which may stack them as one ensemble); without it each member is
    claimed on its own, which balances the work better between several worker processes.
    Members another process holds are waited for at the end, and taken over if that process
    dies before finishing them. Each member is tried at most once per call.
    """
    names = list(sweep.names if names is None else names)
    start = time.time()
    index = sweep.refresh_from_runs()
    todo = [n for n in names if index[n].get("state") not in FINISHED]
    tried: set[str] = set()
    while True:
        remaining = [n for n in todo if n not in tried]
        if not remaining:
            return
        if not group_seeds:  # longest first, so that no worker is left alone with one long run at the end
            remaining.sort(key=lambda n: -_cost(sweep.config(n)))
        groups: dict[str, list[str]] = {}
        for n in remaining:
            groups.setdefault(setting_key(sweep.configs[n]) if group_seeds else n, []).append(n)
        did_work = False
        busy: list[str] = []
        for group in groups.values():
            claimed: list[tuple[str, FileLock]] = []
            for n in group:
                lock = sweep.lock(n)
                if lock.acquire(blocking=False):
                    claimed.append((n, lock))
                else:
                    busy.append(n)
            try:
                ready = []
                index = sweep.read_index() if claimed else {}
                for n, _ in claimed:
                    summary = sweep.member_summary(n)
                    state, entry = _state_of(summary), index[n]
                    # Finished meanwhile, or failed in another process during this call: leave it.
                    if state in FINISHED or (entry.get("state") == "failed" and entry.get("t", 0.0) >= start):
                        tried.add(n)
                        if state in FINISHED and entry.get("state") != state:
                            sweep.update_index({n: _entry_from_summary(summary)})
                        continue
                    ready.append(n)
                if ready:
                    _train(sweep, ready, progress)
                    tried.update(ready)
                    did_work = True
                    if report is not None:
                        index = sweep.read_index()
                        for n in ready:
                            report(n, index[n])
            finally:
                for _, lock in claimed:
                    lock.release()
        if not did_work and busy:
            # Everything left is in other hands: wait for one of them, then look again.
            lock = sweep.lock(busy[0])
            lock.acquire(blocking=True)
            lock.release()


def _echo_line(sweep: Sweep, name: str, entry: dict[str, Any]) -> None:
    index = sweep.read_index()
    done = sum(1 for e in index.values() if e.get("state") in FINISHED + ("failed",))
    print(format_member_line(name, entry, f"{done}/{len(index)}"), flush=True)


def _worker_main(sweep_dir: str, names: Optional[list[str]], env: dict[str, Any], echo: bool) -> None:
    """A helper worker process of ``run_sweep(workers=N)``: the same loop, one member at a time."""
    import signal

    def terminate(signum: int, frame: Any) -> None:  # like the CLI: SIGTERM stops training cleanly
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, terminate)
    sweep = open_sweep(sweep_dir)
    sweep.env = env
    try:
        work_loop(sweep, names, report=(lambda n, e: _echo_line(sweep, n, e)) if echo else None, group_seeds=False)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the main process reports it
        sys.exit(130)
    except WriteError as e:  # one line; the main process says how to continue
        print(f"irnn: worker {os.getpid()}: cannot write {e.filename}: {e.strerror}", file=sys.stderr, flush=True)
        sys.exit(1)


def _spawn_workers(sweep: Sweep, names: Optional[list[str]], count: int, echo: bool) -> list[subprocess.Popen]:
    code = ("import json, sys; from irnn.experiments.sweep import _worker_main; "
            "_worker_main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == '1')")
    # a model or task registered from outside the package (a notebook's module, an IRNN_PLUGINS file)
    # must exist in the workers too
    env = {**os.environ, "IRNN_PLUGINS": ",".join(registry.plugin_modules())}
    procs = []
    for _ in range(count):
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(sweep.path), json.dumps(names),
                                       json.dumps(sweep.env), "1" if echo else "0"], env=env))
    return procs


def run_sweep(sweep: Sweep | str | os.PathLike, *, names: Optional[list[str]] = None, backend: str = "local",
              address: Optional[str] = None, workers: int = 1, progress: bool = False, echo: bool = False):
    """Train a sweep's unfinished members (:func:`train_sweep`), write its tables and return its results
    :class:`~irnn.results.aggregate.Table`."""
    from ..results.aggregate import collect, settings_table, write_tables

    sweep = train_sweep(sweep, names=names, backend=backend, address=address, workers=workers, progress=progress,
                        echo=echo)
    members = collect(sweep.path)
    table = settings_table(members)
    write_tables(sweep.path, members, table)
    return table


def train_sweep(sweep: Sweep | str | os.PathLike, *, names: Optional[list[str]] = None, backend: str = "local",
                address: Optional[str] = None, workers: int = 1, progress: bool = False, echo: bool = False) -> Sweep:
    """Train a sweep's unfinished members; returns the sweep, its index brought up to date.

    Args:
        sweep: an opened :class:`Sweep` or a sweep folder.
        names: only these members (default: all).
        backend: ``local`` (this process plus ``workers - 1`` helper processes) or ``ray``
            (``irnn.experiments.ray_backend.run_members``; ``address`` is the Ray cluster).
        echo: print one line per finished member.
    """
    if not isinstance(sweep, Sweep):
        sweep = open_sweep(sweep)
    if names is not None:
        unknown = [n for n in names if n not in sweep.configs]
        if unknown:
            raise ConfigError(f"sweep {sweep.name!r} has no member {unknown[0]!r}")
    if backend == "ray":
        run_members = _ray_runner()
        index = sweep.refresh_from_runs()
        todo = [n for n in (names or sweep.names) if index[n].get("state") not in FINISHED]
        if todo:
            run_members(sweep.path, todo, address=address, echo=echo)
        sweep.refresh_from_runs()
    elif backend == "local":
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        report = (lambda n, e: _echo_line(sweep, n, e)) if echo else None
        procs = _spawn_workers(sweep, names, workers - 1, echo) if workers > 1 else []
        try:
            # one process: seeds together (ensembles); several: one member at a time (balance)
            work_loop(sweep, names, progress=progress, report=report, group_seeds=workers == 1)
        except BaseException:
            for p in procs:  # stopped (Ctrl-C, SIGTERM, an error): stop the helpers too; they save their runs
                if p.poll() is None:
                    p.terminate()
            raise
        finally:
            for p in procs:
                try:
                    p.wait()
                except KeyboardInterrupt:
                    p.kill()
                    raise
        if procs and any(p.returncode not in (0, None) for p in procs):
            print(f"irnn: warning: {sum(p.returncode != 0 for p in procs)} helper worker(s) exited with an error; "
                  f"re-run the same command to finish their members", file=sys.stderr)
        sweep.refresh_from_runs()
    else:
        raise ConfigError(f"unknown backend {backend!r}; choose local or ray")
    return sweep


def format_member_line(name: str, entry: dict[str, Any], k: Optional[str] = None) -> str:
    state = entry.get("state", "?")
    parts = [f"{state:9s} {name}"]
    if entry.get("final") is not None:
        parts.append(f"final {_g(entry['final'])}")
    if entry.get("solved_step") is not None:
        parts.append(f"solved at step {entry['solved_step']}")
    if entry.get("wall_time_s") is not None:
        parts.append(f"{entry['wall_time_s']:.0f} s")
    if entry.get("error"):
        parts.append(f"({entry['error']})")
    return (f"[{k}] " if k is not None else "") + "  ".join(parts)


def _g(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def _ray_runner():
    try:
        from . import ray_backend  # type: ignore[attr-defined]
    except ImportError as e:
        raise ConfigError(f"the ray backend is not available ({_error_line(e)}); install irnn[ray] or use "
                          f"--backend local") from None
    fn = getattr(ray_backend, "run_members", None)
    if fn is None:
        raise ConfigError("irnn.experiments.ray_backend has no run_members(); use --backend local")
    return fn


def sweep(grid: Optional[dict[str, list[Any]] | list[dict[str, list[Any]]]] = None, *, name: Optional[str] = None,
          base: Optional[dict[str, Any]] = None, file: Optional[str | os.PathLike] = None, out: str | os.PathLike = "runs",
          overwrite: bool = False, backend: str = "local", address: Optional[str] = None, workers: int = 1,
          progress: bool = False, echo: bool = False):
    """Run a sweep from Python and return its results table (one row per setting, seeds aggregated).

        >>> table = irnn.experiments.sweep({"seq_len": [50, 100], "seed": [0, 1, 2]}, name="s1",
        ...                                base={"steps": 2000})  # doctest: +SKIP

    ``file`` reads a TOML/YAML sweep file; ``grid``/``base``/``name`` then override its parts.
    """
    data: dict[str, Any] = load_file(str(file)) if file is not None else {}
    if grid is not None:
        data["grid"] = grid
    if base is not None:
        data["base"] = {**(data.get("base") or {}), **base} if isinstance(data.get("base"), dict) else base
    spec = parse_spec(data, source=str(file) if file else "sweep", name=name)
    env = {k: v for k, v in spec.base.items() if k in ENV_KEYS}
    sw = create(spec, out, overwrite=overwrite, env=env)
    return run_sweep(sw, backend=backend, address=address, workers=workers, progress=progress, echo=echo)
