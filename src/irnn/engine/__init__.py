"""Training-step engines: the plain PyTorch reference and the fast paths that must equal it.

* ``torch``: ``model(x)`` on ``nn.RNN/LSTM/GRU`` (cuDNN on GPU), eager.
* ``fused``: CPU: a compiled time loop with a hand-written BPTT, ``engine.fused`` for ReLU/tanh RNNs and
  ``engine.fused_gates`` for LSTMs and GRUs.
* ``cuda-graph``: CUDA: the whole step (forward, backward, clip, optimiser) replayed as one graph.

``auto`` picks ``fused`` on CPU where it applies, ``cuda-graph`` on CUDA, else ``torch``.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ..models import CELLS
from . import update

Forward = Callable[[torch.Tensor], torch.Tensor]
RNN_CELLS = ("relu", "tanh")  # engine.fused
GATED_CELLS = ("lstm", "gru")  # engine.fused_gates
OWN_CELLS = ("indrnn",)  # models with their own layers whose recurrence an engine has a loop for (engine.indrnn)


def cell_of(model: nn.Module) -> str | None:
    """The ``nn.RNN/LSTM/GRU`` layer a model runs (``model.cell`` of a :class:`RecurrentModel`, a
    successor built on one included), which the fast engines can take over; None for any other model
    (IndRNN, expRNN, a plugin's own module), which the ``torch`` engine runs as ``model(x)``."""
    cell = getattr(model, "cell", None)
    on_layer = cell in CELLS and isinstance(getattr(model, "rnn", None), nn.RNNBase)
    return cell if on_layer or cell in OWN_CELLS else None


def resolve_engine(engine: str, model: nn.Module, device: torch.device, optimizer_name: str = "adam") -> str:
    """The engine that ``engine`` (possibly ``auto``) means for this model and device."""
    cell = cell_of(model)
    if engine == "auto":
        if device.type == "cuda":
            from . import cuda_graph

            return "cuda-graph" if cuda_graph.can_capture(device, cell, optimizer_name) else "torch"
        if cell in RNN_CELLS:
            try:
                from . import fused
            except ImportError:  # a broken install: the reference path still works
                return "torch"
            return "fused" if fused.supports(model.rnn) and fused.available() else "torch"
        if cell in GATED_CELLS:
            try:
                from . import fused_gates
            except ImportError:
                return "torch"
            return "fused" if fused_gates.supports(model.rnn) and fused_gates.available() else "torch"
        if cell == "indrnn":
            from . import indrnn

            return "fused" if indrnn.available() else "torch"
        return "torch"
    if engine == "fused":
        if device.type != "cpu" or cell is None:
            name = getattr(model, "kind", type(model).__name__)
            raise ValueError(f"engine 'fused' runs RNNs, LSTMs, GRUs and IndRNNs on the CPU, not {name} on {device.type}")
    if engine == "cuda-graph" and device.type != "cuda":
        raise ValueError("engine 'cuda-graph' needs a CUDA device")
    return engine


def numerics(engine: str) -> dict:
    """What a run's numbers depend on besides its config and seed (recorded in ``config.json``).

    The fused CPU engine (alone or stacked) gives bitwise the same numbers for any thread count, so they
    depend on the instruction set its kernel runs (summation order of the vector code) and the torch
    build. The eager ``torch`` engine on the CPU uses MKL, whose long reductions follow the thread count;
    CUDA paths follow the GPU and its libraries.
    """
    if engine in ("fused", "ensemble-fused"):
        from . import fused

        return {"isa": fused.isa_name(), "thread_count_independent": True}
    return {"thread_count_independent": False}


def make_forward(model: nn.Module, engine: str) -> Forward:
    """``x [B, T, I] -> pred`` for a resolved engine (``cuda-graph`` evaluates eagerly): ``[B, out]`` from
    the last state, or ``[B, T, out]`` from every state for a ``per_step`` model (a task with a target at
    every step). The readout is the same ``model.readout`` either way; only the states it reads differ."""
    last_only = not getattr(model, "per_step", False)
    if engine == "fused" and cell_of(model) == "indrnn":
        from . import indrnn

        return lambda x: model(x, recurrence=indrnn.recurrence)
    if engine == "fused" and cell_of(model) in GATED_CELLS:
        from . import fused_gates

        return lambda x: model.readout(fused_gates.gates_forward(model.rnn, x, last_only=last_only))
    if engine == "fused":
        from . import fused

        return lambda x: model.readout(fused.rnn_forward(model.rnn, x, last_only=last_only))
    return model


class TrainStep:
    """One optimisation step: forward, loss, backward, clip by global norm, optimiser step.

    Returns the loss and the gradient norm before clipping as 0-dim tensors on the
    device, so that no host synchronisation happens inside the step.
    """

    def __init__(self, forward: Forward, loss_fn, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 clip_norm: float):
        self.forward, self.loss_fn, self.params = forward, loss_fn, params
        self.optimizer, self.clip_norm = optimizer, clip_norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        update.zero_grad(self.optimizer)
        loss = self.loss_fn(self.forward(x), y)
        loss.backward()
        grad_norm = update.clip_grad_norm(self.params, self.clip_norm)
        update.adam_steps([self.optimizer])  # optimizer.step(), minus its Python overhead where it can
        return loss.detach(), grad_norm

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def reset(self) -> None:
        """Called after parameters or optimiser state were replaced (rollback, resume)."""


def make_train_step(model: nn.Module, engine: str, loss_fn, optimizer: torch.optim.Optimizer,
                    clip_norm: float, example: tuple[torch.Tensor, torch.Tensor]) -> TrainStep:
    params = [p for p in model.parameters() if p.requires_grad]
    if engine == "cuda-graph":
        from . import cuda_graph

        try:
            return cuda_graph.GraphedStep(model, loss_fn, params, optimizer, clip_norm, *example)
        except Exception as e:  # noqa: BLE001 - capture unsupported here: fall back, loudly once
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); using eager steps", stacklevel=2)
            engine = "torch"
    return TrainStep(make_forward(model, engine), loss_fn, params, optimizer, clip_norm)
