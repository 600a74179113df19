"""The training engine: loop, divergence guard, optimisers, checkpoint/resume, ensembles."""
from .ensemble import train_many
from .loop import Run, Trainer, resolve_device, train

__all__ = ["Run", "Trainer", "train", "train_many", "resolve_device"]
