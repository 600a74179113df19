"""The training engine: loop, divergence guard, optimisers, checkpoint/resume."""
from .loop import Run, Trainer, resolve_device, train, train_many

__all__ = ["Run", "Trainer", "train", "train_many", "resolve_device"]
