"""Fused attention (causal, ALiBi, GQA, packed sequences, KV-cache decoding): the Python API.

Custom ops ``torch.ops.mptkernels.attention_fwd`` / ``attention_bwd``, ``attention_varlen_fwd`` /
``_bwd`` and ``attention_with_kvcache`` (schemas in csrc/registration.cpp). Their
implementations (C++ CPU, Triton; PyTorch's F.scaled_dot_product_attention at the level of
``attention``) and the choice between them are in mptkernels/_dispatch.py; this module checks
arguments, gives the fake kernels and the autograd.
"""
from __future__ import annotations

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


def attention(q, k, v, *, causal=False, alibi_slopes=None, softmax_scale=None, deterministic=False):
    """softmax(q k^T * softmax_scale + ALiBi + mask) v, fused (no seqlen x seqlen matrix in memory).

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim) with
    heads_q % heads_kv == 0 (GQA/MQA: q head h reads kv head h // (heads_q // heads_kv)).
    head_dim: a multiple of 8 up to 256. softmax_scale defaults to head_dim ** -0.5.
    alibi_slopes: None, or float32 (heads_q,) or (batch, heads_q); query i and key j get
    ``slope * (j - i - (seqlen_k - seqlen_q))`` added (MPT's bias; with causal masking it is
    -slope * distance). causal: query i sees keys j <= i + seqlen_k - seqlen_q (bottom-right
    aligned, as new tokens attending to a cache). A query that sees no key returns zeros.
    Differentiable in q, k, v. The backward is deterministic on every kernel (each output
    gradient has one owner, no atomics), so ``deterministic`` is accepted and always holds.
    """
    _precheck((q, k, v), alibi_slopes, softmax_scale)
    _check_causal(causal, "attention")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()

    def kernel(q, k, v):
        return _ops.attention_fwd.default(q.contiguous(), k.contiguous(), v.contiguous(), slopes, scale, causal)[0]

    def torch_fn(q, k, v):
        return torch_impl.attention(q, k, v, causal, slopes, scale)

    def ref(q, k, v):
        return reference.attention(q, k, v, causal=causal, alibi_slopes=slopes, softmax_scale=scale)

    b, sq, hq, d = q.shape
    return _dispatch.route("attention", (q, k, v), device=q.device, dtype=q.dtype,
                           torch_why=lambda: torch_impl.covers_attention(q, k, causal),
                           shape_class=lambda: (q.dtype, d, sq.bit_length(), k.shape[1].bit_length(),
                                                (b * hq).bit_length(), hq // k.shape[2], causal, slopes is not None),
                           kernel=kernel, torch_fn=torch_fn, reference=ref,
                           check=lambda: _check(q, k, v, alibi_slopes, softmax_scale))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     alibi_slopes=None, softmax_scale=None, deterministic=False):
    """``attention`` over sequences packed along one token dimension (no padding).

    q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim). cu_seqlens_q/_k:
    int32 (batch + 1,) cumulative lengths from 0: sequence b is rows
    [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and the same of k, v by cu_seqlens_k; no token
    attends across a sequence boundary. max_seqlen_q/_k: the longest sequence (the GPU grid
    is sized by it; a longer one is an error, checked on the host once per cu_seqlens tensor
    and version, so layers sharing one tensor pay one sync, and not while a CUDA graph is
    being captured). alibi_slopes: (heads_q,) or (batch, heads_q) float32. causal and the
    ALiBi bias are per sequence (bottom-right aligned when its q and k lengths differ). Rows
    after cu_seqlens_q[-1] belong to no sequence and return zeros. Differentiable in q, k, v;
    the backward is deterministic (see ``attention``).
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, softmax_scale)
    _check_causal(causal, "attention_varlen")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)

    def kernel(q, k, v):
        return _ops.attention_varlen_fwd.default(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q,
                                                 cu_seqlens_k,
                                         max_q, max_k, slopes, scale, causal)[0]

    def ref(q, k, v):
        # the kernels' length checks, so every implementation refuses the same input
        _varlen_lengths(q, k, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
        return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, alibi_slopes=slopes,
                                          softmax_scale=scale)

    return _dispatch.route("attention_varlen", (q, k, v), device=q.device, dtype=q.dtype,
                           torch_why=_dispatch.no_torch_op, shape_class=tuple, kernel=kernel, torch_fn=None,
                           reference=ref)


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, causal=True, alibi_slopes=None,
                           softmax_scale=None):
    """Attention of a few new tokens per sequence over a KV cache (decoding), updating the cache.

    q: (batch, seqlen_q, heads_q, head_dim). k_cache, v_cache: (batch, max_seqlen, heads_kv,
    head_dim), contiguous, q's dtype. cache_seqlens: int32 (batch,), the rows of each cache
    already filled. k, v: (batch, seqlen_new, heads_kv, head_dim) or None; if given they are
    written into the caches in place at rows [cache_seqlens[b], cache_seqlens[b] + seqlen_new)
    and attended to. cache_seqlens itself is not modified (the caller advances it). q attends
    over the first cache_seqlens[b] + seqlen_new rows of its cache exactly as ``attention``
    would (causal bottom-right aligned: query i of seqlen_q sees the cache and the new keys up
    to its own position; ALiBi by the same formula). Returns out like q. Not differentiable:
    with grad mode on, inputs that require grad are refused (a clear error, not a silent
    gradient of None).

    Caches too short for the new tokens raise; the check reads cache_seqlens on the host once
    per tensor and version (the layers of one decode step share it: one sync per step), and
    is skipped while a CUDA graph is captured (there, rows that do not fit are not written).
    On the GPU one query token over a long cache splits the keys across programs and combines
    the partial results (flash-decoding), so a batch of one still fills the GPU.
    """
    _precheck((q,), alibi_slopes, softmax_scale, "attention_with_kvcache", ("q",))
    _check_causal(causal, "attention_with_kvcache")
    for t, name in ((k, "k"), (v, "v")):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"attention_with_kvcache: {name} must be a tensor or None, got {type(t).__name__}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()

    def kernel(q):
        return _ops.attention_with_kvcache.default(q.contiguous(), k_cache, v_cache, cache_seqlens,
                                           None if k is None else k.contiguous(), None if v is None else v.contiguous(),
                                           slopes, scale, causal)

    def ref(q):
        _check_cache_room(k_cache, cache_seqlens, k)
        return reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, causal=causal,
                                                alibi_slopes=slopes, softmax_scale=scale)

    return _dispatch.route("attention_with_kvcache", (q,), device=q.device, dtype=q.dtype,
                           torch_why=_dispatch.no_torch_op, shape_class=tuple, kernel=kernel, torch_fn=None,
                           reference=ref, check=lambda: _check_kvcache(q, k_cache, v_cache, cache_seqlens, k, v,
                                                                       alibi_slopes, softmax_scale))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, alibi_slopes=None):
    """``torch.nn.functional.scaled_dot_product_attention`` on the fused kernel.

    Same signature and semantics: tensors are (batch, heads, seqlen, head_dim), ``is_causal`` is
    top-left aligned as in PyTorch. The extra ``alibi_slopes`` adds MPT's bias (as in
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
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be True or False, got {causal!r}")


def _check(q, k, v, alibi_slopes, softmax_scale, op="attention", hint=LAYOUT_HINT, shape=lambda t: t.shape,
           names=("q", "k", "v")):
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
    if k.shape[0] != b or k.shape[3] != d:
        what = "batch and head_dim" if len(qs) == 4 else "head_dim"  # varlen's have no batch dimension
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


def _check_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale):
    op = "attention_with_kvcache"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a (batch, seqlen, heads, head_dim) tensor")
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a (batch, max_seqlen, heads_kv, head_dim) tensor")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is written in place)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ "
                         f"({KVCACHE_LAYOUT_HINT})")
    _check(q, k_cache, v_cache, alibi_slopes, softmax_scale, op, KVCACHE_LAYOUT_HINT,
           names=("q", "k_cache", "v_cache"))
    b, hk, d = q.shape[0], k_cache.shape[2], q.shape[3]
    if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32
            or tuple(cache_seqlens.shape) != (b,)):
        raise TypeError(f"{op}: cache_seqlens must be an int32 ({b},) tensor, got "
                        f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)} "
                        f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"{op}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
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
    if torch.is_grad_enabled():
        for t, name in ((q, "q"), (k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
            if t is not None and t.requires_grad:
                raise ValueError(f"{op}: {name} requires grad, but attention over a KV cache is for inference and "
                                 f"has no backward; call it under torch.no_grad() or torch.inference_mode() (or "
                                 f"use attention() / attention_varlen() to train)")


def _check_cache_room(k_cache, cache_seqlens, k):
    new = 0 if k is None else k.shape[1]
    if _checked.seen(cache_seqlens, "kvcache", new, k_cache.shape[1]):
        return
    lens = cache_seqlens.tolist()
    for i, n in enumerate(lens):
        if n < 0 or n + new > k_cache.shape[1]:
            raise ValueError(f"attention_with_kvcache: cache_seqlens[{i}] = {n} plus {new} new tokens does not fit "
                             f"the cache of {k_cache.shape[1]} rows")
    _checked.add(cache_seqlens, "kvcache", new, k_cache.shape[1])


# ---- the custom ops' checks (also run by the public functions) and fake kernels
def _check_contiguous(op, **tensors):
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous here")


def _check_fwd(q, k, v, alibi_slopes, softmax_scale, causal):
    _check(q, k, v, alibi_slopes, softmax_scale)
    _check_contiguous("attention", q=q, k=k, v=v, alibi_slopes=alibi_slopes)


def _check_grad_inputs(op, dout, q, out, lse, lse_shape):
    for t, name in ((dout, "dout"), (out, "out")):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} must have q's shape {tuple(q.shape)} and dtype {q.dtype} on {q.device}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != lse_shape or lse.dtype != torch.float32:
        raise ValueError(f"{op}: lse must be a float32 {lse_shape} tensor, got "
                         f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")
    _check_contiguous(op, dout=dout, out=out, lse=lse)


def _check_bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, causal):
    _check_fwd(q, k, v, alibi_slopes, softmax_scale, causal)
    b, sq, hq, _ = q.shape
    _check_grad_inputs("attention (backward)", dout, q, out, lse, (b, hq, sq))


def _check_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale, causal):
    _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale)
    _check_contiguous("attention_varlen", q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                      alibi_slopes=alibi_slopes)


def _check_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale, causal):
    _check_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale, causal)
    _check_grad_inputs("attention_varlen (backward)", dout, q, out, lse, (q.shape[1], q.shape[0]))


def _varlen_lengths(q, k, cu_q, cu_k, max_q, max_k):
    """The packed lengths against the tensors and max_seqlen_* (read on the host: a sync on a GPU)."""
    _check_lengths(cu_q, q.shape[0], max_q, "cu_seqlens_q", "max_seqlen_q")
    _check_lengths(cu_k, k.shape[0], max_k, "cu_seqlens_k", "max_seqlen_k")


def _check_kvcache_op(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale, causal):
    _check_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale)
    _check_contiguous("attention_with_kvcache", q=q, k=k, v=v, cache_seqlens=cache_seqlens, alibi_slopes=alibi_slopes)


def _fake_fwd(q, k, v, alibi_slopes, softmax_scale, causal):
    b, sq, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, sq), dtype=torch.float32)


def _fake_grads(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fake_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, softmax_scale,
                     causal):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _fake_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, alibi_slopes, softmax_scale, causal):
    return torch.empty_like(q)


def _attention_class(q, k):
    b, sq, hq, d = q.shape
    return (q.dtype, d, sq.bit_length(), k.shape[1].bit_length(), (b * hq).bit_length(), hq // max(k.shape[2], 1))


for _schema in (
        _dispatch.Schema("attention_fwd", check=_check_fwd, public_of=lambda a: "attention",
                         dtype_of=lambda a: a[0].dtype, shape_class=lambda a: _attention_class(a[0], a[1]) + a[4:],
                         fake=_fake_fwd),
        _dispatch.Schema("attention_bwd", check=_check_bwd, public_of=lambda a: "attention",
                         dtype_of=lambda a: a[1].dtype, shape_class=lambda a: _attention_class(a[1], a[2]) + a[7:],
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
                         shape_class=lambda a: (a[0].dtype,), fake=_fake_kvcache,
                         host_check=lambda q, kc, vc, lens, k, *rest: _check_cache_room(kc, lens, k))):
    _dispatch.register(_schema)


# ---- autograd: the backwards are custom ops too, run under the forward's forcing
def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.flags = (softmax_scale, causal)
    ctx.forced = _dispatch.forced_settings()


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    softmax_scale, causal = ctx.flags
    with _dispatch.restored(ctx.forced):
        dq, dk, dv = _ops.attention_bwd.default(dout.contiguous(), q, k, v, out, lse, alibi_slopes, softmax_scale,
                                                causal)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("mptkernels::attention_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mptkernels attention: double backward is not supported; use "
                       "mptkernels.backend('reference') for it")


torch.library.register_autograd("mptkernels::attention_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.flags = (max_q, max_k, softmax_scale, causal)
    ctx.forced = _dispatch.forced_settings()


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    max_q, max_k, softmax_scale, causal = ctx.flags
    with _dispatch.restored(ctx.forced):
        dq, dk, dv = _ops.attention_varlen_bwd.default(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                               alibi_slopes, softmax_scale, causal)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("mptkernels::attention_varlen_fwd", _varlen_backward,
                                setup_context=_varlen_setup_context)
torch.library.register_autograd("mptkernels::attention_varlen_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
