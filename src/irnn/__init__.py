"""irnn: IRNNs (Le, Jaitly & Hinton 2015) and their baselines on long-range memory benchmarks.

    >>> import irnn
    >>> run = irnn.train(irnn.Config(seq_len=30, steps=200), out_dir="runs/demo")  # doctest: +SKIP

The config names are imported at once; the rest (which needs torch, about 1.5 s to import) on first
use, so that the command line answers bad input and ``--help`` without loading torch.
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

from .config import PRESETS, Config, ConfigError, from_dict
from .registry import ModelSpec, Option, TaskSpec, register_model, register_task

_LAZY = {"RecurrentModel": ".models", "build_model": ".models", "Task": ".tasks", "make_task": ".tasks",
         "make_adding": ".tasks", "generate_adding": ".tasks", "Run": ".train", "train": ".train"}

__all__ = ["Config", "ConfigError", "PRESETS", "from_dict", "ModelSpec", "TaskSpec", "Option", "register_model",
           "register_task", "RecurrentModel", "build_model", "Task",
           "make_task", "make_adding", "generate_adding", "Run", "train", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'irnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
