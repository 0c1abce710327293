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
    # attention: causal + ALiBi + GQA, packed sequences, and a decode step over a KV cache
    hq, hk, d = 8, 2, 64
    slopes = ops.alibi_slopes(hq).to(device)
    qa = torch.randn(2, 300, hq, d, device=device, dtype=dtype, requires_grad=True)
    ka, va = (torch.randn(2, 300, hk, d, device=device, dtype=dtype) for _ in range(2))
    out = ops.attention(qa, ka, va, causal=True, alibi_slopes=slopes)
    want = reference.attention(qa.detach(), ka, va, causal=True, alibi_slopes=slopes)
    print(f"  attention causal+ALiBi  {rel(out, want):.2e}")
    out.float().pow(2).sum().backward()
    print(f"  attention backward      |grad| finite: {bool(torch.isfinite(qa.grad).all())}")
    cu = torch.tensor([0, 100, 117, 300], dtype=torch.int32, device=device)
    qv, kv, vv = (t.detach()[0] for t in (qa, ka, va))
    got = ops.attention_varlen(qv, kv, vv, cu, cu, 183, 183, causal=True, alibi_slopes=slopes)
    print(f"  attention_varlen        {rel(got, reference.attention_varlen(qv, kv, vv, cu, cu, causal=True, alibi_slopes=slopes)):.2e}")
    kc, vc = (torch.randn(2, 512, hk, d, device=device, dtype=dtype) for _ in range(2))
    lens = torch.tensor([37, 400], dtype=torch.int32, device=device)
    qn, kn, vn = (torch.randn(2, 1, h, d, device=device, dtype=dtype) for h in (hq, hk, hk))
    kc2, vc2 = kc.clone(), vc.clone()
    got = ops.attention_with_kvcache(qn, kc, vc, lens, k=kn, v=vn, alibi_slopes=slopes)
    want = reference.attention_with_kvcache(qn, kc2, vc2, lens, kn, vn, alibi_slopes=slopes)
    print(f"  attention_with_kvcache  {rel(got, want):.2e} (cache written: {bool(torch.equal(kc, kc2))})")
    # GEMMs: linear + GELU, W8A8 and weight-only int8 (errors vs the dequantised reference)
    xg = torch.randn(77, 512, device=device, dtype=dtype)
    wg = torch.randn(384, 512, device=device, dtype=dtype) * 512 ** -0.5
    print(f"  linear + GELU           {rel(ops.linear(xg, wg, None, 'gelu'), reference.linear(xg, wg, None, 'gelu')):.2e}")
    wq, ws = ops.quantize_rowwise(wg.float())
    print(f"  int8_linear (W8A8)      {rel(ops.int8_linear(xg, wq, ws), reference.int8_linear(xg, wq, ws)):.2e}"
          f"  (vs the float linear: {rel(ops.int8_linear(xg, wq, ws), xg.float() @ wg.float().t()):.2e})")
    print(f"  weight_only_int8_linear "
          f"{rel(ops.weight_only_int8_linear(xg, wq, ws), reference.weight_only_int8_linear(xg, wq, ws)):.2e}")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.LayerNorm(64))
    print(" ", str(mptkernels.patch(model, int8="weight_only")).replace("\n", "\n  "))


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
