"""The GEMM family against PyTorch's paths on the same device.

Baselines: F.linear (cuBLAS / MKL), F.gelu(F.linear(...)) eager and compiled (forward, and
forward + backward: 3x the FLOPs),
torch._int_mm in its fast layout (second operand a transposed (N, K) weight), PyTorch's own
W8A8 path for int8_linear (quantise x per row, torch._int_mm, then the scales: the same
result as ours), and for weight-only int8 a dequantise-then-F.linear path. FLOPs 2·M·N·K;
int8 rows report TOP/s against a measured int8 ceiling. Float linears of the int8 cases are
shown for context, not ranked (another computation). Decoding rows (M = 1 linear, weight-only
int8) report GB/s of weight bytes (what bounds them). On the CPU (full runs) the linear+GELU
and decoding cases also run in bf16, against PyTorch's bf16 path (oneDNN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mptkernels import ops

try:
    from .harness import case_rows, compiled, ours
except ImportError:
    from harness import case_rows, compiled, ours


def run(device: str, quick: bool):
    rows = []
    gpu = device == "cuda"
    dt = torch.bfloat16 if gpu else torch.float32
    # MPT-7B FFN shapes on the GPU (d_model 4096, 4x expansion); a 2-core-sized one on the CPU
    m, k, n = (8192, 4096, 16384) if gpu else (512, 2048, 2048)
    if gpu and quick:
        m, k, n = 8192, 4096, 4096
    x = torch.randn(m, k, device=device, dtype=dt)
    w = torch.randn(n, k, device=device, dtype=dt) * k ** -0.5
    flops = 2 * m * n * k
    tag = f"{m}x{k}x{n} {str(dt).replace('torch.', '')}"
    rows += case_rows("gemm", f"linear {tag}", device, quick, None,
                      ours("linear", lambda: ops.linear(x, w), device), {"F.linear": lambda: F.linear(x, w)},
                      flops=flops)
    gelu_compiled = compiled(lambda x, w: F.gelu(F.linear(x, w)))
    rows += case_rows("gemm", f"linear+GELU {tag}", device, quick, None,
                      ours("linear", lambda: ops.linear(x, w, activation="gelu"), device),
                      {"F.gelu(F.linear) eager": lambda: F.gelu(F.linear(x, w)),
                       "torch.compile": lambda: gelu_compiled(x, w)}, flops=flops)
    # training: forward and backward (dx, dw: two more GEMMs of the same size)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dt)

    def fwd_bwd(fn, x=xg, w=wg, dy=dy):  # dx and dw of fn(x, w) for the upstream gradient dy
        return lambda: torch.autograd.grad(fn(x, w), (x, w), dy)

    rows += case_rows("gemm", f"linear+GELU fwd+bwd {tag}", device, quick, None,
                      ours("linear", fwd_bwd(lambda x, w: ops.linear(x, w, activation="gelu")), device),
                      {"F.gelu(F.linear) eager": fwd_bwd(lambda x, w: F.gelu(F.linear(x, w)))}, flops=3 * flops)

    if not gpu and not quick:
        # bf16 on the CPU: on CPUs with AVX512-BF16 PyTorch's bf16 matmul is oneDNN's native one
        # (about twice the fp32 rate), the path to beat; rates against the bf16 matmul ceiling
        xb, wb16, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
        btag = f"{m}x{k}x{n} bfloat16"
        rows += case_rows("gemm", f"linear+GELU {btag}", device, quick, None,
                          ours("linear", lambda: ops.linear(xb, wb16, activation="gelu"), device),
                          {"F.gelu(F.linear) eager": lambda: F.gelu(F.linear(xb, wb16))}, flops=flops,
                          dtype=torch.bfloat16)
        grads16 = dict(x=xb.clone().requires_grad_(), w=wb16.clone().requires_grad_(), dy=dyb)
        rows += case_rows("gemm", f"linear+GELU fwd+bwd {btag}", device, quick, None,
                          ours("linear", fwd_bwd(lambda x, w: ops.linear(x, w, activation="gelu"), **grads16), device),
                          {"F.gelu(F.linear) eager": fwd_bwd(lambda x, w: F.gelu(F.linear(x, w)), **grads16)},
                          flops=3 * flops, dtype=torch.bfloat16)

    # int8: the exact GEMM core and W8A8 end to end (activation quantisation included)
    mi, ki, ni = (8192, 8192, 8192) if gpu else (512, 2048, 2048)
    a8 = torch.randint(-127, 128, (mi, ki), dtype=torch.int8, device=device)
    w8 = torch.randint(-127, 128, (ni, ki), dtype=torch.int8, device=device)
    itag = f"{mi}x{ki}x{ni}"
    ab, wb = a8.to(dt), w8.to(dt)
    rows += case_rows("gemm", f"int8 GEMM core {itag}", device, quick, None,
                      ours("int8_mm", lambda: torch.ops.mptkernels.int8_mm(a8, w8), device),
                      {"torch._int_mm (w^T)": lambda: torch._int_mm(a8, w8.t())}, flops=2 * mi * ni * ki, int8=True,
                      references={f"{'bf16' if gpu else 'fp32'} F.linear": lambda: F.linear(ab, wb)})
    xf = torch.randn(mi, ki, device=device, dtype=dt)
    wq, ws = ops.quantize_rowwise(torch.randn(ni, ki, device=device))
    wd = (wq.float() * ws[:, None]).to(dt)

    def torch_w8a8():  # PyTorch's W8A8: the same quantisation and epilogue as ours, unfused
        xq, xs = ops.quantize_rowwise(xf)
        return (torch._int_mm(xq, wq.t()).float() * xs[:, None] * ws).to(dt)

    rows += case_rows("gemm", f"int8_linear W8A8 {itag} {str(dt).replace('torch.', '')}", device, quick, None,
                      ours("int8_linear", lambda: ops.int8_linear(xf, wq, ws), device),
                      {"quantize_rowwise + torch._int_mm + scales": torch_w8a8}, flops=2 * mi * ni * ki, int8=True,
                      references={"F.linear (float weight)": lambda: F.linear(xf, wd)})

    # weight-only int8 for decoding: M = 1 and 16 tokens, an MPT-7B QKV projection
    kd, nd = (4096, 12288) if gpu else (2048, 6144)
    wq, ws = ops.quantize_rowwise(torch.randn(nd, kd, device=device))
    wd = (wq.float() * ws[:, None]).to(dt)
    wf = (torch.randn(nd, kd, device=device) * kd ** -0.5).to(dt)
    x1 = torch.randn(1, kd, device=device, dtype=dt)
    rows += case_rows("gemm", f"linear M=1 {kd}->{nd} {str(dt).replace('torch.', '')}", device, quick,
                      nd * kd * wf.element_size(), ours("linear", lambda: ops.linear(x1, wf), device),
                      {"F.linear": lambda: F.linear(x1, wf)})
    if not gpu and not quick:  # bf16 decoding on the CPU: 1 and 16 tokens (the dot tiles on vdpbf16ps)
        wf16 = wf.bfloat16()
        for md in (1, 16):
            xd16 = torch.randn(md, kd, dtype=torch.bfloat16)
            rows += case_rows("gemm", f"linear M={md} {kd}->{nd} bfloat16", device, quick, nd * kd * 2,
                              ours("linear", lambda: ops.linear(xd16, wf16), device),
                              {"F.linear": lambda: F.linear(xd16, wf16)})
    for md in (1,) if quick else (1, 16):
        xd = torch.randn(md, kd, device=device, dtype=dt)
        rows += case_rows("gemm", f"weight-only int8 M={md} {kd}->{nd} {str(dt).replace('torch.', '')}", device,
                          quick, nd * kd,
                          ours("weight_only_int8_linear", lambda: ops.weight_only_int8_linear(xd, wq, ws), device),
                          {"F.linear (float weight)": lambda: F.linear(xd, wd),
                           "dequantise + F.linear": lambda: F.linear(xd, (wq.to(dt) * ws[:, None].to(dt)))})
    return rows


if __name__ == "__main__":
    from harness import environment, print_table, setup

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    setup(dev)
    print_table(run(dev, quick=True), environment(dev))
