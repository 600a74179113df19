"""Fused CPU recurrence for LSTM and GRU layers, with a hand-written backward pass through time.

``nn.LSTM`` / ``nn.GRU`` on the CPU run a dozen ATen ops per time step. Their arithmetic is dense (a
``[B, H] x [H, 4H]`` product per step for the LSTM), so unlike the ReLU RNN there are no zeros to skip:
the C++ engine (``csrc/fused_gates.cpp``) runs the whole time loop, forward and backward, over raw
pointers with one register-blocked micro-kernel for every product, the gates and cell update fused into
the step, and the weight gradients summed inside the backward loop while each step's data is in cache.

Same equations, gate order and biases as PyTorch (LSTM: i, f, g, o; GRU: r, z, n with
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` and ``h' = (1 - z) * n + z * h``), zero initial
state. Stacked ensembles: every tensor may carry a leading models dimension ``N``.

Reproducibility: the batch rows are cut into fixed groups whose size depends only on the batch size;
each group sums its own partial gradients, and the partials are added in group order. Threads only
distribute groups, so outputs and gradients are bitwise identical for any ``torch.get_num_threads()``.

Built on first use with ``torch.utils.cpp_extension.load`` like :mod:`irnn.engine.fused` (its own
build; ``IRNN_NO_EXTENSION=1`` and ``IRNN_FUSED_ISA`` apply to both). Without it everything runs on
:class:`_PythonGates`, the same algorithm in plain torch ops (the fallback and the test reference).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .build import Extension, isa_code
from .layers import module_layers

__all__ = ["available", "gates_layer", "gates_forward", "supports"]

_SOURCE = Path(__file__).with_name("csrc") / "fused_gates.cpp"
_IMPLS = ("auto", "cpp", "python")
_MODES = ("lstm", "gru")
_GATES = {"lstm": 4, "gru": 3}

_EXT = Extension("irnn_fused_gates", _SOURCE, "irnn_gates", "LSTM/GRU")


def _load():
    """The compiled ops (torch.ops.irnn_gates), building them on first use; None if the build failed (warned once)."""
    return _EXT.load()


def available() -> bool:
    """Whether the C++ engine can be used (builds it on the first call). False if ``IRNN_NO_EXTENSION=1``."""
    return _EXT.available()


_isa = isa_code


# ----------------------------------------------------------------------------------------------
# The C++ path.
class _CppGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, gru: bool, last_only: bool = False):
        out, act, state = _EXT.ops.forward(x, w_ih, w_hh, b_ih, b_hh, gru, True, last_only, _isa())
        ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, act, state)
        ctx.gru = gru
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_ih, w_hh, b_ih, b_hh, act, state = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw_ih, dw_hh, db_ih, db_hh = _EXT.ops.backward(grad_out, x, w_ih, w_hh, b_ih, b_hh, act, state, ctx.gru,
                                                       need[0], _isa())
        return (dx if need[0] else None, dw_ih if need[1] else None, dw_hh if need[2] else None,
                db_ih if need[3] else None, db_hh if need[4] else None, None, None)


# ----------------------------------------------------------------------------------------------
# The reference path: the same algorithm in plain torch ops (one bmm per step), stacked tensors only.
def _python_states(x, w_ih, w_hh, b_ih, b_hh, gru: bool):
    """``(out [N, B, T, H], act [N, B, T, 4H], cell [N, B, T, H] or None)`` for ``x [N, B, T, I]``.

    act holds what the backward needs: LSTM i, f, g, o after their nonlinearities; GRU r, z, n and
    ``hn = h W_hn^T + b_hn``.
    """
    n, b, t, _ = x.shape
    hsz = w_hh.shape[-1]
    gx = torch.baddbmm(b_ih.unsqueeze(1), x.reshape(n, b * t, -1), w_ih.transpose(1, 2)).view(n, b, t, -1)
    h = x.new_zeros(n, b, hsz)
    c = x.new_zeros(n, b, hsz)
    outs, acts, cells = [], [], []
    for step in range(t):
        hh = torch.baddbmm(b_hh.unsqueeze(1), h, w_hh.transpose(1, 2))  # [N, B, gH]
        xs = gx[:, :, step]
        if gru:
            r, z = torch.sigmoid(xs[..., :2 * hsz] + hh[..., :2 * hsz]).chunk(2, -1)
            hn = hh[..., 2 * hsz:]
            nn_ = torch.tanh(xs[..., 2 * hsz:] + r * hn)
            h = (1 - z) * nn_ + z * h
            acts.append(torch.cat([r, z, nn_, hn], -1))
        else:
            pre = xs + hh
            i, f, o = (torch.sigmoid(pre[..., k * hsz:(k + 1) * hsz]) for k in (0, 1, 3))
            g = torch.tanh(pre[..., 2 * hsz:3 * hsz])
            c = f * c + i * g
            h = o * torch.tanh(c)
            acts.append(torch.cat([i, f, g, o], -1))
            cells.append(c)
        outs.append(h)
    if t == 0:
        return x.new_zeros(n, b, 0, hsz), x.new_zeros(n, b, 0, 4 * hsz), None if gru else x.new_zeros(n, b, 0, hsz)
    return torch.stack(outs, 2), torch.stack(acts, 2), None if gru else torch.stack(cells, 2)


class _PythonGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, gru: bool):
        out, act, cell = _python_states(x, w_ih, w_hh, b_ih, b_hh, gru)
        ctx.save_for_backward(x, w_ih, w_hh, out, act, cell)
        ctx.gru = gru
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_ih, w_hh, out, act, cell = ctx.saved_tensors
        n, b, t, i = x.shape
        hsz = w_hh.shape[-1]
        da = x.new_zeros(n, b, t, w_hh.shape[1])  # dL/d(gate pre-activations), input side
        db_ = torch.zeros_like(da)  # recurrent side (differs from da in the GRU's n gate only)
        carry = x.new_zeros(n, b, hsz)  # dL/dh_t through step t+1
        dc = x.new_zeros(n, b, hsz)  # LSTM: dL/dc_t through step t+1
        for step in reversed(range(t)):
            dh = grad_out[:, :, step] + carry
            a = act[:, :, step]
            if ctx.gru:
                r, z, nn_, hn = a.chunk(4, -1)
                hp = out[:, :, step - 1] if step else torch.zeros_like(dh)
                dnp = dh * (1 - z) * (1 - nn_ * nn_)
                dr = dnp * hn * r * (1 - r)
                dz = dh * (hp - nn_) * z * (1 - z)
                da[:, :, step] = torch.cat([dr, dz, dnp], -1)
                db_[:, :, step] = torch.cat([dr, dz, dnp * r], -1)
                carry = dh * z + torch.bmm(db_[:, :, step], w_hh)
            else:
                ig, fg, gg, og = a.chunk(4, -1)
                c = cell[:, :, step]
                cp = cell[:, :, step - 1] if step else torch.zeros_like(c)
                tc = torch.tanh(c)
                dcv = dc + dh * og * (1 - tc * tc)
                dc = dcv * fg
                da[:, :, step] = torch.cat([dcv * gg * ig * (1 - ig), dcv * cp * fg * (1 - fg),
                                            dcv * ig * (1 - gg * gg), dh * tc * og * (1 - og)], -1)
                db_[:, :, step] = da[:, :, step]
                carry = torch.bmm(da[:, :, step], w_hh)
        daf, dbf = da.reshape(n, b * t, -1), db_.reshape(n, b * t, -1)
        gh, rows = w_hh.shape[1], b * max(t - 1, 0)
        dw_hh = torch.bmm(db_[:, :, 1:].reshape(n, rows, gh).transpose(1, 2), out[:, :, :-1].reshape(n, rows, hsz))
        dw_ih = torch.bmm(daf.transpose(1, 2), x.reshape(n, b * t, i))
        dx = torch.bmm(daf, w_ih).view(n, b, t, i)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw_ih if need[1] else None, dw_hh if need[2] else None,
                daf.sum(1) if need[3] else None, dbf.sum(1) if need[4] else None, None)


# ----------------------------------------------------------------------------------------------
# Public API.
def _check(x, w_ih, w_hh, b_ih, b_hh, mode, impl) -> bool:
    """Validates the arguments; returns whether they are stacked (leading N)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    for tensor in (x, w_ih, w_hh, b_ih, b_hh):
        if tensor.device.type != "cpu":
            raise ValueError(f"the fused LSTM/GRU engine is CPU only; got a tensor on {tensor.device}")
        if tensor.dtype != x.dtype or x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"all tensors must be float32 or float64 and share one dtype; got x {x.dtype}, "
                             f"w_ih {w_ih.dtype}, w_hh {w_hh.dtype}, b_ih {b_ih.dtype}, b_hh {b_hh.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [B, T, I] or stacked [N, B, T, I], got shape {tuple(x.shape)}")
    stacked = x.dim() == 4
    lead = x.shape[:1] if stacked else ()
    hsz = w_hh.shape[-1]
    gh = _GATES[mode] * hsz
    if (w_ih.shape != lead + (gh, x.shape[-1]) or w_hh.shape != lead + (gh, hsz) or b_ih.shape != lead + (gh,)
            or b_hh.shape != lead + (gh,)):
        raise ValueError(f"for a {mode} layer, x of shape {tuple(x.shape)} and hidden size {hsz} the weights must be "
                         f"w_ih {lead + (gh, x.shape[-1])}, w_hh {lead + (gh, hsz)}, b_ih and b_hh {lead + (gh,)}; "
                         f"got {tuple(w_ih.shape)}, {tuple(w_hh.shape)}, {tuple(b_ih.shape)}, {tuple(b_hh.shape)}")
    return stacked


def gates_layer(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor,
                mode: str = "lstm", impl: str = "auto", last_only: bool = False) -> torch.Tensor:
    """One LSTM or GRU layer over a whole sequence, from a zero state; differentiable.

    Args:
        x: inputs, batch first.
        w_ih, w_hh, b_ih, b_hh: the layer's weights as in ``nn.LSTM`` / ``nn.GRU`` (``weight_ih_l0`` ...).
        mode: ``"lstm"`` or ``"gru"``.
        impl: ``"cpp"`` (an error if the extension cannot be built), ``"python"`` (the reference path) or
            ``"auto"`` (cpp when :func:`available`).
        last_only: return only the last hidden state.

    Shape:
        single model: x ``[B, T, I]``, w_ih ``[G*H, I]``, w_hh ``[G*H, H]``, b_* ``[G*H]`` (G = 4 for the
        LSTM, 3 for the GRU) -> ``[B, T, H]`` (``[B, H]`` with ``last_only``).
        stacked: the same with a leading ``N`` on every argument.
    """
    stacked = _check(x, w_ih, w_hh, b_ih, b_hh, mode, impl)
    if last_only and x.shape[-2] == 0:
        raise ValueError("last_only needs at least one time step; x has none")
    gru = mode == "gru"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_ih, w_hh, b_ih, b_hh))
    if impl != "python" and available():
        if needs_grad:
            return _CppGates.apply(x, w_ih, w_hh, b_ih, b_hh, gru, last_only)
        return _EXT.ops.forward(x, w_ih, w_hh, b_ih, b_hh, gru, False, last_only, _isa())[0]  # nothing saved
    if impl == "cpp":
        raise RuntimeError("impl='cpp' but the fused C++ LSTM/GRU engine is unavailable "
                           "(IRNN_NO_EXTENSION is set or the build failed); use impl='auto' or 'python'")
    args = (x, w_ih, w_hh, b_ih, b_hh) if stacked else tuple(t.unsqueeze(0) for t in (x, w_ih, w_hh, b_ih, b_hh))
    if needs_grad:
        out = _PythonGates.apply(*args, gru)
    else:
        with torch.no_grad():
            out = _python_states(*args, gru)[0]
    out = out if stacked else out.squeeze(0)
    return out.select(-2, -1) if last_only else out


def supports(rnn: nn.Module) -> bool:
    """Whether :func:`gates_forward` can run ``rnn``: an ``nn.LSTM`` or ``nn.GRU``, unidirectional, with
    biases, no dropout and no projections."""
    return (type(rnn) in (nn.LSTM, nn.GRU) and not rnn.bidirectional and rnn.bias and rnn.dropout == 0
            and getattr(rnn, "proj_size", 0) == 0)


def gates_forward(rnn: nn.Module, x: torch.Tensor, impl: str = "auto", last_only: bool = False) -> torch.Tensor:
    """All layers of an ``nn.LSTM`` / ``nn.GRU`` through :func:`gates_layer`, with the module's own parameters.

    Gradients land in ``rnn.weight_hh_l0.grad`` etc. as with ``rnn(x)``. The initial state is zero; only
    the output sequence is returned.

    Shape:
        x ``[B, T, I]`` -> ``[B, T, H]`` (``[T, B, I] -> [T, B, H]`` if ``rnn.batch_first`` is False,
        ``[T, I] -> [T, H]`` unbatched); with ``last_only``, the last layer's last state ``[B, H]``.

    Raises:
        ValueError: if ``rnn`` is not supported (see :func:`supports`).
    """
    if not supports(rnn):
        raise ValueError(f"the fused gates engine runs only nn.LSTM / nn.GRU, unidirectional, bias=True, dropout=0, "
                         f"proj_size=0; got {rnn!r}; use the module itself instead")
    mode = "lstm" if type(rnn) is nn.LSTM else "gru"
    return module_layers(rnn, x, lambda *a, last_only: gates_layer(*a, mode, impl, last_only=last_only), last_only)
