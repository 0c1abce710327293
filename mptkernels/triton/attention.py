"""Triton flash attention (forward and backward) with causal masking, sliding windows,
softcap, ALiBi and GQA; packed sequences; decoding over a (paged) KV cache with rotary.

Same semantics as the ``mptkernels::attention_*`` schemas in csrc/registration.cpp and the
math of ``mptkernels.reference``:

* q (B, Sq, Hq, D), k and v (B, Sk, Hk, D), contiguous, one dtype (fp16, bf16 or fp32);
  Hq % Hk == 0 and q head h reads kv head h // (Hq // Hk) (GQA / MQA);
  D a multiple of 8 in [8, 256], padded in-kernel to BLOCK_D = next_power_of_2(max(D, 16)).
* Query i sits at key position i + Sk - Sq (bottom-right aligned); rel = j - i - (Sk - Sq).
  score(i, j) = c(softmax_scale * q_i . k_j) - slope[b?, h] * |rel| with c(s) = softcap *
  tanh(s / softcap) when softcap > 0 (ALiBi slopes (Hq,) or (B, Hq) float32, or none; the
  bias is formed in-kernel from the slope; causal: slope * rel, the same on visible keys).
* Key j is visible to query i iff -window_left <= rel <= window_right (-1: unbounded;
  causal is window_right = 0), so a decode step (Sq < Sk) sees the whole cache and with
  Sq > Sk and causal the first Sq - Sk rows see no key.
* Returns out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) float32, the natural-log
  log-sum-exp of the row's visible scores. A row that sees no key gets out = 0 and
  lse = -inf (never NaN). The backward takes the gradient of lse too (dlse) and returns
  dq, dk, dv in the inputs' dtype; dk and dv sum over the Hq // Hk query heads that share a
  kv head.

Flags: each option is a constexpr (CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, PAGED,
HAS_CACHE_IDX, HAS_LEFTPAD, HAS_ROTARY, HAS_DLSE), so a call without it compiles to the
kernel it was before the option existed. Causal without a left bound is CAUSAL (its own key
ranges and launch order); any other window is HAS_WINDOW, with both bounds finite (an
unbounded side is max_sq + max_sk, farther than any key).

Algorithm (FlashAttention-2):

* Forward, grid (ceil(Sq / BLOCK_M), Hq, B): a program owns BLOCK_M query rows of one
  head and streams the key/value blocks through an online softmax held in registers
  (running max m, running sum l, fp32 accumulator). Scores are kept in the log2 domain
  (scale pre-multiplied by log2(e), exp2 instead of exp). The key loop has two phases:
  blocks that every row of the tile sees in full run without any mask, then the blocks on
  the causal diagonal (and the ragged last block at Sk) run with the mask; key blocks
  entirely above the diagonal are never visited. For causal attention the query tiles are
  launched last-first, so the longest programs start first (less tail on the last wave).
  With a window the tile visits only the key blocks from its first row's first visible key
  to its last row's last one (work scales with the window, not with Sk): masked edges, an
  unmasked middle of the blocks every row sees in full (``_window_ranges``).
* Backward: (1) delta = rowsum(dout * out) - dlse (fp32, (B, Hq, Sq); a gradient reaching
  the lse adds dlse * P to dS, the same as lowering delta by dlse); (2) grid
  (ceil(Sk / BLOCK_N), Hk, B): a program owns one key block of one kv head, loops over
  the query heads of its group and over the query blocks that see the key block
  (diagonal blocks masked, the rest not; the ragged last key block masks every query
  block; with a window only the query blocks that see some key of the block), recomputing
  P from lse (softcap: and 1 - tanh^2, dS's factor), and accumulates dk, dv in registers; GQA therefore
  needs no atomics; (3) grid (ceil(Sq / BLOCK_M), Hq, B): a program owns a query block
  and walks the same key blocks as the forward to accumulate dq. Recomputing QK^T and
  dO V^T in (3) costs about 40% more matmul work than the atomic-add dq of
  FlashAttention-2, but every output is written by exactly one program with a fixed
  summation order, so the backward is bitwise deterministic.
* KV cache (``attention_with_kvcache``): a small kernel rotates q (rotary) into a copy; the
  append kernel rotates the new k and writes k, v at each sequence's rows (a batch row
  cache_batch_idx[b], or pages: row r at block_table[b, r // PAGE_ROWS], r % PAGE_ROWS);
  then the decode kernel (few query rows: flash-decoding, the visible keys split across
  programs and merged by the combine kernel, which also gives the lse) or the forward kernel
  (prefill, fp32) reads the keys in place: each key block looks up the page of each of its
  rows (one gathered load of the block-table row), so any page size works.
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
multiplies bf16 tensors as raw uint16 (NumPy has no bf16); tests that interpret bf16 kernels
patch its create_dot to widen bf16 to fp32 first (tests/test_attention_triton_features.py).
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
# Backward dk/dv kernel with a sliding window or softcap, 16-bit inputs: the window's three
# query phases and the cap's 1 - tanh^2 tile (live from the scores to dS) add registers, and
# the tiles above then spill on sm_90a (ptxas, Triton 3.6: d64 (64, 128, 4, 2) 2.7-3.8 KB,
# d128 softcap GQA 1 KB). Chosen by compiling for sm_90a (scripts/triton_sm90_check.py), not
# timed on a GPU yet: d64 (64, 64, 4, 2) does not spill; d128 (32, 128, 8, 2) does not spill
# with a window and spills 156 B with softcap and GQA (the check caps it at 256 B), where
# (16, 128, 8, 2) spills nothing but halves the MMAs' query dimension; d256 as the plain table.
BWD_DKDV_CONFIGS_OPTIONS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (32, 128, 8, 2),
    256: (16, 64, 8, 2),
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
TWO_LOG2E = tl.constexpr(2.8853900817779268)


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
def _tanh(x):
    # 1 - 2 / (e^2x + 1) on exp2 (one MUFU op and a division): exact limits at both ends
    # (e^2x = inf gives 1, 0 gives -1), absolute error ~1e-7 near 0, which is what a capped
    # score needs (the cap multiplies an absolute error); the CPU kernel uses the same form
    return 1.0 - 2.0 / (tl.exp2(x * TWO_LOG2E) + 1.0)


@triton.jit
def _bias_and_mask(
    s,  # [R, C] fp32 q.k times qk_scale (times log2(e), or / softcap under HAS_SOFTCAP)
    rel,  # [R, C] (or broadcastable) int32 j - i - (Sk - Sq): the key's position from the query's
    key_ok,  # broadcastable to [R, C]: key index j < Sk (read when MASKED)
    slope2,  # ALiBi slope * log2(e): a scalar or [R, 1]
    cap2,  # softcap * log2(e) (read under HAS_SOFTCAP)
    win_left, win_right,  # HAS_WINDOW: visible iff -win_left <= rel <= win_right
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """(scores in log2 units, dcap): softcap, the ALiBi bias and the mask applied to s, and the
    cap's derivative 1 - tanh^2 (the backward's factor of dS; s itself when there is no cap,
    never read then). rel works for either orientation (queries x keys or keys x queries)."""
    if HAS_SOFTCAP:
        t = _tanh(s)
        s = t * cap2
        dcap = 1.0 - t * t
    else:
        dcap = s
    if HAS_ALIBI:
        # exact integer distance, then one rounding (slope2 already carries log2(e))
        if CAUSAL:
            s += slope2 * rel.to(tl.float32)  # rel <= 0 on every visible key: -slope * |rel|
        else:
            s -= slope2 * tl.abs(rel).to(tl.float32)
    if MASKED:
        # keys past Sk are masked too: an unmasked ALiBi bias is not what keeps them out
        visible = key_ok
        if CAUSAL:
            visible = visible & (rel <= 0)
        if HAS_WINDOW:
            visible = visible & (rel <= win_right) & (rel >= -win_left)
        s = tl.where(visible, s, float("-inf"))
    return s, dcap


@triton.jit
def _key_rows(
    kn,  # [BLOCK_N] key indices j of the sequence
    k_start,  # the sequence's first key row: in the k/v tensors, or (PAGED) its first logical cache row
    bt_row,  # PAGED: the sequence's row of the block table, int32 [max_blocks]
    stride_kb,  # int64: PAGED: the stride of one page of the cache
    stride_ks,  # int64: the stride of one key row (token)
    key_ok,  # [BLOCK_N] j < Sk: rows whose page may be looked up (with CHECK)
    CHECK: tl.constexpr, PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr,
):
    """int64 [BLOCK_N] offsets of keys kn from the k/v base pointer. Paged caches: logical row
    r = k_start + j lives at row r % PAGE_ROWS of page block_table[b, r // PAGE_ROWS]; one
    gathered load of the block-table row per key block (any page size, no page-aligned tile)."""
    if PAGED:
        r = k_start + kn
        if CHECK:
            page = tl.load(bt_row + r // PAGE_ROWS, mask=key_ok, other=0)
        else:
            page = tl.load(bt_row + r // PAGE_ROWS)
        rows = page.to(tl.int64) * stride_kb + (r % PAGE_ROWS).to(tl.int64) * stride_ks
    else:
        rows = kn.to(tl.int64) * stride_ks
    return rows


@triton.jit
def _fwd_inner(
    acc, l_i, m_i,  # running state of the BLOCK_M rows
    q,  # [BLOCK_M, BLOCK_D] q tile
    k_base, v_base,  # K, V at (b, key 0, h_kv, 0); PAGED: at (page 0, row 0, h_kv, 0)
    stride_kb,  # int64 page stride of K and V (PAGED)
    stride_ks,  # int64 key stride of K and V
    bt_row, k_start,  # PAGED: the sequence's block-table row and first logical row
    q_pos,  # [BLOCK_M] i + Sk - Sq: the query's own key position (rel = j - q_pos)
    offs_n, offs_d, d_ok,
    slope2, qk_scale, cap2, win_left, win_right, lo, hi,
    Sk,  # keys >= Sk are masked (MASKED)
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        key_ok = kn < Sk
        rows = _key_rows(kn, k_start, bt_row, stride_kb, stride_ks, key_ok, MASKED, PAGED, PAGE_ROWS)
        kv_off = rows[:, None] + offs_d[None, :]
        # unmasked blocks lie entirely below Sk, so only the masked phase checks rows
        k = _load_tile(k_base + kv_off, key_ok, d_ok, MASKED, EVEN_D)
        v = _load_tile(v_base + kv_off, key_ok, d_ok, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s, _ = _bias_and_mask(s, kn[None, :] - q_pos[:, None], key_ok[None, :], slope2, cap2, win_left, win_right,
                              MASKED, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP)
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
def _window_ranges(first, last, diag, n, win_left, win_right, BLOCK: tl.constexpr, KEYS: tl.constexpr):
    """(lo, a, b, hi): the other side's indices that rows [first, last] of this side can see
    under the window, in blocks of BLOCK: [lo, a) and [b, hi) need the mask, every index of
    the blocks in [a, b) is seen by every row (the tile's padding rows past `last` run the
    unmasked phase too: their results are dropped, or their P is 0).
    KEYS: this side is queries (rows i), the other keys (j, n = Sk), visible iff
    i + diag - left <= j <= i + diag + right; else this side is keys and the other queries
    (n = Sq), i in [j - diag - right, j - diag + left]. Only non-negative numbers are divided
    (// truncates toward zero on the GPU, floors in the interpreter)."""
    if KEYS:
        begin_first, begin_last = first + diag - win_left, last + diag - win_left
        end_first, end_last = first + diag + win_right + 1, last + diag + win_right + 1
        # every row of the tile sees [begin of its last row, end of its first row)
        full_begin, full_end = begin_last, end_first
    else:
        begin_first, begin_last = first - diag - win_right, last - diag - win_right
        end_first, end_last = first - diag + win_left + 1, last - diag + win_left + 1
        full_begin, full_end = begin_last, end_first
    lo = tl.maximum(begin_first, 0) // BLOCK * BLOCK
    hi = tl.minimum(end_last, n)
    full_lo = (tl.maximum(full_begin, 0) + BLOCK - 1) // BLOCK * BLOCK
    if KEYS:
        # a full key block must lie below Sk: the unmasked phase does not check key rows
        full_hi = tl.maximum(tl.minimum(full_end, n), 0) // BLOCK * BLOCK
    else:
        # query rows past Sq are harmless (lse = +inf, P = 0): run the ragged last block unmasked
        full_hi = tl.where(full_end >= n, n, tl.maximum(full_end, 0) // BLOCK * BLOCK)
    a = tl.minimum(full_lo, hi)
    b = tl.maximum(tl.minimum(full_hi, hi), a)
    return lo, a, b, hi


@triton.jit
def _sequence(CU_Q, CU_K, SEQLENS_K, LEFTPAD, b, Sq, Sk, Sn,
              VARLEN: tl.constexpr, HAS_SEQLENS_K: tl.constexpr, HAS_LEFTPAD: tl.constexpr):
    """(first q row, first k row, Sq, Sk) of sequence b: from cu_seqlens for packed
    sequences; for a KV cache, Sk = seqlens_k[b] + Sn - leftpad[b] keys from row leftpad[b]
    (a logical row of the cache); else the batch-wide sizes at row 0."""
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
        Sk = tl.load(SEQLENS_K + b) + Sn
        if HAS_LEFTPAD:
            pad = tl.load(LEFTPAD + b)
            Sk -= pad
            k_start = pad
    return q_start, k_start, Sq, Sk


@triton.jit
def _cache_bases(K, V, CACHE_IDX, BLOCK_TABLE, b, k_start, h_kv, stride_kb, stride_ks, stride_bt,
                 HEAD_DIM: tl.constexpr, HAS_CACHE_IDX: tl.constexpr, PAGED: tl.constexpr):
    """(k_base, v_base, bt_row, k_start for _key_rows) of sequence b's keys: a contiguous k/v
    (or cache row cache_idx[b]) has its first key folded into the bases; a paged cache keeps
    the logical first row for the page lookups."""
    if PAGED:
        k_base = K + h_kv * HEAD_DIM
        v_base = V + h_kv * HEAD_DIM
        bt_row = BLOCK_TABLE + b * stride_bt
        row0 = k_start
    else:
        if HAS_CACHE_IDX:
            kb = tl.load(CACHE_IDX + b).to(tl.int64)
        else:
            kb = b
        off = kb * stride_kb + k_start * stride_ks + h_kv * HEAD_DIM
        k_base = K + off
        v_base = V + off
        bt_row = BLOCK_TABLE  # not dereferenced
        row0 = 0
    return k_base, v_base, bt_row, row0


@triton.jit
def _attn_fwd_kernel(
    Q,  # [B, Sq, Hq, D]
    K,  # [B, Sk, Hk, D]; KV cache: [B_cache, Smax, Hk, D] or PAGED [num_blocks, PAGE_ROWS, Hk, D]
    V,  # same shape and strides as K
    SLOPES,  # [Hq] or [B, Hq] fp32, read only when HAS_ALIBI
    O,  # [B, Sq, Hq, D] q's dtype, same strides as Q
    LSE,  # [B, Hq, Sq] fp32 (varlen: [Hq, total_q])
    CU_Q, CU_K,  # VARLEN: int32 [B + 1] first row of each sequence in q and in k/v
    SEQLENS_K,  # HAS_SEQLENS_K: int32 [B] filled cache rows before the Sn new ones
    CACHE_IDX,  # HAS_CACHE_IDX: int32 [B] cache row of each sequence
    LEFTPAD,  # HAS_LEFTPAD: int32 [B] first cache row each sequence attends to
    BLOCK_TABLE,  # PAGED: int32 [B, max_blocks] pages of each sequence
    Sq, Sk, Hq,  # VARLEN / HAS_SEQLENS_K: replaced per sequence
    GROUP,  # Hq // Hk
    Sn,  # HAS_SEQLENS_K: new rows already written after SEQLENS_K[b]
    stride_qb, stride_qs,  # of Q and O (head stride D, feature stride 1)
    stride_kb, stride_ks,  # of K and V (PAGED: stride_kb is the page stride)
    stride_lse_b, stride_lse_h,  # of LSE
    stride_slope_b,  # 0 for (Hq,) slopes
    stride_bt,  # of BLOCK_TABLE's rows
    qk_scale,  # softmax_scale * log2(e); softmax_scale / softcap under HAS_SOFTCAP
    cap2,  # softcap * log2(e)
    win_left, win_right,  # HAS_WINDOW: keys with -win_left <= rel <= win_right (clamped, >= 0)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr, HAS_SEQLENS_K: tl.constexpr,
    HAS_CACHE_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr, PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr,
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
    q_start, k_start, Sq, Sk = _sequence(CU_Q, CU_K, SEQLENS_K, LEFTPAD, b, Sq, Sk, Sn, VARLEN, HAS_SEQLENS_K,
                                         HAS_LEFTPAD)
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
    stride_kb = stride_kb.to(tl.int64)

    q_off = offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    q_head = b * stride_qb + q_start * stride_qs + h * HEAD_DIM  # Q and O at (b, row 0, h, 0)
    q = _load_tile(Q + q_head + q_off, row_ok, d_ok, True, EVEN_D)
    k_base, v_base, bt_row, row0 = _cache_bases(K, V, CACHE_IDX, BLOCK_TABLE, b, k_start, h_kv, stride_kb, stride_ks,
                                                stride_bt, HEAD_DIM, HAS_CACHE_IDX, PAGED)

    diag = Sk - Sq
    q_pos = offs_m + diag
    slope2 = _slope2(SLOPES, b, stride_slope_b, h, HAS_ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:
        # only the key blocks inside the tile's window: masked edges, unmasked middle
        lo, a, bb, hi = _window_ranges(start_m, tl.minimum(start_m + BLOCK_M, Sq) - 1, diag, Sk, win_left, win_right,
                                       BLOCK_N, True)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, bt_row, row0, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, lo, a, Sk,
            True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION, PAGED, PAGE_ROWS)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, bt_row, row0, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, a, bb, Sk,
            False, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION, PAGED, PAGE_ROWS)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, bt_row, row0, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, bb, hi, Sk,
            True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION, PAGED, PAGE_ROWS)
    else:
        full_end, hi = _key_range(start_m, diag, Sk, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, bt_row, row0, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, 0, full_end, Sk,
            False, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION, PAGED, PAGE_ROWS)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, bt_row, row0, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, full_end, hi, Sk,
            True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION, PAGED, PAGE_ROWS)

    out, lse = _finish_rows(acc, l_i, m_i)
    _store_tile(O + q_head + q_off, out.to(O.dtype.element_ty), row_ok, d_ok, EVEN_D)
    tl.store(LSE + b * stride_lse_b + h * stride_lse_h + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O,  # [B * Sq * Hq, D] forward output (rows in (b, i, h) order)
    DO,  # [B * Sq * Hq, D] gradient of O, same strides
    DLSE,  # HAS_DLSE: [B, Hq, Sq] fp32 gradient reaching the forward's lse
    DELTA,  # [B, Hq, Sq] fp32: rowsum(dO * O) - dlse
    R,  # B * Sq * Hq
    Sq, Hq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_DLSE: tl.constexpr,
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
    lse_off = (b * Hq + h) * Sq + i
    if HAS_DLSE:
        # d lse_i / d s_ij = P_ij: the lse's gradient adds dlse_i * P_ij to dS_ij, which is
        # P_ij * (dP_ij - delta_i) with delta lowered by dlse_i
        delta -= tl.load(DLSE + lse_off, mask=row_ok, other=0.0)
    tl.store(DELTA + lse_off, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv,  # [BLOCK_N, BLOCK_D] fp32 accumulators
    k, v,  # [BLOCK_N, BLOCK_D] this program's key block
    q_base, do_base,  # Q, DO at (b, query 0, h, 0)
    lse_base, delta_base,  # LSE, DELTA at (b, h, query 0)
    stride_qs,  # int64 query stride of Q and DO
    k_pos,  # [BLOCK_N] key index j - (Sk - Sq): rel(i, j) = k_pos - i
    col_ok,  # [BLOCK_N] key index j < Sk
    offs_m, offs_d, d_ok,
    slope2, qk_scale, cap2, win_left, win_right, lo, hi, Sq,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        sT, dcapT = _bias_and_mask(sT, k_pos[:, None] - qm[None, :], col_ok[:, None], slope2, cap2, win_left,
                                   win_right, MASKED, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP)
        pT = tl.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * dcapT  # through the cap: d(cap * tanh(s / cap)) / ds = 1 - tanh^2
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
    DELTA,  # [B, Hq, Sq] fp32 rowsum(dO * O) - dlse
    DK,  # [B, Sk, Hk, D] same strides as K
    DV,  # [B, Sk, Hk, D] same strides as K
    CU_Q, CU_K,  # VARLEN: int32 [B + 1] first row of each sequence in q and in k/v
    Sq, Sk, Hq,
    GROUP,  # Hq // Hk
    stride_qb, stride_qs,  # of Q and DO
    stride_kb, stride_ks,  # of K, V, DK and DV
    stride_lse_b, stride_lse_h,  # of LSE and DELTA
    stride_slope_b,  # 0 for (Hq,) slopes
    qk_scale,  # softmax_scale * log2(e); softmax_scale / softcap under HAS_SOFTCAP
    softmax_scale,
    cap2,  # softcap * log2(e)
    win_left, win_right,  # HAS_WINDOW: keys with -win_left <= rel <= win_right (clamped, >= 0)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h_kv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    q_start, k_start, Sq, Sk = _sequence(CU_Q, CU_K, CU_K, CU_K, b, Sq, Sk, 0, VARLEN, False, False)
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
    # A window: only the query blocks that see some key of the block, [lo, hi); those whose
    # rows all see all of it, [a, bb), unmasked.
    ragged = start_n + BLOCK_N > Sk
    if HAS_WINDOW:
        lo, a, bb, hi = _window_ranges(start_n, tl.minimum(start_n + BLOCK_N, Sk) - 1, diag, Sq, win_left, win_right,
                                       BLOCK_M, False)
        a = tl.where(ragged, hi, a)
        bb = tl.where(ragged, hi, bb)
        mid = lo  # unused
    elif CAUSAL:
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
        if HAS_WINDOW:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                offs_m, offs_d, d_ok, slope2, qk_scale, cap2, win_left, win_right, lo, a, Sq,
                True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_M, DOT_PRECISION)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                offs_m, offs_d, d_ok, slope2, qk_scale, cap2, win_left, win_right, a, bb, Sq,
                False, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_M, DOT_PRECISION)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                offs_m, offs_d, d_ok, slope2, qk_scale, cap2, win_left, win_right, bb, hi, Sq,
                True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_M, DOT_PRECISION)
        elif ragged:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                offs_m, offs_d, d_ok, slope2, qk_scale, cap2, win_left, win_right, lo, Sq, Sq,
                True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_M, DOT_PRECISION)
        else:
            if CAUSAL:
                dk, dv = _bwd_dkdv_inner(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                    offs_m, offs_d, d_ok, slope2, qk_scale, cap2, win_left, win_right, lo, mid, Sq,
                    True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_M, DOT_PRECISION)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, k_pos, col_ok,
                offs_m, offs_d, d_ok, slope2, qk_scale, cap2, win_left, win_right, mid, Sq, Sq,
                False, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_M, DOT_PRECISION)

    # dS is d(loss)/d(score) and score = c(softmax_scale * q.k) + bias (c's derivative is in dS)
    dk = dk * softmax_scale
    _store_tile(DK + kv_off, dk.to(DK.dtype.element_ty), col_ok, d_ok, EVEN_D)
    _store_tile(DV + kv_off, dv.to(DV.dtype.element_ty), col_ok, d_ok, EVEN_D)


@triton.jit
def _bwd_dq_inner(
    dq,  # [BLOCK_M, BLOCK_D] fp32 accumulator
    q, do,  # [BLOCK_M, BLOCK_D] this program's query rows and their output gradient
    lse2, delta,  # [BLOCK_M] lse * log2(e) (+inf for rows that see nothing), rowsum(dO * O) - dlse
    k_base, v_base,  # K, V at (b, key 0, h_kv, 0)
    stride_ks,  # int64 key stride of K and V
    q_pos,  # [BLOCK_M] i + Sk - Sq
    offs_n, offs_d, d_ok,
    slope2, qk_scale, cap2, win_left, win_right, lo, hi, Sk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        key_ok = kn < Sk
        kv_off = kn.to(tl.int64)[:, None] * stride_ks + offs_d[None, :]
        k = _load_tile(k_base + kv_off, key_ok, d_ok, MASKED, EVEN_D)
        v = _load_tile(v_base + kv_off, key_ok, d_ok, MASKED, EVEN_D)
        # keys past Sk are masked here (unlike in dk/dv): with ALiBi their bias may be
        # positive and an overflowing P times the zero k row would be NaN
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s, dcap = _bias_and_mask(s, kn[None, :] - q_pos[:, None], key_ok[None, :], slope2, cap2, win_left, win_right,
                                 MASKED, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * dcap
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
    DELTA,  # [B, Hq, Sq] fp32 rowsum(dO * O) - dlse
    DQ,  # [B, Sq, Hq, D] same strides as Q
    CU_Q, CU_K,  # VARLEN: int32 [B + 1] first row of each sequence in q and in k/v
    Sq, Sk, Hq,
    GROUP,  # Hq // Hk
    stride_qb, stride_qs,  # of Q, DO and DQ
    stride_kb, stride_ks,  # of K and V
    stride_lse_b, stride_lse_h,  # of LSE and DELTA
    stride_slope_b,  # 0 for (Hq,) slopes
    qk_scale,  # softmax_scale * log2(e); softmax_scale / softcap under HAS_SOFTCAP
    softmax_scale,
    cap2,  # softcap * log2(e)
    win_left, win_right,  # HAS_WINDOW: keys with -win_left <= rel <= win_right (clamped, >= 0)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h_kv = h // GROUP
    start_m = pid_m * BLOCK_M
    q_start, k_start, Sq, Sk = _sequence(CU_Q, CU_K, CU_K, CU_K, b, Sq, Sk, 0, VARLEN, False, False)
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

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:  # the forward's key blocks
        lo, a, bb, hi = _window_ranges(start_m, tl.minimum(start_m + BLOCK_M, Sq) - 1, diag, Sk, win_left, win_right,
                                       BLOCK_N, True)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, lo, a, Sk,
            True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, a, bb, Sk,
            False, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, bb, hi, Sk,
            True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION)
    else:
        full_end, hi = _key_range(start_m, diag, Sk, CAUSAL, BLOCK_M, BLOCK_N)  # as the forward
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, 0, full_end, Sk,
            False, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, q_pos, offs_n, offs_d, d_ok,
            slope2, qk_scale, cap2, win_left, win_right, full_end, hi, Sk,
            True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, DOT_PRECISION)
    dq = dq * softmax_scale
    _store_tile(DQ + q_off, dq.to(DQ.dtype.element_ty), row_ok, d_ok, EVEN_D)


@triton.jit
def _rotated(
    x_ptrs,  # [BLOCK_H, BLOCK_D] pointers to rows of one token (a head per row), feature d
    offs_d,  # [BLOCK_D]
    mask,  # [BLOCK_H, BLOCK_D] rows and features that exist
    cos_row, sin_row,  # COS, SIN at the token's position: fp32 [ROT_HALF]
    ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    """The rows rotated in fp32: the first 2 * ROT_HALF features by (cos, sin) of the
    position, halves (GPT-NeoX) or pairs (GPT-J, INTERLEAVED), the rest copied;
    x * cos + sign * partner * sin with partner the feature x rotates with."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    rot = offs_d < 2 * ROT_HALF
    if INTERLEAVED:
        partner = offs_d ^ 1
        j = offs_d // 2
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        first = offs_d < ROT_HALF
        partner = tl.where(first, offs_d + ROT_HALF, offs_d - ROT_HALF)
        j = tl.where(first, offs_d, offs_d - ROT_HALF)
        sign = tl.where(first, -1.0, 1.0)
    xp = tl.load(x_ptrs + (partner - offs_d)[None, :], mask=mask & rot[None, :], other=0.0).to(tl.float32)
    c = tl.load(cos_row + j, mask=rot, other=1.0)
    s = tl.load(sin_row + j, mask=rot, other=0.0)
    return x * c[None, :] + xp * (sign * s)[None, :]


@triton.jit
def _rotary_q_kernel(
    Q,  # [B, Sq, Hq, D] contiguous
    Q_OUT,  # [B, Sq, Hq, D] contiguous: q rotated
    SEQLENS,  # int32 [B]: filled cache rows, the position of the first new token
    COS, SIN,  # fp32 [seqlen_ro, ROT_HALF] contiguous
    Sq, Hq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, ROT_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # program (token t, head block, batch b); token t at position seqlens[b] + t (PER_TOKEN:
    # causal or windowed attention), else every token at seqlens[b], as flash-attn
    t = tl.program_id(0)
    hb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pos = tl.load(SEQLENS + b)
    if PER_TOKEN:
        pos += t
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < Hq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    off = ((b * Sq + t) * Hq + offs_h.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    y = _rotated(Q + off, offs_d, mask, COS + pos.to(tl.int64) * ROT_HALF, SIN + pos.to(tl.int64) * ROT_HALF,
                 ROT_HALF, INTERLEAVED)
    tl.store(Q_OUT + off, y.to(Q_OUT.dtype.element_ty), mask=mask)


@triton.jit
def _kv_append_kernel(
    K_NEW, V_NEW,  # [B, Sn, Hk, D] contiguous
    K_CACHE, V_CACHE,  # [B_cache, Smax, Hk, D], or PAGED [num_blocks, PAGE_ROWS, Hk, D]
    SEQLENS,  # int32 [B]: rows of each cache already filled (the first new token's row)
    CACHE_IDX,  # HAS_CACHE_IDX: int32 [B] cache row of each sequence
    BLOCK_TABLE,  # PAGED: int32 [B, max_blocks]
    COS, SIN,  # HAS_ROTARY: fp32 [seqlen_ro, ROT_HALF] contiguous
    B, Sn, Hk,
    capacity,  # rows a sequence can hold: Smax, or max_blocks * PAGE_ROWS
    stride_cb,  # of the cache's dim 0 (a batch row, or a page)
    stride_cs,  # of one cache row
    stride_bt,  # of BLOCK_TABLE's rows
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_CACHE_IDX: tl.constexpr, PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr,
    HAS_ROTARY: tl.constexpr, ROT_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    # program (new token t, head block, batch b): k rotated to position seqlens[b] + t (with
    # rotary), then k and v written at that logical row. A row past the cache is not written
    # (the host checks it outside CUDA-graph capture and raises)
    t = tl.program_id(0)
    hb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pos = tl.load(SEQLENS + b) + t
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (pos < capacity) & (pos >= 0)
    if PAGED:
        page = tl.load(BLOCK_TABLE + b * stride_bt + pos // PAGE_ROWS, mask=ok, other=0)
        dst_row = page.to(tl.int64) * stride_cb + (pos % PAGE_ROWS).to(tl.int64) * stride_cs
    else:
        if HAS_CACHE_IDX:
            cb = tl.load(CACHE_IDX + b)
            # two sequences in one cache row (a repeated index): the later one in batch order
            # writes a row both write, as the reference's sequential writes leave it
            for start in range(b + 1, B, BLOCK_B):
                other = start + tl.arange(0, BLOCK_B)
                live = other < B
                o_cb = tl.load(CACHE_IDX + other, mask=live, other=-1)
                o_pos = tl.load(SEQLENS + other, mask=live, other=0)
                hit = live & (o_cb == cb) & (o_pos <= pos) & (pos < o_pos + Sn)
                ok = ok & (tl.max(hit.to(tl.int32), 0) == 0)
            cb = cb.to(tl.int64)
        else:
            cb = b
        dst_row = cb * stride_cb + pos.to(tl.int64) * stride_cs
    mask = ((offs_h < Hk)[:, None] & (offs_d < HEAD_DIM)[None, :]) & ok
    src = ((b * Sn + t) * Hk + offs_h.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    dst = dst_row + offs_h.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    if HAS_ROTARY:
        cs = pos.to(tl.int64) * ROT_HALF
        k = _rotated(K_NEW + src, offs_d, mask, COS + cs, SIN + cs, ROT_HALF, INTERLEAVED)
    else:
        k = tl.load(K_NEW + src, mask=mask)
    tl.store(K_CACHE + dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(V_CACHE + dst, tl.load(V_NEW + src, mask=mask), mask=mask)


@triton.jit
def _attn_decode_kernel(
    Q,  # [B, Sq, Hq, D] a few new tokens per sequence (rotated already, with rotary)
    K, V,  # caches: [B_cache, Smax, Hk, D], or PAGED [num_blocks, PAGE_ROWS, Hk, D]
    SLOPES,  # [Hq] or [B, Hq] fp32, read only when HAS_ALIBI
    SEQLENS_K,  # int32 [B]: filled cache rows before the Sn new ones
    CACHE_IDX,  # HAS_CACHE_IDX: int32 [B] cache row of each sequence
    LEFTPAD,  # HAS_LEFTPAD: int32 [B] first cache row each sequence attends to
    BLOCK_TABLE,  # PAGED: int32 [B, max_blocks] pages of each sequence
    O,  # [B, Sq, Hq, D], written when NUM_SPLITS == 1
    LSE,  # [B, Hq, Sq] fp32, written when NUM_SPLITS == 1
    O_PART,  # [B, Sq, Hq, NUM_SPLITS, D] fp32 partial outputs, when NUM_SPLITS > 1
    LSE_PART,  # [B, Sq, Hq, NUM_SPLITS] fp32 their log-sum-exp (natural log)
    Sq, Hq,
    GROUP,  # Hq // Hk
    Sn,  # new rows already written after SEQLENS_K[b]
    stride_qb, stride_qs,  # of Q
    stride_kb, stride_ks,  # of the caches (PAGED: stride_kb is the page stride)
    stride_slope_b,  # 0 for (Hq,) slopes
    stride_bt,  # of BLOCK_TABLE's rows
    qk_scale,  # softmax_scale * log2(e); softmax_scale / softcap under HAS_SOFTCAP
    cap2,  # softcap * log2(e)
    win_left, win_right,  # HAS_WINDOW: keys with -win_left <= rel <= win_right (clamped, >= 0)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, HAS_CACHE_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    PAGED: tl.constexpr, PAGE_ROWS: tl.constexpr,
):
    """Flash-decoding: program (split, kv head, batch) attends the GROUP q heads x Sq tokens
    that read this kv head (rows r = token * GROUP + head-in-group, so the cache is read once
    per kv head, not once per q head) over its 1/NUM_SPLITS share of the visible keys."""
    split = tl.program_id(0)
    h_kv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    _, k_start, _, Sk = _sequence(SEQLENS_K, SEQLENS_K, SEQLENS_K, LEFTPAD, b, Sq, 0, Sn, False, True, HAS_LEFTPAD)
    rows = tl.arange(0, BLOCK_M)
    t = rows // GROUP
    h = h_kv * GROUP + rows % GROUP
    row_ok = t < Sq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    stride_ks = stride_ks.to(tl.int64)
    stride_kb = stride_kb.to(tl.int64)

    q_rows = b * stride_qb + t.to(tl.int64) * stride_qs + h * HEAD_DIM
    q = _load_tile(Q + q_rows[:, None] + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    diag = Sk - Sq
    q_pos = t + diag
    if HAS_ALIBI:
        slope2 = (tl.load(SLOPES + b * stride_slope_b + h, mask=row_ok, other=0.0) * LOG2E)[:, None]
    else:
        slope2 = 0.0
    k_base, v_base, bt_row, row0 = _cache_bases(K, V, CACHE_IDX, BLOCK_TABLE, b, k_start, h_kv, stride_kb, stride_ks,
                                                stride_bt, HEAD_DIM, HAS_CACHE_IDX, PAGED)
    # the keys some token sees (a window: from the first token's first key to the last
    # token's last), split in equal shares of whole blocks
    if HAS_WINDOW:
        first = tl.maximum(diag - win_left, 0) // BLOCK_N * BLOCK_N
        end = tl.minimum(Sq - 1 + diag + win_right + 1, Sk)
    else:
        first = 0
        end = Sk
    per_split = tl.cdiv(tl.cdiv(tl.maximum(end - first, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, end)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # every block masked (at hi; causal and the window bite only at the ends): the masked
    # loop of the forward, with hi in place of Sk
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, bt_row, row0, q_pos, offs_n, offs_d, d_ok,
        slope2, qk_scale, cap2, win_left, win_right, lo, hi, hi,
        True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, EVEN_D, BLOCK_N, None, PAGED, PAGE_ROWS)

    out, lse = _finish_rows(acc, l_i, m_i)
    o_rows = (b * Sq + t) * Hq + h  # (b, t, h) row of O and of the partials
    if NUM_SPLITS == 1:
        _store_tile(O + o_rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
                    row_ok, d_ok, EVEN_D)
        tl.store(LSE + (b * Hq + h) * Sq + t, lse, mask=row_ok)
    else:
        part = o_rows.to(tl.int64) * NUM_SPLITS + split
        _store_tile(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, row_ok, d_ok, EVEN_D)
        tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _attn_decode_combine_kernel(
    O_PART, LSE_PART,  # see _attn_decode_kernel
    O,  # [B * Sq * Hq, D] rows in (b, t, h) order
    LSE,  # [B, Hq, Sq] fp32
    Sq, Hq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s(lse_s); a row whose
    # splits all saw nothing (lse_s = -inf) gets zeros and lse = -inf
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(LSE_PART + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, 0)
    empty = total == 0.0
    w = w / tl.where(empty, 1.0, total)
    parts = tl.load(O_PART + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0)
    tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    h = row % Hq
    bt = row // Hq  # b * Sq + t
    t = bt % Sq
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total)))
    tl.store(LSE + ((bt // Sq) * Hq + h) * Sq + t, lse)


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


def bwd_configs(head_dim: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int, options: bool = False):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) of the dk/dv kernel, the same of the dq kernel);
    options: the kernels have a sliding window or softcap (HAS_WINDOW / HAS_SOFTCAP)."""
    fp32 = dtype == torch.float32
    out = []
    dkdv = BWD_DKDV_CONFIGS_OPTIONS if options else BWD_DKDV_CONFIGS
    for table in ((BWD_DKDV_CONFIGS_FP32, BWD_DQ_CONFIGS_FP32) if fp32 else (dkdv, BWD_DQ_CONFIGS)):
        block_m, block_n, num_warps, num_stages = table[_block_d(head_dim)]
        out.append((fit(block_m, seqlen_q), fit(block_n, seqlen_k), num_warps, num_stages))
    return tuple(out)


def _slopes_args(alibi_slopes, q):
    """(slopes tensor or a dummy, batch stride, HAS_ALIBI)."""
    if alibi_slopes is None:
        return q, 0, False  # never dereferenced
    slopes = alibi_slopes.to(torch.float32).contiguous()
    return slopes, (slopes.stride(0) if slopes.dim() == 2 else 0), True


def _score_args(softmax_scale, causal, window_left, window_right, softcap, max_sq, max_sk):
    """The scores' options as the kernels take them: (runtime args, constexprs).

    The mask: causal is window_right = 0; a bound of -1 is none. Causal without a left bound
    (window (-1, 0) too) is the CAUSAL path, no bound at all neither flag, so those compile
    to the kernels they were before windows existed. Otherwise HAS_WINDOW with both bounds
    finite: |rel| < max(Sq, Sk) for every pair, so max_sq + max_sk stands for "unbounded" (and
    caps a huge window to int32). softcap > 0: q.k is scaled by softmax_scale / softcap for
    the tanh and the capped score brought to log2 units by cap2 = softcap * log2(e)."""
    right = 0 if causal else int(window_right)
    left = int(window_left)
    big = max_sq + max_sk + 1
    pure_causal = left < 0 and right == 0
    has_window = not pure_causal and (left >= 0 or right >= 0)
    win_left = min(left, big) if left >= 0 else big
    win_right = min(right, big) if right >= 0 else big
    has_softcap = softcap > 0
    if has_softcap:
        qk_scale, cap2 = float(softmax_scale) / float(softcap), float(softcap) * _LOG2E
    else:
        qk_scale, cap2 = float(softmax_scale) * _LOG2E, 0.0
    return ((qk_scale, cap2, win_left, win_right),
            dict(CAUSAL=pure_causal, HAS_WINDOW=has_window, HAS_SOFTCAP=has_softcap))


def _int32(t):
    return t.to(torch.int32).contiguous()


def _fwd(q, k, v, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap, out, lse, *, batch,
         max_sq, max_sk, lse_strides, cu_seqlens=None, cache=None):
    """Launch the forward over (batch, S, H, D) views: one tensor per batch element
    (stride_qb) or one packed sequence dimension (stride 0, rows found by cu_seqlens); or
    over a KV cache (cache: dict of seqlens, Sn, cache_batch_idx, cache_leftpad, block_table)."""
    D, Hq, Hk = q.shape[3], q.shape[2], k.shape[2]
    slopes, stride_slope_b, has_alibi = _slopes_args(alibi_slopes, q)
    block_d = _block_d(D)
    block_m, block_n, num_warps, num_stages = fwd_config(D, q.dtype, max_sq, max_sk)
    varlen = cu_seqlens is not None
    cu_q, cu_k = cu_seqlens if varlen else (q, q)  # dummies are never dereferenced
    cache = cache or {}
    seqlens, idx, pad, table = (cache.get(n) for n in ("seqlens", "cache_batch_idx", "cache_leftpad", "block_table"))
    score, flags = _score_args(softmax_scale, causal, window_left, window_right, softcap, max_sq, max_sk)
    grid = (triton.cdiv(max_sq, block_m), Hq, batch)
    with device_ctx(q):
        _attn_fwd_kernel[grid](
            q, k, v, slopes, out, lse, cu_q, cu_k, q if seqlens is None else seqlens, q if idx is None else idx,
            q if pad is None else pad, q if table is None else table,
            max_sq, max_sk, Hq, Hq // Hk, cache.get("Sn", 0),
            0 if varlen else q.stride(0), q.stride(1), 0 if varlen else k.stride(0), k.stride(1),
            lse_strides[0], lse_strides[1], stride_slope_b, 0 if table is None else table.stride(0), *score,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_ALIBI=has_alibi, **flags,
            EVEN_D=D == block_d, DOT_PRECISION=dot_precision(q.dtype), VARLEN=varlen,
            HAS_SEQLENS_K=seqlens is not None, HAS_CACHE_IDX=idx is not None, HAS_LEFTPAD=pad is not None,
            PAGED=table is not None, PAGE_ROWS=k.shape[1] if table is not None else 1,
            num_warps=num_warps, num_stages=num_stages)


def attention_fwd(q, k, v, alibi_slopes, softmax_scale: float, causal: bool, window_left: int = -1,
                  window_right: int = -1, softcap: float = 0.0):
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
    _fwd(q, k, v, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap, out, lse, batch=B,
         max_sq=Sq, max_sk=Sk, lse_strides=(Hq * Sq, Sq))
    return out, lse


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, alibi_slopes,
                         softmax_scale: float, causal: bool, window_left: int = -1, window_right: int = -1,
                         softcap: float = 0.0):
    """Forward over packed sequences: q (total_q, Hq, D), k, v (total_k, Hk, D); returns
    (out (total_q, Hq, D), lse (Hq, total_q)). Rows after cu_seqlens_q[-1] get 0 and -inf."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    total_q, Hq, _ = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = torch.zeros_like(q)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or k.shape[0] == 0:
        return out, lse
    _fwd(q[None], k[None], v[None], alibi_slopes, softmax_scale, causal, window_left, window_right, softcap,
         out[None], lse, batch=batch, max_sq=max_seqlen_q, max_sk=max_seqlen_k, lse_strides=(0, total_q),
         cu_seqlens=(_int32(cu_seqlens_q), _int32(cu_seqlens_k)))
    return out, lse


def _bwd(dout, q, k, v, out, lse, dlse, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap,
         dq, dk, dv, *, batch, max_sq, max_sk, lse_strides, cu_seqlens=None):
    D, Hq, Hk = q.shape[3], q.shape[2], k.shape[2]
    slopes, stride_slope_b, has_alibi = _slopes_args(alibi_slopes, q)
    block_d = _block_d(D)
    even_d = D == block_d
    precision = dot_precision(q.dtype)
    (qk_scale, cap2, win_left, win_right), flags = _score_args(softmax_scale, causal, window_left, window_right,
                                                               softcap, max_sq, max_sk)
    (kv_m, kv_n, kv_warps, kv_stages), (q_m, q_n, q_warps, q_stages) = bwd_configs(
        D, q.dtype, max_sq, max_sk, options=flags["HAS_WINDOW"] or flags["HAS_SOFTCAP"])
    varlen = cu_seqlens is not None
    cu_q, cu_k = cu_seqlens if varlen else (q, q)

    # delta has lse's layout: rows of the (B or 1, S, Hq) token grid in order
    delta = torch.empty_like(lse)
    nb, S = q.shape[0], q.shape[1]
    rows = nb * S * Hq
    block_r = max(DELTA_TILE // block_d, 1)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, HAS_ALIBI=has_alibi, **flags, EVEN_D=even_d, DOT_PRECISION=precision,
                  VARLEN=varlen)
    sizes = (max_sq, max_sk, Hq, Hq // Hk,
             0 if varlen else q.stride(0), q.stride(1), 0 if varlen else k.stride(0), k.stride(1),
             lse_strides[0], lse_strides[1], stride_slope_b, qk_scale, float(softmax_scale), cap2, win_left, win_right)
    with device_ctx(q):
        _attn_bwd_delta_kernel[(triton.cdiv(rows, block_r),)](
            out, dout, delta if dlse is None else dlse, delta, rows, S, Hq,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, EVEN_D=even_d, HAS_DLSE=dlse is not None, num_warps=4)
        _attn_bwd_dkdv_kernel[(triton.cdiv(max_sk, kv_n), Hk, batch)](
            q, k, v, slopes, dout, lse, delta, dk, dv, cu_q, cu_k, *sizes,
            BLOCK_M=kv_m, BLOCK_N=kv_n, **common, num_warps=kv_warps, num_stages=kv_stages)
        _attn_bwd_dq_kernel[(triton.cdiv(max_sq, q_m), Hq, batch)](
            q, k, v, slopes, dout, lse, delta, dq, cu_q, cu_k, *sizes,
            BLOCK_M=q_m, BLOCK_N=q_n, **common, num_warps=q_warps, num_stages=q_stages)


def attention_bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale: float, causal: bool, window_left: int = -1,
                  window_right: int = -1, softcap: float = 0.0, dlse=None):
    """Gradient of attention_fwd (dlse: the gradient reaching its lse, or None); returns
    (dq, dk, dv) in the inputs' dtype."""
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    # dout comes from autograd and may be strided (expanded, transposed): one layout for all
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    dlse = None if dlse is None else dlse.to(torch.float32).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if dk.numel() == 0 or dq.numel() == 0:
        # no keys: nothing reaches q; no queries: nothing reaches k, v
        return dq.zero_(), dk.zero_(), dv.zero_()
    _bwd(dout, q, k, v, out, lse, dlse, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap,
         dq, dk, dv, batch=B, max_sq=Sq, max_sk=Sk, lse_strides=(Hq * Sq, Sq))
    return dq, dk, dv


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                         max_seqlen_k: int, alibi_slopes, softmax_scale: float, causal: bool, window_left: int = -1,
                         window_right: int = -1, softcap: float = 0.0, dlse=None):
    """Gradient of attention_varlen_fwd; tokens outside every sequence get zero gradients."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    dlse = None if dlse is None else dlse.to(torch.float32).contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    batch = cu_seqlens_q.numel() - 1
    if dq.numel() == 0 or dk.numel() == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq, dk, dv
    _bwd(dout[None], q[None], k[None], v[None], out[None], lse, dlse, alibi_slopes, softmax_scale, causal,
         window_left, window_right, softcap, dq[None], dk[None], dv[None], batch=batch, max_sq=max_seqlen_q,
         max_sk=max_seqlen_k, lse_strides=(0, q.shape[0]), cu_seqlens=(_int32(cu_seqlens_q), _int32(cu_seqlens_k)))
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
# Elements of one (token, heads) tile of the rotary / cache-append kernels
ROW_TILE = 2048


def decode_splits(batch: int, heads_kv: int, max_seqlen: int, block_n: int, sm_count: int) -> int:
    """How many key splits the decode kernel uses: enough programs to fill the GPU, no split
    shorter than two key blocks. Depends only on shapes (never on cache_seqlens' values), so a
    captured CUDA graph stays valid as the cache fills."""
    # rounded down: one full wave, never a second wave of a few programs
    want = (DECODE_PROGRAMS_PER_SM * sm_count) // max(batch * heads_kv, 1)
    most = max(max_seqlen // (2 * block_n), 1)
    return int(max(1, min(want, most, DECODE_MAX_SPLITS)))


def _row_tile(heads: int, block_d: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) of the rotary / cache-append kernels: a token's heads in tiles of
    about ROW_TILE elements."""
    block_h = min(triton.next_power_of_2(heads), max(1, ROW_TILE // block_d))
    return block_h, 4 if block_h * block_d >= 1024 else 1


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale: float,
                           causal: bool, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                           rotary_cos=None, rotary_sin=None, rotary_interleaved: bool = False, cache_batch_idx=None,
                           cache_leftpad=None, block_table=None):
    """Rotate q and the new k (rotary), write k, v (if given) into the caches at
    cache_seqlens (rows of batch row cache_batch_idx[b], or pages of block_table), then attend
    q over each sequence's rows [cache_leftpad[b], cache_seqlens[b] + seqlen_new); returns
    (out (B, Sq, Hq, D), lse (B, Hq, Sq) float32). Schema: csrc/registration.cpp."""
    B, Sq, Hq, D = q.shape
    Hk = k_cache.shape[2]
    paged = block_table is not None
    page_rows = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    q = q.contiguous()
    block_d = _block_d(D)
    seqlens = _int32(cache_seqlens)
    idx = None if cache_batch_idx is None or paged else _int32(cache_batch_idx)
    pad = None if cache_leftpad is None else _int32(cache_leftpad)
    table = _int32(block_table) if paged else None
    Sn = 0 if k is None else k.shape[1]
    rotary = rotary_cos is not None
    rot_half = rotary_cos.shape[1] if rotary else 1
    cos, sin = (rotary_cos.to(torch.float32).contiguous(), rotary_sin.to(torch.float32).contiguous()) if rotary \
        else (q, q)  # dummies are never dereferenced
    with device_ctx(q):
        if rotary and q.numel() > 0:
            # q's token t at position cache_seqlens[b] + t when causal or windowed, else every
            # token at cache_seqlens[b] (flash-attn's rule); q is left as it is, the kernels
            # read the rotated copy
            q_rot = torch.empty_like(q)
            block_h, warps = _row_tile(Hq, block_d)
            _rotary_q_kernel[(Sq, triton.cdiv(Hq, block_h), B)](
                q, q_rot, seqlens, cos, sin, Sq, Hq,
                HEAD_DIM=D, BLOCK_D=block_d, BLOCK_H=block_h, ROT_HALF=rot_half,
                INTERLEAVED=bool(rotary_interleaved),
                PER_TOKEN=bool(causal) or window_left >= 0 or window_right >= 0, num_warps=warps)
            q = q_rot
        if Sn > 0 and B > 0:
            k, v = k.contiguous(), v.contiguous()
            block_h, warps = _row_tile(Hk, block_d)
            _kv_append_kernel[(Sn, triton.cdiv(Hk, block_h), B)](
                k, v, k_cache, v_cache, seqlens, k if idx is None else idx, k if table is None else table, cos, sin,
                B, Sn, Hk, capacity, k_cache.stride(0), k_cache.stride(1), 0 if table is None else table.stride(0),
                HEAD_DIM=D, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_B=128, HAS_CACHE_IDX=idx is not None,
                PAGED=paged, PAGE_ROWS=page_rows, HAS_ROTARY=rotary, ROT_HALF=rot_half,
                INTERLEAVED=bool(rotary_interleaved), num_warps=warps)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    cache = dict(seqlens=seqlens, Sn=Sn, cache_batch_idx=idx, cache_leftpad=pad, block_table=table)
    if Sq * (Hq // Hk) > DECODE_MAX_ROWS or q.dtype == torch.float32:
        # prefill into a cache, or fp32: the forward kernel, one key count per sequence
        _fwd(q, k_cache, v_cache, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap, out, lse,
             batch=B, max_sq=Sq, max_sk=capacity, lse_strides=(Hq * Sq, Sq), cache=cache)
        return out, lse
    slopes, stride_slope_b, has_alibi = _slopes_args(alibi_slopes, q)
    score, flags = _score_args(softmax_scale, causal, window_left, window_right, softcap, Sq, capacity)
    block_m = max(MIN_DOT_BLOCK, triton.next_power_of_2(Sq * (Hq // Hk)))
    block_n, num_warps, num_stages = DECODE_CONFIGS[block_d]
    splits = decode_splits(B, Hk, capacity, block_n, sm_count(q.device))
    if splits > 1:
        o_part = torch.empty((B, Sq, Hq, splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Sq, Hq, splits), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # not dereferenced
    with device_ctx(q):
        _attn_decode_kernel[(splits, Hk, B)](
            q, k_cache, v_cache, slopes, seqlens, q if idx is None else idx, q if pad is None else pad,
            q if table is None else table, out, lse, o_part, lse_part,
            Sq, Hq, Hq // Hk, Sn, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), stride_slope_b,
            0 if table is None else table.stride(0), *score,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=splits,
            HAS_ALIBI=has_alibi, **flags, EVEN_D=D == block_d, HAS_CACHE_IDX=idx is not None,
            HAS_LEFTPAD=pad is not None, PAGED=paged, PAGE_ROWS=page_rows,
            num_warps=num_warps, num_stages=num_stages)
        if splits > 1:
            _attn_decode_combine_kernel[(B * Sq * Hq,)](
                o_part, lse_part, out, lse, Sq, Hq, HEAD_DIM=D, BLOCK_D=block_d, NUM_SPLITS=splits,
                BLOCK_S=triton.next_power_of_2(splits), num_warps=4 if block_d >= 128 else 2)
    return out, lse
