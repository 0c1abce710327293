"""Fused attention (causal, ALiBi, GQA, packed sequences, KV-cache decoding): the Python API.

Custom ops ``torch.ops.mptkernels.attention_fwd`` / ``attention_bwd``, ``attention_varlen_fwd`` /
``_bwd`` and ``attention_with_kvcache`` (schemas in csrc/registration.cpp). Their
implementations (C++ CPU, Triton; PyTorch's F.scaled_dot_product_attention at the level of
``attention``) and the choice between them are in mptkernels/_dispatch.py; this module checks
arguments, gives the fake kernels and the autograd.
"""
from __future__ import annotations

import math
import numbers
import weakref

import torch

from .. import _dispatch, reference, torch_impl

_ops = _dispatch.CUSTOM_OPS  # torch.ops.mptkernels, called directly where nothing else would run
MAX_HEAD_DIM = 256  # the kernels' limit (the Triton tiles go up to BLOCK_D 256; the C++ kernel's rows)
# Appended to every error of an impossible shape: the likeliest cause is a tensor in another layout.
# (No warning for a possible shape: SDPA's layout with seqlen_q == seqlen_k and heads dividing
# evenly is a valid input of ours, and no shape rule tells the two apart without misfiring, e.g.
# on decoding, where seqlen 1 < heads is the normal case.)
LAYOUT_HINT = ("q, k, v are (batch, seqlen, heads, head_dim), flash-attn's layout; "
               "SDPA's (batch, heads, seqlen, head_dim) needs .transpose(1, 2)")
VARLEN_LAYOUT_HINT = ("q, k, v are (total_tokens, heads, head_dim), the sequences packed along dim 0; "
                      "a (heads, total_tokens, head_dim) tensor needs .transpose(0, 1)")
KVCACHE_LAYOUT_HINT = ("q, k, v, k_cache, v_cache are (batch, seqlen, heads, head_dim), flash-attn's layout; "
                       "SDPA's (batch, heads, seqlen, head_dim) needs .transpose(1, 2)")
# the dtypes some attention kernel takes (scaled_dot_product_attention hands others to PyTorch)
_KERNEL_DTYPES = tuple(set().union(*_dispatch.TABLE["attention"].kernels.values()))


def attention(q, k, v, *, causal=False, alibi_slopes=None, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              return_lse=False, deterministic=False):
    """softmax(softcap(q k^T * softmax_scale) + ALiBi + mask) v, fused (no seqlen x seqlen matrix
    in memory); flash-attn's ``flash_attn_func`` (without dropout).

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim) with
    heads_q % heads_kv == 0 (GQA/MQA: q head h reads kv head h // (heads_q // heads_kv)).
    head_dim: a multiple of 8 up to 256. softmax_scale defaults to head_dim ** -0.5.
    Query i sits at key position i + seqlen_k - seqlen_q (bottom-right aligned, as new tokens
    attending to a cache); rel = j - that position is key j's distance from it.
    causal: keys with rel <= 0. window_size=(left, right): keys with -left <= rel <= right, -1
    unbounded on that side (Mistral's sliding window is causal with (window, window) or
    (window, 0): causal sets right = 0). softcap > 0: the scaled scores s become softcap *
    tanh(s / softcap) (Gemma 2), before the bias. alibi_slopes: None, or float32 (heads_q,) or
    (batch, heads_q); adds -slope * |rel| (flash-attn's and llm-foundry's ALiBi; with causal,
    slope * rel, MPT's). A query that sees no key returns zeros (its lse is -inf).
    return_lse: also return the log-sum-exp of each row's scores, float32 (batch, heads_q,
    seqlen_q), for merging partial attentions (differentiable: a gradient reaching it flows to
    q and k). Differentiable in q, k, v. The backward is deterministic on every kernel (each
    output gradient has one owner, no atomics), so ``deterministic`` is accepted and always holds.
    """
    _precheck((q, k, v), alibi_slopes, softmax_scale)
    _check_causal(causal, "attention")
    window, cap = _window(window_size, "attention"), _softcap(softcap, "attention")
    _check_flag(return_lse, "return_lse", "attention")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()

    def kernel(q, k, v):
        out, lse = _ops.attention_fwd.default(q.contiguous(), k.contiguous(), v.contiguous(), slopes, scale, causal,
                                              *window, cap)
        return (out, lse) if return_lse else out

    def torch_fn(q, k, v):
        return torch_impl.attention(q, k, v, causal, slopes, scale)

    def ref(q, k, v):
        return reference.attention(q, k, v, causal=causal, alibi_slopes=slopes, softmax_scale=scale,
                                   window_size=window, softcap=cap, return_lse=return_lse)

    def torch_why():
        if window != (-1, -1) or cap or return_lse:
            return "a sliding window, softcap or return_lse (SDPA has none of them)"
        return torch_impl.covers_attention(q, k, causal)

    b, sq, hq, d = q.shape
    return _dispatch.route("attention", (q, k, v), device=q.device, dtype=q.dtype, torch_why=torch_why,
                           shape_class=lambda: (q.dtype, d, sq.bit_length(), k.shape[1].bit_length(),
                                                (b * hq).bit_length(), hq // k.shape[2], causal, slopes is not None),
                           kernel=kernel, torch_fn=torch_fn, reference=ref,
                           check=lambda: _check(q, k, v, alibi_slopes, softmax_scale))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     alibi_slopes=None, softmax_scale=None, window_size=(-1, -1), softcap=0.0, return_lse=False,
                     deterministic=False):
    """``attention`` over sequences packed along one token dimension (no padding);
    flash-attn's ``flash_attn_varlen_func``.

    q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim). cu_seqlens_q/_k:
    int32 (batch + 1,) cumulative lengths from 0: sequence b is rows
    [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and the same of k, v by cu_seqlens_k; no token
    attends across a sequence boundary. max_seqlen_q/_k: the longest sequence (the GPU grid
    is sized by it; a longer one is an error, checked on the host once per cu_seqlens tensor
    and version, so layers sharing one tensor pay one sync, and not while a CUDA graph is
    being captured). alibi_slopes: (heads_q,) or (batch, heads_q) float32. causal, window_size,
    softcap and the ALiBi bias are per sequence, as in ``attention`` (bottom-right aligned when
    a sequence's q and k lengths differ). Rows after cu_seqlens_q[-1] belong to no sequence and
    return zeros. return_lse: also the lse, float32 (heads_q, total_q). Differentiable in q, k,
    v; the backward is deterministic (see ``attention``).
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, softmax_scale)
    _check_causal(causal, "attention_varlen")
    window, cap = _window(window_size, "attention_varlen"), _softcap(softcap, "attention_varlen")
    _check_flag(return_lse, "return_lse", "attention_varlen")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)

    def kernel(q, k, v):
        out, lse = _ops.attention_varlen_fwd.default(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q,
                                                     cu_seqlens_k, max_q, max_k, slopes, scale, causal, *window, cap)
        return (out, lse) if return_lse else out

    def ref(q, k, v):
        # the kernels' length checks, so every implementation refuses the same input
        _varlen_lengths(q, k, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
        return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, alibi_slopes=slopes,
                                          softmax_scale=scale, window_size=window, softcap=cap,
                                          return_lse=return_lse)

    return _dispatch.route("attention_varlen", (q, k, v), device=q.device, dtype=q.dtype,
                           torch_why=_dispatch.no_torch_op, shape_class=tuple, kernel=kernel, torch_fn=None,
                           reference=ref)


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, rotary_cos=None, rotary_sin=None,
                           cache_batch_idx=None, cache_leftpad=None, block_table=None, causal=True, window_size=(-1, -1),
                           softcap=0.0, rotary_interleaved=True, alibi_slopes=None, softmax_scale=None,
                           return_lse=False):
    """Attention of a few new tokens per sequence over a KV cache (decoding), updating the
    cache; flash-attn's ``flash_attn_with_kvcache`` (the decode step of a serving engine).

    q: (batch, seqlen_q, heads_q, head_dim). k_cache, v_cache: contiguous, q's dtype, either
    (batch_cache, max_seqlen, heads_kv, head_dim), sequence b in row cache_batch_idx[b] (int32
    (batch,), repeats allowed; b when None), or paged: (num_blocks, block_size, heads_kv,
    head_dim) with block_table int32 (batch, max_blocks_per_seq), logical row r of sequence b
    in page block_table[b, r // block_size] at row r % block_size (any block size).
    cache_seqlens: int32 (batch,), where each cache's filled part ends; cache_leftpad: int32
    (batch,) or None, where it starts (left padding: rows before it are ignored).
    k, v: (batch, seqlen_new, heads_kv, head_dim) or None; if given they are written into the
    caches in place at rows [cache_seqlens[b], cache_seqlens[b] + seqlen_new) and attended to.
    rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) or None (needs k): k's token t is
    rotated to position cache_seqlens[b] + t before it is written, and q's the same when
    causal or windowed, else every q token to cache_seqlens[b] (as flash-attn); positions count
    from the cache's row 0, left padding included. rotary_interleaved: GPT-J pairs (True, flash-
    attn's default) or GPT-NeoX halves (False). cache_seqlens itself is not modified (the
    caller advances it). q attends to rows [cache_leftpad[b], cache_seqlens[b] + seqlen_new)
    exactly as ``attention`` would (causal, window_size, softcap and ALiBi as there, bottom-right
    aligned: q's last token at the last key). Returns out like q, or (out, lse (batch, heads_q,
    seqlen_q) float32) with return_lse. Not differentiable: with grad mode on, inputs that
    require grad are refused (a clear error, not a silent gradient of None).

    The host checks (rows that fit the cache, the rotary table and the pages; indices in
    range) read cache_seqlens and the index tensors once per tensor and version (the layers of
    one decode step share them: one sync per step), and are skipped while a CUDA graph is
    captured (there, rows that do not fit are not written). On the GPU one query token over a
    long cache splits the keys across programs and combines the partial results
    (flash-decoding), so a batch of one still fills the GPU.
    """
    op = "attention_with_kvcache"
    _precheck((q,), alibi_slopes, softmax_scale, op, ("q",))
    _check_causal(causal, op)
    window, cap = _window(window_size, op), _softcap(softcap, op)
    _check_flag(return_lse, "return_lse", op)
    _check_flag(rotary_interleaved, "rotary_interleaved", op)
    for t, name in ((k, "k"), (v, "v"), (rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin"),
                    (cache_batch_idx, "cache_batch_idx"), (cache_leftpad, "cache_leftpad"),
                    (block_table, "block_table")):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a float tensor, got {t.dtype}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()
    # the kernels read the rotary tables in float32 (a float32 table is used as it is)
    cos32, sin32 = (None if t is None else t.float().contiguous() for t in (rotary_cos, rotary_sin))
    index = dict(cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table)

    def kernel(q):
        out, lse = _ops.attention_with_kvcache.default(
            q.contiguous(), k_cache, v_cache, cache_seqlens, None if k is None else k.contiguous(),
            None if v is None else v.contiguous(), slopes, scale, causal, *window, cap, cos32, sin32,
            rotary_interleaved, cache_batch_idx, cache_leftpad, block_table)
        return (out, lse) if return_lse else out

    def ref(q):
        _check_cache_room(q, k_cache, cache_seqlens, k, cos32, causal, window, **index)
        return reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, rotary_cos=cos32,
                                                rotary_sin=sin32, rotary_interleaved=rotary_interleaved, **index,
                                                causal=causal, alibi_slopes=slopes, softmax_scale=scale,
                                                window_size=window, softcap=cap, return_lse=return_lse)

    return _dispatch.route("attention_with_kvcache", (q,), device=q.device, dtype=q.dtype,
                           torch_why=_dispatch.no_torch_op, shape_class=tuple, kernel=kernel, torch_fn=None,
                           reference=ref, check=lambda: _check_kvcache(q, k_cache, v_cache, cache_seqlens, k, v,
                                                                       alibi_slopes, softmax_scale, cos32, sin32,
                                                                       **index))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, alibi_slopes=None):
    """``torch.nn.functional.scaled_dot_product_attention`` on the fused kernel.

    Same signature and semantics: tensors are (batch, heads, seqlen, head_dim), ``is_causal`` is
    top-left aligned as in PyTorch. The extra ``alibi_slopes`` adds the ALiBi bias (as in
    ``attention``). Cases the kernel does not cover run PyTorch's own SDPA (with the ALiBi bias
    materialised into the mask when slopes are given), listed in ``SDPA_FALLBACKS``: an
    ``attn_mask``, ``dropout_p > 0``, ``is_causal`` with seqlen_q != seqlen_k (top-left alignment),
    head dims or dtypes the kernel does not take, a value head dim other than the query's, batch
    or heads that PyTorch would broadcast, ``scale <= 0`` and inputs that are not 4-D. Input
    PyTorch itself rejects gets PyTorch's error.
    """
    if not _sdpa_kernel_takes(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        if alibi_slopes is not None:
            if not isinstance(query, torch.Tensor) or query.dim() < 3:
                raise ValueError("scaled_dot_product_attention: alibi_slopes needs query as (..., heads, seqlen, "
                                 "head_dim)")
            batch = query.shape[0] if query.dim() == 4 else 1
            _check_slopes(alibi_slopes, batch, query.shape[-3], query.device, "scaled_dot_product_attention")
            if alibi_slopes.dim() == 2 and query.dim() != 4:
                raise ValueError("scaled_dot_product_attention: (batch, heads) alibi_slopes need a 4-D query")
            attn_mask = _alibi_mask(alibi_slopes, query, key, attn_mask, is_causal)
            is_causal = False
        kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return torch_impl.SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                    alibi_slopes=alibi_slopes, softmax_scale=scale)
    return out.transpose(1, 2)


def _sdpa_kernel_takes(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether the fused kernel computes exactly what PyTorch's SDPA would; anything else
    (including input PyTorch rejects, which then gets PyTorch's own error) falls back."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return False
    (b, hq, sq, d), (bk, hk, sk, dk) = query.shape, key.shape
    return (attn_mask is None and dropout_p == 0.0 and value.shape == key.shape  # same v head dim, no broadcast
            and bk == b and dk == d and d % 8 == 0 and 0 < d <= MAX_HEAD_DIM
            and hk > 0 and (hq == hk or (enable_gqa and hq % hk == 0))
            and not (is_causal and sq != sk)  # PyTorch's is_causal is top-left aligned
            and (scale is None or scale > 0)
            and query.dtype in _KERNEL_DTYPES and key.dtype == value.dtype == query.dtype
            and key.device == value.device == query.device)


# what scaled_dot_product_attention hands to PyTorch (mptkernels.info() prints it)
SDPA_FALLBACKS = ("attn_mask, dropout_p > 0, is_causal with seqlen_q != seqlen_k (top-left), "
                  f"head_dim % 8 or > {MAX_HEAD_DIM}, "
                  "dtypes other than fp32/fp16/bf16 (e.g. float64), v's head_dim != q's, broadcast batch or "
                  "heads, scale <= 0, not 4-D")


def _alibi_mask(slopes, query, key, attn_mask, is_causal):
    """The additive mask PyTorch's SDPA needs to reproduce ALiBi (+ its own mask and causal)."""
    bias = torch_impl.alibi_bias(slopes, query.shape[-2], key.shape[-2], causal_shift=0 if is_causal else None)
    if attn_mask is not None:
        bias = bias.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else bias + attn_mask
    return bias.to(query.dtype)


def _precheck(tensors, alibi_slopes, softmax_scale, op="attention", names=("q", "k", "v")):
    """What the public functions need before the op's own check (which the chosen
    implementation's path runs): 4-D tensors, slopes a tensor or None, a number of a scale."""
    for t, name in zip(tensors, names):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a (batch, seqlen, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if alibi_slopes is not None and not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"{op}: alibi_slopes must be a float32 tensor or None, got {type(alibi_slopes).__name__}")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{op}: softmax_scale must be a number, got {type(softmax_scale).__name__}")


def _check_causal(causal, op):
    _check_flag(causal, "causal", op)


def _check_flag(value, name, op):
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")


def _window(window_size, op):
    """window_size as the kernels take it: (left, right), ints >= -1 (-1: unbounded)."""
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int and \
            type(window_size[1]) is int and window_size[0] >= -1 and window_size[1] >= -1:
        return window_size  # the common case, without the ABC checks below (a decode step calls this per layer)
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"{op}: window_size must be (left, right), two ints >= -1 (-1: unbounded on that side), "
                         f"got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def _softcap(softcap, op):
    if type(softcap) is float and 0.0 <= softcap < math.inf:
        return softcap
    if (not isinstance(softcap, numbers.Real) or isinstance(softcap, bool) or not math.isfinite(softcap)
            or softcap < 0):
        raise ValueError(f"{op}: softcap must be a finite number >= 0 (0: no capping), got {softcap!r}")
    return float(softcap)


def _check(q, k, v, alibi_slopes, softmax_scale, op="attention", hint=LAYOUT_HINT, shape=lambda t: t.shape,
           names=("q", "k", "v"), kv_batch=True):
    """The checks every attention op shares; varlen passes its tensors with a batch dimension
    added (``shape`` gives the shapes to print, without it) and kvcache its caches as k, v."""
    for t, name in zip((q, k, v), names):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a (batch, seqlen, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a float tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    qs, ks, vs = (tuple(shape(t)) for t in (q, k, v))
    kn, vn = names[1:]
    if k.shape != v.shape:
        raise ValueError(f"{op}: {kn} {ks} and {vn} {vs} must have one shape ({hint})")
    b, _, hq, d = q.shape
    if (kv_batch and k.shape[0] != b) or k.shape[3] != d:
        what = "batch and head_dim" if len(qs) == 4 and kv_batch else "head_dim"  # varlen's have no batch dimension
        raise ValueError(f"{op}: {kn}/{vn} {ks} must match q {qs} in {what} ({hint})")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(f"{op}: heads_q ({hq}) must be a multiple of heads_kv ({k.shape[2]}), got q {qs}, "
                         f"{kn} {ks} ({hint})")
    if d % 8 or not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be a multiple of 8 up to {MAX_HEAD_DIM}, got {d} (q {qs}; {hint})")
    if alibi_slopes is not None:
        _check_slopes(alibi_slopes, b, hq, q.device, op, hint)
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"{op}: softmax_scale must be > 0, got {softmax_scale}")


def _check_slopes(alibi_slopes, b, hq, device, op="attention", hint=None):
    """hint: the layout of the op's tensors, for the shape error (None: the slopes of SDPA's
    fallback, whose tensors are in SDPA's own layout)."""
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
        raise TypeError(f"{op}: alibi_slopes must be a float32 tensor (mptkernels.ops.alibi_slopes "
                        f"gives MPT's), got {getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")
    if tuple(alibi_slopes.shape) not in ((hq,), (b, hq)):
        raise ValueError(f"{op}: alibi_slopes must have shape ({hq},) or ({b}, {hq}) (heads_q = {hq}), got "
                         f"{tuple(alibi_slopes.shape)}" + (f" ({hint})" if hint else ""))
    if alibi_slopes.device != device:
        raise ValueError(f"{op}: alibi_slopes is on {alibi_slopes.device} but q is on {device}")


def _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"attention_varlen: {name} must be a (total_tokens, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    for t, name in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1 or t.numel() < 1:
            raise TypeError(f"attention_varlen: {name} must be a 1-D int32 tensor of batch + 1 offsets, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != q.device:
            raise ValueError(f"attention_varlen: {name} is on {t.device} but q is on {q.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"attention_varlen: cu_seqlens_q has {cu_q.numel()} entries and cu_seqlens_k "
                         f"{cu_k.numel()}; both must be batch + 1")
    for m, name in ((max_q, "max_seqlen_q"), (max_k, "max_seqlen_k")):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"attention_varlen: {name} must be a non-negative int, got {m!r}")
    batch = cu_q.numel() - 1
    _check(q[None], k[None], v[None], None, softmax_scale, "attention_varlen", VARLEN_LAYOUT_HINT,
           shape=lambda t: t.shape[1:])
    if alibi_slopes is not None:
        _check_slopes(alibi_slopes, batch, q.shape[1], q.device, "attention_varlen", VARLEN_LAYOUT_HINT)


class _CheckedTensors:
    """Remembers the last few (tensor, arguments) pairs a host-side check passed, so a model
    that hands the same cu_seqlens / cache_seqlens tensor to each of its layers pays the
    device-to-host copy (a sync on the GPU) once per step, not once per layer. A tensor is
    the same while it is alive, at the same address and its version counter (bumped by every
    in-place write) has not moved; anything else is checked again."""

    def __init__(self, size=8):
        self.size, self.entries = size, []

    def seen(self, t, *args):
        key = (t._version, t.data_ptr(), args)
        return any(ref() is t and k == key for ref, k in self.entries)

    def add(self, t, *args):
        self.entries = [(weakref.ref(t), (t._version, t.data_ptr(), args))] + self.entries[:self.size - 1]


_checked = _CheckedTensors()


def _check_lengths(cu, total, max_len, name, max_name):
    if _checked.seen(cu, "varlen", total, max_len):
        return
    c = cu.tolist()
    lens = [b - a for a, b in zip(c, c[1:])]
    if c[0] != 0 or any(n < 0 for n in lens) or c[-1] > total:
        # more tokens than rows: often a tensor in another layout (its heads read as the rows)
        raise ValueError(f"attention_varlen: {name} must rise from 0 to at most {total} tokens, got {c}"
                         + (f" ({VARLEN_LAYOUT_HINT})" if c[-1] > total else ""))
    if lens and max(lens) > max_len:
        raise ValueError(f"attention_varlen: a sequence of {max(lens)} tokens in {name} exceeds "
                         f"{max_name} = {max_len}")
    _checked.add(cu, "varlen", total, max_len)


def _check_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale, rotary_cos=None,
                   rotary_sin=None, cache_batch_idx=None, cache_leftpad=None, block_table=None):
    op = "attention_with_kvcache"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a (batch, seqlen, heads, head_dim) tensor")
    paged = block_table is not None
    layout = "(num_blocks, block_size, heads_kv, head_dim)" if paged else "(batch, max_seqlen, heads_kv, head_dim)"
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a {layout} tensor")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is written in place)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ "
                         f"({KVCACHE_LAYOUT_HINT})")
    _check(q, k_cache, v_cache, alibi_slopes, softmax_scale, op, KVCACHE_LAYOUT_HINT,
           names=("q", "k_cache", "v_cache"), kv_batch=not paged and cache_batch_idx is None)
    b, hk, d = q.shape[0], k_cache.shape[2], q.shape[3]
    for t, name in ((cache_seqlens, "cache_seqlens"), (cache_batch_idx, "cache_batch_idx"),
                    (cache_leftpad, "cache_leftpad")):
        if t is None and name != "cache_seqlens":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (b,):
            raise TypeError(f"{op}: {name} must be an int32 ({b},) tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if paged:
        if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2
                or block_table.shape[0] != b):
            raise TypeError(f"{op}: block_table must be an int32 ({b}, max_blocks_per_seq) tensor, got "
                            f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                            f"{tuple(getattr(block_table, 'shape', ()))}")
        if block_table.device != q.device:
            raise ValueError(f"{op}: block_table is on {block_table.device} but q is on {q.device}")
        if cache_batch_idx is not None:
            raise ValueError(f"{op}: cache_batch_idx and block_table cannot be combined (a paged cache finds each "
                             f"sequence's rows through block_table)")
        if k_cache.shape[0] == 0 or k_cache.shape[1] == 0:
            raise ValueError(f"{op}: a paged k_cache needs at least one block of at least one row, got "
                             f"{tuple(k_cache.shape)}")
    elif cache_batch_idx is not None and k_cache.shape[0] == 0:
        raise ValueError(f"{op}: cache_batch_idx indexes an empty k_cache {tuple(k_cache.shape)}")
    if (k is None) != (v is None):
        raise ValueError(f"{op}: give both k and v, or neither")
    if k is not None:
        for t, name in ((k, "k"), (v, "v")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != b or t.shape[2] != hk or t.shape[3] != d:
                raise ValueError(f"{op}: {name} must be ({b}, seqlen_new, {hk}, {d}), got {tuple(t.shape)} "
                                 f"({KVCACHE_LAYOUT_HINT})")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{op}: {name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
        if k.shape != v.shape:
            raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{op}: give both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError(f"{op}: rotary_cos/rotary_sin rotate the new k (and q); they need k and v")
        for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
            if t.dim() != 2 or t.shape != rotary_cos.shape or not 0 < 2 * t.shape[1] <= d:
                raise ValueError(f"{op}: {name} must be (seqlen_ro, rotary_dim / 2) with rotary_dim <= head_dim "
                                 f"({d}), both of one shape, got {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if torch.is_grad_enabled():
        for t, name in ((q, "q"), (k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
            if t is not None and t.requires_grad:
                raise ValueError(f"{op}: {name} requires grad, but attention over a KV cache is for inference and "
                                 f"has no backward; call it under torch.no_grad() or torch.inference_mode() (or "
                                 f"use attention() / attention_varlen() to train)")


def _identity(t):
    return None if t is None else (id(t), t._version, t.data_ptr())


def _check_cache_room(q, k_cache, cache_seqlens, k, rotary_cos, causal, window, cache_batch_idx=None,
                      cache_leftpad=None, block_table=None):
    """The rows each sequence writes and reads against the cache, the pages, the rotary table
    and the index tensors (host reads: once per tensor and version, see _CheckedTensors)."""
    op = "attention_with_kvcache"
    new = 0 if k is None else k.shape[1]
    paged = block_table is not None
    rows = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    q_span = q.shape[1] if causal or tuple(window) != (-1, -1) else 1  # rotary positions of q's tokens
    ro = None if rotary_cos is None else rotary_cos.shape[0]
    key = ("kvcache", new, tuple(k_cache.shape), ro, q_span, _identity(cache_batch_idx), _identity(cache_leftpad),
           _identity(block_table))
    if _checked.seen(cache_seqlens, *key):
        return
    lens = cache_seqlens.tolist()
    pad = [0] * len(lens) if cache_leftpad is None else cache_leftpad.tolist()
    where = (f"the {block_table.shape[1]} pages of {k_cache.shape[1]} rows of block_table" if paged
             else f"the cache of {rows} rows")
    for i, n in enumerate(lens):
        if n < 0 or n + new > rows:
            raise ValueError(f"{op}: cache_seqlens[{i}] = {n} plus {new} new tokens does not fit {where}")
        if not 0 <= pad[i] <= n:
            raise ValueError(f"{op}: cache_leftpad[{i}] = {pad[i]} must be in [0, cache_seqlens[{i}] = {n}]")
        if ro is not None and n + max(new, q_span) > ro:
            raise ValueError(f"{op}: rotary_cos has {ro} rows, but cache_seqlens[{i}] = {n} puts tokens at rows up "
                             f"to {n + max(new, q_span) - 1}")
    if cache_batch_idx is not None:
        bad = [(i, c) for i, c in enumerate(cache_batch_idx.tolist()) if not 0 <= c < k_cache.shape[0]]
        if bad:
            raise ValueError(f"{op}: cache_batch_idx[{bad[0][0]}] = {bad[0][1]} is not a row of the cache "
                             f"[0, {k_cache.shape[0]})")
    if paged:
        table, bs = block_table.tolist(), k_cache.shape[1]
        writer = {}  # (page, row) -> the sequence writing it: the GPU's writes have no order
        for i, n in enumerate(lens):
            used = table[i][pad[i] // bs:(n + new + bs - 1) // bs]
            bad = [p for p in used if not 0 <= p < k_cache.shape[0]]
            if bad:
                raise ValueError(f"{op}: block_table[{i}] holds page {bad[0]}, outside the {k_cache.shape[0]} pages "
                                 f"of k_cache")
            for r in range(n, n + new):
                at = (table[i][r // bs], r % bs)
                if writer.setdefault(at, i) != i:
                    raise ValueError(f"{op}: sequences {writer[at]} and {i} both write row {at[1]} of page {at[0]} "
                                     f"(block_table); a page written by one call must belong to one sequence")
    _checked.add(cache_seqlens, *key)


# ---- the custom ops' checks (also run by the public functions) and fake kernels
def _check_contiguous(op, **tensors):
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous here")


def _check_options(op, causal, window_left, window_right, softcap):
    """The options every attention op takes, as the custom op receives them."""
    _check_causal(causal, op)
    _window((window_left, window_right), op)
    _softcap(softcap, op)


def _check_fwd(q, k, v, alibi_slopes, softmax_scale, causal, window_left=-1, window_right=-1, softcap=0.0):
    _check(q, k, v, alibi_slopes, softmax_scale)
    _check_options("attention", causal, window_left, window_right, softcap)
    _check_contiguous("attention", q=q, k=k, v=v, alibi_slopes=alibi_slopes)


def _check_grad_inputs(op, dout, q, out, lse, lse_shape, dlse):
    for t, name in ((dout, "dout"), (out, "out")):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} must have q's shape {tuple(q.shape)} and dtype {q.dtype} on {q.device}")
    for t, name in ((lse, "lse"), (dlse, "dlse")):
        if name == "dlse" and t is None:
            continue
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != lse_shape or t.dtype != torch.float32
                or t.device != q.device):
            raise ValueError(f"{op}: {name} must be a float32 {lse_shape} tensor on {q.device}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    _check_contiguous(op, dout=dout, out=out, lse=lse, dlse=dlse)


def _check_bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, causal, window_left=-1, window_right=-1,
               softcap=0.0, dlse=None):
    _check_fwd(q, k, v, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap)
    b, sq, hq, _ = q.shape
    _check_grad_inputs("attention (backward)", dout, q, out, lse, (b, hq, sq), dlse)


def _check_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale, causal, window_left=-1,
                      window_right=-1, softcap=0.0):
    _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale)
    _check_options("attention_varlen", causal, window_left, window_right, softcap)
    _check_contiguous("attention_varlen", q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                      alibi_slopes=alibi_slopes)


def _check_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale, causal,
                      window_left=-1, window_right=-1, softcap=0.0, dlse=None):
    _check_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale, causal, window_left,
                      window_right, softcap)
    _check_grad_inputs("attention_varlen (backward)", dout, q, out, lse, (q.shape[1], q.shape[0]), dlse)


def _varlen_lengths(q, k, cu_q, cu_k, max_q, max_k):
    """The packed lengths against the tensors and max_seqlen_* (read on the host: a sync on a GPU)."""
    _check_lengths(cu_q, q.shape[0], max_q, "cu_seqlens_q", "max_seqlen_q")
    _check_lengths(cu_k, k.shape[0], max_k, "cu_seqlens_k", "max_seqlen_k")


def _check_kvcache_op(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale, causal, window_left=-1,
                      window_right=-1, softcap=0.0, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
                      cache_batch_idx=None, cache_leftpad=None, block_table=None):
    op = "attention_with_kvcache"
    _check_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale, rotary_cos, rotary_sin,
                   cache_batch_idx, cache_leftpad, block_table)
    _check_options(op, causal, window_left, window_right, softcap)
    _check_flag(rotary_interleaved, "rotary_interleaved", op)
    for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32 here, got {t.dtype}")
    _check_contiguous(op, q=q, k=k, v=v, cache_seqlens=cache_seqlens, alibi_slopes=alibi_slopes,
                      rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
                      cache_leftpad=cache_leftpad, block_table=block_table)


def _kvcache_host_check(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale, causal, window_left=-1,
                        window_right=-1, softcap=0.0, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
                        cache_batch_idx=None, cache_leftpad=None, block_table=None):
    _check_cache_room(q, k_cache, cache_seqlens, k, rotary_cos, causal, (window_left, window_right), cache_batch_idx,
                      cache_leftpad, block_table)


def _fake_fwd(q, k, v, *rest):
    b, sq, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, sq), dtype=torch.float32)


def _fake_grads(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fake_varlen_fwd(q, k, v, *rest):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _attention_class(q, k):
    b, sq, hq, d = q.shape
    return (q.dtype, d, sq.bit_length(), k.shape[1].bit_length(), (b * hq).bit_length(), hq // max(k.shape[2], 1))


for _schema in (
        _dispatch.Schema("attention_fwd", check=_check_fwd, public_of=lambda a: "attention",
                         dtype_of=lambda a: a[0].dtype, shape_class=lambda a: _attention_class(a[0], a[1]) + a[4:],
                         fake=_fake_fwd),
        _dispatch.Schema("attention_bwd", check=_check_bwd, public_of=lambda a: "attention",
                         dtype_of=lambda a: a[1].dtype,
                         shape_class=lambda a: _attention_class(a[1], a[2]) + a[7:12] + (a[12] is not None,),
                         fake=_fake_grads),
        _dispatch.Schema("attention_varlen_fwd", check=_check_varlen_fwd, public_of=lambda a: "attention_varlen",
                         dtype_of=lambda a: a[0].dtype, shape_class=lambda a: (a[0].dtype,), fake=_fake_varlen_fwd,
                         host_check=lambda q, k, v, cu_q, cu_k, max_q, max_k, *rest: _varlen_lengths(
                             q, k, cu_q, cu_k, max_q, max_k)),
        _dispatch.Schema("attention_varlen_bwd", check=_check_varlen_bwd, public_of=lambda a: "attention_varlen",
                         dtype_of=lambda a: a[1].dtype, shape_class=lambda a: (a[1].dtype,), fake=_fake_grads,
                         host_check=lambda dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *rest: _varlen_lengths(
                             q, k, cu_q, cu_k, max_q, max_k)),
        _dispatch.Schema("attention_with_kvcache", check=_check_kvcache_op,
                         public_of=lambda a: "attention_with_kvcache", dtype_of=lambda a: a[0].dtype,
                         shape_class=lambda a: (a[0].dtype,), fake=_fake_fwd, host_check=_kvcache_host_check)):
    _dispatch.register(_schema)


# ---- autograd: the backwards are custom ops too, run under the forward's forcing
def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, *options = inputs  # softmax_scale, causal, window_left, window_right, softcap
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.options = options
    ctx.forced = _dispatch.forced_settings()


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    with _dispatch.restored(ctx.forced):
        dq, dk, dv = _ops.attention_bwd.default(dout.contiguous(), q, k, v, out, lse, alibi_slopes, *ctx.options,
                                                None if dlse is None else dlse.contiguous())
    return (dq, dk, dv) + (None,) * (3 + len(ctx.options))


torch.library.register_autograd("mptkernels::attention_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mptkernels attention: double backward is not supported; use "
                       "mptkernels.backend('reference') for it")


torch.library.register_autograd("mptkernels::attention_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.max_lens, ctx.options = (max_q, max_k), options
    ctx.forced = _dispatch.forced_settings()


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    with _dispatch.restored(ctx.forced):
        dq, dk, dv = _ops.attention_varlen_bwd.default(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                                       *ctx.max_lens, alibi_slopes, *ctx.options,
                                                       None if dlse is None else dlse.contiguous())
    return (dq, dk, dv) + (None,) * (5 + len(ctx.options))


torch.library.register_autograd("mptkernels::attention_varlen_fwd", _varlen_backward,
                                setup_context=_varlen_setup_context)
torch.library.register_autograd("mptkernels::attention_varlen_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
