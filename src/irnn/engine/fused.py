"""Fused CPU recurrence for ReLU/tanh RNN layers, with a hand-written backward pass through time.

``nn.RNN`` on the CPU spends most of a small model's step in op dispatch: at batch 16 and hidden
100 one time step is only ~3 us of arithmetic. The C++ engine (``csrc/fused_rnn.cpp``) runs the
whole time loop, forward and backward, in plain C++ with a register-blocked kernel per step and the
bias, input projection and nonlinearity fused in; ReLU zeros are skipped exactly (IRNNs on the
adding problem soon have ~90% of their units at zero); ``dW_hh`` is summed step by step inside the
backward loop (``IRNN_FUSED_DW=gemm``: one GEMM over all steps afterwards instead). Same inputs give
bitwise the same results on a given machine and instruction set, whatever the thread count, and a model
in a stack gets bitwise what it gets alone.

It is built on first use with ``torch.utils.cpp_extension.load`` (about a minute; cached in torch's
extension directory). If the build fails it warns once and, like with ``IRNN_NO_EXTENSION=1``,
everything runs on :class:`_PythonRNN`, a reference ``autograd.Function`` with the same backward
pass in plain torch ops (slower than ``nn.RNN``: it is the fallback and the test reference).
``IRNN_FUSED_ISA`` (auto, avx512, avx2, generic) pins the kernel's instruction set, for tests.

Threads: the batch rows of each model are split into a fixed number of groups (:func:`_groups`, from
the shapes alone) that run their whole time loop independently; threads take whole groups, and the
groups' partial sums of ``dW_hh`` are added in a fixed order, so the thread count changes the speed and
never the numbers. On a shared, loaded 2-core machine two threads make every step several times slower
(nn.RNN's too: each OpenMP barrier waits for a descheduled thread); set ``torch.set_num_threads(1)`` there.

Both paths compute, for each layer (Elman 1990; Le et al. 2015, eq. 1 with ``act = relu``)::

    h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),   h_{-1} = 0

Stacked ensembles: every tensor may carry a leading models dimension ``N``; model ``n`` only sees
its own weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .build import ISA, Extension, isa_code, requested_isa
from .layers import module_layers

__all__ = ["available", "rnn_layer", "rnn_forward", "supports"]

_SOURCE = Path(__file__).with_name("csrc") / "fused_rnn.cpp"
_IMPLS = ("auto", "cpp", "python")
_NONLINEARITIES = ("relu", "tanh")

_EXT = Extension("irnn_fused_rnn", _SOURCE, "irnn_fused", "RNN")


def _load():
    """The compiled ops (torch.ops.irnn_fused), building them on first use; None if the build failed (warned once)."""
    return _EXT.load()


def available() -> bool:
    """Whether the C++ engine can be used (builds it on the first call). False if ``IRNN_NO_EXTENSION=1``."""
    return _EXT.available()


_isa = isa_code


def isa_name() -> str:
    """The instruction set the C++ kernel runs with here (``IRNN_FUSED_ISA`` resolved against the CPU)."""
    best = {v: k for k, v in ISA.items()}[_load().best_isa()] if available() else "none"
    requested = requested_isa()
    return best if requested == "auto" else requested


def check_isa(name: str) -> None:
    """ValueError, in one line, when this CPU cannot run the instruction set ``name`` asks for."""
    if name != "auto" and available() and ISA[name] > _load().best_isa():
        best = {v: k for k, v in ISA.items()}[_load().best_isa()]
        raise ValueError(f"isa={name}: this CPU's best instruction set is {best}")


def _gemm_dw() -> bool:
    """``IRNN_FUSED_DW`` = auto (default: dW_hh summed inside the backward time loop where it can be) or
    gemm (always one GEMM over all steps after the loop), for tests and benchmarks."""
    name = os.environ.get("IRNN_FUSED_DW", "auto").lower()
    if name not in ("auto", "gemm"):
        raise ValueError(f"IRNN_FUSED_DW={name!r} is not one of auto, gemm")
    return name == "gemm"


# A group of batch rows must carry at least this many multiply-adds of recurrence (rows x T x H x H, about
# 20 us) to be worth a thread of its own.
_MIN_SLICE_WORK = 2_000_000
# At most this many groups per model, of at least _MIN_GROUP_ROWS rows (the AVX-512 kernel's register
# blocking). Two groups run as fast as one on one thread (T=150, H=100, Intel Xeon, 2026-12-02: 1.61 vs
# 1.60 ms a step at B=16, 2.37 vs 2.36 at B=32), and they are what two threads took before the split was
# fixed, so results became thread-count independent at no cost on these 2-core machines
# (benchmarks/bench_threads.py). A single model gains little from more threads at these sizes anyway.
_MAX_GROUPS, _MIN_GROUP_ROWS = 2, 8


def _groups(x: torch.Tensor, w_hh: torch.Tensor) -> int:
    """How many groups of batch rows each model's time loop is split into: a function of the shapes only.

    Rows are independent through time, so the groups run without any synchronisation inside the loop,
    and each group sums its own part of ``dW_hh``; the parts are added in group order. Since the split
    never follows ``torch.get_num_threads()``, neither do the results: threads only take whole groups.
    """
    batch = x.shape[-3]
    work = batch * x.shape[-2] * w_hh.shape[-1] ** 2
    return max(1, min(_MAX_GROUPS, batch // _MIN_GROUP_ROWS, work // _MIN_SLICE_WORK))


# ----------------------------------------------------------------------------------------------
# The C++ path.
class _CppRNN(torch.autograd.Function):
    # Takes and returns single-model ([B, T, I] ...) or stacked tensors as they are; the C++ handles both.
    # last_only: return only the last hidden state [.., B, H]; the backward then hands the C++ that
    # gradient alone instead of an all-zero [.., B, T, H] one with its last step filled in.
    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, relu: bool, last_only: bool = False):
        ctx.groups = _groups(x, w_hh)
        out = _EXT.ops.forward(x, w_ih, w_hh, b_ih, b_hh, relu, ctx.groups, _isa())
        ctx.save_for_backward(x, w_ih, w_hh, out)
        ctx.relu = relu
        return out.select(-2, -1).clone() if last_only else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_ih, w_hh, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw_ih, dw_hh, db = _EXT.ops.backward(grad_out, x, w_ih, w_hh, out, ctx.relu, need[0], need[1], ctx.groups,
                                             _isa(), _gemm_dw())
        return (dx if need[0] else None, dw_ih if need[1] else None, dw_hh if need[2] else None,
                db if need[3] else None, db.clone() if need[4] else None, None, None)


# ----------------------------------------------------------------------------------------------
# The reference path: the same algorithm in plain torch ops (one bmm per step).
def _python_states(x, w_ih, w_hh, b_ih, b_hh, relu: bool) -> torch.Tensor:
    """All hidden states ``[N, B, T, H]`` for stacked inputs ``x [N, B, T, I]``."""
    n, b, t, i = x.shape
    xp = torch.baddbmm((b_ih + b_hh).unsqueeze(1), x.reshape(n, b * t, i), w_ih.transpose(1, 2))
    xp = xp.view(n, b, t, -1)  # [N, B, T, H]
    act = torch.relu if relu else torch.tanh
    states, h = [], None
    for step in range(t):
        z = xp[:, :, step] if h is None else xp[:, :, step] + torch.bmm(h, w_hh.transpose(1, 2))
        h = act(z)  # [N, B, H]
        states.append(h)
    return torch.stack(states, 2) if states else xp.new_zeros(n, b, 0, w_hh.shape[-1])


class _PythonRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, relu: bool):
        out = _python_states(x, w_ih, w_hh, b_ih, b_hh, relu)
        ctx.save_for_backward(x, w_ih, w_hh, out)
        ctx.relu = relu
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_ih, w_hh, out = ctx.saved_tensors
        n, b, t, i = x.shape
        hsz = w_hh.shape[-1]
        # dz_t = (dL/dout_t + dz_{t+1} W_hh) * act'(z_t), with act' taken from h_t = act(z_t):
        # relu' = 0 where h <= 0 (so 0 at z = 0, like torch's threshold_backward), tanh' = 1 - h^2.
        dz = torch.empty_like(out)  # [N, B, T, H]
        nxt = None
        for step in reversed(range(t)):
            dh = grad_out[:, :, step] if nxt is None else grad_out[:, :, step] + torch.bmm(nxt, w_hh)
            h = out[:, :, step]
            nxt = torch.where(h <= 0, 0.0, dh) if ctx.relu else dh * (1 - h * h)
            dz[:, :, step] = nxt
        dzf = dz.reshape(n, b * t, hsz)
        db = dzf.sum(1)
        rows = b * (t - 1)
        dw_hh = torch.bmm(dz[:, :, 1:].reshape(n, rows, hsz).transpose(1, 2), out[:, :, :-1].reshape(n, rows, hsz))
        dw_ih = torch.bmm(dzf.transpose(1, 2), x.reshape(n, b * t, i))
        dx = torch.bmm(dzf, w_ih).view(n, b, t, i)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw_ih if need[1] else None, dw_hh if need[2] else None,
                db if need[3] else None, db.clone() if need[4] else None, None)


# ----------------------------------------------------------------------------------------------
# Public API.
def _check(x, w_ih, w_hh, b_ih, b_hh, nonlinearity, impl) -> bool:
    """Validates the arguments; returns whether they are stacked (leading N). Kept lean: runs every step."""
    if nonlinearity not in _NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {_NONLINEARITIES}, got {nonlinearity!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    tensors = (x, w_ih, w_hh, b_ih, b_hh)
    for tensor in tensors:
        if tensor.device.type != "cpu":
            raise ValueError(f"the fused RNN engine is CPU only; got a tensor on {tensor.device}")
        if tensor.dtype != x.dtype or x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"all tensors must be float32 or float64 and share one dtype; got x {x.dtype}, "
                             f"w_ih {w_ih.dtype}, w_hh {w_hh.dtype}, b_ih {b_ih.dtype}, b_hh {b_hh.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [B, T, I] or stacked [N, B, T, I], got shape {tuple(x.shape)}")
    stacked = x.dim() == 4
    lead = x.shape[:1] if stacked else ()
    hsz = w_hh.shape[-1]
    if (w_ih.shape != lead + (hsz, x.shape[-1]) or w_hh.shape != lead + (hsz, hsz) or b_ih.shape != lead + (hsz,)
            or b_hh.shape != lead + (hsz,)):
        raise ValueError(f"for x of shape {tuple(x.shape)} and hidden size {hsz} the weights must be w_ih "
                         f"{lead + (hsz, x.shape[-1])}, w_hh {lead + (hsz, hsz)}, b_ih and b_hh {lead + (hsz,)}; got "
                         f"{tuple(w_ih.shape)}, {tuple(w_hh.shape)}, {tuple(b_ih.shape)}, {tuple(b_hh.shape)}")
    return stacked


def rnn_layer(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor,
              nonlinearity: str = "relu", impl: str = "auto", last_only: bool = False) -> torch.Tensor:
    """One Elman RNN layer over a whole sequence, starting from a zero state; differentiable.

    Args:
        x: inputs, batch first.
        w_ih, w_hh, b_ih, b_hh: the layer's weights, as in ``nn.RNN`` (``weight_ih_l0`` ...).
        nonlinearity: ``"relu"`` or ``"tanh"``.
        impl: ``"cpp"`` (the C++ engine; an error if it cannot be built), ``"python"`` (the reference
            path) or ``"auto"`` (cpp when :func:`available`).
        last_only: return only the last hidden state (what a readout of the last step needs); the
            backward pass then skips an all-zero gradient for the other steps.

    Shape:
        single model: x ``[B, T, I]``, w_ih ``[H, I]``, w_hh ``[H, H]``, b_* ``[H]`` -> ``[B, T, H]``
        (``[B, H]`` with ``last_only``).
        stacked: the same with a leading ``N`` on every argument -> ``[N, B, T, H]`` (``[N, B, H]``).
    """
    stacked = _check(x, w_ih, w_hh, b_ih, b_hh, nonlinearity, impl)
    if last_only and x.shape[-2] == 0:
        raise ValueError("last_only needs at least one time step; x has none")
    relu = nonlinearity == "relu"
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w_ih.requires_grad or w_hh.requires_grad
                                              or b_ih.requires_grad or b_hh.requires_grad)
    if impl != "python" and available():
        if needs_grad:
            return _CppRNN.apply(x, w_ih, w_hh, b_ih, b_hh, relu, last_only)
        out = _EXT.ops.forward(x, w_ih, w_hh, b_ih, b_hh, relu, _groups(x, w_hh), _isa())  # forward only: nothing saved
        return out.select(-2, -1) if last_only else out
    if impl == "cpp":
        raise RuntimeError("impl='cpp' but the fused C++ engine is unavailable "
                           "(IRNN_NO_EXTENSION is set or the build failed); use impl='auto' or 'python'")
    args = (x, w_ih, w_hh, b_ih, b_hh) if stacked else tuple(t.unsqueeze(0) for t in (x, w_ih, w_hh, b_ih, b_hh))
    if needs_grad:
        out = _PythonRNN.apply(*args, relu)
    else:
        with torch.no_grad():
            out = _python_states(*args, relu)
    out = out if stacked else out.squeeze(0)
    return out.select(-2, -1) if last_only else out


def supports(rnn: nn.Module) -> bool:
    """Whether :func:`rnn_forward` can run ``rnn``: an ``nn.RNN`` (relu or tanh), unidirectional, with
    biases, no dropout and no projections."""
    return (type(rnn) is nn.RNN and rnn.nonlinearity in _NONLINEARITIES and not rnn.bidirectional and rnn.bias
            and rnn.dropout == 0 and getattr(rnn, "proj_size", 0) == 0)


def rnn_forward(rnn: nn.RNN, x: torch.Tensor, impl: str = "auto", last_only: bool = False) -> torch.Tensor:
    """All layers of ``rnn`` through :func:`rnn_layer`, using the module's own parameters.

    Gradients land in ``rnn.weight_hh_l0.grad`` etc. as with ``rnn(x)``, so optimisers and
    ``state_dict`` are unaffected. The initial state is zero; only the output sequence is returned.

    Shape:
        x ``[B, T, I]`` -> ``[B, T, H]`` (``[T, B, I] -> [T, B, H]`` if ``rnn.batch_first`` is False,
        ``[T, I] -> [T, H]`` unbatched); with ``last_only``, the last layer's last state ``[B, H]``.

    Raises:
        ValueError: if ``rnn`` is not supported (see :func:`supports`).
    """
    if not supports(rnn):
        raise ValueError(f"the fused engine runs only nn.RNN (relu/tanh), unidirectional, bias=True, dropout=0; "
                         f"got {rnn!r}; use the module itself instead")
    return module_layers(rnn, x, lambda *a, last_only: rnn_layer(*a, rnn.nonlinearity, impl, last_only=last_only),
                         last_only)
