"""Triton GEMMs of the ``gemm`` family: linear with a fused epilogue, int8 quantisation, W8A8 and
weight-only int8 linears.

Same math as ``mptkernels.reference`` (``linear``, ``activation``, ``quantize_rowwise``,
``int8_mm``, ``int8_linear``, ``weight_only_int8_linear``). The op layer (mptkernels/ops/)
validates arguments; these functions take 2-D row-major tensors (weights in nn.Linear's
(N, K) layout, i.e. every GEMM here is ``a @ b.T`` with both operands K-contiguous).

* ``linear_fwd(x, weight, bias, activation) -> (out, preact)``: out = act(x @ weight.T + bias),
  x (M, K) fp16/bf16/fp32, weight (N, K) in x's dtype, bias (N,) in x's dtype or fp32.
  Activations: "none", "relu", "gelu" (exact erf), "gelu_tanh". The bias add, the activation
  and both stores are the GEMM's epilogue: for the gelus the same kernel also writes
  preact = x @ weight.T + bias (rounded to x's dtype) for the backward; otherwise preact is an
  empty (0,) tensor. ``activation_bwd(dout, saved, activation)`` is the elementwise gradient
  through the activation (saved = preact for the gelus, out for relu); ``linear_bwd`` is it
  followed by the two GEMMs of the backward on cuBLAS.
* ``int8_mm(a, b)``: a (M, K) int8 @ b (N, K).T int8, exact, int32 accumulation and result.
* ``int8_linear(x, w_int8, w_scale, bias, activation)``: x quantised by ``quantize_rowwise``,
  then the same GEMM with the epilogue act(float(acc) * x_scale[m] * w_scale[n] + bias[n]), in
  x's dtype.
* ``quantize_rowwise(x) -> (x_int8, scale)``: scale = absmax(row) / 127 (1 for an all-zero
  row), q = round-half-to-even(x / scale) clamped to [-127, 127]; bit-exact with the CPU
  reference (see "Numerics").
* ``weight_only_int8_linear(x, w_int8, w_scale, bias)``: x @ (w_int8 * w_scale[:, None]).T + bias
  in x's dtype; the int8 weight tile is converted to x's dtype in registers after the load
  (never materialised in memory) and the per-output-column scale is applied to the fp32
  accumulator in the epilogue: sum_k x[m, k] * w[n, k] * s[n] = s[n] * sum_k x[m, k] * w[n, k].

Algorithm:

* Tiled GEMMs (linear, int8, weight-only with M > ``WO_DECODE_MAX_M``): one program per
  (BLOCK_M, BLOCK_N) output tile, a K loop of BLOCK_K steps with an fp32 (int32 for int8)
  accumulator in registers, Triton software-pipelining the loads over ``num_stages``. The 1-D
  grid is walked in grouped ("super-tile") order: GROUP_M consecutive row tiles share each
  column tile, so the programs resident at once read a GROUP_M x (a few) block of tiles whose
  operands stay in L2 instead of streaming the whole weight once per row tile.
  Rows and columns past M and N are wrapped (index % M) instead of masked on load: every load
  stays in bounds without a predicate and the garbage rows/columns are dropped by the masked
  store. Only the ragged K edge is masked, and only when K % BLOCK_K != 0 (EVEN_K).
* Weight-only int8 for decoding (M <= ``WO_DECODE_MAX_M``): reading the weight dominates, so
  one 16-row tile covers all of M (each weight byte is read exactly once) and K is split
  across programs until about ``WO_DECODE_PROGRAMS_PER_SM`` programs per SM run. With more
  than one split each program writes fp32 partial sums to a (splits, M, N) buffer and a second
  kernel adds them in a fixed order and applies scale and bias: deterministic, unlike an fp32
  atomic-add reduction. The split count depends only on shapes (CUDA-graph safe).
* quantize_rowwise: a whole row (or a tile of short rows) in registers for rows of up to
  ``QUANT_FUSED_MAX_BLOCK_K`` padded elements (x read once); longer rows take two passes of
  ``QUANT_LOOPED_BLOCK_K`` chunks (absmax, then quantize), the second re-reading from L2.

Numerics:

* Matmuls take the input dtype (fp16/bf16 tensor cores, fp32 accumulation); fp32 inputs use
  ``FP32_DOT_PRECISION`` = "ieee" (mptkernels/triton/__init__.py; exactness over speed: fp32
  inputs exist for accuracy, and TF32 would be ~1e-3 off the fp32 reference). int8 dots
  accumulate exactly in int32.
* Epilogues run in fp32 and round once to the output dtype. gelu is 0.5 h (1 + erf(h / sqrt 2));
  gelu_tanh is written as h * sigmoid(2u) (u = sqrt(2/pi) (h + 0.044715 h^3)), which equals
  0.5 h (1 + tanh u) and needs only exp (Triton 3.6 has no tanh outside libdevice, and libdevice
  does not run in the interpreter).
* quantize_rowwise divides with ``tl.math.div_rn`` (IEEE round-to-nearest; Triton's ``/`` on
  fp32 lowers to the approximate div.full.f32 on NVIDIA GPUs) and rounds half to even with
  libdevice's rint on the GPU. libdevice calls fail under TRITON_INTERPRET=1 ("extern_elementwise
  not supported"), so the interpreter uses the classic (v + 1.5 * 2**23) - 1.5 * 2**23, exact
  round-half-to-even for |v| < 2**22 (here |v| <= 127 + an ulp); the launch helper picks the
  variant by whether the kernel object is an interpreted one. The result is bit-identical to
  ``reference.quantize_rowwise``. (The reference divides by a 127 *tensor*: torch computes a
  division by a Python scalar on CUDA as a multiplication by fl(1 / 127), one ulp off the
  exact quotient for ~4% of values.)

Tile configurations come from the ``*_CONFIGS`` tables below, read through the ``*_config``
helpers so they can be tuned in one place.

Testing note (Triton 3.6 interpreter, TRITON_INTERPRET=1): tl.dot returns garbage for bf16
inputs, so interpreted tests cover the float GEMMs in fp16 and fp32 (tests/test_triton_gemm.py);
int8 tl.dot with out_dtype=int32 is exact there and is tested. libdevice calls are unsupported
(hence the rint fallback above), and an fp32 -> bf16 ``.to()`` truncates toward zero instead of
rounding to nearest even as the GPU does, so bf16 outputs are one ulp off there at times.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import MIN_DOT_BLOCK, device_ctx, dot_precision, fit, interpreted, sm_count

# --------------------------------------------------------------------------------------
# Tuning tables: (dtype class, M class) -> (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
# --------------------------------------------------------------------------------------
# Not yet timed on a GPU. Chosen for the H100 (228 KB shared memory per SM, wgmma) from the
# usual Hopper GEMM shapes: the largest tiles whose pipelined operand buffers take at most
# 128 KB of shared memory (leaving room for the epilogue's layout conversion) and whose fp32
# accumulator stays at or below 64 registers per thread (the gelu epilogue needs headroom).
# Checked by compiling every kernel variant for sm_90a offline (triton.compile with the JIT's
# 16-byte alignment specialisation, then ptxas -v): every config below pipelines its K loop
# (16-bit and int8: 128 KB shared memory at 4 stages), uses wgmma from BLOCK_M = 64 (mma.sync
# for the 16-row tiles of M <= 16) and spills nothing; the heaviest, 16-bit "large" with a gelu
# epilogue, takes 192 registers.
#
# M class: "small" is M <= SMALL_M (decoding, short prompts), where the weight read dominates:
# BLOCK_M shrinks to the next power of two of M (never below 16, the smallest legal tl.dot
# dimension), and narrow 64-column tiles with a long BLOCK_K give many programs per weight and
# long contiguous loads. "large" is a compute-bound GEMM: 128 x 128 tiles, 8 warps (two
# warpgroups, 64 accumulator registers each per thread).
SMALL_M = 64
LINEAR_CONFIGS = {
    ("16bit", "small"): (64, 64, 128, 8, 4, 4),  # (64*128 + 64*128) * 2 B * 4 stages = 128 KB
    ("16bit", "large"): (128, 128, 64, 8, 8, 4),  # (128*64 + 128*64) * 2 B * 4 stages = 128 KB
    # fp32 with "ieee" dots runs on the FMA units, not tensor cores: operands feed the FMAs
    # from registers, so the tiles are smaller; these exist for accuracy, not speed.
    ("fp32", "small"): (64, 64, 32, 8, 4, 3),
    ("fp32", "large"): (64, 64, 32, 8, 4, 3),
}
# int8 x int8 -> int32 (also the W8A8 linear). The smallest legal K of an int8 tl.dot is 32.
INT8_CONFIGS = {
    "small": (64, 64, 256, 8, 4, 4),  # (64*256 + 64*256) * 1 B * 4 stages = 128 KB
    "large": (128, 128, 128, 8, 8, 4),  # (128*128 + 128*128) * 1 B * 4 stages = 128 KB
}
# Weight-only int8 tiled path (M > WO_DECODE_MAX_M): x tile in x's dtype, weight tile int8,
# converted in registers before the dot; the same shapes as the 16-bit linear.
WO_CONFIGS = {
    ("16bit", "small"): (64, 64, 128, 8, 4, 4),
    ("16bit", "large"): (128, 128, 64, 8, 8, 4),
    # the int8 -> fp32 conversion costs registers: 4 warps spilled (255 regs + 660 B), 8 take 188
    ("fp32", "small"): (64, 64, 32, 8, 8, 3),
    ("fp32", "large"): (64, 64, 32, 8, 8, 3),
}
# Weight-only decode path: M <= WO_DECODE_MAX_M rows in one 16-row tile, split K.
# (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M is 16.
WO_DECODE_MAX_M = 16
WO_DECODE_CONFIGS = {
    "16bit": (64, 128, 4, 4),  # weight tile 64 x 128 int8 = 8 KB per stage
    "fp32": (64, 32, 4, 3),  # 168 regs; BLOCK_K = 64 at 4 warps spilled 176 B
}
# Split K until about this many programs per SM (several resident programs keep enough weight
# loads in flight to approach HBM bandwidth), but give each split at least
# WO_DECODE_MIN_K_BLOCKS BLOCK_K steps, so the pipeline has something to overlap and the
# partial buffer stays small against the weight.
WO_DECODE_PROGRAMS_PER_SM = 4
WO_DECODE_MIN_K_BLOCKS = 4
WO_DECODE_MAX_SPLITS = 64
# quantize_rowwise: rows up to this padded length stay in registers (16 warps x 32 threads x
# 32 fp32 values); longer rows are walked twice in chunks of QUANT_LOOPED_BLOCK_K.
QUANT_FUSED_MAX_BLOCK_K = 16384
QUANT_LOOPED_BLOCK_K = 4096
# Short rows are packed to about QUANT_MIN_TILE elements per program (at most
# QUANT_MAX_BLOCK_M rows), so a program still moves a useful amount of data.
QUANT_MIN_TILE = 2048
QUANT_MAX_BLOCK_M = 32
# activation_bwd: elements per program (8 per thread at 4 warps: two 16-byte bf16 loads).
ACT_BWD_BLOCK = 1024

# the smallest legal K of an int8 tl.dot (16-bit and fp32 dots: MIN_DOT_BLOCK)
_MIN_BLOCK_K_INT8 = 32


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------

# (globals a kernel reads must be constexpr instances; an annotation is not enough)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
SQRT2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
GELU_TANH_C = tl.constexpr(0.044715)
# 1.5 * 2**23: adding and subtracting it rounds an fp32 |v| < 2**22 to an integer, half to even
RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D program id in grouped order: GROUP_M row tiles walk the column
    tiles together, so the tiles of one wave share their x rows and weight columns in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)  # the last group may be short
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _tile_operands(A, B, stride_a, stride_b, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The C tile of this program (grouped order) and the pointers of its first K block:
    (offs_m, offs_n, offs_k, a_ptrs, b_ptrs) for A (M, K) and B (N, K), unit feature stride.
    Rows and columns past M and N wrap around (in-bounds loads without a predicate; the
    store drops them); 64-bit row offsets, as M * K of a long batch can exceed 2**31."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = A + rows[:, None] * stride_a + offs_k[None, :]
    b_ptrs = B + cols[:, None] * stride_b + offs_k[None, :]
    return offs_m, offs_n, offs_k, a_ptrs, b_ptrs


@triton.jit
def _apply_activation(h, ACTIVATION: tl.constexpr):
    """act(h) on an fp32 tile."""
    if ACTIVATION == "relu":
        return tl.maximum(h, 0.0)
    elif ACTIVATION == "gelu":
        return 0.5 * h * (1.0 + tl.math.erf(h * SQRT1_2))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 h (1 + tanh u) = h * sigmoid(2u); for u -> -inf exp overflows to inf and the
        # quotient is -0, never NaN
        u = SQRT2_PI * (h + GELU_TANH_C * h * h * h)
        return h / (1.0 + tl.exp(-2.0 * u))
    else:
        return h


@triton.jit
def _activation_grad(g, s, ACTIVATION: tl.constexpr):
    """d act / d h * g, with s = h (gelus) or s = act(h) (relu); fp32 tiles."""
    if ACTIVATION == "relu":
        # as torch's threshold_backward on the output: no gradient where out <= 0
        return tl.where(s > 0.0, g, 0.0)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(s * SQRT1_2))
        pdf = tl.exp(-0.5 * s * s) * INV_SQRT_2PI
        return g * (cdf + s * pdf)
    elif ACTIVATION == "gelu_tanh":
        # with p = sigmoid(2u) = (1 + tanh u) / 2: d/dh [h p] = p + 2 h p (1 - p) du/dh
        u = SQRT2_PI * (s + GELU_TANH_C * s * s * s)
        du = SQRT2_PI * (1.0 + 3.0 * GELU_TANH_C * s * s)
        p = 1.0 / (1.0 + tl.exp(-2.0 * u))
        return g * (p + 2.0 * s * p * (1.0 - p) * du)
    else:
        return g


@triton.jit
def _k_loop(acc, a_ptrs, b_ptrs, K, offs_k, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, B_TO_A: tl.constexpr,
            INT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += A tile rows . B tile rows over K (both K-contiguous; the pointers start at k = 0).
    Only the ragged K edge is masked. B_TO_A: convert B's tile to A's dtype first (int8
    weights against 16-bit activations: exact, |w| <= 127 needs 7 significand bits).
    INT_DOT: int8 x int8 with int32 accumulation."""
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0)
        if B_TO_A:
            b = b.to(a.dtype)
        if INT_DOT:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _linear_kernel(
    X,  # [M, K] fp16/bf16/fp32
    W,  # [N, K] x's dtype (nn.Linear layout)
    BIAS,  # [N] x's dtype or fp32, read only when HAS_BIAS
    OUT,  # [M, N] x's dtype: act(x @ w^T + bias)
    PRE,  # [M, N] x's dtype: x @ w^T + bias, written only when STORE_PRE
    M, N, K,
    stride_xm,  # of X (feature stride 1)
    stride_wn,  # of W (feature stride 1)
    stride_om,  # of OUT and PRE
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_m, offs_n, offs_k, x_ptrs, w_ptrs = _tile_operands(X, W, stride_xm, stride_wn, M, N, BLOCK_M, BLOCK_N,
                                                            BLOCK_K, GROUP_M)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _k_loop(acc, x_ptrs, w_ptrs, K, offs_k, BLOCK_K, EVEN_K, False, False, DOT_PRECISION)

    # epilogue: bias, pre-activation store, activation, store; all in fp32 until the stores
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dtype = OUT.dtype.element_ty
    o_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = (offs_m < M)[:, None] & n_ok[None, :]
    if STORE_PRE:
        tl.store(PRE + o_off, acc.to(dtype), mask=o_mask)
    tl.store(OUT + o_off, _apply_activation(acc, ACTIVATION).to(dtype), mask=o_mask)


@triton.jit
def _activation_bwd_kernel(
    DOUT,  # [numel] gradient of the activation's output, any float dtype
    SAVED,  # [numel] preact (gelus) or out (relu), x's dtype
    DPRE,  # [numel] gradient of the pre-activation, x's dtype
    numel,
    BLOCK: tl.constexpr, ACTIVATION: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(DOUT + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(SAVED + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DPRE + offs, _activation_grad(g, s, ACTIVATION).to(DPRE.dtype.element_ty), mask=ok)


@triton.jit
def _int8_gemm_kernel(
    A,  # [M, K] int8
    B,  # [N, K] int8
    XS,  # [M] fp32 per-row scale of A, read only when SCALED
    WS,  # [N] fp32 per-row scale of B, read only when SCALED
    BIAS,  # [N] any float dtype, read only when HAS_BIAS
    OUT,  # [M, N] int32 (not SCALED) or out_dtype
    M, N, K,
    stride_am, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
):
    offs_m, offs_n, offs_k, a_ptrs, b_ptrs = _tile_operands(A, B, stride_am, stride_bn, M, N, BLOCK_M, BLOCK_N,
                                                            BLOCK_K, GROUP_M)

    # exact: |acc| <= 127 * 127 * K fits int32 for K < 133,000
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc = _k_loop(acc, a_ptrs, b_ptrs, K, offs_k, BLOCK_K, EVEN_K, False, True, None)

    m_ok = offs_m < M
    n_ok = offs_n < N
    o_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if SCALED:
        # the reference's order: (float(acc) * x_scale) * w_scale + bias
        xs = tl.load(XS + offs_m, mask=m_ok, other=0.0)
        ws = tl.load(WS + offs_n, mask=n_ok, other=0.0)
        h = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            h += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + o_off, _apply_activation(h, ACTIVATION).to(OUT.dtype.element_ty), mask=o_mask)
    else:
        tl.store(OUT + o_off, acc, mask=o_mask)


@triton.jit
def _rint(v, USE_LIBDEVICE: tl.constexpr):
    """Round half to even (fp32, |v| < 2**22)."""
    if USE_LIBDEVICE:
        return libdevice.rint(v)
    else:
        # the interpreter has no libdevice; exact in fp32 round-to-nearest arithmetic
        return (v + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def _quantize_rowwise_kernel(
    X,  # [M, K] fp16/bf16/fp32
    Q,  # [M, K] int8
    SCALE,  # [M] fp32
    M, K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    base = rows.to(tl.int64)[:, None] * K
    if SINGLE_PASS:
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
    else:
        amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            mask = row_ok[:, None] & (c < K)[None, :]
            x = tl.load(X + base + c[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        absmax = tl.max(amax, axis=1)
    # exact IEEE quotients: the reference's fp32 absmax / 127 and x / scale
    scale = tl.where(absmax > 0.0, tl.math.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32)), 1.0)
    tl.store(SCALE + rows, scale, mask=row_ok)
    if SINGLE_PASS:
        v = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        q = tl.minimum(tl.maximum(_rint(v, USE_LIBDEVICE), -127.0), 127.0)
        tl.store(Q + base + cols[None, :], q.to(tl.int8), mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            mask = row_ok[:, None] & (c < K)[None, :]
            x = tl.load(X + base + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            v = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(scale[:, None], x.shape))
            q = tl.minimum(tl.maximum(_rint(v, USE_LIBDEVICE), -127.0), 127.0)
            tl.store(Q + base + c[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _wo_int8_kernel(
    X,  # [M, K] fp16/bf16/fp32
    W,  # [N, K] int8
    WS,  # [N] fp32 per-output-column scale
    BIAS,  # [N] any float dtype, read only when HAS_BIAS
    OUT,  # [M, N] x's dtype
    M, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_m, offs_n, offs_k, x_ptrs, w_ptrs = _tile_operands(X, W, stride_xm, stride_wn, M, N, BLOCK_M, BLOCK_N,
                                                            BLOCK_K, GROUP_M)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _k_loop(acc, x_ptrs, w_ptrs, K, offs_k, BLOCK_K, EVEN_K, True, False, DOT_PRECISION)

    n_ok = offs_n < N
    acc = acc * tl.load(WS + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(OUT + o_off, acc.to(OUT.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _wo_int8_splitk_kernel(
    X,  # [M, K] fp16/bf16/fp32, M <= BLOCK_M
    W,  # [N, K] int8
    WS,  # [N] fp32, read only when NUM_SPLITS == 1
    BIAS,  # [N], read only when NUM_SPLITS == 1 and HAS_BIAS
    OUT,  # [M, N] x's dtype, written only when NUM_SPLITS == 1
    PART,  # [NUM_SPLITS, M, N] fp32 partial sums, written only when NUM_SPLITS > 1
    M, N, K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_SPLITS: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid (column tiles, splits): the programs of one wave cover different weight columns
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + k_start + offs_k[None, :]
    w_ptrs = W + cols[:, None] * stride_wn + k_start + offs_k[None, :]
    dtype = X.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        # splits are whole BLOCK_K steps, so only K itself can cut the last step short
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs, eviction_policy="evict_first")  # each weight byte is read once
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[None, :], other=0, eviction_policy="evict_first")
        acc = tl.dot(a, tl.trans(b.to(dtype)), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    if NUM_SPLITS == 1:
        acc = acc * tl.load(WS + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(OUT + o_off, acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        p_off = (split.to(tl.int64) * M + offs_m)[:, None] * N + offs_n[None, :]
        tl.store(PART + p_off, acc, mask=mask)


@triton.jit
def _wo_int8_reduce_kernel(
    PART,  # [NUM_SPLITS, M, N] fp32
    WS,  # [N] fp32
    BIAS,  # [N], read only when HAS_BIAS
    OUT,  # [M, N] x's dtype
    N, stride_om,
    stride_split,  # M * N, from the host (M == 1 would arrive as a constexpr without .to())
    NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # one row of M per program axis 1, BLOCK columns per program axis 0; the splits are added
    # in index order, so the result is the same on every run
    m = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_ok = offs_n < N
    p = PART + m.to(tl.int64) * N + offs_n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        acc += tl.load(p + s * stride_split, mask=n_ok, other=0.0)
    acc = acc * tl.load(WS + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(OUT + m.to(tl.int64) * stride_om + offs_n, acc.to(OUT.dtype.element_ty), mask=n_ok)


# --------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------


def _m_class(M: int) -> str:
    return "small" if M <= SMALL_M else "large"


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def linear_config(M: int, N: int, K: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the linear kernel."""
    bm, bn, bk, group, warps, stages = LINEAR_CONFIGS[(_dtype_class(dtype), _m_class(M))]
    return fit(bm, M), fit(bn, N), fit(bk, K), group, warps, stages


def int8_config(M: int, N: int, K: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the int8 GEMM."""
    bm, bn, bk, group, warps, stages = INT8_CONFIGS[_m_class(M)]
    return fit(bm, M), fit(bn, N), fit(bk, K, _MIN_BLOCK_K_INT8), group, warps, stages


def wo_config(M: int, N: int, K: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the tiled weight-only GEMM."""
    bm, bn, bk, group, warps, stages = WO_CONFIGS[(_dtype_class(dtype), _m_class(M))]
    return fit(bm, M), fit(bn, N), fit(bk, K), group, warps, stages


def wo_decode_splits(N: int, K: int, block_n: int, block_k: int, sm_count: int) -> tuple[int, int]:
    """(splits, k_per_split) of the weight-only decode kernel: enough programs to fill the GPU,
    no split shorter than WO_DECODE_MIN_K_BLOCKS steps, none empty. Depends only on shapes."""
    col_tiles = triton.cdiv(N, block_n)
    k_blocks = max(triton.cdiv(K, block_k), 1)
    want = (WO_DECODE_PROGRAMS_PER_SM * sm_count) // col_tiles  # rounded down: one wave
    most = max(k_blocks // WO_DECODE_MIN_K_BLOCKS, 1)
    splits = int(max(1, min(want, most, WO_DECODE_MAX_SPLITS)))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    # rounding k_per_split up can leave the last splits without work: drop them
    return max(triton.cdiv(K, k_per_split), 1), k_per_split


def linear_fwd(x, weight, bias, activation: str):
    """act(x @ weight.T + bias) with fp32 accumulation; returns (out (M, N) in x's dtype,
    preact (M, N) in x's dtype for "gelu"/"gelu_tanh", else an empty (0,) tensor)."""
    x, weight = x.contiguous(), weight.contiguous()  # the kernel walks rows of unit-stride columns
    M, K = x.shape
    N = weight.shape[0]
    store_pre = activation in ("gelu", "gelu_tanh")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    preact = torch.empty((M, N) if store_pre else (0,), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out, preact
    bm, bn, bk, group, warps, stages = linear_config(M, N, K, x.dtype)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    with device_ctx(x):
        # absent tensors are never dereferenced (their constexpr flag is off); pass out instead
        _linear_kernel[grid](
            x, weight, out if bias is None else bias.contiguous(), out, preact if store_pre else out,
            M, N, K, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, EVEN_K=K % bk == 0,
            HAS_BIAS=bias is not None, ACTIVATION=activation, STORE_PRE=store_pre,
            DOT_PRECISION=dot_precision(x.dtype), num_warps=warps, num_stages=stages)
    return out, preact


def activation_bwd(dout, saved, activation: str):
    """Gradient through the activation: dpre = dout * act'(h), in saved's dtype, fp32 math.
    saved is preact for "gelu"/"gelu_tanh" and out for "relu"; unused for "none"."""
    if activation == "none":
        return dout.clone(memory_format=torch.contiguous_format)
    dout, saved = dout.contiguous(), saved.contiguous()
    dpre = torch.empty_like(saved)
    numel = saved.numel()
    if numel == 0:
        return dpre
    with device_ctx(saved):
        _activation_bwd_kernel[(triton.cdiv(numel, ACT_BWD_BLOCK),)](
            dout, saved, dpre, numel, BLOCK=ACT_BWD_BLOCK, ACTIVATION=activation, num_warps=4)
    return dpre


def linear_bwd(dout, x, weight, saved, activation: str, has_bias: bool):
    """Gradient of linear_fwd: the activation's derivative in one fused elementwise pass
    (``activation_bwd``), then the two GEMMs on cuBLAS (torch.matmul), which these shapes
    (dx = dpre @ W, dW = dpre^T @ x) run at its peak. Returns (dx, dweight, dbias fp32 or empty)."""
    dpre = dout if activation == "none" else activation_bwd(dout, saved, activation)
    db = dpre.float().sum(0) if has_bias else dout.new_empty((0,), dtype=torch.float32)
    return dpre @ weight, dpre.t() @ x, db


def _int8_gemm(a, b, x_scale, w_scale, bias, activation, out):
    M, K = a.shape
    N = b.shape[0]
    bm, bn, bk, group, warps, stages = int8_config(M, N, K)
    scaled = x_scale is not None
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    with device_ctx(a):
        _int8_gemm_kernel[grid](
            a, b, x_scale if scaled else out, w_scale if scaled else out, out if bias is None else bias, out,
            M, N, K, a.stride(0), b.stride(0), out.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, EVEN_K=K % bk == 0,
            SCALED=scaled, HAS_BIAS=bias is not None, ACTIVATION=activation, num_warps=warps, num_stages=stages)
    return out


def int8_mm(a, b):
    """a (M, K) int8 @ b (N, K).T int8 -> (M, N) int32, exact."""
    a, b = a.contiguous(), b.contiguous()
    M, N = a.shape[0], b.shape[0]
    out = torch.empty((M, N), dtype=torch.int32, device=a.device)
    if M == 0 or N == 0:
        return out
    return _int8_gemm(a, b, None, None, None, "none", out)


def int8_linear(x, w_int8, w_scale, bias, activation: str):
    """W8A8: x quantised per row (``quantize_rowwise``), then act(float(x_int8 @ w_int8.T) *
    x_scale[:, None] * w_scale[None, :] + bias) in x's dtype. w_scale (N,) fp32; bias (N,) any
    float dtype or None."""
    x_int8, x_scale = quantize_rowwise(x)
    M, N = x_int8.shape[0], w_int8.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    return _int8_gemm(x_int8, w_int8.contiguous(), x_scale, w_scale.contiguous(),
                      None if bias is None else bias.contiguous(), activation, out)


def quantize_rowwise(x):
    """Symmetric per-row int8: returns (q (M, K) int8, scale (M,) fp32), scale = absmax / 127
    (1 for an all-zero row), q = round-half-to-even(x / scale) clamped to [-127, 127]."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    if K == 0:  # absmax of nothing is 0: the all-zero row's scale
        return q, scale.fill_(1.0)
    block_k = triton.next_power_of_2(K)
    single_pass = block_k <= QUANT_FUSED_MAX_BLOCK_K
    if single_pass:
        block_m = min(max(QUANT_MIN_TILE // block_k, 1), QUANT_MAX_BLOCK_M)
    else:
        block_m, block_k = 1, QUANT_LOOPED_BLOCK_K
    # 16 values per thread: two 16-byte loads of a 16-bit row
    num_warps = min(max(block_m * block_k // (32 * 16), 1), 16)
    with device_ctx(x):
        _quantize_rowwise_kernel[(triton.cdiv(M, block_m),)](
            x, q, scale, M, K, BLOCK_M=block_m, BLOCK_K=block_k, SINGLE_PASS=single_pass,
            USE_LIBDEVICE=not interpreted(_quantize_rowwise_kernel), num_warps=num_warps)
    return q, scale


def weight_only_int8_linear(x, w_int8, w_scale, bias):
    """x (M, K) @ (w_int8 (N, K) * w_scale[:, None]).T + bias -> (M, N) in x's dtype; the weight
    is converted in registers. M <= WO_DECODE_MAX_M takes the split-K decode kernel."""
    x, w_int8 = x.contiguous(), w_int8.contiguous()
    w_scale = w_scale.to(torch.float32).contiguous()
    bias = None if bias is None else bias.contiguous()
    M, K = x.shape
    N = w_int8.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    bias_arg = w_scale if bias is None else bias  # never dereferenced without HAS_BIAS
    precision = dot_precision(x.dtype)
    if M > WO_DECODE_MAX_M:
        bm, bn, bk, group, warps, stages = wo_config(M, N, K, x.dtype)
        with device_ctx(x):
            _wo_int8_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
                x, w_int8, w_scale, bias_arg, out, M, N, K, x.stride(0), w_int8.stride(0), out.stride(0),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, EVEN_K=K % bk == 0,
                HAS_BIAS=bias is not None, DOT_PRECISION=precision, num_warps=warps, num_stages=stages)
        return out

    bn, bk, warps, stages = WO_DECODE_CONFIGS[_dtype_class(x.dtype)]
    bn, bk = fit(bn, N), fit(bk, K)
    splits, k_per_split = wo_decode_splits(N, K, bn, bk, sm_count(x.device))
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    with device_ctx(x):
        _wo_int8_splitk_kernel[(triton.cdiv(N, bn), splits)](
            x, w_int8, w_scale, bias_arg, out, part, M, N, K, k_per_split,
            x.stride(0), w_int8.stride(0), out.stride(0),
            BLOCK_M=WO_DECODE_MAX_M, BLOCK_N=bn, BLOCK_K=bk, NUM_SPLITS=splits, EVEN_K=K % bk == 0,
            HAS_BIAS=bias is not None, DOT_PRECISION=precision, num_warps=warps, num_stages=stages)
        if splits > 1:
            block = min(1024, triton.next_power_of_2(N))
            _wo_int8_reduce_kernel[(triton.cdiv(N, block), M)](
                part, w_scale, bias_arg, out, N, out.stride(0), M * N,
                NUM_SPLITS=splits, BLOCK=block, HAS_BIAS=bias is not None, num_warps=4)
    return out
