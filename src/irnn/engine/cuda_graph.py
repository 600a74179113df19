"""The whole training step (forward, loss, backward, clip, optimiser step) replayed as one CUDA graph.

For a single small model the GPU time of a step is launches and latency, not arithmetic
(PERF_NOTES: 3.09 ms eager, 0.34 ms graphed at T=150 on an H200). This follows PyTorch's
whole-network capture recipe (CUDA semantics notes, "Whole-network capture"):

* warm up a few steps on a side stream, so that lazy initialisation (cuDNN/cuBLAS handles and
  workspaces, optimiser state, Triton compilation) happens outside the capture;
* set the gradients to None and capture one step with ``torch.cuda.graph``: the backward then
  writes (not accumulates) into gradient buffers that the graph owns;
* feed each batch by copying it into the static input buffers and replaying.

The optimiser is made capturable in place: its step counters live on the device and its
learning rate becomes a 0-dim device tensor that the graph reads, so :meth:`GraphedStep.set_lr`
needs no recapture (Adam and RMSprop with ``capturable=True``, RMSprop on its ``foreach`` path,
SGD on its ``fused`` path: these read a tensor lr on the device without ``.item()``).

TF32 is off for the whole step by default (``allow_tf32=False``): cuDNN's TF32 RNN drifts to a
gradient error of 8e-4 over 150 steps, fp32 holds 2e-7 (PERF_NOTES).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ..models.recurrent import CELLS

SUPPORTED_OPTIMIZERS = ("sgd", "adam", "rmsprop")
RECURRENCES = ("cudnn", "triton")
WARMUP_STEPS = 3

Forward = Callable[[Tensor], Tensor]
ClipFn = Callable[[list, float], Tensor]

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """``sgd``, ``adam`` or ``rmsprop`` for those optimisers (AdamW counts as ``adam``), else the class name."""
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.RMSprop):
        return "rmsprop"
    return type(optimizer).__name__.lower()


def can_capture(device: torch.device | str, cell: str | None, optimizer_name: str) -> bool:
    """Whether a whole step of a model on this ``nn.RNN/LSTM/GRU`` cell (``engine.cell_of``) and optimiser
    can be captured on ``device``."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and cell in CELLS
            and optimizer_name in SUPPORTED_OPTIMIZERS)


@contextlib.contextmanager
def fp32_matmuls(allow_tf32: bool = False):
    """cuBLAS and cuDNN (RNNs included) in full fp32, or in TF32 when allowed; the flags are restored on exit."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def train_step(forward: Forward, loss_fn, params: list[Tensor], optimizer: torch.optim.Optimizer,
               clip_norm: float, x: Tensor, y: Tensor, clip_fn: Optional[ClipFn] = None) -> tuple[Tensor, Tensor]:
    """One eager step: forward, loss, backward, clip by global norm, optimiser step.

    This is exactly what :class:`GraphedStep` captures. Gradients must be None or zero on entry.

    Returns:
        the loss and the gradient norm before clipping, as 0-dim device tensors (no host sync).
    """
    loss = loss_fn(forward(x), y)
    loss.backward()
    grad_norm = (clip_fn or torch.nn.utils.clip_grad_norm_)(params, clip_norm)
    optimizer.step()
    return loss.detach(), grad_norm


# --- optimiser preparation, snapshots -------------------------------------------------------

_GROUP_KEYS = ("lr", "capturable", "foreach", "fused")


def _prepare_optimizer(optimizer: torch.optim.Optimizer, device: torch.device,
                       lrs: Optional[list[Tensor]], fused: bool = True) -> Optional[list[Tensor]]:
    """Make ``optimizer`` capturable in place; returns the device lr tensors its groups now read.

    With ``fused`` Adam runs as one fused kernel (fewer nodes in the graph); without, on its
    capturable ``foreach`` path. SGD always runs fused and RMSprop always on ``foreach``.

    ``lrs`` (from an earlier call) are reused, so that the graph keeps reading the same tensors;
    a group whose lr was replaced (``load_state_dict``) has its value copied into them. Returns
    None for an optimiser that cannot read a tensor lr in a graph (its lr is then baked in).
    """
    name = optimizer_name(optimizer)
    tensor_lr = name in SUPPORTED_OPTIMIZERS
    out = []
    for i, group in enumerate(optimizer.param_groups):
        if name == "sgd":
            if group["momentum"] and group["dampening"] and any(
                    optimizer.state.get(p, {}).get("momentum_buffer") is None for p in group["params"]):
                # _restore would leave a zero buffer, whose first update is (1 - dampening) * grad, not grad.
                raise ValueError("SGD with momentum and dampening can be captured only after one eager step")
            # Only the fused kernel reads a tensor lr on the device; the others call .item().
            group["foreach"], group["fused"] = False, True
        elif "capturable" in group:
            group["capturable"] = True
            if name == "rmsprop":
                group["foreach"] = True  # its single-tensor path calls .item() on a tensor lr
            elif name == "adam":
                group["foreach"], group["fused"] = (False, True) if fused else (True, False)
        if not tensor_lr:
            continue
        lr = group["lr"]
        mine = lrs[i] if lrs is not None and i < len(lrs) else None
        if mine is None:
            mine = torch.zeros((), dtype=torch.float32, device=device)
        if lr is not mine:
            with torch.no_grad():
                mine.copy_(lr.detach().reshape(()) if isinstance(lr, Tensor) else torch.tensor(float(lr)))
            group["lr"] = mine
        out.append(mine)
    for p, state in optimizer.state.items():
        step = state.get("step")
        if step is not None and (not isinstance(step, Tensor) or step.device != p.device):
            # Capturable optimisers keep their step counters on the parameters' device.
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
    return out if tensor_lr else None


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _snapshot(params: list[Tensor], optimizer: torch.optim.Optimizer):
    values = [p.detach().clone() for p in params]
    state = {p: {k: (v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [{k: g[k] for k in _GROUP_KEYS if k in g} for g in optimizer.param_groups]
    return values, state, groups


@torch.no_grad()
def _restore(params: list[Tensor], optimizer: torch.optim.Optimizer, snapshot) -> None:
    """Undo the warm-up steps in place (tensor identities kept, as the capture needs).

    State that the warm-up created is zeroed: a fresh Adam/RMSprop state is all zeros, and a
    zero SGD momentum buffer equals torch's first-step ``buf = grad`` when dampening is 0.
    """
    values, state, _ = snapshot
    for p, v in zip(params, values):
        p.copy_(v)
    for p, s in optimizer.state.items():
        saved = state.get(p)
        for k, v in list(s.items()):
            if isinstance(v, Tensor):
                if saved is not None and k in saved and isinstance(saved[k], Tensor):
                    v.copy_(saved[k])
                else:
                    v.zero_()
            elif saved is not None and k in saved:
                s[k] = saved[k]


@torch.no_grad()
def _restore_exactly(params: list[Tensor], optimizer: torch.optim.Optimizer, snapshot) -> None:
    """Put parameters, optimiser state and group settings back as they were (after a failed capture)."""
    values, state, groups = snapshot
    for p, v in zip(params, values):
        p.copy_(v)
    optimizer.state.clear()
    for p, s in state.items():
        optimizer.state[p] = dict(s)
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(saved)


_CAPTURABLE_WARNING = "This instance was constructed with capturable=True"


class GraphedStep:
    """One training step (forward, loss, backward, clip, optimiser step) captured as one CUDA graph.

    Args:
        forward: ``x -> prediction``, e.g. the model, or :func:`irnn.engine.triton_rnn.model_forward`.
        loss_fn: ``(prediction, y) -> 0-dim loss``.
        params: the parameters whose gradients are clipped (by global L2 norm).
        optimizer: an SGD, Adam or RMSprop optimiser; made capturable in place (tensor lr on the
            device, step counters on the device).
        clip_norm: the clipping threshold.
        example_x, example_y: a batch on the CUDA device; fixes the shapes of every later batch and
            is used for the warm-up steps (whose effect on parameters and state is undone).
        allow_tf32: allow TF32 in cuBLAS/cuDNN (off by default: fp32-grade gradients).
        clip_fn: ``(params, clip_norm) -> grad_norm`` (default ``clip_grad_norm_``), e.g. a per-model
            clip for stacked ensembles.
        copy_outputs: return fresh tensors from each call (default) rather than the graph's static
            outputs, which the next replay overwrites.
        fused_optimizer: run Adam as its one fused kernel (default) rather than its capturable
            ``foreach`` path.

    Shape:
        ``x`` and ``y`` as ``example_x`` and ``example_y``; returns ``(loss, grad_norm)``, 0-dim.

    Model parameters may be replaced in place (``load_state_dict`` on the model) between calls; after
    ``optimizer.load_state_dict`` (a rollback or resume), call :meth:`recapture`.
    """

    def __init__(self, forward: Forward, loss_fn, params, optimizer: torch.optim.Optimizer, clip_norm: float,
                 example_x: Tensor, example_y: Tensor, *, allow_tf32: bool = False,
                 clip_fn: Optional[ClipFn] = None, copy_outputs: bool = True, fused_optimizer: bool = True,
                 warmup_steps: int = WARMUP_STEPS):
        if example_x.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"a CUDA graph needs the batch on a CUDA device, got {example_x.device}")
        if warmup_steps < 1:
            # Without one, the optimiser would create its state inside the graph, re-zeroed at every replay.
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        self.forward, self.loss_fn, self.params = forward, loss_fn, list(params)
        self.optimizer, self.clip_norm, self.clip_fn = optimizer, clip_norm, clip_fn
        self.allow_tf32, self.copy_outputs, self.warmup_steps = allow_tf32, copy_outputs, warmup_steps
        self.fused_optimizer = fused_optimizer
        self.device = example_x.device
        self.static_x = example_x.detach().clone()  # [B, T, I]: each call copies its batch here
        self.static_y = example_y.detach().clone()
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._lrs: Optional[list[Tensor]] = None
        self._out: Optional[Tensor] = None
        self.recapture()

    def recapture(self) -> None:
        """Capture (again): after the optimiser's state or groups were replaced, e.g. by ``load_state_dict``.

        On failure the parameters, optimiser state and group settings are left as they were before
        the call, and the error propagates.
        """
        self.graph = self._out = None
        all_params = list({id(p): p for p in self.params + _optimizer_params(self.optimizer)}.values())
        with torch.cuda.device(self.device):
            # The snapshot precedes preparation, so that a failure can undo that too.
            before = _snapshot(all_params, self.optimizer)
            try:
                self._lrs = _prepare_optimizer(self.optimizer, self.device, self._lrs, self.fused_optimizer)
                snapshot = _snapshot(all_params, self.optimizer)
                with fp32_matmuls(self.allow_tf32), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_CAPTURABLE_WARNING)
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(self.warmup_steps):
                            self.optimizer.zero_grad(set_to_none=True)
                            self._body()
                    torch.cuda.current_stream().wait_stream(side)
                    _restore(all_params, self.optimizer, snapshot)
                    self.optimizer.zero_grad(set_to_none=True)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        loss, grad_norm = self._body()
                        self._out = torch.stack([loss, grad_norm.to(loss.dtype)])  # [2]
                self.graph = graph
            except BaseException:
                self.graph = self._out = None
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                _restore_exactly(all_params, self.optimizer, before)
                self._lrs = None
                raise

    reset = recapture  # the name irnn.engine.TrainStep uses

    def _body(self) -> tuple[Tensor, Tensor]:
        return train_step(self.forward, self.loss_fn, self.params, self.optimizer, self.clip_norm,
                          self.static_x, self.static_y, self.clip_fn)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            raise ValueError(f"the captured step takes x {tuple(self.static_x.shape)} and y {tuple(self.static_y.shape)}, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}; drop the last partial batch or use the torch engine")
        if self.graph is None:
            raise RuntimeError("no captured step to replay: the last capture failed")
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()
        out = self._out.clone() if self.copy_outputs else self._out
        return out[0], out[1]

    def set_lr(self, lr: float) -> None:
        """Set every group's learning rate; read by the graph at the next replay (no recapture, no sync)."""
        if self._lrs is not None:
            for t in self._lrs:
                t.fill_(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.recapture()


def make_step(model, loss_fn, optimizer: torch.optim.Optimizer, clip_norm: float, example_x: Tensor,
              example_y: Tensor, *, recurrence: str = "cudnn", precision: str = "tf32x3",
              allow_tf32: bool = False) -> Optional[GraphedStep]:
    """A :class:`GraphedStep` for a :class:`~irnn.models.recurrent.RecurrentModel`, or None to train eagerly.

    None when capture does not apply here (no CUDA, an unsupported optimiser or model) or when it
    failed; a failure warns once per distinct reason and leaves the model and optimiser as they were.

    Args:
        recurrence: ``cudnn`` (the model's own ``nn.RNN/LSTM/GRU``) or ``triton`` (the fused Triton
            layer of :mod:`irnn.engine.triton_rnn`, ReLU/tanh RNNs only, at ``precision``).
    """
    if recurrence not in RECURRENCES:
        raise ValueError(f"recurrence must be one of {RECURRENCES}, got {recurrence!r}")
    from . import cell_of

    if not can_capture(example_x.device, cell_of(model), optimizer_name(optimizer)):
        return None
    forward: Forward = model
    if recurrence == "triton":
        from . import triton_rnn

        if cell_of(model) not in ("relu", "tanh") or getattr(model, "per_step", False) or not triton_rnn.available():
            _warn_once(f"the Triton recurrence needs a ReLU/tanh RNN and Triton with CUDA (model {model.kind!r}, "
                       f"triton available: {triton_rnn.available()}); using eager steps")
            return None
        forward = triton_rnn.model_forward(model, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return GraphedStep(forward, loss_fn, params, optimizer, clip_norm, example_x, example_y, allow_tf32=allow_tf32)
    except Exception as e:  # noqa: BLE001 - any capture failure: fall back to eager steps
        _warn_once(f"CUDA graph capture failed ({type(e).__name__}: {e}); using eager steps")
        return None
