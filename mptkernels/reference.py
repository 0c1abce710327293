"""Plain-PyTorch reference of every mptkernels op: the oracle for tests and docs.

Each function computes in float32 (float64 for float64 inputs) and rounds where the fused
kernels round, so a kernel's output can be compared with it at the dtype's rounding error.
Everything here is differentiable by autograd, which gives the reference gradients.
"""
from __future__ import annotations

import math

import torch

from .ops.tables import alibi_slopes, rotary_cos_sin  # noqa: F401  (the ops' input tables, shared)

# cast modes of the norms: how the weight meets the normalised value (see docs/ops.md)
CAST_MODES = ("torch", "llama", "gemma", "mpt")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm(x, weight, bias, eps, residual, cast, rms_norm):
    if cast not in CAST_MODES:
        raise ValueError(f"cast must be one of {CAST_MODES}, got {cast!r}")
    dtype, acc = x.dtype, _acc_dtype(x.dtype)
    # the pre-norm residual stream: summed in fp32, stored (and normalised) in x's dtype
    s = x if residual is None else (x.to(acc) + residual.to(acc)).to(dtype)
    h = s.to(acc)
    if rms_norm:
        xhat = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        xhat = (h - mean) * torch.rsqrt(var + eps)
    if cast == "mpt":  # MPT's LPLayerNorm: weight and bias rounded to the activation dtype
        weight = None if weight is None else weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if cast == "llama":  # normalise in fp32, cast, then multiply by the weight
        xhat = xhat.to(dtype).to(acc)
    y = xhat
    if weight is not None:
        y = y * (weight.to(acc) + (1.0 if cast == "gemma" else 0.0))
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(dtype)
    return y if residual is None else (y, s)


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None, *, cast="torch"):
    """LayerNorm over the last dim; with residual returns (norm(x + residual), x + residual)."""
    return _norm(x, weight, bias, eps, residual, cast, rms_norm=False)


def rms_norm(x, weight=None, eps=1e-6, residual=None, *, cast="torch"):
    """RMSNorm over the last dim; with residual returns (norm(x + residual), x + residual)."""
    return _norm(x, weight, None, eps, residual, cast, rms_norm=True)


def rotary_positions(batch: int, seqlen: int, seqlen_offsets, device) -> torch.Tensor:
    """(batch, seqlen) row of the cos/sin table used by each token."""
    pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
    if isinstance(seqlen_offsets, torch.Tensor):
        return pos + seqlen_offsets.to(device=device, dtype=torch.long).view(-1, 1)
    return pos + int(seqlen_offsets)


def apply_rotary(x, cos, sin, *, interleaved=False, seqlen_offsets=0):
    """Rotary embedding of x (batch, seqlen, heads, head_dim) with cos/sin (max_seqlen, rotary_dim/2)."""
    batch, seqlen = x.shape[0], x.shape[1]
    half = cos.shape[-1]
    rot = 2 * half
    acc = _acc_dtype(x.dtype)
    pos = rotary_positions(batch, seqlen, seqlen_offsets, x.device)
    c = cos.to(acc)[pos].unsqueeze(2)  # (batch, seqlen, 1, half)
    s = sin.to(acc)[pos].unsqueeze(2)
    xr = x[..., :rot].to(acc)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def visible(rel, causal=False, window_size=(-1, -1)):
    """Which keys a query sees, from rel = j - (i + Sk - Sq): the key's position relative to the
    query's own (bottom-right aligned). flash-attn's sliding window: keys with
    -left <= rel <= right, -1 meaning unbounded on that side; causal is right = 0."""
    left, right = window_size
    if causal:
        right = 0
    ok = torch.ones_like(rel, dtype=torch.bool)
    if right >= 0:
        ok &= rel <= right
    if left >= 0:
        ok &= rel >= -left
    return ok


def attention(q, k, v, *, causal=False, alibi_slopes=None, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
              return_lse=False):
    """softmax(softcap(q k^T * scale) + ALiBi bias + mask) v over (batch, seqlen, heads, head_dim) tensors.

    GQA: q has Hq heads, k/v Hk with Hq % Hk == 0 (q head h reads kv head h // (Hq // Hk)).
    Query i sits at key position i + Sk - Sq (bottom-right aligned); rel = j - that is the
    key's relative position. softcap > 0 caps the scaled scores: softcap * tanh(s / softcap)
    (Gemma 2), before the bias. The ALiBi bias is -slope * |rel| (flash-attn's and
    llm-foundry's; with causal masking, slope * rel as in MPT). The mask keeps ``visible``
    keys (causal, sliding window). A row that sees no key returns zeros (lse -inf).
    Computed in float32 (float64 for float64 inputs), out rounded to q's dtype.
    """
    batch, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    acc = _acc_dtype(q.dtype)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qf = q.to(acc).transpose(1, 2)  # (B, Hq, Sq, D)
    kf = k.to(acc).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    vf = v.to(acc).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale  # (B, Hq, Sq, Sk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    rel = torch.arange(sk, device=q.device).view(1, -1) - torch.arange(sq, device=q.device).view(-1, 1) - (sk - sq)
    if alibi_slopes is not None:
        shape = (batch, hq, 1, 1) if alibi_slopes.dim() == 2 else (1, hq, 1, 1)
        scores = scores - alibi_slopes.to(acc).view(shape) * rel.abs().to(acc)
    scores = scores.masked_fill(~visible(rel, causal, window_size), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Sq); -inf where no key is visible
    p = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    out = (p @ vf).transpose(1, 2).to(q.dtype)
    return (out, lse.float()) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, alibi_slopes=None, softmax_scale=None,
                     window_size=(-1, -1), softcap=0.0, return_lse=False):
    """``attention`` of each packed sequence on its own: q (total_q, Hq, D), k/v (total_k, Hk, D),
    sequence b is rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q (and the same of k/v by
    cu_seqlens_k); alibi_slopes (Hq,) or (B, Hq). Rows after the last sequence get zeros
    (lse -inf). lse is (Hq, total_q)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, lse = attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                           causal=causal, alibi_slopes=slopes, softmax_scale=softmax_scale, window_size=window_size,
                           softcap=softcap, return_lse=True)
        outs.append(o[0])
        lses.append(lse[0])
    rest = q.shape[0] - cq[-1]
    outs.append(q.new_zeros((rest,) + q.shape[1:]))
    lses.append(torch.full((q.shape[1], rest), float("-inf"), device=q.device))
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def cache_rows(b, rows, cache_batch_idx=None, block_table=None, block_size=None):
    """Where the logical cache rows ``rows`` (a list) of sequence b live: (index of dim 0, index
    of dim 1) of the cache tensors. Contiguous caches: row r of batch row cache_batch_idx[b]
    (b without it); paged caches (block_table): row r % block_size of page block_table[b, r // block_size]."""
    r = torch.as_tensor(rows, dtype=torch.long)
    if block_table is not None:
        return block_table[b].long().cpu()[r // block_size], r % block_size
    cb = b if cache_batch_idx is None else int(cache_batch_idx[b])
    return torch.full_like(r, cb), r


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=None, v=None, *, rotary_cos=None, rotary_sin=None,
                           rotary_interleaved=False, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                           causal=True, alibi_slopes=None, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                           return_lse=False):
    """flash-attn's ``flash_attn_with_kvcache``. Sequence b's cache is rows [cache_leftpad[b]
    (0), cache_seqlens[b]) of batch row cache_batch_idx[b] (b) of the caches, or, paged, of the
    pages block_table[b] (caches (num_blocks, block_size, Hk, D)). With rotary_cos/sin, k (new)
    token t is rotated to position cache_seqlens[b] + t, and q the same when causal or windowed
    (else every q token to cache_seqlens[b]). The new k, v are written at rows cache_seqlens[b]
    + t (all writes first); then q (B, Sq, Hq, D) attends to its rows [leftpad, cache_seqlens[b]
    + Sn) as ``attention`` would. lse (B, Hq, Sq)."""
    lens = cache_seqlens.tolist()
    b_all, sq, hq, d = q.shape
    sn = 0 if k is None else k.shape[1]
    bs = k_cache.shape[1] if block_table is not None else None
    if rotary_cos is not None:
        k = apply_rotary(k, rotary_cos, rotary_sin, interleaved=rotary_interleaved, seqlen_offsets=cache_seqlens)
        if causal or tuple(window_size) != (-1, -1):
            q = apply_rotary(q, rotary_cos, rotary_sin, interleaved=rotary_interleaved, seqlen_offsets=cache_seqlens)
        else:  # every query token at the position of the first new token
            q = apply_rotary(q.reshape(b_all, 1, sq * hq, d), rotary_cos, rotary_sin, interleaved=rotary_interleaved,
                             seqlen_offsets=cache_seqlens).reshape(q.shape)
    for b, n in enumerate(lens):
        if sn:
            pages, rows = cache_rows(b, list(range(n, n + sn)), cache_batch_idx, block_table, bs)
            k_cache[pages, rows] = k[b]
            v_cache[pages, rows] = v[b]
    outs, lses = [], []
    for b, n in enumerate(lens):
        start = 0 if cache_leftpad is None else int(cache_leftpad[b])
        pages, rows = cache_rows(b, list(range(start, n + sn)), cache_batch_idx, block_table, bs)
        slopes = alibi_slopes[b:b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, lse = attention(q[b:b + 1], k_cache[pages, rows][None], v_cache[pages, rows][None], causal=causal,
                           alibi_slopes=slopes, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                           return_lse=True)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs) if outs else torch.empty_like(q)
    lse = torch.cat(lses) if lses else q.new_empty((0, hq, sq), dtype=torch.float32)
    return (out, lse) if return_lse else out


# ---- GEMM family: linear with an activation, int8 quantisation and int8 linears
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")


def activation(h, name):
    """The activations of ``linear``: None, "relu", "gelu" (exact erf, MPT's FFN), "gelu_tanh"."""
    if name is None or name == "none":
        return h
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return torch.nn.functional.gelu(h)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_grad(dout, h, name):
    """d(loss)/dh of ``activation(h, name)`` given d(loss)/d(output) = dout, in fp32 maths
    (fp64 for fp64), returned in dout's dtype (the closed forms, so it traces without autograd).
    For relu, h may also be the activation's output (the same sign)."""
    if name is None or name == "none":
        return dout
    acc = _acc_dtype(dout.dtype)
    hf, df = h.to(acc), dout.to(acc)
    if name == "relu":
        return (df * (hf > 0)).to(dout.dtype)
    if name == "gelu":  # Phi(h) + h * phi(h)
        d = 0.5 * (1.0 + torch.erf(hf * 0.7071067811865476)) + hf * torch.exp(-0.5 * hf * hf) * 0.3989422804014327
    elif name == "gelu_tanh":
        u = 0.7978845608028654 * (hf + 0.044715 * hf * hf * hf)
        t = torch.tanh(u)
        d = 0.5 * (1.0 + t) + 0.5 * hf * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * hf * hf)
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return (df * d).to(dout.dtype)


def linear(x, weight, bias=None, activation_name=None):
    """act(x @ weight^T + bias), computed in float32 (float64 for float64), rounded to x's dtype."""
    acc = _acc_dtype(x.dtype)
    h = torch.nn.functional.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return activation(h, activation_name).to(x.dtype)


def quantize_rowwise(x):
    """(x_int8, scale): scale = absmax of each row (last dim) / 127 in float32 (1 for an all-zero
    row, and for a row holding NaN); x_int8 = round-half-to-even(x / scale) clamped to
    [-127, 127], NaN elements 0."""
    xf = x.float()
    # an empty row (K = 0) has absmax 0, so scale 1 (amax refuses an empty dim)
    absmax = xf.abs().amax(dim=-1) if x.shape[-1] else xf.new_zeros(x.shape[:-1])
    # a tensor divisor: CUDA divides by a Python number through its reciprocal (not IEEE division)
    scale = torch.where(absmax > 0, absmax / torch.full_like(absmax, 127.0), torch.ones_like(absmax))
    # a NaN element becomes 0 (its row's absmax is NaN, so the row gets scale 1): casting NaN
    # to int8 is undefined, so say it
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).nan_to_num_(0.0).to(torch.int8)
    return q, scale


def int8_mm(a, b):
    """a (M, K) int8 @ b (N, K)^T int8, exact, as int32 (in float64: exact while every partial
    sum stays below 2**53, i.e. K < 5e11; CUDA has no int64 matmul)."""
    return (a.double() @ b.double().t()).to(torch.int32)


def dequantize(w_int8, w_scale):
    """The float32 weight that (w_int8, w_scale) = quantize_rowwise(weight) stands for."""
    return w_int8.float() * w_scale.float().unsqueeze(1)


def int8_linear(x, w_int8, w_scale, bias=None, activation_name=None):
    """W8A8: x quantised per row, the int8 product, then act(acc * x_scale * w_scale + bias).
    Gradient in x straight-through the rounding: that of x @ (w_int8 * w_scale[:, None])^T."""
    shape = x.shape
    x2 = x.reshape(math.prod(shape[:-1]), shape[-1])  # not reshape(-1, K): ambiguous for K = 0
    xq, xs = quantize_rowwise(x2.detach())
    acc = int8_mm(xq, w_int8).float() * xs.unsqueeze(1) * w_scale.float().unsqueeze(0)
    if x.requires_grad and torch.is_grad_enabled():
        # adds exactly zero to the value (finite x); carries the straight-through gradient
        xf = x2.float()
        acc = acc + (xf - xf.detach()) @ dequantize(w_int8, w_scale).t()
    if bias is not None:
        acc = acc + bias.float()
    return activation(acc, activation_name).to(x.dtype).reshape(*shape[:-1], w_int8.shape[0])


def weight_only_int8_linear(x, w_int8, w_scale, bias=None):
    """x @ (w_int8 * w_scale[:, None])^T + bias in float32, rounded to x's dtype."""
    out = torch.nn.functional.linear(x.float(), dequantize(w_int8, w_scale), None if bias is None else bias.float())
    return out.to(x.dtype)


# ---- GLU family: the gated activations of the FFN
def swiglu(gate, up):
    """silu(gate) * up in float32 (float64 for float64), rounded once to gate's dtype."""
    acc = _acc_dtype(gate.dtype)
    return (torch.nn.functional.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def geglu(gate, up, approximate="none"):
    """gelu(gate, approximate) * up ("none": exact erf; "tanh") in float32 (float64 for float64),
    rounded once to gate's dtype."""
    acc = _acc_dtype(gate.dtype)
    return (torch.nn.functional.gelu(gate.to(acc), approximate=approximate) * up.to(acc)).to(gate.dtype)
# ---- cross_entropy family
REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         logit_softcap=None, z_loss=0.0):
    """The unfused loss: logits = x @ weight^T + bias in float32 (float64 for float64), then
    s = c * tanh(logits / c) (logit_softcap c, None: s = logits), lse = logsumexp(s) and per row
    ``lse - (1 - eps) s[t] - eps / V * sum(s) + z_loss * lse^2`` (eps = label_smoothing: F.cross_entropy's
    smoothing; z_loss: PaLM's), 0 where target == ignore_index; "mean" over the rows not ignored
    (NaN when every row is: F.cross_entropy's 0 / 0), "sum", or "none" (target's shape). Returned in
    float32 (float64 for float64 x); autograd gives the reference gradients in the inputs' dtypes."""
    acc = _acc_dtype(x.dtype)
    V = weight.shape[0]
    z = torch.nn.functional.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    z = z.reshape(-1, V)
    t = target.reshape(-1)
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    lse = torch.logsumexp(z, -1)
    valid = t != ignore_index
    s_t = z.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    eps = label_smoothing
    loss = lse - (1.0 - eps) * s_t - (eps / V) * z.sum(-1) + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return loss.sum() / valid.sum()
