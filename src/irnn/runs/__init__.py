"""The run store: folders, config, metrics, summary and checkpoints."""
from .store import RunDir, iter_metrics, model_label

__all__ = ["RunDir", "iter_metrics", "model_label"]
