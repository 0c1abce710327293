"""Triton SwiGLU / GeGLU forward and backward (the ``mptkernels::glu_fwd`` / ``glu_bwd`` schemas
of csrc/registration.cpp; the maths of ``mptkernels.reference.swiglu`` / ``geglu``).

Elementwise over rows: a program owns a tile of BLOCK_M rows x BLOCK_N columns (short rows are
packed several to a program, long rows split over programs), reads gate and up once and writes
out (forward), or reads dout, gate and up once and writes dgate and dup (backward: act(gate) is
recomputed, nothing but the inputs is saved). The activation's maths is fp32; each output is
rounded once to the inputs' dtype. Inputs: (rows, N) with unit stride along N and any row stride
(a chunk() of a fused projection is read in place; a one-row or one-column input's stride
there is never stepped over, whatever it is); outputs are new contiguous tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_ctx

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT2_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_C = tl.constexpr(0.044715)

# Columns of a tile (a power of two); elements of a tile, short rows packed up to it; warps.
# 16 bytes per thread per load at 4096 bf16 elements and 8 warps.
MAX_BLOCK_N = 4096
TILE_ELEMS = 4096
NUM_WARPS = 8


@triton.jit
def _act_fwd(g, ACTIVATION: tl.constexpr):
    """act(g) on an fp32 tile."""
    if ACTIVATION == "silu":
        # g * sigmoid(g); for g -> -inf exp overflows to inf and the quotient is -0, never NaN
        return g / (1.0 + tl.exp(-g))
    elif ACTIVATION == "gelu":
        return 0.5 * g * (1.0 + tl.math.erf(g * SQRT1_2))
    else:  # gelu_tanh: 0.5 g (1 + tanh u) = g * sigmoid(2u)
        u = SQRT2_PI * (g + GELU_TANH_C * g * g * g)
        return g / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _act_and_grad(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) on an fp32 tile."""
    if ACTIVATION == "silu":  # s (1 + g (1 - s)), s = sigmoid(g)
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s + a * (1.0 - s)
    elif ACTIVATION == "gelu":  # Phi(g) + g phi(g)
        cdf = 0.5 * (1.0 + tl.math.erf(g * SQRT1_2))
        a = g * cdf
        da = cdf + g * INV_SQRT_2PI * tl.exp(-0.5 * g * g)
    else:  # p + 2 g p (1 - p) du/dg, p = sigmoid(2u)
        u = SQRT2_PI * (g + GELU_TANH_C * g * g * g)
        du = SQRT2_PI * (1.0 + 3.0 * GELU_TANH_C * g * g)
        p = 1.0 / (1.0 + tl.exp(-2.0 * u))
        a = g * p
        da = p + 2.0 * a * (1.0 - p) * du
    return a, da


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows (int64) and columns, and the mask of the elements inside (M, N)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return rows, cols, mask


@triton.jit
def _glu_fwd_kernel(
    GATE,  # [M, N] row stride stride_g, unit column stride
    UP,  # [M, N] row stride stride_u
    OUT,  # [M, N] contiguous, the inputs' dtype
    M, N, stride_g, stride_u,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr,
):
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(GATE + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = _act_fwd(g, ACTIVATION) * u
    tl.store(OUT + rows[:, None] * N + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DOUT,  # [M, N] row stride stride_d, unit column stride
    GATE,  # [M, N] row stride stride_g
    UP,  # [M, N] row stride stride_u
    DGATE,  # [M, N] contiguous: dout * up * act'(gate)
    DUP,  # [M, N] contiguous: dout * act(gate)
    M, N, stride_d, stride_g, stride_u,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr,
):
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    d = tl.load(DOUT + rows[:, None] * stride_d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACTIVATION)
    o = rows[:, None] * N + cols[None, :]
    tl.store(DGATE + o, (d * u * da).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + o, (d * a).to(DUP.dtype.element_ty), mask=mask)


def _config(M: int, N: int):
    """(BLOCK_M, BLOCK_N, grid) of an (M, N) problem."""
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(max(N, 1)))
    block_m = max(1, min(TILE_ELEMS // block_n, triton.next_power_of_2(max(M, 1))))
    return block_m, block_n, (triton.cdiv(M, block_m), triton.cdiv(N, block_n))


def glu_fwd(gate, up, activation: str):
    """out = act(gate) * up, (M, N) contiguous in gate's dtype (fp32 maths)."""
    M, N = gate.shape
    out = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    bm, bn, grid = _config(M, N)
    with device_ctx(gate):
        _glu_fwd_kernel[grid](gate, up, out, M, N, gate.stride(0), up.stride(0),
                              BLOCK_M=bm, BLOCK_N=bn, ACTIVATION=activation, num_warps=NUM_WARPS)
    return out


def glu_bwd(dout, gate, up, activation: str):
    """(dgate = dout * up * act'(gate), dup = dout * act(gate)), (M, N) contiguous, one pass."""
    M, N = gate.shape
    dgate = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    dup = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    if dgate.numel() == 0:
        return dgate, dup
    bm, bn, grid = _config(M, N)
    with device_ctx(gate):
        _glu_bwd_kernel[grid](dout, gate, up, dgate, dup, M, N, dout.stride(0), gate.stride(0),
                              up.stride(0), BLOCK_M=bm, BLOCK_N=bn, ACTIVATION=activation,
                              num_warps=NUM_WARPS)
    return dgate, dup
