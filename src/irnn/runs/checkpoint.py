"""Checkpoints that cannot be half-written and are validated on load.

File format: an 8-byte magic, the SHA-256 of the payload (32 bytes), then the
payload, a ``torch.save`` of plain state_dicts (loaded with ``weights_only=True``).
A truncated or bit-flipped file fails the checksum and is reported as corrupt;
resuming then falls back to the previous good checkpoint (and renames the bad
ones ``*.corrupt``). Temporary files of a write cut short are removed on resume.
"""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import torch

from .store import RunDir, atomic_write_bytes

MAGIC = b"IRNNCKP1"
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why in one line."""


def encode(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(data: bytes, name: str = "checkpoint") -> dict[str, Any]:
    if len(data) < len(MAGIC) + 32 or data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{name}: not an irnn checkpoint (bad header; truncated or foreign file)")
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{name}: checksum mismatch (truncated or corrupted file)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"{name}: cannot be read ({type(e).__name__})") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{name}: missing the model or step")
    return state


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    return decode(data, str(path))


def list_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    """Step-numbered checkpoints, oldest first."""
    if not run.ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save(run: RunDir, state: dict[str, Any], *, keep: int, best: bool = False) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, keep the last ``keep`` and (separately) ``best.pt``."""
    data = encode(state)
    path = run.ckpt_dir / f"ckpt-{int(state['step']):09d}.pt"
    atomic_write_bytes(path, data)
    if best:
        atomic_write_bytes(run.ckpt_dir / "best.pt", data)
    for _, old in list_checkpoints(run)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def set_aside_after(run: RunDir, step: int) -> list[Path]:
    """Rename the numbered checkpoints newer than ``step`` (the ones that failed to load) to ``*.corrupt``.

    Kept for inspection, but out of the rotation: otherwise ``save`` would count them among the
    newest K and delete the good checkpoints written after the resume instead.
    """
    moved = []
    for s, path in list_checkpoints(run):
        if s > step:
            target = path.with_name(path.name + ".corrupt")
            path.replace(target)
            moved.append(target)
    return moved


def load_latest(run: RunDir, *, max_step: int | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest checkpoint that validates (optionally at or before ``max_step``).

    Returns ``(state or None, warnings)``; each skipped corrupt file gives one warning line.
    """
    warnings: list[str] = []
    for step, path in reversed(list_checkpoints(run)):
        if max_step is not None and step > max_step:
            continue
        try:
            return load(path), warnings
        except CheckpointError as e:
            warnings.append(f"skipping {e}")
    return None, warnings
