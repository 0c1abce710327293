"""Fused attention (causal, ALiBi, GQA): the Python API of the family.

``torch.ops.mptkernels.attention_fwd`` / ``attention_bwd`` (schemas in csrc/registration.cpp)
have a C++ CPU kernel (csrc/cpu/attention.cpp). On CUDA the Triton kernels run when they are
available; until then CUDA tensors take the reference path (mptkernels.info() says which).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from .. import _backend, reference

_ops = torch.ops.mptkernels
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def attention(q, k, v, *, causal=False, alibi_slopes=None, softmax_scale=None, deterministic=False):
    """softmax(q k^T * softmax_scale + ALiBi + mask) v, fused (no seqlen x seqlen matrix in memory).

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim) with
    heads_q % heads_kv == 0 (GQA/MQA: q head h reads kv head h // (heads_q // heads_kv)).
    head_dim: a multiple of 8 up to 256. softmax_scale defaults to head_dim ** -0.5.
    alibi_slopes: None, or float32 (heads_q,) or (batch, heads_q); query i and key j get
    ``slope * (j - i - (seqlen_k - seqlen_q))`` added (MPT's bias; with causal masking it is
    -slope * distance). causal: query i sees keys j <= i + seqlen_k - seqlen_q (bottom-right
    aligned, as new tokens attending to a cache). A query that sees no key returns zeros.
    Differentiable in q, k, v. The backward is deterministic on every backend (each output
    gradient has one owner, no atomics), so ``deterministic`` is accepted and always holds.
    """
    _check(q, k, v, alibi_slopes, softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()
    if q.dtype not in _KERNEL_DTYPES or _backend.use_reference(q.device, has_kernel=_has_gpu_kernel()):
        return reference.attention(q, k, v, causal=causal, alibi_slopes=slopes, softmax_scale=scale)
    out, _ = _ops.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), slopes, scale, causal)
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, alibi_slopes=None):
    """``torch.nn.functional.scaled_dot_product_attention`` on the fused kernel.

    Same signature and semantics: tensors are (batch, heads, seqlen, head_dim), ``is_causal`` is
    top-left aligned as in PyTorch. The extra ``alibi_slopes`` adds MPT's bias (as in
    ``attention``). Cases the kernel does not cover run PyTorch's own SDPA (with the ALiBi bias
    materialised into the mask when slopes are given), listed in ``SDPA_FALLBACKS``: an
    ``attn_mask``, ``dropout_p > 0``, ``is_causal`` with seqlen_q != seqlen_k (top-left alignment),
    and head dims or dtypes the kernel does not take.
    """
    hq, hk = query.shape[-3], key.shape[-3]
    d = query.shape[-1]
    fallback = (attn_mask is not None or dropout_p > 0.0 or query.dim() != 4
                or (is_causal and query.shape[-2] != key.shape[-2]) or d % 8 or d > MAX_HEAD_DIM
                or query.dtype not in _KERNEL_DTYPES or (hq != hk and not enable_gqa))
    if fallback:
        if alibi_slopes is not None:
            attn_mask = _alibi_mask(alibi_slopes, query, key, attn_mask, is_causal)
            is_causal = False
        kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                    alibi_slopes=alibi_slopes, softmax_scale=scale)
    return out.transpose(1, 2)


# what scaled_dot_product_attention hands to PyTorch (mptkernels.info() prints it)
SDPA_FALLBACKS = "attn_mask, dropout_p > 0, is_causal with seqlen_q != seqlen_k (top-left), head_dim % 8 or > 256"


def _alibi_mask(slopes, query, key, attn_mask, is_causal):
    """The additive mask PyTorch's SDPA needs to reproduce ALiBi (+ its own mask and causal)."""
    sq, sk = query.shape[-2], key.shape[-2]
    i = torch.arange(sq, device=query.device).view(-1, 1)
    j = torch.arange(sk, device=query.device).view(1, -1)
    shape = (-1, slopes.shape[-1], 1, 1) if slopes.dim() == 2 else (slopes.shape[-1], 1, 1)
    bias = slopes.view(shape).float() * (j - i - (sk - sq)).float()
    if is_causal:  # PyTorch's is_causal: top-left aligned
        bias = bias.masked_fill(j > i, float("-inf"))
    if attn_mask is not None:
        bias = bias.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else bias + attn_mask
    return bias.to(query.dtype)


def _check(q, k, v, alibi_slopes, softmax_scale):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a (batch, seqlen, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a float tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    b, _, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(f"attention: heads_q ({hq}) must be a multiple of heads_kv ({k.shape[2]})")
    if d % 8 or not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim must be a multiple of 8 up to {MAX_HEAD_DIM}, got {d}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError("attention: alibi_slopes must be a float32 tensor (mptkernels.ops.alibi_slopes "
                            f"gives MPT's), got {getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")
        if tuple(alibi_slopes.shape) not in ((hq,), (b, hq)):
            raise ValueError(f"attention: alibi_slopes must have shape ({hq},) or ({b}, {hq}), got "
                             f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"attention: alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"attention: softmax_scale must be > 0, got {softmax_scale}")


@functools.lru_cache(maxsize=None)
def _triton_attention():
    """mptkernels.triton.attention when it exists and can launch, else None."""
    from ..triton import available

    if not available() or importlib.util.find_spec("mptkernels.triton.attention") is None:
        return None
    return importlib.import_module("mptkernels.triton.attention")


def _has_gpu_kernel() -> bool:
    return _triton_attention() is not None


# ---- fake kernels
@torch.library.register_fake("mptkernels::attention_fwd")
def _(q, k, v, alibi_slopes, softmax_scale, causal):
    b, sq, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.register_fake("mptkernels::attention_bwd")
def _(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ---- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.flags = (softmax_scale, causal)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    softmax_scale, causal = ctx.flags
    dq, dk, dv = _ops.attention_bwd(dout.contiguous(), q, k, v, out, lse, alibi_slopes, softmax_scale, causal)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("mptkernels::attention_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mptkernels attention: double backward is not supported; use "
                       "mptkernels.backend('reference') for it")


torch.library.register_autograd("mptkernels::attention_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- CUDA: the Triton kernels
@torch.library.register_kernel("mptkernels::attention_fwd", "cuda")
def _(q, k, v, alibi_slopes, softmax_scale, causal):
    return _triton_attention().attention_fwd(q, k, v, alibi_slopes, softmax_scale, causal)


@torch.library.register_kernel("mptkernels::attention_bwd", "cuda")
def _(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, causal):
    return _triton_attention().attention_bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, causal)
