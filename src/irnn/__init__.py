"""irnn: IRNNs (Le, Jaitly & Hinton 2015) and their baselines on long-range memory benchmarks.

    >>> import irnn
    >>> run = irnn.train(irnn.Config(seq_len=30, steps=200), out_dir="runs/demo")  # doctest: +SKIP
"""
__version__ = "0.1.0"

from .config import PRESETS, Config, ConfigError, from_dict
from .models import RecurrentModel, build_model
from .tasks import Task, generate_adding, make_adding, make_task
from .train import Run, train

__all__ = ["Config", "ConfigError", "PRESETS", "from_dict", "RecurrentModel", "build_model", "Task",
           "make_task", "make_adding", "generate_adding", "Run", "train", "__version__"]
