"""The ``torch`` implementation of each public op: PyTorch's own ops, called the way a model
that does not use mptkernels calls them, with PyTorch's autograd. It is what ``auto`` must
never be slower than (on a GPU it is timed against our kernels per shape class) and what
``backend("torch")`` forces, so a benchmark can compare both through one function.

Each op has ``<op>(...)`` (the public op's arguments, already checked by mptkernels.ops) and
``covers_<op>(...)``: None when PyTorch's op computes exactly this call, else why not (the
dispatcher asks it; an op PyTorch does not have is not here at all, see _dispatch.TABLE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.activations import activation

# PyTorch's own SDPA, kept at import: mptkernels.patch may route F.scaled_dot_product_attention
# to ours while a model runs, and PyTorch's path must not call itself
SDPA = F.scaled_dot_product_attention

# ---- norms: F.layer_norm / F.rms_norm, after a separate residual add
def _params_why(x, *params):
    if any(t is not None and t.dtype != x.dtype for t in params):
        return f"F.layer_norm / F.rms_norm take weight and bias in x's dtype ({x.dtype})"
    return None


def covers_layer_norm(x, weight, bias, cast):
    # "mpt" arrives with its weight already rounded to x's dtype. Llama's and Gemma's casts are
    # not PyTorch ops.
    if cast not in ("torch", "mpt"):
        return f"cast={cast!r} is not a PyTorch op (it has torch and mpt's rounding)"
    return _params_why(x, weight, bias)


def layer_norm(x, weight, bias, eps, residual):
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)


def covers_rms_norm(x, weight, cast):
    if cast != "torch":
        return f"cast={cast!r} is not a PyTorch op (F.rms_norm rounds as cast='torch')"
    return _params_why(x, weight)


def rms_norm(x, weight, eps, residual):
    s = x if residual is None else x + residual
    y = F.rms_norm(s, (s.shape[-1],), weight, eps)
    return y if residual is None else (y, s)


# ---- attention: F.scaled_dot_product_attention on (batch, heads, seqlen, head_dim) views
def alibi_bias(slopes, sq: int, sk: int, *, causal_shift: int | None = None):
    """The ALiBi bias -slope * |j - i - shift| of query i and key j (shift = causal_shift, or
    sk - sq without one: mptkernels' bottom-right alignment), float32, shaped (batch, heads, sq,
    sk) for (batch, heads) slopes or (heads, sq, sk) for (heads,); with causal_shift, keys j > i +
    causal_shift get -inf (0: PyTorch's top-left causal; sk - sq: bottom-right, as mptkernels'
    causal), where the bias is MPT's slope * (j - i - shift)."""
    i = torch.arange(sq, device=slopes.device).view(-1, 1)
    j = torch.arange(sk, device=slopes.device).view(1, -1)
    shape = (-1, slopes.shape[-1], 1, 1) if slopes.dim() == 2 else (slopes.shape[-1], 1, 1)
    shift = sk - sq if causal_shift is None else causal_shift
    bias = -slopes.view(shape).float() * (j - i - shift).abs().float()
    return bias if causal_shift is None else bias.masked_fill(j > i + causal_shift, float("-inf"))


def covers_attention(q, k, causal):
    # bottom-right causal with more queries than keys leaves rows that see no key, which
    # SDPA returns as NaN (ours: zeros); no key at all, the same
    sq, sk = q.shape[1], k.shape[1]
    if sk == 0 or (causal and sq > sk):
        return "rows that see no key (SDPA gives NaN there, mptkernels zeros)"
    return None


def attention(q, k, v, causal, alibi_slopes, softmax_scale):
    sq, sk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if alibi_slopes is None:
        if causal and sq != sk:  # PyTorch's own bottom-right causal mask
            from torch.nn.attention.bias import causal_lower_right

            mask, is_causal = causal_lower_right(sq, sk), False
        else:
            mask, is_causal = None, causal
    else:
        # ALiBi as an additive bias tensor in q's dtype, as PyTorch models pass it (HF's MPT)
        mask = alibi_bias(alibi_slopes, sq, sk, causal_shift=sk - sq if causal else None).to(q.dtype)
        is_causal = False
    out = SDPA(qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=softmax_scale,
               enable_gqa=gqa)
    return out.transpose(1, 2)


# ---- GEMMs: F.linear + the activation; int8 through torch._int_mm
def linear(x, weight, bias, act):
    return activation(F.linear(x, weight, bias), act)


def _rows(x):
    return x.reshape(-1, x.shape[-1]) if x.shape[-1] else x.reshape(x.numel(), 0)


def covers_int8_mm(a, b):
    # cuBLASLt's int8 GEMM behind torch._int_mm on CUDA takes more than 16 rows and K, N
    # multiples of 8
    m = a.numel() // max(a.shape[-1], 1)
    if a.device.type == "cuda" and not (m > 16 and a.shape[-1] % 8 == 0 and b.shape[0] % 8 == 0):
        return "torch._int_mm on CUDA needs more than 16 rows and K, N multiples of 8"
    return None


def int8_mm(a, b):
    return torch._int_mm(a, b.t())


covers_int8_linear = covers_int8_mm  # the same GEMM inside


def int8_linear(x, w_int8, w_scale, bias, act):
    """W8A8 as torchao runs it: quantise x per row with PyTorch ops, torch._int_mm against the
    transposed weight (its fast layout), the scales, bias and activation as PyTorch ops. x's
    gradient goes straight through the quantisation (that of x @ w_dequantised^T)."""
    x2 = _rows(x)
    xf = x2.float()
    absmax = xf.abs().amax(dim=-1) if x2.shape[-1] else xf.new_zeros(x2.shape[0])
    x_scale = torch.where(absmax > 0, absmax / torch.full_like(absmax, 127.0), torch.ones_like(absmax))
    xq = torch.round(xf.detach() / x_scale.detach().unsqueeze(1)).clamp_(-127, 127).nan_to_num_(0.0).to(torch.int8)
    acc = torch._int_mm(xq, w_int8.t()).float() * x_scale.detach().unsqueeze(1) * w_scale.unsqueeze(0)
    if x.requires_grad and torch.is_grad_enabled():
        # adds exactly zero to the value; carries the straight-through gradient
        acc = acc + (xf - xf.detach()) @ (w_int8.float() * w_scale.unsqueeze(1)).t()
    if bias is not None:
        acc = acc + bias.float()
    return activation(acc, act).to(x.dtype).reshape(*x.shape[:-1], w_int8.shape[0])


def weight_only_int8_linear(x, w_int8, w_scale, bias):
    """torchao's weight-only int8: the weight converted to x's dtype, the scales after the GEMM."""
    out = F.linear(x, w_int8.to(x.dtype)) * w_scale.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


# ---- GLUs: the activation of the gate, then the product (two elementwise kernels in eager)
def swiglu(gate, up):
    return F.silu(gate) * up


def geglu(gate, up, approximate):
    return F.gelu(gate, approximate=approximate) * up
# ---- cross_entropy: the LM head's logits whole, then F.cross_entropy (+ the z-loss term)
def linear_cross_entropy(x, weight, target, bias, ignore_index, reduction, label_smoothing, logit_softcap, z_loss):
    """What a model does without a fused loss: the (N, V) logits in x's dtype, softcapped, in
    float32 (as HF's causal-LM loss upcasts them) into F.cross_entropy; z_loss from a logsumexp."""
    V = weight.shape[0]
    logits = F.linear(x, weight, bias).reshape(-1, V)
    logits = logits.double() if x.dtype == torch.float64 else logits.float()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    t = target.reshape(-1)
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        valid = t != ignore_index
        lse2 = torch.where(valid, torch.logsumexp(logits, -1).square(), torch.zeros((), device=x.device))
        loss = loss + z_loss * (lse2 if reduction == "none" else lse2.sum() / (valid.sum() if reduction == "mean" else 1))
    return loss.reshape(target.shape) if reduction == "none" else loss
