"""A fused ReLU/tanh RNN layer in Triton: the whole time loop in one kernel, for one model or many stacked ones.

The recurrence ``h_t = f(x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T)`` (``h_{-1} = 0``, as in
``nn.RNN``) is split in three:

1. the input projection ``u = x W_ih^T + b`` for every step at once, one ``baddbmm`` in PyTorch;
2. the recurrence, one Triton program per model: the program holds that model's ``W_hh`` on chip,
   runs the ``T`` steps and stores every ``h_t``; its backward runs the reverse loop
   ``dz_t = (dh_t + dz_{t+1} W_hh) * f'(h_t)`` and stores every ``dz_t``;
3. the weight gradient ``dW_hh = sum_t dz_t^T h_{t-1}``, one large ``bmm`` with ``K = T * B``
   in PyTorch (the gradients of ``W_ih`` and the biases follow from step 1 through autograd).

Precision. Products with ``W_hh ~ I`` repeated over hundreds of steps compound a 10-bit mantissa's
error (PERF_NOTES: plain TF32 reached 2e-1 relative gradient error at T=150), so the default
``tf32x3`` splits each fp32 operand into its nearest TF32 value and a remainder and sums three
tensor-core products (``a_hi b_hi + a_hi b_lo + a_lo b_hi``), which keeps fp32-grade accuracy;
the split of ``W_hh`` is done once, outside the time loop. Rounding the head (rather than
truncating it) matters over long sequences: a CPU emulation of TF32 operands on an IRNN layer
(B=16, H=100) gave weight-gradient errors of 3e-6 at T=150 and 7e-6 at T=400 with the rounded
split, against 3e-5 and 9e-5 with a truncated one and 8e-2 and 2e-1 with plain TF32. ``ieee``
uses no tensor cores; ``tf32`` is the fast, inexact mode, only on request; ``tf32x3-native`` is
Triton's own 3-pass split, kept to compare against.

Hidden and batch sizes are padded inside the kernel to powers of two (at least 16, the smallest
``tl.dot``) with masks: ``H = 100`` runs as 128.

On a machine without a GPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1``
is set in the environment (slow; for tests on small shapes).
"""
import os
from typing import Callable, Optional

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as _e:  # ImportError, or an install that fails on import
    triton = None
    _IMPORT_ERROR = _e

    class tl:  # noqa: N801 - stands in so that the kernel signatures below still parse without Triton
        constexpr = None

PRECISIONS = ("tf32x3", "ieee", "tf32", "tf32x3-native")
NONLINEARITIES = ("relu", "tanh")
_PRECISION_CODE = {"ieee": 0, "tf32": 1, "tf32x3": 2, "tf32x3-native": 3}

# Default launch shape; benchmarks/gpu_bench.py compares the alternatives on the H200.
DEFAULT_TRANSPOSED = True  # state held as [H, B], so the product is W @ h^T with M = H (wgmma-sized)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def available() -> bool:
    """Whether :func:`rnn_layer_triton` can run here: Triton imports and CUDA is present (or TRITON_INTERPRET=1)."""
    return triton is not None and (torch.cuda.is_available() or _interpret_requested())


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions, turned into Triton kernels by _kernels() on first use, so that the
# same source runs compiled on a GPU or under the interpreter on CPU tensors, whichever the call
# needs. They call no jit functions, not even triton.language's own (tl.zeros is one): those were
# compiled-mode when triton was imported, and the interpreter cannot call them.
# Layout: u, h and dz are contiguous [N, T, B, H]; the output gradient is [N, T, B, H] with H
# contiguous and any other strides; w is [N, H, H].
# --------------------------------------------------------------------------------------------

def _rnn_fwd_kernel(u_ptr, w_ptr, h_ptr, B, T, H,
                    stride_un, stride_ut, stride_wn, stride_hn, stride_ht,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, TANH: tl.constexpr,
                    PREC: tl.constexpr, TRANS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    u_ptr += n * stride_un
    w_ptr += n * stride_wn
    h_ptr += n * stride_hn
    d0 = tl.arange(0, BLOCK_H)[:, None]
    d1 = tl.arange(0, BLOCK_H)[None, :]
    w_mask = (d0 < H) & (d1 < H)
    if TRANS:
        # State as [H, B]; z^T = W h^T: the left operand is W itself.
        rh = tl.arange(0, BLOCK_H)[:, None]
        rb = tl.arange(0, BLOCK_B)[None, :]
        w = tl.load(w_ptr + d0 * H + d1, mask=w_mask, other=0.0)
        h = tl.full([BLOCK_H, BLOCK_B], 0.0, tl.float32)
    else:
        # State as [B, H]; z = h W^T: the right operand is W^T.
        rb = tl.arange(0, BLOCK_B)[:, None]
        rh = tl.arange(0, BLOCK_H)[None, :]
        w = tl.load(w_ptr + d1 * H + d0, mask=w_mask, other=0.0)
        h = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    offs = rb * H + rh
    mask = (rb < B) & (rh < H)
    if PREC == 2:
        # W = w_hi + w_lo, split once: w_hi is W rounded to the nearest TF32 value (add half a
        # TF32 ulp to the bits, clear the low 13), so the tensor cores take it exactly, and the
        # remainder w_lo (|w_lo| <= 2^-11 |W|, exact in fp32) carries the rest. Rounding, not
        # truncation, keeps the remainder's sign random, so that its error does not build up a
        # bias over hundreds of steps.
        w_hi = ((w.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)
        w_lo = w - w_hi
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    for t in range(T):
        # Prefetch the next step's input while this step's product runs (the last step reloads itself).
        t_next = tl.minimum(t + 1, T - 1)
        u_next = tl.load(u_ptr + t_next * stride_ut + offs, mask=mask, other=0.0)
        if PREC == 2:
            h_hi = ((h.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)
            h_lo = h - h_hi
            if TRANS:
                z = tl.dot(w_lo, h_hi, u, input_precision="tf32")
                z = tl.dot(w_hi, h_lo, z, input_precision="tf32")
                z = tl.dot(w_hi, h_hi, z, input_precision="tf32")
            else:
                z = tl.dot(h_hi, w_lo, u, input_precision="tf32")
                z = tl.dot(h_lo, w_hi, z, input_precision="tf32")
                z = tl.dot(h_hi, w_hi, z, input_precision="tf32")
        elif PREC == 0:
            if TRANS:
                z = tl.dot(w, h, u, input_precision="ieee")
            else:
                z = tl.dot(h, w, u, input_precision="ieee")
        elif PREC == 1:
            if TRANS:
                z = tl.dot(w, h, u, input_precision="tf32")
            else:
                z = tl.dot(h, w, u, input_precision="tf32")
        else:
            if TRANS:
                z = tl.dot(w, h, u, input_precision="tf32x3")
            else:
                z = tl.dot(h, w, u, input_precision="tf32x3")
        if TANH:
            # tanh without libdevice (which the interpreter lacks): a Taylor series near 0, where
            # (1 - e) / (1 + e) would cancel, and the exponential form elsewhere.
            a = tl.abs(z)
            e = tl.exp(-2.0 * a)
            big = (1.0 - e) / (1.0 + e)
            big = tl.where(z < 0, -big, big)
            z2 = z * z
            small = z * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 + z2 * (
                -0.05396825396825397 + z2 * 0.021869488536155203))))
            h = tl.where(a < 0.1, small, big)
        else:
            h = tl.maximum(z, 0.0)
        tl.store(h_ptr + t * stride_ht + offs, h, mask=mask)
        u = u_next


def _rnn_bwd_kernel(g_ptr, h_ptr, w_ptr, dz_ptr, B, T, H,
                    stride_gn, stride_gt, stride_gb, stride_hn, stride_ht, stride_wn, stride_dn, stride_dt,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, TANH: tl.constexpr,
                    PREC: tl.constexpr, TRANS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    g_ptr += n * stride_gn
    h_ptr += n * stride_hn
    w_ptr += n * stride_wn
    dz_ptr += n * stride_dn
    d0 = tl.arange(0, BLOCK_H)[:, None]
    d1 = tl.arange(0, BLOCK_H)[None, :]
    w_mask = (d0 < H) & (d1 < H)
    if TRANS:
        # dh_{t-1}^T = W^T dz_t^T: the left operand is W^T.
        rh = tl.arange(0, BLOCK_H)[:, None]
        rb = tl.arange(0, BLOCK_B)[None, :]
        w = tl.load(w_ptr + d1 * H + d0, mask=w_mask, other=0.0)
        carry = tl.full([BLOCK_H, BLOCK_B], 0.0, tl.float32)
    else:
        # dh_{t-1} = dz_t W: the right operand is W itself.
        rb = tl.arange(0, BLOCK_B)[:, None]
        rh = tl.arange(0, BLOCK_H)[None, :]
        w = tl.load(w_ptr + d0 * H + d1, mask=w_mask, other=0.0)
        carry = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    offs = rb * H + rh
    g_offs = rb * stride_gb + rh  # the output gradient may be a transposed view
    mask = (rb < B) & (rh < H)
    if PREC == 2:  # the same split as in the forward kernel
        w_hi = ((w.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)
        w_lo = w - w_hi
    g = tl.load(g_ptr + (T - 1) * stride_gt + g_offs, mask=mask, other=0.0)
    hv = tl.load(h_ptr + (T - 1) * stride_ht + offs, mask=mask, other=0.0)
    for i in range(T):
        t = T - 1 - i
        t_prev = tl.maximum(t - 1, 0)  # prefetch; the first step reloads itself
        g_next = tl.load(g_ptr + t_prev * stride_gt + g_offs, mask=mask, other=0.0)
        h_next = tl.load(h_ptr + t_prev * stride_ht + offs, mask=mask, other=0.0)
        g = g + carry
        if TANH:
            dz = g * (1.0 - hv * hv)
        else:
            dz = tl.where(hv > 0.0, g, 0.0)  # ReLU'(0) = 0, as in torch
        tl.store(dz_ptr + t * stride_dt + offs, dz, mask=mask)
        if PREC == 2:
            d_hi = ((dz.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)
            d_lo = dz - d_hi
            if TRANS:
                carry = tl.dot(w_lo, d_hi, input_precision="tf32")
                carry = tl.dot(w_hi, d_lo, carry, input_precision="tf32")
                carry = tl.dot(w_hi, d_hi, carry, input_precision="tf32")
            else:
                carry = tl.dot(d_hi, w_lo, input_precision="tf32")
                carry = tl.dot(d_lo, w_hi, carry, input_precision="tf32")
                carry = tl.dot(d_hi, w_hi, carry, input_precision="tf32")
        elif PREC == 0:
            if TRANS:
                carry = tl.dot(w, dz, input_precision="ieee")
            else:
                carry = tl.dot(dz, w, input_precision="ieee")
        elif PREC == 1:
            if TRANS:
                carry = tl.dot(w, dz, input_precision="tf32")
            else:
                carry = tl.dot(dz, w, input_precision="tf32")
        else:
            if TRANS:
                carry = tl.dot(w, dz, input_precision="tf32x3")
            else:
                carry = tl.dot(dz, w, input_precision="tf32x3")
        g = g_next
        hv = h_next


_KERNELS: dict = {}


def _kernels(interpret: bool):
    """(forward, backward) kernels, compiled for the GPU or wrapped for Triton's interpreter."""
    if interpret not in _KERNELS:
        # Built directly rather than through triton.jit, which would follow TRITON_INTERPRET as it
        # stands at this moment: CUDA tensors always get compiled kernels.
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            wrap = InterpretedFunction
        else:
            from triton.runtime.jit import JITFunction

            def wrap(fn):
                # T varies between runs; specialising on it would recompile for every sequence length.
                return JITFunction(fn, do_not_specialize=["T"])
        _KERNELS[interpret] = (wrap(_rnn_fwd_kernel), wrap(_rnn_bwd_kernel))
    return _KERNELS[interpret]


def _block(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


class _Recurrence(torch.autograd.Function):
    """``h = scan(u, W_hh)`` with ``u`` and ``h`` as ``[N, T, B, H]``; the backward returns ``du = dz`` and ``dW_hh``."""

    @staticmethod
    def forward(ctx, u, w_hh, tanh: bool, prec: int, trans: bool, num_warps: int, interpret: bool):
        u = u.contiguous()
        w_hh = w_hh.contiguous()
        N, T, B, H = u.shape
        h = torch.empty_like(u)  # [N, T, B, H]
        fwd, _ = _kernels(interpret)
        fwd[(N,)](u, w_hh, h, B, T, H,
                  u.stride(0), u.stride(1), w_hh.stride(0), h.stride(0), h.stride(1),
                  BLOCK_B=_block(B), BLOCK_H=_block(H), TANH=tanh, PREC=prec, TRANS=trans,
                  num_warps=num_warps)
        ctx.save_for_backward(h, w_hh)
        ctx.cfg = (tanh, prec, trans, num_warps, interpret)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        h, w_hh = ctx.saved_tensors
        tanh, prec, trans, num_warps, interpret = ctx.cfg
        if grad_h.stride(3) != 1:
            grad_h = grad_h.contiguous()
        # Otherwise read in place: the usual gradient is the transposed view of a [N, B, T, H] buffer,
        # and copying it would cost as much as the kernel's own traffic.
        N, T, B, H = h.shape
        dz = torch.empty_like(h)  # [N, T, B, H]: gradient of the pre-activations
        _, bwd = _kernels(interpret)
        bwd[(N,)](grad_h, h, w_hh, dz, B, T, H,
                  grad_h.stride(0), grad_h.stride(1), grad_h.stride(2), h.stride(0), h.stride(1), w_hh.stride(0),
                  dz.stride(0), dz.stride(1),
                  BLOCK_B=_block(B), BLOCK_H=_block(H), TANH=tanh, PREC=prec, TRANS=trans,
                  num_warps=num_warps)
        grad_w = None
        if ctx.needs_input_grad[1]:
            if T > 1:
                # dW_hh = sum over t >= 1 and b of dz_t^T h_{t-1}: one bmm with K = (T - 1) * B.
                grad_w = torch.bmm(dz[:, 1:].reshape(N, (T - 1) * B, H).transpose(1, 2),
                                   h[:, :-1].reshape(N, (T - 1) * B, H))  # [N, H, H]
            else:
                grad_w = torch.zeros_like(w_hh)
        return dz, grad_w, None, None, None, None, None


def rnn_layer_triton(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                     b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None,
                     nonlinearity: str = "relu", precision: str = "tf32x3", *,
                     num_warps: Optional[int] = None, transposed: Optional[bool] = None) -> torch.Tensor:
    """One RNN layer (zero initial state) for one model or ``N`` stacked models, through the fused kernel.

    Args:
        x: input, ``[B, T, I]`` for one model or ``[N, B, T, I]`` for N stacked models (fp32).
        w_ih: ``[H, I]`` or ``[N, H, I]``; ``w_hh``: ``[H, H]`` or ``[N, H, H]``.
        b_ih, b_hh: ``[H]`` or ``[N, H]``, or None for no bias.
        nonlinearity: ``relu`` or ``tanh``.
        precision: ``tf32x3`` (default, fp32-grade), ``ieee`` (no tensor cores), ``tf32`` (fast but
            drifts over long sequences), or ``tf32x3-native`` (Triton's own split).
        num_warps, transposed: launch options (None: the defaults); results do not depend on them
            beyond float rounding.

    Shape:
        returns every hidden state, ``[B, T, H]`` or ``[N, B, T, H]`` (a transposed view of a
        time-major buffer), like ``nn.RNN(batch_first=True)``'s output.
    """
    if triton is None:
        raise RuntimeError(f"the Triton RNN engine needs the triton package, which failed to import: {_IMPORT_ERROR}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    stacked = x.dim() == 4
    if not stacked:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, T, I] or [N, B, T, I], got shape {tuple(x.shape)}")
        x, w_ih, w_hh = x.unsqueeze(0), w_ih.unsqueeze(0), w_hh.unsqueeze(0)
        b_ih = None if b_ih is None else b_ih.unsqueeze(0)
        b_hh = None if b_hh is None else b_hh.unsqueeze(0)
    N, B, T, I = x.shape
    H = w_hh.shape[-1]
    if w_ih.shape != (N, H, I) or w_hh.shape != (N, H, H):
        raise ValueError(f"weights must be w_ih [N, H, I] = {(N, H, I)} and w_hh [N, H, H] = {(N, H, H)}, "
                         f"got {tuple(w_ih.shape)} and {tuple(w_hh.shape)}")
    if x.dtype != torch.float32 or w_hh.dtype != torch.float32:
        raise ValueError(f"the Triton RNN engine computes in float32, got {x.dtype} and {w_hh.dtype}")
    if T < 1:
        raise ValueError(f"sequence length must be at least 1, got {T}")
    if x.device.type == "cuda":
        interpret = False
    elif _interpret_requested():
        interpret = True
    else:
        raise RuntimeError("rnn_layer_triton needs CUDA tensors, or TRITON_INTERPRET=1 to run the "
                           f"interpreter on CPU tensors; got a tensor on {x.device}")

    # Input projection for all steps at once, time-major: u [N, T*B, H].
    xt = x.transpose(1, 2).reshape(N, T * B, I)
    if b_ih is None and b_hh is None:
        u = torch.bmm(xt, w_ih.transpose(1, 2))
    else:
        bias = (b_ih if b_hh is None else b_hh if b_ih is None else b_ih + b_hh)  # [N, H]
        u = torch.baddbmm(bias.unsqueeze(1), xt, w_ih.transpose(1, 2))
    if num_warps is None:
        num_warps = 8 if _block(H) >= 128 else 4
    trans = DEFAULT_TRANSPOSED if transposed is None else bool(transposed)
    h = _Recurrence.apply(u.view(N, T, B, H), w_hh, nonlinearity == "tanh", _PRECISION_CODE[precision],
                          trans, int(num_warps), interpret)  # [N, T, B, H]
    out = h.transpose(1, 2)  # [N, B, T, H]
    return out if stacked else out[0]


def model_forward(model, precision: str = "tf32x3", **launch) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> model(x)`` for an ``irnn``/``rnn-relu``/``rnn-tanh`` :class:`~irnn.models.recurrent.RecurrentModel`,
    with every recurrent layer run by :func:`rnn_layer_triton` on the model's own parameters (so the
    optimiser and checkpoints are unchanged).

    Shape: ``[B, T, I] -> [B, output_size]``.
    """
    if getattr(model, "nonlinearity", None) not in NONLINEARITIES:
        raise ValueError(f"the Triton engine runs ReLU and tanh RNNs only, not {getattr(model, 'kind', model)!r}")
    rnn = model.rnn

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in range(model.num_layers):
            h = rnn_layer_triton(h, getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}"),
                                 getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}"),
                                 model.nonlinearity, precision, **launch)  # [B, T, H]
        return model.readout(h[:, -1])

    return forward
