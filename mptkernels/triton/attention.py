"""Triton flash attention (forward and backward) with causal masking, ALiBi and GQA.

Same semantics as the ``mptkernels::attention_fwd`` / ``attention_bwd`` schemas in
csrc/registration.cpp and the math of ``mptkernels.reference.attention``:

* q (B, Sq, Hq, D), k and v (B, Sk, Hk, D), contiguous, one dtype (fp16, bf16 or fp32);
  Hq % Hk == 0 and q head h reads kv head h // (Hq // Hk) (GQA / MQA);
  D a multiple of 8 in [8, 256], padded in-kernel to BLOCK_D = next_power_of_2(max(D, 16)).
* score(i, j) = softmax_scale * q_i . k_j + slope[b?, h] * (j - i - (Sk - Sq)) (MPT's ALiBi;
  slopes (Hq,) or (B, Hq) float32, or none). The bias is formed in-kernel from the slope.
* causal: key j is visible to query i iff j <= i + Sk - Sq (bottom-right aligned, so a
  decode step with a KV cache, Sq < Sk, sees the whole cache; with Sq > Sk the first
  Sq - Sk rows see no key).
* Returns out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) float32, the natural-log
  log-sum-exp of the row's visible scores. A row that sees no key gets out = 0 and
  lse = -inf (never NaN). The backward returns dq, dk, dv in the inputs' dtype; dk and dv
  sum over the Hq // Hk query heads that share a kv head.

Algorithm (FlashAttention-2):

* Forward, grid (ceil(Sq / BLOCK_M), Hq, B): a program owns BLOCK_M query rows of one
  head and streams the key/value blocks through an online softmax held in registers
  (running max m, running sum l, fp32 accumulator). Scores are kept in the log2 domain
  (scale pre-multiplied by log2(e), exp2 instead of exp). The key loop has two phases:
  blocks that every row of the tile sees in full run without any mask, then the blocks on
  the causal diagonal (and the ragged last block at Sk) run with the mask; key blocks
  entirely above the diagonal are never visited. For causal attention the query tiles are
  launched last-first, so the longest programs start first (less tail on the last wave).
* Backward: (1) delta = rowsum(dout * out) (fp32, (B, Hq, Sq)); (2) grid
  (ceil(Sk / BLOCK_N), Hk, B): a program owns one key block of one kv head, loops over
  the query heads of its group and over the query blocks that see the key block
  (diagonal blocks masked, the rest not; the ragged last key block masks every query
  block), recomputing P from lse, and accumulates dk, dv in registers; GQA therefore
  needs no atomics; (3) grid (ceil(Sq / BLOCK_M), Hq, B): a program owns a query block
  and walks the same key blocks as the forward to accumulate dq. Recomputing QK^T and
  dO V^T in (3) costs about 40% more matmul work than the atomic-add dq of
  FlashAttention-2, but every output is written by exactly one program with a fixed
  summation order, so the backward is bitwise deterministic.
* Heads and batch are separate grid axes (not one B * Hq axis): CUDA limits grid axes 1
  and 2 to 65535 each, which B * Hq alone could exceed; the tile index stays on axis 0 so
  that programs launched together share one head's k/v (or q/dout) in L2.

Numerics: the matmuls take the input dtype (fp16/bf16 tensor cores; fp32 inputs use
``FP32_DOT_PRECISION``) and accumulate in fp32; softmax, lse, delta and the gradient
accumulators are fp32. An lse of -inf (a row that sees no key) is replaced by +inf in the
backward, so exp2(s - lse) is exactly 0 there instead of NaN.

Block sizes, warps and pipeline stages come from the ``*_CONFIGS`` tables below (keyed by
BLOCK_D), read through ``fwd_config`` / ``bwd_configs`` so they can be tuned in one place.

Testing note: under TRITON_INTERPRET=1, Triton 3.6's interpreter calls int() on a
shape-(1,) NumPy array for every loop with a runtime bound, which NumPy >= 2.3 rejects; a
test harness has to patch ``triton.runtime.interpreter._patch_lang_tensor`` so that
``__index__`` reads the single element (tests/conftest.py does). The interpreter's tl.dot
is not usable for bf16, so interpreted tests cover fp32 and fp16.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import MIN_DOT_BLOCK, device_ctx, dot_precision, fit, sm_count

# --------------------------------------------------------------------------------------
# Tuning tables: BLOCK_D -> (BLOCK_M, BLOCK_N, num_warps, num_stages)
# --------------------------------------------------------------------------------------
# First chosen by compiling every kernel for sm_90a offline (triton.compile + ptxas -v) and
# keeping, per head dim, the largest tiles that use wgmma, fit in shared memory and do not
# spill; then the d64 and d128 tiles were timed on the H100 (benchmarks/tune_attention.py) and
# replaced where another tile measured faster (noted per table). scripts/triton_sm90_check.py
# compiles them all for sm_90a in CI and fails on a spill the comments do not accept.
#
# Forward, 16-bit inputs: q, the fp32 accumulator (BLOCK_M x BLOCK_D) and the score tile
# (BLOCK_M x BLOCK_N) live in registers, k/v tiles are pipelined through shared memory.
# Two warpgroups of 64 rows each (8 warps) halve the registers per thread compared with 4
# warps (D=64: 118 instead of 255), so two CTAs fit on an SM.
# Timed on the H100 (benchmarks/tune_attention.py, causal + ALiBi bf16, 2026-11-24): at d128
# (B4 S4096 H32) (128, 64, 8, 3) and (64, 64, 4, 3) tie at 419 TFLOP/s, every other tile of
# the sweep is slower; at d64 (B8 S2048 H32) (64, 64, 4, 3) gives 330 against 315 for the
# 8-warp tile.
FWD_CONFIGS = {
    16: (64, 64, 4, 3),
    32: (64, 64, 4, 3),
    64: (64, 64, 4, 3),
    128: (128, 64, 8, 3),  # 215 regs, 128 KB
    256: (64, 64, 8, 2),  # 255 regs, 160 KB
}
# Backward dk/dv kernel, 16-bit inputs: BLOCK_N keys stay resident (k and v as register
# operands, the dk and dv accumulators) while BLOCK_M-row query tiles stream past, so
# registers, not shared memory, limit the tile: 2 * BLOCK_N * BLOCK_D fp32 accumulator
# values plus 2 * BLOCK_N * BLOCK_D 16-bit k/v values over num_warps * 32 threads.
# H100, d64 (B8 S2048 H32, causal + ALiBi): (64, 128, 4, 2) makes the whole backward 1.32x
# faster than (32, 128, 8, 3), the best of 24 tiles.
# Spills accepted here, because the timed tiles win despite them (ptxas on sm_90a, Triton 3.6,
# scripts/triton_sm90_check.py, which caps them): d64 (64, 128, 4, 2) spills up to ~424 B
# (varlen, causal + ALiBi); d128 (64, 128, 8, 2) 0-632 B (GQA causal + ALiBi the most);
# d256 (16, 64, 8, 2) ~40 B.
BWD_DKDV_CONFIGS = {
    16: (64, 128, 4, 2),
    32: (64, 128, 4, 2),
    64: (64, 128, 4, 2),
    128: (64, 128, 8, 2),  # H100 d128 (B4 S4096 H32): backward 4.86 ms, 2.0x faster than (32, 64, 8, 2)
    256: (16, 64, 8, 2),  # spills ~40 B; (16, 32, 8, 2) does not but falls back to mma.sync
}
# Backward dq kernel, 16-bit inputs: BLOCK_M query rows (q, dout, the dq accumulator)
# resident, BLOCK_N-key k/v tiles streamed.
BWD_DQ_CONFIGS = {
    16: (128, 64, 8, 3),
    32: (128, 64, 8, 3),
    64: (128, 64, 8, 3),  # 144 regs, 80 KB
    128: (128, 64, 8, 3),  # H100 d128: 3% faster than (128, 32, 8, 3)
    256: (64, 32, 8, 2),  # 243 regs, 128 KB
}
# fp32 inputs take twice the shared memory and registers per tile and, with exact fp32
# dots, run on the FMA units (no tensor cores); they exist for accuracy, not speed. Same
# selection rule (no spills), which for these kernels is erratic in the tile size.
FWD_CONFIGS_FP32 = {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (32, 16, 8, 2),
                    256: (16, 16, 4, 2)}
BWD_DKDV_CONFIGS_FP32 = {16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (32, 32, 8, 2),
                         256: (16, 16, 8, 2)}
BWD_DQ_CONFIGS_FP32 = {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 4, 2),
                       256: (16, 16, 4, 1)}
# Rows per program of the delta = rowsum(dout * out) preprocess: about this many elements.
DELTA_TILE = 4096

_LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------

# (globals a kernel reads must be constexpr instances; an annotation is not enough)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    # A [rows, BLOCK_D] tile; masks only what may be out of bounds, so that the common
    # case (interior rows, D == BLOCK_D) compiles to unpredicated vector loads.
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, row_ok, d_ok, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _score_tile(
    q,  # [BLOCK_M, BLOCK_D] query tile
    k,  # [BLOCK_N, BLOCK_D] key tile
    kn,  # [BLOCK_N] key indices j
    q_pos,  # [BLOCK_M] i + Sk - Sq: the last key each row sees (causal), ALiBi's origin
    slope2, qk_scale, Sk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Scores in log2 units: q k^T * scale (+ ALiBi), masked to -inf where a key is not
    visible. Keys past Sk are masked too: with ALiBi their bias would be positive."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_ALIBI:
        # exact integer distance, then one rounding (slope2 already carries log2(e))
        s += slope2 * (kn[None, :] - q_pos[:, None]).to(tl.float32)
    if MASKED:
        visible = (kn < Sk)[None, :]
        if CAUSAL:
            visible = visible & (kn[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(
    acc, l_i, m_i,  # running state of the BLOCK_M rows
    q,  # [BLOCK_M, BLOCK_D] q tile
    k_base, v_base,  # K, V at (b, key 0, h_kv, 0)
    stride_ks,  # int64 key stride of K and V
    q_pos,  # [BLOCK_M] i + Sk - Sq: the last key each row sees (causal), ALiBi's origin
    offs_n, offs_d, d_ok,
    slope2, qk_scale, lo, hi, Sk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        kv_off = kn.to(tl.int64)[:, None] * stride_ks + offs_d[None, :]
        # unmasked blocks lie entirely below Sk, so only the masked phase checks rows
        k = _load_tile(k_base + kv_off, kn < Sk, d_ok, MASKED, EVEN_D)
        v = _load_tile(v_base + kv_off, kn < Sk, d_ok, MASKED, EVEN_D)
        s = _score_tile(q, k, kn, q_pos, slope2, qk_scale, Sk, MASKED, CAUSAL, HAS_ALIBI, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out of alpha and p (both become exactly 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _slope2(SLOPES, b, stride_slope_b, h, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of (batch b, head h) in log2 units (scores are kept in log2), or 0."""
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + b * stride_slope_b + h) * LOG2E
    else:
        slope2 = 0.0
    return slope2


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """(out, lse) of rows from the online softmax's state (acc, l, m in log2 units). l = 0
    exactly for a row that saw no key (any visible key contributes exp2(0) = 1 at the row
    max): out = 0 and lse = -inf there, not 0/0."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)


@triton.jit
def _key_range(start_m, diag, Sk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, hi) for the query tile at start_m: keys [0, full_end) are seen in full by
    every row of the tile (no mask at all); [full_end, hi) holds the diagonal blocks and the
    ragged block at Sk (masked). diag = Sk - Sq."""
    if CAUSAL:
        # the tile's last row sees keys < start_m + BLOCK_M + diag; its first row sees all
        # keys <= start_m + diag (none when that is negative: rows with Sq > Sk)
        hi = tl.minimum(start_m + BLOCK_M + diag, Sk)
        full_end = tl.maximum(start_m + diag + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = Sk
        full_end = Sk // BLOCK_N * BLOCK_N
    return full_end, hi


@triton.jit
def _sequence(CU_Q, CU_K, SEQLENS_K, b, Sq, Sk, VARLEN: tl.constexpr, HAS_SEQLENS_K: tl.constexpr):
    """(first q row, first k row, Sq, Sk) of sequence b: from cu_seqlens for packed
    sequences, from seqlens_k for a KV cache, else the batch-wide sizes at row 0."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        Sq = tl.load(CU_Q + b + 1) - q_start
        Sk = tl.load(CU_K + b + 1) - k_start
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    else:
        q_start = 0
        k_start = 0
    if HAS_SEQLENS_K:
        Sk = tl.load(SEQLENS_K + b)
    return q_start, k_start, Sq, Sk


@triton.jit
def _attn_fwd_kernel(
    Q,  # [B, Sq, Hq, D]
    K,  # [B, Sk, Hk, D]
    V,  # [B, Sk, Hk, D]
    SLOPES,  # [Hq] or [B, Hq] fp32, read only when HAS_ALIBI
    O,  # [B, Sq, Hq, D] q's dtype, same strides as Q
    LSE,  # [B, Hq, Sq] fp32 (varlen: [Hq, total_q])
    CU_Q, CU_K,  # VARLEN: int32 [B + 1] first row of each sequence in q and in k/v
    SEQLENS_K,  # HAS_SEQLENS_K: int32 [B] keys of each sequence (a KV cache's filled rows)
    Sq, Sk, Hq,  # VARLEN / HAS_SEQLENS_K: replaced per sequence
    GROUP,  # Hq // Hk
    stride_qb, stride_qs,  # of Q and O (head stride D, feature stride 1)
    stride_kb, stride_ks,  # of K and V
    stride_lse_b, stride_lse_h,  # of LSE
    stride_slope_b,  # 0 for (Hq,) slopes
    qk_scale,  # softmax_scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SEQLENS_K: tl.constexpr,
):
    if CAUSAL:
        # later query tiles see more keys: launch them first
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h_kv = h // GROUP
    start_m = pid_m * BLOCK_M
    q_start, k_start, Sq, Sk = _sequence(CU_Q, CU_K, SEQLENS_K, b, Sq, Sk, VARLEN, HAS_SEQLENS_K)
    if start_m >= Sq:  # a shorter sequence than the grid's longest
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM
    # 64-bit offsets: one batch element of q or k can exceed 2**31 elements
    stride_qs = stride_qs.to(tl.int64)
    stride_ks = stride_ks.to(tl.int64)

    q_off = offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    q_head = b * stride_qb + q_start * stride_qs + h * HEAD_DIM  # Q and O at (b, row 0, h, 0)
    q = _load_tile(Q + q_head + q_off, row_ok, d_ok, True, EVEN_D)
    k_base = K + b * stride_kb + k_start * stride_ks + h_kv * HEAD_DIM
    v_base = V + b * stride_kb + k_start * stride_ks + h_kv * HEAD_DIM

    diag = Sk - Sq
    q_pos = offs_m + diag
    slope2 = _slope2(SLOPES, b, stride_slope_b, h, HAS_ALIBI)

    full_end, hi = _key_range(start_m, diag, Sk, CAUSAL, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
        slope2, qk_scale, 0, full_end, Sk,
        False, CAUSAL, HAS_ALIBI, EVEN_D, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
        slope2, qk_scale, full_end, hi, Sk,
        True, CAUSAL, HAS_ALIBI, EVEN_D, BLOCK_N, DOT_PRECISION)

    out, lse = _finish_rows(acc, l_i, m_i)
    _store_tile(O + q_head + q_off, out.to(O.dtype.element_ty), row_ok, d_ok, EVEN_D)
    tl.store(LSE + b * stride_lse_b + h * stride_lse_h + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O,  # [B * Sq * Hq, D] forward output (rows in (b, i, h) order)
    DO,  # [B * Sq * Hq, D] gradient of O, same strides
    DELTA,  # [B, Hq, Sq] fp32: rowsum(dO * O)
    R,  # B * Sq * Hq
    Sq, Hq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_D: tl.constexpr,
):
    # Flat rows so that the loads are one contiguous stream whatever Sq and Hq are.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    d_ok = offs_d < HEAD_DIM
    off = rows[:, None] * HEAD_DIM + offs_d[None, :]
    o = _load_tile(O + off, row_ok, d_ok, True, EVEN_D).to(tl.float32)
    do = _load_tile(DO + off, row_ok, d_ok, True, EVEN_D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    h = rows % Hq
    bi = rows // Hq  # b * Sq + i
    i = bi % Sq
    b = bi // Sq
    tl.store(DELTA + (b * Hq + h) * Sq + i, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv,  # [BLOCK_N, BLOCK_D] fp32 accumulators
    k, v,  # [BLOCK_N, BLOCK_D] this program's key block
    q_base, do_base,  # Q, DO at (b, query 0, h, 0)
    lse_base, delta_base,  # LSE, DELTA at (b, h, query 0)
    stride_qs,  # int64 query stride of Q and DO
    k_pos,  # [BLOCK_N] key index j - (Sk - Sq): query i sees key j iff i >= k_pos (causal)
    col_ok,  # [BLOCK_N] key index j < Sk
    offs_m, offs_d, d_ok,
    slope2, qk_scale, lo, hi, Sq,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so that P^T and dS^T feed the dv and dk
    # matmuls directly, without a transpose of a register tile.
    for start_m in range(lo, hi, BLOCK_M):
        qm = start_m + offs_m
        row_ok = qm < Sq
        q_off = qm.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
        q = _load_tile(q_base + q_off, row_ok, d_ok, True, EVEN_D)
        do = _load_tile(do_base + q_off, row_ok, d_ok, True, EVEN_D)
        # rows past Sq and rows that saw no key (lse = -inf) get lse = +inf: their P is
        # exactly 0, so they contribute nothing (and no NaN) to dk and dv
        lse = tl.load(lse_base + qm, mask=row_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        delta = tl.load(delta_base + qm, mask=row_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        if HAS_ALIBI:
            # slope * (j - i - (Sk - Sq)) = slope * (k_pos - i)
            sT += slope2 * (k_pos[:, None] - qm[None, :]).to(tl.float32)
        if MASKED:
            visible = col_ok[:, None]
            if CAUSAL:
                visible = visible & (qm[None, :] >= k_pos[:, None])
            sT = tl.where(visible, sT, float("-inf"))
        pT = tl.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # [B, Sq, Hq, D]
    K,  # [B, Sk, Hk, D]
    V,  # [B, Sk, Hk, D]
    SLOPES,  # [Hq] or [B, Hq] fp32, read only when HAS_ALIBI
    DO,  # [B, Sq, Hq, D] same strides as Q
    LSE,  # [B, Hq, Sq] fp32 from the forward
    DELTA,  # [B, Hq, Sq] fp32 rowsum(dO * O)
    DK,  # [B, Sk, Hk, D] same strides as K
    DV,  # [B, Sk, Hk, D] same strides as K
    CU_Q, CU_K,  # VARLEN: int32 [B + 1] first row of each sequence in q and in k/v
    Sq, Sk, Hq,
    GROUP,  # Hq // Hk
    stride_qb, stride_qs,  # of Q and DO
    stride_kb, stride_ks,  # of K, V, DK and DV
    stride_lse_b, stride_lse_h,  # of LSE and DELTA
    stride_slope_b,  # 0 for (Hq,) slopes
    qk_scale,  # softmax_scale * log2(e)
    softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h_kv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    q_start, k_start, Sq, Sk = _sequence(CU_Q, CU_K, CU_K, b, Sq, Sk, VARLEN, False)
    if start_n >= Sk:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Sk
    d_ok = offs_d < HEAD_DIM
    stride_qs = stride_qs.to(tl.int64)
    stride_ks = stride_ks.to(tl.int64)

    kv_off = (b * stride_kb + k_start * stride_ks + h_kv * HEAD_DIM + offs_n.to(tl.int64)[:, None] * stride_ks
              + offs_d[None, :])
    k = _load_tile(K + kv_off, col_ok, d_ok, True, EVEN_D)
    v = _load_tile(V + kv_off, col_ok, d_ok, True, EVEN_D)
    diag = Sk - Sq
    k_pos = offs_n - diag

    # Query range: [lo, mid) holds the query blocks on the diagonal (masked); [mid, Sq)
    # the blocks whose rows all see every key of this block. Queries before lo see none.
    # The ragged last key block (one program per head) runs every query block masked: a
    # padded key row of dk/dv is never stored, but unmasked its P could overflow (ALiBi
    # gives it a positive bias) and fill the discarded rows with inf/NaN.
    ragged = start_n + BLOCK_N > Sk
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - diag, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(mid, (Sq + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    else:
        lo = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # the query heads sharing this kv head, in a fixed order (deterministic sum)
    for g in range(GROUP):
        h = h_kv * GROUP + g
        q_base = Q + b * stride_qb + q_start * stride_qs + h * HEAD_DIM
        do_base = DO + b * stride_qb + q_start * stride_qs + h * HEAD_DIM
        lse_base = LSE + b * stride_lse_b + h * stride_lse_h + q_start
        delta_base = DELTA + b * stride_lse_b + h * stride_lse_h + q_start
        slope2 = _slope2(SLOPES, b, stride_slope_b, h, HAS_ALIBI)
        if ragged:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                offs_m, offs_d, d_ok, slope2, qk_scale, lo, Sq, Sq,
                True, CAUSAL, HAS_ALIBI, EVEN_D, BLOCK_M, DOT_PRECISION)
        else:
            if CAUSAL:
                dk, dv = _bwd_dkdv_inner(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                    offs_m, offs_d, d_ok, slope2, qk_scale, lo, mid, Sq,
                    True, CAUSAL, HAS_ALIBI, EVEN_D, BLOCK_M, DOT_PRECISION)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                offs_m, offs_d, d_ok, slope2, qk_scale, mid, Sq, Sq,
                False, CAUSAL, HAS_ALIBI, EVEN_D, BLOCK_M, DOT_PRECISION)

    # dS is d(loss)/d(score) and score = softmax_scale * q.k + bias
    dk = dk * softmax_scale
    _store_tile(DK + kv_off, dk.to(DK.dtype.element_ty), col_ok, d_ok, EVEN_D)
    _store_tile(DV + kv_off, dv.to(DV.dtype.element_ty), col_ok, d_ok, EVEN_D)


@triton.jit
def _bwd_dq_inner(
    dq,  # [BLOCK_M, BLOCK_D] fp32 accumulator
    q, do,  # [BLOCK_M, BLOCK_D] this program's query rows and their output gradient
    lse2, delta,  # [BLOCK_M] lse * log2(e) (+inf for rows that see nothing), rowsum(dO * O)
    k_base, v_base,  # K, V at (b, key 0, h_kv, 0)
    stride_ks,  # int64 key stride of K and V
    q_pos,  # [BLOCK_M] i + Sk - Sq
    offs_n, offs_d, d_ok,
    slope2, qk_scale, lo, hi, Sk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        kv_off = kn.to(tl.int64)[:, None] * stride_ks + offs_d[None, :]
        k = _load_tile(k_base + kv_off, kn < Sk, d_ok, MASKED, EVEN_D)
        v = _load_tile(v_base + kv_off, kn < Sk, d_ok, MASKED, EVEN_D)
        # keys past Sk are masked here (unlike in dk/dv): with ALiBi their bias is
        # positive and an overflowing P times the zero k row would be NaN
        s = _score_tile(q, k, kn, q_pos, slope2, qk_scale, Sk, MASKED, CAUSAL, HAS_ALIBI, DOT_PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # [B, Sq, Hq, D]
    K,  # [B, Sk, Hk, D]
    V,  # [B, Sk, Hk, D]
    SLOPES,  # [Hq] or [B, Hq] fp32, read only when HAS_ALIBI
    DO,  # [B, Sq, Hq, D] same strides as Q
    LSE,  # [B, Hq, Sq] fp32 from the forward
    DELTA,  # [B, Hq, Sq] fp32 rowsum(dO * O)
    DQ,  # [B, Sq, Hq, D] same strides as Q
    CU_Q, CU_K,  # VARLEN: int32 [B + 1] first row of each sequence in q and in k/v
    Sq, Sk, Hq,
    GROUP,  # Hq // Hk
    stride_qb, stride_qs,  # of Q, DO and DQ
    stride_kb, stride_ks,  # of K and V
    stride_lse_b, stride_lse_h,  # of LSE and DELTA
    stride_slope_b,  # 0 for (Hq,) slopes
    qk_scale,  # softmax_scale * log2(e)
    softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h_kv = h // GROUP
    start_m = pid_m * BLOCK_M
    q_start, k_start, Sq, Sk = _sequence(CU_Q, CU_K, CU_K, b, Sq, Sk, VARLEN, False)
    if start_m >= Sq:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM
    stride_qs = stride_qs.to(tl.int64)
    stride_ks = stride_ks.to(tl.int64)

    q_off = (b * stride_qb + q_start * stride_qs + h * HEAD_DIM + offs_m.to(tl.int64)[:, None] * stride_qs
             + offs_d[None, :])
    q = _load_tile(Q + q_off, row_ok, d_ok, True, EVEN_D)
    do = _load_tile(DO + q_off, row_ok, d_ok, True, EVEN_D)
    lse_off = b * stride_lse_b + h * stride_lse_h + q_start + offs_m
    lse = tl.load(LSE + lse_off, mask=row_ok, other=float("inf"))
    # a row that sees no key has lse = -inf: +inf makes its P exactly 0 (dq = 0, no NaN)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + k_start * stride_ks + h_kv * HEAD_DIM
    v_base = V + b * stride_kb + k_start * stride_ks + h_kv * HEAD_DIM

    diag = Sk - Sq
    q_pos = offs_m + diag
    slope2 = _slope2(SLOPES, b, stride_slope_b, h, HAS_ALIBI)
    full_end, hi = _key_range(start_m, diag, Sk, CAUSAL, BLOCK_M, BLOCK_N)  # as the forward

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
        slope2, qk_scale, 0, full_end, Sk,
        False, CAUSAL, HAS_ALIBI, EVEN_D, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
        slope2, qk_scale, full_end, hi, Sk,
        True, CAUSAL, HAS_ALIBI, EVEN_D, BLOCK_N, DOT_PRECISION)
    dq = dq * softmax_scale
    _store_tile(DQ + q_off, dq.to(DQ.dtype.element_ty), row_ok, d_ok, EVEN_D)


@triton.jit
def _kv_append_kernel(
    K_NEW, V_NEW,  # [B, Sn, Hk, D]
    K_CACHE, V_CACHE,  # [B, Smax, Hk, D]
    SEQLENS,  # int32 [B]: rows of each cache already filled
    Sn, Smax, Hk,
    stride_nb, stride_ns, stride_cb, stride_cs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one (batch, new token, kv head) row per program; a position past the cache is not
    # written (the host checks it outside CUDA-graph capture and raises)
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pos = tl.load(SEQLENS + b) + t
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_d < HEAD_DIM) & (pos < Smax) & (pos >= 0)
    src = b * stride_nb + t * stride_ns + h * HEAD_DIM + offs_d
    dst = b * stride_cb + pos.to(tl.int64) * stride_cs + h * HEAD_DIM + offs_d
    tl.store(K_CACHE + dst, tl.load(K_NEW + src, mask=ok), mask=ok)
    tl.store(V_CACHE + dst, tl.load(V_NEW + src, mask=ok), mask=ok)


@triton.jit
def _attn_decode_kernel(
    Q,  # [B, Sq, Hq, D] a few new tokens per sequence
    K, V,  # [B, Smax, Hk, D] caches
    SLOPES,  # [Hq] or [B, Hq] fp32, read only when HAS_ALIBI
    SEQLENS_K,  # int32 [B]: keys of each sequence (filled cache rows, new ones included)
    O,  # [B, Sq, Hq, D], written when NUM_SPLITS == 1
    O_PART,  # [B, Sq, Hq, NUM_SPLITS, D] fp32 partial outputs, when NUM_SPLITS > 1
    LSE_PART,  # [B, Sq, Hq, NUM_SPLITS] fp32 their log-sum-exp (natural log)
    Sq, Hq,
    GROUP,  # Hq // Hk
    stride_qb, stride_qs, stride_kb, stride_ks, stride_slope_b,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Flash-decoding: program (split, kv head, batch) attends the GROUP q heads x Sq tokens
    that read this kv head (rows r = token * GROUP + head-in-group, so the cache is read once
    per kv head, not once per q head) over its 1/NUM_SPLITS share of the keys."""
    split = tl.program_id(0)
    h_kv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Sk = tl.load(SEQLENS_K + b)
    rows = tl.arange(0, BLOCK_M)
    t = rows // GROUP
    h = h_kv * GROUP + rows % GROUP
    row_ok = t < Sq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    stride_ks = stride_ks.to(tl.int64)

    q_rows = b * stride_qb + t.to(tl.int64) * stride_qs + h * HEAD_DIM
    q = _load_tile(Q + q_rows[:, None] + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    q_pos = t + Sk - Sq
    if HAS_ALIBI:
        slope2 = (tl.load(SLOPES + b * stride_slope_b + h, mask=row_ok, other=0.0) * LOG2E)[:, None]
    else:
        slope2 = 0.0
    # this split's keys: an equal share of Sk in whole blocks
    per_split = tl.cdiv(tl.cdiv(Sk, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, Sk)
    k_base = K + b * stride_kb + h_kv * HEAD_DIM
    v_base = V + b * stride_kb + h_kv * HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # every block masked (at hi; causal only bites on the last block): the masked loop of
    # the forward, with hi in place of Sk
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
        slope2, qk_scale, lo, hi, hi,
        True, CAUSAL, HAS_ALIBI, EVEN_D, BLOCK_N, None)

    out, lse = _finish_rows(acc, l_i, m_i)
    o_rows = (b * Sq + t) * Hq + h  # (b, t, h) row of O and of the partials
    if NUM_SPLITS == 1:
        _store_tile(O + o_rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
                    row_ok, d_ok, EVEN_D)
    else:
        part = o_rows.to(tl.int64) * NUM_SPLITS + split
        _store_tile(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, row_ok, d_ok, EVEN_D)
        tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _attn_decode_combine_kernel(
    O_PART, LSE_PART, O,  # see _attn_decode_kernel; O [B * Sq * Hq, D]
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s(lse_s); a row whose
    # splits all saw nothing (lse_s = -inf) gets zeros
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(LSE_PART + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, 0)
    w = w / tl.where(total == 0.0, 1.0, total)
    parts = tl.load(O_PART + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0)
    tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


# --------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return triton.next_power_of_2(max(head_dim, MIN_DOT_BLOCK))


def fwd_config(head_dim: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel."""
    table = FWD_CONFIGS_FP32 if dtype == torch.float32 else FWD_CONFIGS
    block_m, block_n, num_warps, num_stages = table[_block_d(head_dim)]
    return fit(block_m, seqlen_q), fit(block_n, seqlen_k), num_warps, num_stages


def bwd_configs(head_dim: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) of the dk/dv kernel, the same of the dq kernel)."""
    fp32 = dtype == torch.float32
    out = []
    for table in ((BWD_DKDV_CONFIGS_FP32, BWD_DQ_CONFIGS_FP32) if fp32 else (BWD_DKDV_CONFIGS, BWD_DQ_CONFIGS)):
        block_m, block_n, num_warps, num_stages = table[_block_d(head_dim)]
        out.append((fit(block_m, seqlen_q), fit(block_n, seqlen_k), num_warps, num_stages))
    return tuple(out)


def _slopes_args(alibi_slopes, q):
    """(slopes tensor or a dummy, batch stride, HAS_ALIBI)."""
    if alibi_slopes is None:
        return q, 0, False  # never dereferenced
    slopes = alibi_slopes.to(torch.float32).contiguous()
    return slopes, (slopes.stride(0) if slopes.dim() == 2 else 0), True


def _fwd(q, k, v, alibi_slopes, softmax_scale, causal, out, lse, *, batch, max_sq, max_sk, lse_strides,
         cu_seqlens=None, seqlens_k=None):
    """Launch the forward over (batch, S, H, D) views: one tensor per batch element
    (stride_qb) or one packed sequence dimension (stride 0, rows found by cu_seqlens)."""
    D, Hq, Hk = q.shape[3], q.shape[2], k.shape[2]
    slopes, stride_slope_b, has_alibi = _slopes_args(alibi_slopes, q)
    block_d = _block_d(D)
    block_m, block_n, num_warps, num_stages = fwd_config(D, q.dtype, max_sq, max_sk)
    varlen = cu_seqlens is not None
    cu_q, cu_k = cu_seqlens if varlen else (q, q)  # dummies are never dereferenced
    grid = (triton.cdiv(max_sq, block_m), Hq, batch)
    with device_ctx(q):
        _attn_fwd_kernel[grid](
            q, k, v, slopes, out, lse, cu_q, cu_k, q if seqlens_k is None else seqlens_k,
            max_sq, max_sk, Hq, Hq // Hk,
            0 if varlen else q.stride(0), q.stride(1), 0 if varlen else k.stride(0), k.stride(1),
            lse_strides[0], lse_strides[1], stride_slope_b,
            float(softmax_scale) * _LOG2E,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            CAUSAL=bool(causal), HAS_ALIBI=has_alibi, EVEN_D=D == block_d,
            DOT_PRECISION=dot_precision(q.dtype), VARLEN=varlen, HAS_SEQLENS_K=seqlens_k is not None,
            num_warps=num_warps, num_stages=num_stages)


def attention_fwd(q, k, v, alibi_slopes, softmax_scale: float, causal: bool):
    """Attention forward; returns (out (B, Sq, Hq, D) in q's dtype, lse (B, Hq, Sq) float32)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Sk == 0:  # nothing to attend to: every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    _fwd(q, k, v, alibi_slopes, softmax_scale, causal, out, lse, batch=B, max_sq=Sq, max_sk=Sk,
         lse_strides=(Hq * Sq, Sq))
    return out, lse


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, alibi_slopes,
                         softmax_scale: float, causal: bool):
    """Forward over packed sequences: q (total_q, Hq, D), k, v (total_k, Hk, D); returns
    (out (total_q, Hq, D), lse (Hq, total_q)). Rows after cu_seqlens_q[-1] get 0 and -inf."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    total_q, Hq, _ = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = torch.zeros_like(q)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or k.shape[0] == 0:
        return out, lse
    _fwd(q[None], k[None], v[None], alibi_slopes, softmax_scale, causal, out[None], lse, batch=batch,
         max_sq=max_seqlen_q, max_sk=max_seqlen_k, lse_strides=(0, total_q),
         cu_seqlens=(cu_seqlens_q.to(torch.int32).contiguous(), cu_seqlens_k.to(torch.int32).contiguous()))
    return out, lse


def _bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, causal, dq, dk, dv, *, batch, max_sq, max_sk,
         lse_strides, cu_seqlens=None):
    D, Hq, Hk = q.shape[3], q.shape[2], k.shape[2]
    slopes, stride_slope_b, has_alibi = _slopes_args(alibi_slopes, q)
    block_d = _block_d(D)
    even_d = D == block_d
    precision = dot_precision(q.dtype)
    qk_scale = float(softmax_scale) * _LOG2E
    (kv_m, kv_n, kv_warps, kv_stages), (q_m, q_n, q_warps, q_stages) = bwd_configs(D, q.dtype, max_sq, max_sk)
    varlen = cu_seqlens is not None
    cu_q, cu_k = cu_seqlens if varlen else (q, q)

    # delta has lse's layout: rows of the (B or 1, S, Hq) token grid in order
    delta = torch.empty_like(lse)
    nb, S = q.shape[0], q.shape[1]
    rows = nb * S * Hq
    block_r = max(DELTA_TILE // block_d, 1)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), HAS_ALIBI=has_alibi, EVEN_D=even_d,
                  DOT_PRECISION=precision, VARLEN=varlen)
    sizes = (max_sq, max_sk, Hq, Hq // Hk,
             0 if varlen else q.stride(0), q.stride(1), 0 if varlen else k.stride(0), k.stride(1),
             lse_strides[0], lse_strides[1], stride_slope_b, qk_scale, float(softmax_scale))
    with device_ctx(q):
        _attn_bwd_delta_kernel[(triton.cdiv(rows, block_r),)](
            out, dout, delta, rows, S, Hq,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, EVEN_D=even_d, num_warps=4)
        _attn_bwd_dkdv_kernel[(triton.cdiv(max_sk, kv_n), Hk, batch)](
            q, k, v, slopes, dout, lse, delta, dk, dv, cu_q, cu_k, *sizes,
            BLOCK_M=kv_m, BLOCK_N=kv_n, **common, num_warps=kv_warps, num_stages=kv_stages)
        _attn_bwd_dq_kernel[(triton.cdiv(max_sq, q_m), Hq, batch)](
            q, k, v, slopes, dout, lse, delta, dq, cu_q, cu_k, *sizes,
            BLOCK_M=q_m, BLOCK_N=q_n, **common, num_warps=q_warps, num_stages=q_stages)


def attention_bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale: float, causal: bool):
    """Gradient of attention_fwd; returns (dq, dk, dv) in the inputs' dtype."""
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    # dout comes from autograd and may be strided (expanded, transposed): one layout for all
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if dk.numel() == 0 or dq.numel() == 0:
        # no keys: nothing reaches q; no queries: nothing reaches k, v
        return dq.zero_(), dk.zero_(), dv.zero_()
    _bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, causal, dq, dk, dv, batch=B, max_sq=Sq, max_sk=Sk,
         lse_strides=(Hq * Sq, Sq))
    return dq, dk, dv


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                         max_seqlen_k: int, alibi_slopes, softmax_scale: float, causal: bool):
    """Gradient of attention_varlen_fwd; tokens outside every sequence get zero gradients."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    batch = cu_seqlens_q.numel() - 1
    if dq.numel() == 0 or dk.numel() == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq, dk, dv
    _bwd(dout[None], q[None], k[None], v[None], out[None], lse, alibi_slopes, softmax_scale, causal,
         dq[None], dk[None], dv[None], batch=batch, max_sq=max_seqlen_q, max_sk=max_seqlen_k,
         lse_strides=(0, q.shape[0]),
         cu_seqlens=(cu_seqlens_q.to(torch.int32).contiguous(), cu_seqlens_k.to(torch.int32).contiguous()))
    return dq, dk, dv


# Decode kernel: rows of one program (query tokens x q heads per kv head) it takes at most;
# more go to the forward kernel (with per-sequence key counts).
DECODE_MAX_ROWS = 64
# (BLOCK_N, num_warps, num_stages) of the decode kernel, by BLOCK_D
# H100, one token over 4096 cached keys, d128 (benchmarks/tune_attention.py --kernel decode):
# every (BLOCK_N, stages, programs/SM) of the sweep lands within 10% (38-43 us for B1 H32);
# (32, 4, 3) with 2 programs per SM is the fastest.
DECODE_CONFIGS = {16: (32, 4, 3), 32: (32, 4, 3), 64: (32, 4, 3), 128: (32, 4, 3), 256: (32, 4, 3)}
# Split the keys until about this many programs per SM run (flash-decoding)
DECODE_PROGRAMS_PER_SM = 2
DECODE_MAX_SPLITS = 64

def decode_splits(batch: int, heads_kv: int, max_seqlen: int, block_n: int, sm_count: int) -> int:
    """How many key splits the decode kernel uses: enough programs to fill the GPU, no split
    shorter than two key blocks. Depends only on shapes (never on cache_seqlens' values), so a
    captured CUDA graph stays valid as the cache fills."""
    # rounded down: one full wave, never a second wave of a few programs
    want = (DECODE_PROGRAMS_PER_SM * sm_count) // max(batch * heads_kv, 1)
    most = max(max_seqlen // (2 * block_n), 1)
    return int(max(1, min(want, most, DECODE_MAX_SPLITS)))


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale: float, causal: bool):
    """Write k, v (if given) into the caches at cache_seqlens, then attend q over the first
    cache_seqlens[b] + seqlen_new rows of each cache; returns out (B, Sq, Hq, D)."""
    B, Sq, Hq, D = q.shape
    Smax, Hk = k_cache.shape[1], k_cache.shape[2]
    q = q.contiguous()
    block_d = _block_d(D)
    seqlens = cache_seqlens.to(torch.int32)
    with device_ctx(q):
        if k is not None and k.shape[1] > 0:
            k, v = k.contiguous(), v.contiguous()
            Sn = k.shape[1]
            _kv_append_kernel[(Sn, Hk, B)](
                k, v, k_cache, v_cache, seqlens, Sn, Smax, Hk,
                k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1),
                HEAD_DIM=D, BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2)
            seqlens = seqlens + Sn
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    if Sq * (Hq // Hk) > DECODE_MAX_ROWS or q.dtype == torch.float32:
        # prefill into a cache, or fp32: the forward kernel, one key count per sequence
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        _fwd(q, k_cache, v_cache, alibi_slopes, softmax_scale, causal, out, lse, batch=B, max_sq=Sq,
             max_sk=Smax, lse_strides=(Hq * Sq, Sq), seqlens_k=seqlens)
        return out
    slopes, stride_slope_b, has_alibi = _slopes_args(alibi_slopes, q)
    block_m = max(MIN_DOT_BLOCK, triton.next_power_of_2(Sq * (Hq // Hk)))
    block_n, num_warps, num_stages = DECODE_CONFIGS[block_d]
    splits = decode_splits(B, Hk, Smax, block_n, sm_count(q.device))
    if splits > 1:
        o_part = torch.empty((B, Sq, Hq, splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Sq, Hq, splits), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # not dereferenced
    with device_ctx(q):
        _attn_decode_kernel[(splits, Hk, B)](
            q, k_cache, v_cache, slopes, seqlens, out, o_part, lse_part,
            Sq, Hq, Hq // Hk,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), stride_slope_b,
            float(softmax_scale) * _LOG2E,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=splits,
            CAUSAL=bool(causal), HAS_ALIBI=has_alibi, EVEN_D=D == block_d,
            num_warps=num_warps, num_stages=num_stages)
        if splits > 1:
            _attn_decode_combine_kernel[(B * Sq * Hq,)](
                o_part, lse_part, out, HEAD_DIM=D, BLOCK_D=block_d, NUM_SPLITS=splits,
                BLOCK_S=triton.next_power_of_2(splits), num_warps=4 if block_d >= 128 else 2)
    return out
