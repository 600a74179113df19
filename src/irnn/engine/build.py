"""Building and loading the C++ engines, shared by ``fused`` (ReLU/tanh) and ``fused_gates`` (LSTM/GRU)."""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import torch

# Plain -O3: no -ffast-math (results must be reproducible) and no -march=native (the build cache may be
# shared by different machines); the C++ picks AVX-512 / AVX2 / baseline code at run time instead.
# -ffp-contract=fast lets the compiler fuse multiply-adds in the AVX2/AVX-512 kernels (-std=c++17/20 turns it off).
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"]
ISA = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}


def extension_name(prefix: str, source: Path, cflags: list[str] = CFLAGS) -> str:
    """One build folder per torch version, source and flags: two checkouts of different versions (or a
    test's copy) would otherwise rebuild one shared folder over each other, each loading the other's code."""
    digest = hashlib.sha1(source.read_bytes() + " ".join(cflags).encode()).hexdigest()[:10]
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}_{digest}"


def staged_source(name: str, source: Path) -> Path:
    """The copy of ``source`` that is compiled, at a path set by the extension's ``name`` alone. torch writes
    the source's absolute path into the build folder's build.ninja and rebuilds when it changes, so two
    checkouts of the same source (a fresh clone for CI beside the working one) rebuilt the shared folder
    each time the other had loaded it (~60 s on 2 cores, measured). Written once: its mtime must not move."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    staged = root / "irnn-sources" / name / source.name
    if not staged.is_file():
        staged.parent.mkdir(parents=True, exist_ok=True)
        tmp = staged.with_name(f".{staged.name}.{os.getpid()}")
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, staged)
    return staged


def load_ops(prefix: str, source: Path, namespace: str, what: str):
    """Build (first use) and load ``source``; its ops under ``torch.ops.<namespace>``, or None if the
    build failed, with one warning naming ``what`` falls back to the slower pure-PyTorch path."""
    try:
        from torch.utils.cpp_extension import load

        name = extension_name(prefix, source)
        load(name=name, sources=[str(staged_source(name, source))], extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return getattr(torch.ops, namespace)
    except Exception as exc:  # compiler missing, headers mismatch, ...: fall back, but say so once
        lines = str(exc).strip().splitlines() or [""]
        reason = next((line for line in lines if "error" in line.lower() and "building extension" not in line),
                      lines[0]).strip()[:300]
        warnings.warn(f"irnn: could not build the fused C++ {what} engine ({type(exc).__name__}: {reason}); "
                      "using the slower pure-PyTorch path", RuntimeWarning, stacklevel=4)
        return None


class Extension:
    """One C++ engine: built on first use and loaded once (``ops``: its ``torch.ops`` namespace), or None
    after a failed build, which warns once and leaves the pure-PyTorch path."""

    def __init__(self, prefix: str, source: Path, namespace: str, what: str):
        self.prefix, self.source, self.namespace, self.what = prefix, source, namespace, what
        self.ops = None
        self.failed = False

    def load(self):
        if self.ops is None and not self.failed:
            self.ops = load_ops(self.prefix, self.source, self.namespace, self.what)
            self.failed = self.ops is None
        return self.ops

    def available(self) -> bool:
        """Whether the engine can be used (builds it on the first call). False if ``IRNN_NO_EXTENSION=1``."""
        return not extension_disabled() and self.load() is not None


def extension_disabled() -> bool:
    """``IRNN_NO_EXTENSION=1`` turns the C++ engines off (the pure-PyTorch paths run instead)."""
    return os.environ.get("IRNN_NO_EXTENSION", "") not in ("", "0")


_isa_override: str | None = None  # set_isa: a run's ``isa`` field, which beats the environment


def set_isa(name: str) -> None:
    """Pin the C++ kernels' instruction set for this process (a run's ``isa`` config field); ``auto``
    hands the choice back to ``IRNN_FUSED_ISA`` (default: the best the CPU has)."""
    global _isa_override
    if name.lower() not in ISA:
        raise ValueError(f"isa={name!r} is not one of {', '.join(ISA)}")
    _isa_override = None if name.lower() == "auto" else name.lower()


def requested_isa() -> str:
    """The instruction set asked for: a run's ``isa``, else ``IRNN_FUSED_ISA``, else ``auto``."""
    return _isa_override or os.environ.get("IRNN_FUSED_ISA", "auto").lower()


def isa_code() -> int:
    """Instruction set for the C++ kernels (:func:`requested_isa`): auto, avx512, avx2 or generic."""
    name = requested_isa()
    if name not in ISA:
        raise ValueError(f"IRNN_FUSED_ISA={name!r} is not one of {', '.join(ISA)}")
    return ISA[name]
