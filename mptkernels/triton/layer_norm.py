"""Triton LayerNorm / RMSNorm with an optional fused residual add (forward and backward).

Same semantics as the ``mptkernels::layer_norm_fwd`` / ``layer_norm_bwd`` schemas in
csrc/registration.cpp and the math of ``mptkernels.reference.layer_norm`` / ``rms_norm``.
The caller validates arguments and handles the "mpt" cast mode (weight/bias rounded to x's
dtype before the call); "llama" is ``cast_before_weight=True``, "gemma" is
``weight_offset=1.0``.

Two code paths, chosen on the padded row length ``BLOCK_N = next_power_of_2(N)``:

* fused (``BLOCK_N <= *_FUSED_MAX_BLOCK_N``): a whole row (or a tile of ``BLOCK_M`` short
  rows) lives in registers, so every tensor is read and written exactly once.
* looped (longer rows): the row is walked in ``LOOPED_BLOCK_N`` chunks; the extra passes
  re-read a row this program has just touched, which mostly hits L2.

The backward is persistent: a fixed number of programs, each owning a contiguous range of
rows, accumulates dweight/dbias partials privately and writes one row of a
(num_programs, N) fp32 buffer; torch sums it over dim 0. No atomics, so it is
deterministic run to run.

Testing note: under TRITON_INTERPRET=1, Triton 3.6's interpreter calls int() on a
shape-(1,) NumPy array for every loop with a runtime bound (the looped kernels and the
persistent backward), which NumPy >= 2.3 rejects; a test harness has to patch
``triton.runtime.interpreter._patch_lang_tensor`` so that ``__index__`` uses ``.item()``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_ctx, sm_count

# Largest padded row kept whole in registers (both capped at 16 warps = 512 threads, so
# at most 128 registers per thread). Forward at 16384: 32 fp32 values per thread per
# row-sized value, with about three such values live (s, then weight and bias). The
# backward keeps about seven live (s, dy, weight, xhat, g and the two partials), so its
# limit is half: 16 values per thread at 8192. Longer rows take the looped kernels.
FWD_FUSED_MAX_BLOCK_N = 16384
BWD_FUSED_MAX_BLOCK_N = 8192
# Chunk of a row that the looped path handles per iteration, and its warp count
# (16 columns per thread: two 16-byte vector loads per bf16 stream).
LOOPED_BLOCK_N = 4096
LOOPED_NUM_WARPS = 8
# Short rows are packed BLOCK_M to a program so that a program still moves a useful
# amount of data (about FUSED_MIN_TILE elements) instead of one tiny row per CTA.
FUSED_MIN_TILE = 2048
FUSED_MAX_BLOCK_M = 32
# Backward programs per SM. More than one lets one program's loads overlap another's
# reductions (Triton does not software-pipeline these row loops); more would not be
# resident at once with 16-warp CTAs (see the maxnreg cap in layer_norm_bwd) and would
# only grow the partial buffer that torch has to sum.
BWD_PROGRAMS_PER_SM = 2
# Program count of the backward where there is no GPU (Triton interpreter): small, but
# above one so the cross-program reduction of dweight/dbias is exercised.
BWD_PROGRAMS_CPU = 4


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_fused(
    X,  # [M, N] input
    RES,  # [M, N] residual, read only when HAS_RESIDUAL
    W,  # [N] weight (x's dtype or fp32), read only when HAS_WEIGHT
    B,  # [N] bias (x's dtype or fp32), read only when HAS_BIAS
    Y,  # [M, N] output, x's dtype
    RES_OUT,  # [M, N] x + residual rounded to x's dtype, written only when HAS_RESIDUAL
    MEAN,  # [M] fp32, written only for LayerNorm
    RSTD,  # [M] fp32
    M,
    N,
    eps,
    weight_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    # int64: M * N can exceed 2**31 for large activations
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    dtype = Y.dtype.element_ty

    # x and residual are read once and never again: do not let them push weight/bias
    # (shared by every program) out of L2.
    s = tl.load(X + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        # the residual stream is stored in x's dtype, and the statistics must be those of
        # the stored (rounded) value, as the reference computes them
        s_lo = (s + r.to(tl.float32)).to(dtype)
        tl.store(RES_OUT + offs, s_lo, mask=mask)
        s = s_lo.to(tl.float32)

    if RMS_NORM:
        xc = s
    else:
        mean = tl.sum(s, axis=1) / N
        tl.store(MEAN + rows, mean, mask=row_mask)
        # two-pass variance on registers; padded columns must not contribute -mean
        xc = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = tl.rsqrt(var + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    y = xc * rstd[:, None]
    if CAST_BEFORE_WEIGHT:  # Llama: the normalised value is rounded before the weight
        y = y.to(dtype).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")
        y = y * (w.to(tl.float32) + weight_offset)[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")
        y = y + b.to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(dtype), mask=mask)


@triton.jit
def _layer_norm_fwd_looped(
    X,  # [M, N] input
    RES,  # [M, N] residual, read only when HAS_RESIDUAL
    W,  # [N] weight (x's dtype or fp32), read only when HAS_WEIGHT
    B,  # [N] bias (x's dtype or fp32), read only when HAS_BIAS
    Y,  # [M, N] output, x's dtype
    RES_OUT,  # [M, N] x + residual rounded to x's dtype, written only when HAS_RESIDUAL
    MEAN,  # [M] fp32, written only for LayerNorm
    RSTD,  # [M] fp32
    N,
    eps,
    weight_offset,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    dtype = Y.dtype.element_ty

    # Pass 1: form s (storing the residual stream) and accumulate sum(s) or sum(s^2).
    # Accumulating per lane and reducing once at the end is both cheaper and more
    # accurate than a running scalar.
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for off in range(0, N, BLOCK_N):
        c = off + cols
        m = c < N
        if HAS_RESIDUAL:
            x = tl.load(X + base + c, mask=m, other=0.0, eviction_policy="evict_first")
            r = tl.load(RES + base + c, mask=m, other=0.0, eviction_policy="evict_first")
            s_lo = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(RES_OUT + base + c, s_lo, mask=m)
            s = s_lo.to(tl.float32)
        else:
            s = tl.load(X + base + c, mask=m, other=0.0).to(tl.float32)
        if RMS_NORM:
            acc += s * s
        else:
            acc += s

    # Later passes re-read the rounded s: from RES_OUT (one stream instead of two, and
    # already rounded) when there is a residual, else from X.
    if HAS_RESIDUAL:
        S = RES_OUT
        # make this program's RES_OUT stores visible to all its threads before re-reading
        tl.debug_barrier()
    else:
        S = X

    if RMS_NORM:
        mean = 0.0
        var = tl.sum(acc, axis=0) / N
    else:
        mean = tl.sum(acc, axis=0) / N
        tl.store(MEAN + row, mean)
        # Pass 2: centred sum of squares (not E[s^2] - E[s]^2, which cancels badly when
        # |mean| >> std).
        acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            m = c < N
            s = tl.load(S + base + c, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, s - mean, 0.0)
            acc2 += d * d
        var = tl.sum(acc2, axis=0) / N
    rstd = tl.rsqrt(var + eps)
    tl.store(RSTD + row, rstd)

    # Pass 3: normalise and write y; this is the last read of the row.
    for off in range(0, N, BLOCK_N):
        c = off + cols
        m = c < N
        s = tl.load(S + base + c, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
        y = (s - mean) * rstd
        if CAST_BEFORE_WEIGHT:
            y = y.to(dtype).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + c, mask=m, other=0.0, eviction_policy="evict_last")
            y = y * (w.to(tl.float32) + weight_offset)
        if HAS_BIAS:
            b = tl.load(B + c, mask=m, other=0.0, eviction_policy="evict_last")
            y = y + b.to(tl.float32)
        tl.store(Y + base + c, y.to(dtype), mask=m)


@triton.jit
def _layer_norm_bwd_fused(
    DY,  # [M, N] gradient of y
    DRES_OUT,  # [M, N] gradient arriving through residual_out, read only when HAS_DRES_OUT
    S,  # [M, N] normalised input saved by the forward (residual_out or x)
    W,  # [N] weight (x's dtype or fp32), read only when HAS_WEIGHT
    MEAN,  # [M] fp32, read only for LayerNorm
    RSTD,  # [M] fp32
    DX,  # [M, N] gradient of s, s's dtype
    DW_PARTIAL,  # [num_programs, N] fp32, this program's share of dweight
    DB_PARTIAL,  # [num_programs, N] fp32, this program's share of dbias
    M,
    N,
    tiles_per_program,
    weight_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DRES_OUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * tiles_per_program * BLOCK_M
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dtype = S.dtype.element_ty

    # weight is loaded once per program and reused for all its rows
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
    # Partials stay 2-D until the end so the loop does no cross-row reduction.
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    # A fixed trip count rather than min(row_start + rows, M) as the bound: only the last
    # program can run past M, and its extra tiles are fully masked (no memory traffic).
    for t in range(0, tiles_per_program):
        rows = row_start + t * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]

        s = tl.load(S + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if HAS_DRES_OUT:
            # issued with the other streams, before the reductions' barriers, so that its
            # latency overlaps theirs instead of following them
            dres = tl.load(DRES_OUT + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        # padded rows get rstd = 0, hence xhat = 0 and no contribution to the partials
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if RMS_NORM:
            xhat = s * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)

        if HAS_WEIGHT:
            g = dy * w[None, :]
            if CAST_BEFORE_WEIGHT:  # the weight saw the rounded xhat
                dw_acc += dy * xhat.to(dtype).to(tl.float32)
            else:
                dw_acc += dy * xhat
        else:
            g = dy
        if HAS_BIAS:
            db_acc += dy

        c1 = tl.sum(xhat * g, axis=1) / N
        if RMS_NORM:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / N
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES_OUT:
            dx += dres.to(tl.float32)
        tl.store(DX + offs, dx.to(dtype), mask=mask)

    # Every program writes its row of the partial buffers (zeros if it had no rows), so
    # the buffers need no initialisation.
    part = pid.to(tl.int64) * N + cols
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + part, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + part, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _layer_norm_bwd_looped(
    DY,  # [M, N] gradient of y
    DRES_OUT,  # [M, N] gradient arriving through residual_out, read only when HAS_DRES_OUT
    S,  # [M, N] normalised input saved by the forward (residual_out or x)
    W,  # [N] weight (x's dtype or fp32), read only when HAS_WEIGHT
    MEAN,  # [M] fp32, read only for LayerNorm
    RSTD,  # [M] fp32
    DX,  # [M, N] gradient of s, s's dtype
    DW_PARTIAL,  # [num_programs, N] fp32, zero-initialised, this program's share of dweight
    DB_PARTIAL,  # [num_programs, N] fp32, zero-initialised, this program's share of dbias
    M,
    N,
    rows_per_program,
    weight_offset,
    BLOCK_N: tl.constexpr,
    HAS_DRES_OUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    cols = tl.arange(0, BLOCK_N)
    dtype = S.dtype.element_ty
    part = pid.to(tl.int64) * N

    # A fixed trip count rather than min(row_start + rows, M) as the bound; only the last
    # program can have rows past M.
    for i in range(0, rows_per_program):
        row = row_start + i
        if row < M:
            base = row.to(tl.int64) * N
            rstd = tl.load(RSTD + row)
            if RMS_NORM:
                mean = 0.0
            else:
                mean = tl.load(MEAN + row)

            # Pass 1: the two row reductions that dx needs.
            acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                s = tl.load(S + base + c, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + base + c, mask=m, other=0.0).to(tl.float32)
                xhat = tl.where(m, (s - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    w = tl.load(W + c, mask=m, other=0.0, eviction_policy="evict_last")
                    g = dy * (w.to(tl.float32) + weight_offset)
                else:
                    g = dy
                acc_gx += xhat * g
                if not RMS_NORM:
                    acc_g += g
            c1 = tl.sum(acc_gx, axis=0) / N
            c2 = tl.sum(acc_g, axis=0) / N

            # Pass 2: dx, and the dweight/dbias partials. The partial rows belong to this
            # program alone, and each element is read and written by the same thread (same
            # layout for the load and the store), so load-add-store needs no atomics.
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                s = tl.load(S + base + c, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
                dy = tl.load(DY + base + c, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
                xhat = tl.where(m, (s - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    w = tl.load(W + c, mask=m, other=0.0, eviction_policy="evict_last")
                    g = dy * (w.to(tl.float32) + weight_offset)
                    if CAST_BEFORE_WEIGHT:
                        xw = xhat.to(dtype).to(tl.float32)
                    else:
                        xw = xhat
                    dw = tl.load(DW_PARTIAL + part + c, mask=m, other=0.0, eviction_policy="evict_last")
                    tl.store(DW_PARTIAL + part + c, dw + dy * xw, mask=m)
                else:
                    g = dy
                if HAS_BIAS:
                    db = tl.load(DB_PARTIAL + part + c, mask=m, other=0.0, eviction_policy="evict_last")
                    tl.store(DB_PARTIAL + part + c, db + dy, mask=m)
                if RMS_NORM:
                    dx = (g - xhat * c1) * rstd
                else:
                    dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_DRES_OUT:
                    dres = tl.load(DRES_OUT + base + c, mask=m, other=0.0, eviction_policy="evict_first")
                    dx += dres.to(tl.float32)
                tl.store(DX + base + c, dx.to(dtype), mask=m)


# --------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------


def _fused_tile(N: int, elems_per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the fused kernels."""
    block_n = triton.next_power_of_2(N)
    block_m = min(max(FUSED_MIN_TILE // block_n, 1), FUSED_MAX_BLOCK_M)
    num_warps = min(max(block_m * block_n // (32 * elems_per_thread), 1), 16)
    return block_m, block_n, num_warps


def layer_norm_fwd(x, weight, bias, residual, eps: float, rms_norm: bool, weight_offset: float,
                   cast_before_weight: bool):
    """LayerNorm/RMSNorm forward; returns (y, residual_out or empty, mean or empty, rstd).
    Arguments as the op's schema, checked by the op layer (2-D contiguous, fp32/fp16/bf16)."""
    M, N = x.shape
    dev = x.device
    y = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else torch.empty(0, dtype=x.dtype, device=dev)
    mean = torch.empty(0 if rms_norm else M, dtype=torch.float32, device=dev)
    rstd = torch.empty(M, dtype=torch.float32, device=dev)
    if M == 0 or N == 0:
        # statistics of an empty row are undefined, as in the reference (mean of nothing)
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        return y, residual_out, mean, rstd

    # absent tensors are never dereferenced (their constexpr flag is off); pass x instead
    args = (
        x,
        x if residual is None else residual,
        x if weight is None else weight,
        x if bias is None else bias,
        y,
        x if residual is None else residual_out,
        rstd if rms_norm else mean,
        rstd,
    )
    flags = dict(
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        RMS_NORM=bool(rms_norm),
        CAST_BEFORE_WEIGHT=bool(cast_before_weight),
    )
    eps, weight_offset = float(eps), float(weight_offset)
    with device_ctx(x):
        if triton.next_power_of_2(N) <= FWD_FUSED_MAX_BLOCK_N:
            # 16 elements per thread (two 16-byte loads per bf16 stream): one row per CTA
            # still leaves room for several CTAs per SM, which supply the loads in flight
            block_m, block_n, num_warps = _fused_tile(N, 16)
            _layer_norm_fwd_fused[(triton.cdiv(M, block_m),)](
                *args, M, N, eps, weight_offset,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags)
        else:
            block_n = min(LOOPED_BLOCK_N, triton.next_power_of_2(N))
            _layer_norm_fwd_looped[(M,)](
                *args, N, eps, weight_offset,
                BLOCK_N=block_n, num_warps=LOOPED_NUM_WARPS, **flags)
    return y, residual_out, mean, rstd


def layer_norm_bwd(dy, dresidual_out, s, weight, bias, mean, rstd, rms_norm: bool, weight_offset: float,
                   cast_before_weight: bool):
    """Gradient of layer_norm_fwd; returns (dx, dweight or empty, dbias or empty)."""
    M, N = s.shape
    dev = s.device
    dx = torch.empty_like(s)
    has_w, has_b = weight is not None, bias is not None

    if M == 0 or N == 0:
        dweight = torch.zeros_like(weight) if has_w else torch.empty(0, dtype=s.dtype, device=dev)
        dbias = torch.zeros_like(bias) if has_b else torch.empty(0, dtype=s.dtype, device=dev)
        return dx, dweight, dbias

    fused = triton.next_power_of_2(N) <= BWD_FUSED_MAX_BLOCK_N
    if fused:
        # 8 elements per thread: the persistent backward has only a couple of CTAs per
        # SM, so it needs wide CTAs for memory parallelism, and each thread keeps about
        # seven row-sized values (s, dy, w, xhat, g and the two partials) live
        block_m, block_n, num_warps = _fused_tile(N, 8)
    else:
        block_m, block_n, num_warps = 1, min(LOOPED_BLOCK_N, triton.next_power_of_2(N)), LOOPED_NUM_WARPS

    # Fixed program count (not data dependent beyond M) keeps the dweight/dbias summation
    # order, hence the result, identical from run to run.
    max_programs = sm_count(dev) * BWD_PROGRAMS_PER_SM if s.is_cuda else BWD_PROGRAMS_CPU
    n_tiles = triton.cdiv(M, block_m)
    # whole tiles per program, so only the last program has a ragged tile
    tiles_per_program = triton.cdiv(n_tiles, min(max_programs, n_tiles))
    num_programs = triton.cdiv(n_tiles, tiles_per_program)

    # the looped kernel accumulates into the buffers, the fused one overwrites them
    alloc = torch.empty if fused else torch.zeros
    dw_partial = alloc((num_programs, N), dtype=torch.float32, device=dev) if has_w else None
    db_partial = alloc((num_programs, N), dtype=torch.float32, device=dev) if has_b else None

    args = (
        dy,
        dy if dresidual_out is None else dresidual_out,
        s,
        s if weight is None else weight,
        rstd if rms_norm else mean,
        rstd,
        dx,
        rstd if dw_partial is None else dw_partial,
        rstd if db_partial is None else db_partial,
        M,
        N,
        tiles_per_program,  # = rows per program for the looped kernel (one-row tiles)
        float(weight_offset),
    )
    flags = dict(
        HAS_DRES_OUT=dresidual_out is not None,
        HAS_WEIGHT=has_w,
        HAS_BIAS=has_b,
        RMS_NORM=bool(rms_norm),
        CAST_BEFORE_WEIGHT=bool(cast_before_weight),
    )
    launch = {}
    if fused and block_m * block_n <= 8 * 32 * num_warps:
        # The grid assumes BWD_PROGRAMS_PER_SM programs resident per SM at once (otherwise
        # the extra ones run as a second wave, with half the loads in flight). At 8 values
        # per thread the kernel fits that register budget without spilling (checked with
        # ptxas for sm_90: 64 registers at 16 warps, fp32 and bf16), so hold it there.
        launch["maxnreg"] = min(65536 // (BWD_PROGRAMS_PER_SM * num_warps * 32), 255)
    with device_ctx(s):
        if fused:
            _layer_norm_bwd_fused[(num_programs,)](
                *args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **launch, **flags)
        else:
            _layer_norm_bwd_looped[(num_programs,)](
                *args, BLOCK_N=block_n, num_warps=num_warps, **flags)

    dweight = dw_partial.sum(0).to(weight.dtype) if has_w else torch.empty(0, dtype=s.dtype, device=dev)
    dbias = db_partial.sum(0).to(bias.dtype) if has_b else torch.empty(0, dtype=s.dtype, device=dev)
    return dx, dweight, dbias
