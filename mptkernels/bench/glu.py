"""SwiGLU / GeGLU (out = act(gate) * up) against the eager PyTorch composite (``F.silu(gate) * up``,
``F.gelu(gate) * up``: two elementwise kernels and a temporary) and its torch.compile.

Bytes counted (the traffic the op cannot avoid): forward reads gate, up and writes out (3 MN);
forward + backward reads gate, up, writes out, then reads dout, gate, up and writes dgate, dup
(8 MN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mptkernels import ops

from .harness import Case, compiled, ours


def _swiglu(g, u):
    return F.silu(g) * u


def _geglu(g, u):
    return F.gelu(g) * u


def shapes(device: str, size: str):
    if size == "tiny":
        return [(64, 256, torch.float32)]
    if device == "cuda":  # Llama-3 8B's FFN width
        return [(16384, 14336, torch.bfloat16)] + ([] if size == "quick" else [(4096, 14336, torch.float16)])
    return [(4096, 5632, torch.float32), (4096, 5632, torch.bfloat16)]  # TinyLlama's FFN width


def cases(device: str, size: str) -> list[Case]:
    out = []
    for m, n, dtype in shapes(device, size):
        e = torch.finfo(dtype).bits // 8
        tag = f"{m}x{n} {str(dtype).replace('torch.', '')}"

        def inputs(m=m, n=n, dtype=dtype):
            g = torch.randn(m, n, device=device, dtype=dtype)
            return g, torch.randn_like(g)

        def fwd(public, eager, ours_fn, inputs=inputs):
            def make():
                g, u = inputs()
                c = compiled(eager)
                return {"ours": ours(public, lambda: ours_fn(g, u), device),
                        "baselines": {"eager": lambda: eager(g, u), "torch.compile": lambda: c(g, u)}}
            return make

        def swiglu_fwd_bwd(inputs=inputs):
            g, u = (t.requires_grad_() for t in inputs())
            dout = torch.randn_like(g)

            def fb(f):
                return lambda: torch.autograd.grad(f(g, u), (g, u), dout)
            return {"ours": ours("swiglu", fb(ops.swiglu), device), "baselines": {"eager": fb(_swiglu)}}

        out += [Case("glu", f"SwiGLU fwd {tag}", fwd("swiglu", _swiglu, ops.swiglu), nbytes=3 * m * n * e),
                Case("glu", f"GeGLU fwd {tag}", fwd("geglu", _geglu, ops.geglu), nbytes=3 * m * n * e),
                Case("glu", f"SwiGLU fwd+bwd {tag}", swiglu_fwd_bwd, nbytes=8 * m * n * e)]
    return out
