"""The run store (folders, config, metrics, summary, checkpoints) and the trackers that mirror it."""
from .store import RunDir, iter_metrics, model_label

__all__ = ["RunDir", "iter_metrics", "model_label"]
