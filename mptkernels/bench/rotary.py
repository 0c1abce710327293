"""Rotary embedding of q and k against the eager PyTorch form (HF's rotate_half) and its compile.

Bytes counted: q and k read and the rotated q and k written (4 x numel x elem size).
"""
from __future__ import annotations

import torch

from mptkernels import ops

from .harness import Case, compiled, ours


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rotary(q, k, cos, sin):
    """HF transformers' apply_rotary_pos_emb with (seqlen, head_dim) cos/sin tables."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def shapes(device: str, size: str):
    if size == "tiny":
        return [(1, 64, 4, 32, torch.float32)]
    if device == "cuda":
        return [(8, 4096, 32, 128, torch.bfloat16)] + ([] if size == "quick" else [(1, 4096, 32, 128, torch.bfloat16)])
    return [(2, 1024, 16, 64, torch.float32), (2, 1024, 16, 64, torch.bfloat16)]


def cases(device: str, size: str) -> list[Case]:
    out = []
    for b, s, h, d, dtype in shapes(device, size):
        def make(b=b, s=s, h=h, d=d, dtype=dtype):
            q = torch.randn(b, s, h, d, device=device, dtype=dtype)
            k = torch.randn_like(q)
            cos, sin = ops.rotary_cos_sin(s, d, device=device)
            # the eager form uses full-width (seqlen, head_dim) tables in the activation dtype
            cos_full, sin_full = torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)
            eager_c = compiled(eager_rotary)
            return {"ours": ours("apply_rotary", lambda: (ops.apply_rotary(q, cos, sin), ops.apply_rotary(k, cos, sin)),
                                 device),
                    "baselines": {"eager": lambda: eager_rotary(q, k, cos_full, sin_full),
                                  "torch.compile": lambda: eager_c(q, k, cos_full, sin_full)}}
        e = torch.finfo(dtype).bits // 8
        out.append(Case("rotary", f"rotary q,k ({b},{s},{h},{d}) {str(dtype).replace('torch.', '')}", make,
                        nbytes=4 * b * s * h * d * e))
    return out
