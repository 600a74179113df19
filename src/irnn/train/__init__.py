"""The training engine: loop, divergence guard, optimisers, checkpoint/resume."""
from .loop import Run, Trainer, resolve_device, train

__all__ = ["Run", "Trainer", "train", "resolve_device"]
