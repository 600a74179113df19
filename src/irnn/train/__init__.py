"""The training engine: loop, divergence guard, optimisers, checkpoint/resume, ensembles."""
import sys
import types

from .ensemble import train_many
from .loop import Run, Trainer, resolve_device, train

__all__ = ["Run", "Trainer", "train", "train_many", "resolve_device"]


class _CallableModule(types.ModuleType):
    """``irnn.train(...)`` is the function :func:`irnn.train.loop.train`; but importing a submodule
    (``from irnn.train.guard import ...``) makes Python bind ``irnn.train`` to this package. Calling
    the package therefore trains too, so ``irnn.train(cfg)`` works whatever was imported first."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
