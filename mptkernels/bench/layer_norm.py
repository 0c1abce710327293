"""LayerNorm / RMSNorm (+ residual) against eager PyTorch and torch.compile of the same math.

Bytes counted (the traffic the op cannot avoid): add + norm forward reads x, residual and
writes out, residual_out (4 MN); norm forward reads x and writes out (2 MN); forward +
backward ("effective", as Liger and flash-attn count it) reads x, writes out, then reads
x and dy and writes dx (5 MN) — weights and statistics are negligible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mptkernels import ops

from .harness import Case, compiled, ours


def _add_ln(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, 1e-5), s


def _add_rms(x, r, w):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w, 1e-6), s


def shapes(device: str, size: str):
    if size == "tiny":
        return [(64, 256, torch.float32)]
    if device == "cuda":
        return [(16384, 4096, torch.bfloat16)] + ([] if size == "quick" else [(16384, 8192, torch.bfloat16), (4096, 4096, torch.float16)])
    return [(4096, 2048, torch.float32), (4096, 2048, torch.bfloat16)]


def cases(device: str, size: str) -> list[Case]:
    out = []
    for m, n, dtype in shapes(device, size):
        e = torch.finfo(dtype).bits // 8
        tag = f"{m}x{n} {str(dtype).replace('torch.', '')}"

        def inputs(m=m, n=n, dtype=dtype):
            x = torch.randn(m, n, device=device, dtype=dtype)
            return x, torch.randn_like(x), torch.randn(n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)

        def add_ln(inputs=inputs):
            x, r, w, b = inputs()
            c = compiled(_add_ln)
            return {"ours": ours("layer_norm", lambda: ops.layer_norm(x, w, b, 1e-5, r), device),
                    "baselines": {"eager": lambda: _add_ln(x, r, w, b), "torch.compile": lambda: c(x, r, w, b)}}

        def add_rms(inputs=inputs):
            x, r, w, _ = inputs()
            c = compiled(_add_rms)
            return {"ours": ours("rms_norm", lambda: ops.rms_norm(x, w, 1e-6, r), device),
                    "baselines": {"eager": lambda: _add_rms(x, r, w), "torch.compile": lambda: c(x, r, w)}}

        def ln(inputs=inputs, n=n):
            x, _, w, b = inputs()
            return {"ours": ours("layer_norm", lambda: ops.layer_norm(x, w, b), device),
                    "baselines": {"eager": lambda: F.layer_norm(x, (n,), w, b)}}

        def ln_fwd_bwd(inputs=inputs, n=n):  # forward + backward (dx, dweight, dbias)
            x, _, w, b = inputs()
            xg, wg, bg = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
            dy = torch.randn_like(x)

            def fb(f):
                return lambda: torch.autograd.grad(f(), (xg, wg, bg), dy)
            return {"ours": ours("layer_norm", fb(lambda: ops.layer_norm(xg, wg, bg)), device),
                    "baselines": {"eager": fb(lambda: F.layer_norm(xg, (n,), wg, bg))}}

        out += [Case("layer_norm", f"add+LayerNorm fwd {tag}", add_ln, nbytes=4 * m * n * e),
                Case("layer_norm", f"add+RMSNorm fwd {tag}", add_rms, nbytes=4 * m * n * e),
                Case("layer_norm", f"LayerNorm fwd {tag}", ln, nbytes=2 * m * n * e),
                Case("layer_norm", f"LayerNorm fwd+bwd {tag}", ln_fwd_bwd, nbytes=5 * m * n * e)]
    return out
