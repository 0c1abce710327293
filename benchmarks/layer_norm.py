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

try:
    from .harness import case_rows, compiled, ours
except ImportError:  # run as a script
    from harness import case_rows, compiled, ours


def _add_ln(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, 1e-5), s


def _add_rms(x, r, w):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w, 1e-6), s


def shapes(device: str, quick: bool):
    if device == "cuda":
        return [(16384, 4096, torch.bfloat16)] + ([] if quick else [(16384, 8192, torch.bfloat16), (4096, 4096, torch.float16)])
    return [(4096, 2048, torch.float32), (4096, 2048, torch.bfloat16)]


def run(device: str, quick: bool):
    rows = []
    for m, n, dtype in shapes(device, quick):
        e = torch.finfo(dtype).bits // 8
        x = torch.randn(m, n, device=device, dtype=dtype)
        r = torch.randn_like(x)
        w = torch.randn(n, device=device, dtype=dtype)
        b = torch.randn(n, device=device, dtype=dtype)
        tag = f"{m}x{n} {str(dtype).replace('torch.', '')}"
        add_ln_c, add_rms_c = compiled(_add_ln), compiled(_add_rms)
        rows += case_rows("layer_norm", f"add+LayerNorm fwd {tag}", device, quick, 4 * m * n * e,
                          ours("layer_norm", lambda: ops.layer_norm(x, w, b, 1e-5, r), device),
                          {"eager": lambda: _add_ln(x, r, w, b), "torch.compile": lambda: add_ln_c(x, r, w, b)})
        rows += case_rows("layer_norm", f"add+RMSNorm fwd {tag}", device, quick, 4 * m * n * e,
                          ours("rms_norm", lambda: ops.rms_norm(x, w, 1e-6, r), device),
                          {"eager": lambda: _add_rms(x, r, w), "torch.compile": lambda: add_rms_c(x, r, w)})
        rows += case_rows("layer_norm", f"LayerNorm fwd {tag}", device, quick, 2 * m * n * e,
                          ours("layer_norm", lambda: ops.layer_norm(x, w, b), device),
                          {"eager": lambda: F.layer_norm(x, (n,), w, b)})
        # forward + backward (dx, dweight, dbias)
        xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        dy = torch.randn_like(x)

        def fb(f):
            def step():
                out = f()
                return torch.autograd.grad(out, (xg, wg, bg), dy)
            return step

        rows += case_rows("layer_norm", f"LayerNorm fwd+bwd {tag}", device, quick, 5 * m * n * e,
                          ours("layer_norm", fb(lambda: ops.layer_norm(xg, wg, bg)), device),
                          {"eager": fb(lambda: F.layer_norm(xg, (n,), wg, bg))})
    return rows


if __name__ == "__main__":
    from harness import environment, print_table, setup

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    setup(dev)  # keep freed memory on the CPU, as run.py does (else the table times page faults)
    print_table(run(dev, quick=True), environment(dev))
