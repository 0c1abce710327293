"""Rotary embedding of q and k against the eager PyTorch form (HF's rotate_half) and its compile.

Bytes counted: q and k read and the rotated q and k written (4 x numel x elem size).
"""
from __future__ import annotations

import torch

from mptkernels import ops

try:
    from .harness import case_rows, compiled, ours
except ImportError:
    from harness import case_rows, compiled, ours


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rotary(q, k, cos, sin):
    """HF transformers' apply_rotary_pos_emb with (seqlen, head_dim) cos/sin tables."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def shapes(device: str, quick: bool):
    if device == "cuda":
        return [(8, 4096, 32, 128, torch.bfloat16)] + ([] if quick else [(1, 4096, 32, 128, torch.bfloat16)])
    return [(2, 1024, 16, 64, torch.float32), (2, 1024, 16, 64, torch.bfloat16)]


def run(device: str, quick: bool):
    rows = []
    for b, s, h, d, dtype in shapes(device, quick):
        q = torch.randn(b, s, h, d, device=device, dtype=dtype)
        k = torch.randn_like(q)
        cos, sin = ops.rotary_cos_sin(s, d, device=device)
        # the eager form uses full-width (seqlen, head_dim) tables in the activation dtype
        cos_full, sin_full = torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)
        eager_c = compiled(eager_rotary)
        e = torch.finfo(dtype).bits // 8
        rows += case_rows("rotary", f"rotary q,k ({b},{s},{h},{d}) {str(dtype).replace('torch.', '')}", device, quick,
                          4 * q.numel() * e,
                          ours("apply_rotary", lambda: (ops.apply_rotary(q, cos, sin), ops.apply_rotary(k, cos, sin)),
                               device),
                          {"eager": lambda: eager_rotary(q, k, cos_full, sin_full),
                           "torch.compile": lambda: eager_c(q, k, cos_full, sin_full)})
    return rows


if __name__ == "__main__":
    from harness import environment, print_table, setup

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    setup(dev)  # keep freed memory on the CPU, as run.py does (else the table times page faults)
    print_table(run(dev, quick=True), environment(dev))
