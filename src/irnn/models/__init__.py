"""Recurrent models: the IRNN, the baselines of Le et al. 2015 and its successors (see irnn.registry)."""
from .recurrent import CELLS, MODEL_KINDS, RNN_KINDS, RecurrentModel, build_model

__all__ = ["RecurrentModel", "build_model", "MODEL_KINDS", "RNN_KINDS", "CELLS"]
