"""The main job: what was built, each op run on this device against the reference, and the
quick benchmarks. Run by scripts/demo.sh (which builds first)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

import mptkernels
from mptkernels import ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_ops(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"\nops on {device} ({str(dtype).replace('torch.', '')}) vs mptkernels.reference (relative error):")
    x = torch.randn(4, 333, 1024, device=device, dtype=dtype)
    r, w, b = torch.randn_like(x), torch.randn(1024, device=device, dtype=dtype), torch.randn(1024, device=device, dtype=dtype)
    y, s = ops.layer_norm(x, w, b, 1e-5, r)
    print(f"  layer_norm (+residual)  {rel(y, reference.layer_norm(x, w, b, 1e-5, r)[0]):.2e}")
    y, s = ops.rms_norm(x, w, 1e-6, r, cast="llama")
    print(f"  rms_norm (llama cast)   {rel(y, reference.rms_norm(x, w, 1e-6, r, cast='llama')[0]):.2e}")
    q = torch.randn(2, 257, 8, 64, device=device, dtype=dtype, requires_grad=True)
    cos, sin = ops.rotary_cos_sin(512, 64, device=device)
    out = ops.apply_rotary(q, cos, sin, seqlen_offsets=100)
    print(f"  apply_rotary (offset)   {rel(out, reference.apply_rotary(q, cos, sin, seqlen_offsets=100)):.2e}")
    out.float().pow(2).sum().backward()
    print(f"  apply_rotary backward   |grad| finite: {bool(torch.isfinite(q.grad).all())}")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.LayerNorm(64))
    print(" ", str(mptkernels.patch(model)).replace("\n", "\n  "))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(ROOT, "bench-out"), help="benchmark JSON and plot folder")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmarks")
    args = p.parse_args()
    mptkernels.info()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_ops(device)
    if not args.no_bench:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import run as bench_run

        bench_run.main(["--quick", "--out", args.out, "--device", device])


if __name__ == "__main__":
    main()
