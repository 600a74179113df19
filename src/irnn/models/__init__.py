"""Recurrent models: IRNN and the baselines of Le et al. 2015."""
from .recurrent import MODEL_KINDS, RNN_KINDS, RecurrentModel, build_model

__all__ = ["RecurrentModel", "build_model", "MODEL_KINDS", "RNN_KINDS"]
