"""The Triton kernel behind ``torch_triton.token_loss_triton`` (imported lazily, only by it).

This module imports Triton at import time on purpose: ``triton.jit`` decides *when the kernel is
decorated* whether it is compiled for the GPU or run by Triton's interpreter (``TRITON_INTERPRET=1``,
CPU tensors). Keeping the decoration here, imported on first use, means ``import xseqloss`` and
``import xseqloss.backends.torch_triton`` never import Triton, and the environment at first use
decides the mode.

One program per row of the (R, C) logits. Two loops over the row in blocks of BLOCK classes:

1. statistics: an online logsumexp in the max-shifted frame (running max m, s = sum exp(x - m)
   rescaled when m grows) and, with label smoothing, sum_c w_c * (x_c - m) rescaled the same way;
2. only when a gradient is asked for: the row again (from L2 when it stayed there), the gradient
   formed in float32 and stored once in the output's dtype.

So the logits are read twice and the gradient written once. Everything is float32 inside.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Whether triton.jit below built interpreted kernels (CPU tensors) or compiled ones (CUDA).
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _tanh(u):
    """tanh in float32 from exp only: the interpreter has no libdevice (extern calls raise there),
    and one code path on CPU and GPU means CI tests what the GPU runs.

    |u| >= 0.5: 1 - 2 / (exp(2|u|) + 1), no cancellation there (the result is >= 0.46; exp(2|u|)
    overflowing to inf gives exactly 1). |u| < 0.5: the Taylor series to u^15 (truncation < 1e-8
    relative), because the exp form loses ulp(1) / tanh(u) relative near 0 (1e-3 at u = 1e-4).
    """
    a = tl.abs(u)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    a2 = a * a
    p = -929569.0 / 638512875.0
    p = p * a2 + 21844.0 / 6081075.0
    p = p * a2 - 1382.0 / 155925.0
    p = p * a2 + 62.0 / 2835.0
    p = p * a2 - 17.0 / 315.0
    p = p * a2 + 2.0 / 15.0
    p = p * a2 - 1.0 / 3.0
    small = a + a * a2 * p
    t = tl.where(a < 0.5, small, big)
    return tl.where(u < 0, -t, t)


@triton.jit
def _row_block(z_row, offs, valid, cap, HAS_CAP: tl.constexpr, EVICT: tl.constexpr):
    """One block of a row as float32 (after the softcap), -inf where not ``valid``, and tanh."""
    x = tl.load(z_row + offs, mask=valid, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    t = x
    if HAS_CAP:
        t = _tanh(x / cap)
        # masked lanes must stay -inf (cap * tanh(-inf) would be -cap: mass in s)
        x = tl.where(valid, cap * t, float("-inf"))
    return x, t


@triton.jit
def _stats_step(z_row, cw_ptr, start, cols, C, lim, cap, m, f, s, S1, W,
                HAS_CW: tl.constexpr, HAS_EPS: tl.constexpr, HAS_CAP: tl.constexpr):
    """Pass 1, one block: the online statistics in the shifted frame f (the running max m; 0 while
    m is -inf, as a row whose max is -inf uses m = 0). ``lim``: the classes read, C, or 0 in a
    dropped row."""
    offs = start + cols
    inrow = offs < C
    valid = offs < lim
    x, t = _row_block(z_row, offs, valid, cap, HAS_CAP, "evict_last")
    m_new = tl.maximum(m, tl.max(x, 0))
    f_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    # f only grows once m is finite; while m was -inf, s == 0 and f = 0 may exceed f_new: the min
    # keeps the factor <= 1 there, so 0 * exp(...) never becomes 0 * inf = NaN.
    s = s * tl.exp(tl.minimum(f - f_new, 0.0)) + tl.sum(tl.exp(x - f_new), 0)
    if HAS_EPS:
        if HAS_CW:
            w = tl.load(cw_ptr + offs, mask=inrow, other=0.0).to(tl.float32)
        else:
            w = tl.where(inrow, 1.0, 0.0)
        # every term w_c * (x_c - f) is <= 0, so moving the earlier ones by f_new - f (all by the
        # same amount) adds no cancellation; w_c == 0 gives exactly 0, even at x_c = -inf (0 log 0)
        S1 = S1 - W * (f_new - f) + tl.sum(tl.where(w == 0.0, 0.0, w * (x - f_new)), 0)
        W = W + tl.sum(w, 0)
    return m_new, f_new, s, S1, W


@triton.jit
def _grad_step(z_row, out_row, cw_ptr, start, cols, C, lim, cap, y32, a, b, f, inv_s, coef, sc,
               HAS_KEEP: tl.constexpr, HAS_CW: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_EPS: tl.constexpr, HAS_CAP: tl.constexpr):
    """Pass 2, one block: (coef * softmax - q) * (1 - t^2) * scale in float32, stored once."""
    offs = start + cols
    inrow = offs < C
    valid = offs < lim
    x, t = _row_block(z_row, offs, valid, cap, HAS_CAP, "evict_first")
    # q_c = b * w_c + a * [c == y]; the true-class entry coef * p_y - q_y is formed here in float32:
    # cast first and p_y -> 1 is lost in bfloat16 (Liger-Kernel PR 1329: 100% relative error at
    # p = 0.999). At a class with q_c == 0 and exp(x_c - f) == 0 this is exactly 0 (vocabulary
    # masking with -inf logits).
    q = tl.where(offs == y32, a, 0.0)
    if HAS_EPS:
        if HAS_CW:
            w = tl.load(cw_ptr + offs, mask=inrow, other=0.0).to(tl.float32)
            q = q + b * w
        else:
            q = q + b
    g = coef * (tl.exp(x - f) * inv_s) - q
    if HAS_CAP:
        g = g * (1.0 - t * t)
    if HAS_SCALE:
        g = g * sc
    if HAS_KEEP:
        g = tl.where(valid, g, 0.0)  # exactly 0, even over a row of NaN (in place: overwritten)
    tl.store(out_row + offs, g.to(out_row.dtype.element_ty), mask=inrow)


@triton.jit
def token_loss_kernel(
    z_ptr, y_ptr, keep_ptr, cw_ptr, scale_ptr, loss_ptr, out_ptr,
    C, stride_z, stride_out,
    one_minus_eps, b, z_loss, cap,
    HAS_KEEP: tl.constexpr, HAS_CW: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_EPS: tl.constexpr, HAS_Z: tl.constexpr, HAS_CAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, WHILE_LOOPS: tl.constexpr,
):
    # WHILE_LOOPS (the interpreter only): Triton 3.6's interpreter turns a runtime loop bound into
    # a Python int with int() of a 1-element array, which NumPy >= 2.4 refuses ("only 0-dimensional
    # arrays can be converted"); a while loop compares instead. The compiled kernel keeps
    # ``for range(...)`` (scf.for, which Triton can pipeline). Both run the same step functions.

    # 64-bit row offsets: row * stride in int32 wraps past 2**31 elements (Liger-Kernel issue 803,
    # pytorch issue 85786); the cast happens before the multiplication.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK)
    y = tl.load(y_ptr + row)  # int64, already clamped into [0, C) by the caller
    y32 = y.to(tl.int32)  # C < 2**31: compared with int32 offsets (no per-element widening)
    kept = True
    lim = C  # the classes a block may read: C, or 0 in a dropped row
    if HAS_KEEP:
        # A dropped row is never read: every load is masked by ``kept`` (the blocks' by ``lim``), so
        # NaN/inf padding cannot reach exp/log, and the selects below give exactly 0 loss and
        # gradient there. Block masks are one comparison (offs < lim), not ``inrow & kept``: an
        # int1 block and an int1 scalar combine to a mask that Triton 3.9's interpreter refuses
        # ("mask has unsupported dtype"; 3.6 let it through).
        keep_byte = tl.load(keep_ptr + row).to(tl.int32)  # a bool tensor's byte: 0 or 1
        kept = keep_byte != 0
        lim = C * keep_byte
    w_y = 1.0
    if HAS_CW:
        w_y = tl.load(cw_ptr + y).to(tl.float32)
    a = one_minus_eps * w_y  # the target's own mass (q_y = a + b * w_y)

    # ---- pass 1: statistics
    m = float("-inf")  # running max
    f = 0.0            # frame
    s = 0.0            # sum_c exp(x_c - f)
    S1 = 0.0           # sum_c w_c * (x_c - f), with smoothing only
    W = 0.0            # sum_c w_c so far, with smoothing only
    if WHILE_LOOPS:
        start = 0
        while start < C:
            m, f, s, S1, W = _stats_step(z_row, cw_ptr, start, cols, C, lim, cap, m, f, s, S1, W,
                                         HAS_CW, HAS_EPS, HAS_CAP)
            start += BLOCK
    else:
        for start in range(0, C, BLOCK):
            m, f, s, S1, W = _stats_step(z_row, cw_ptr, start, cols, C, lim, cap, m, f, s, S1, W,
                                         HAS_CW, HAS_EPS, HAS_CAP)

    # ---- the loss, in the shifted frame: sumq * lse_s - sum_c q_c (x_c - f) + z-loss.
    # Never lse - x_y: in float32 near 1e4 both are rounded at ulp(1e4) ~ 1e-3 before subtracting.
    lse_s = tl.log(s)
    lse = lse_s + f
    if HAS_KEEP:
        x_y = tl.load(z_row + y, mask=kept, other=float("-inf")).to(tl.float32)
    else:
        x_y = tl.load(z_row + y).to(tl.float32)
    if HAS_CAP:
        x_y = cap * _tanh(x_y / cap)  # the same float32 operations as in the blocks
    # 0 log 0 = 0: a target with no mass (a == 0) contributes 0 even when its logit is -inf
    loss = -tl.where(a == 0.0, 0.0, a * (x_y - f))
    sumq = a
    if HAS_EPS:
        sumq = a + b * W
        loss = loss - b * S1
    loss = loss + sumq * lse_s
    coef = sumq
    if HAS_Z:
        zw = z_loss * w_y
        loss = loss + zw * lse * lse
        coef = sumq + 2.0 * zw * lse
    if HAS_KEEP:
        loss = tl.where(kept, loss, 0.0)
    tl.store(loss_ptr + row, loss)

    # ---- pass 2: the gradient
    if WRITE_GRAD:
        out_row = out_ptr + row * stride_out
        sc = 1.0
        if HAS_SCALE:
            sc = tl.load(scale_ptr + row).to(tl.float32)
        inv_s = 1.0 / s
        if WHILE_LOOPS:
            start = 0
            while start < C:
                _grad_step(z_row, out_row, cw_ptr, start, cols, C, lim, cap, y32, a, b, f, inv_s, coef, sc,
                           HAS_KEEP, HAS_CW, HAS_SCALE, HAS_EPS, HAS_CAP)
                start += BLOCK
        else:
            for start in range(0, C, BLOCK):
                _grad_step(z_row, out_row, cw_ptr, start, cols, C, lim, cap, y32, a, b, f, inv_s, coef, sc,
                           HAS_KEEP, HAS_CW, HAS_SCALE, HAS_EPS, HAS_CAP)
