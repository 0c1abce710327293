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

from .harness import Case, compiled, ours


def _name(dt):
    return str(dt).replace("torch.", "")


def _fwd_bwd(fn, x, w, dy):
    """dx and dw of fn(x, w) for the upstream gradient dy (training: two more GEMMs of the same size)."""
    return lambda: torch.autograd.grad(fn(x, w), (x, w), dy)


def cases(device: str, size: str) -> list[Case]:
    gpu = device == "cuda"
    dt = torch.bfloat16 if gpu else torch.float32
    # MPT-7B FFN shapes on the GPU (d_model 4096, 4x expansion); a 2-core-sized one on the CPU
    m, k, n = (8192, 4096, 16384) if gpu else (512, 2048, 2048)
    if gpu and size == "quick":
        m, k, n = 8192, 4096, 4096
    mi, ki, ni = (8192, 8192, 8192) if gpu else (512, 2048, 2048)  # int8
    kd, nd = (4096, 12288) if gpu else (2048, 6144)  # decoding: an MPT-7B QKV projection
    if size == "tiny":
        m, k, n, mi, ki, ni, kd, nd = 64, 128, 96, 64, 128, 96, 128, 192
    flops, iflops = 2 * m * n * k, 2 * mi * ni * ki

    def xw(dtype, grad=False):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
        return (x.requires_grad_(), w.requires_grad_(), torch.randn(m, n, device=device, dtype=dtype)) if grad else (x, w)

    def linear():
        x, w = xw(dt)
        return {"ours": ours("linear", lambda: ops.linear(x, w), device), "baselines": {"F.linear": lambda: F.linear(x, w)}}

    def linear_gelu(dtype=dt):
        x, w = xw(dtype)
        base = {"F.gelu(F.linear) eager": lambda: F.gelu(F.linear(x, w))}
        if dtype == dt:
            c = compiled(lambda x, w: F.gelu(F.linear(x, w)))
            base["torch.compile"] = lambda: c(x, w)
        return {"ours": ours("linear", lambda: ops.linear(x, w, activation="gelu"), device), "baselines": base}

    def linear_gelu_fwd_bwd(dtype=dt):
        x, w, dy = xw(dtype, grad=True)
        return {"ours": ours("linear", _fwd_bwd(lambda x, w: ops.linear(x, w, activation="gelu"), x, w, dy), device),
                "baselines": {"F.gelu(F.linear) eager": _fwd_bwd(lambda x, w: F.gelu(F.linear(x, w)), x, w, dy)}}

    def int8_core():  # the exact GEMM core
        a8 = torch.randint(-127, 128, (mi, ki), dtype=torch.int8, device=device)
        w8 = torch.randint(-127, 128, (ni, ki), dtype=torch.int8, device=device)
        ab, wb = a8.to(dt), w8.to(dt)
        return {"ours": ours("int8_mm", lambda: torch.ops.mptkernels.int8_mm(a8, w8), device),
                "baselines": {"torch._int_mm (w^T)": lambda: torch._int_mm(a8, w8.t())},
                "references": {f"{_name(dt)} F.linear": lambda: F.linear(ab, wb)}}

    def w8a8():  # W8A8 end to end, activation quantisation included
        xf = torch.randn(mi, ki, device=device, dtype=dt)
        wq, ws = ops.quantize_rowwise(torch.randn(ni, ki, device=device))
        wd = (wq.float() * ws[:, None]).to(dt)

        def torch_w8a8():  # PyTorch's W8A8: the same quantisation and epilogue as ours, unfused
            xq, xs = ops.quantize_rowwise(xf)
            return (torch._int_mm(xq, wq.t()).float() * xs[:, None] * ws).to(dt)
        return {"ours": ours("int8_linear", lambda: ops.int8_linear(xf, wq, ws), device),
                "baselines": {"quantize_rowwise + torch._int_mm + scales": torch_w8a8},
                "references": {"F.linear (float weight)": lambda: F.linear(xf, wd)}}

    def decode_linear(md, dtype):
        def make():  # the inputs are built when the case is timed, as every case's
            wf = (torch.randn(nd, kd, device=device) * kd ** -0.5).to(dtype)
            x1 = torch.randn(md, kd, device=device, dtype=dtype)
            return {"ours": ours("linear", lambda: ops.linear(x1, wf), device),
                    "baselines": {"F.linear": lambda: F.linear(x1, wf)}}
        return make

    def weight_only(md):
        def make():
            wq, ws = ops.quantize_rowwise(torch.randn(nd, kd, device=device))
            wd = (wq.float() * ws[:, None]).to(dt)
            xd = torch.randn(md, kd, device=device, dtype=dt)
            return {"ours": ours("weight_only_int8_linear", lambda: ops.weight_only_int8_linear(xd, wq, ws), device),
                    "baselines": {"F.linear (float weight)": lambda: F.linear(xd, wd),
                                  "dequantise + F.linear": lambda: F.linear(xd, (wq.to(dt) * ws[:, None].to(dt)))}}
        return make

    tag, itag = f"{m}x{k}x{n} {_name(dt)}", f"{mi}x{ki}x{ni}"
    out = [Case("gemm", f"linear {tag}", linear, flops=flops),
           Case("gemm", f"linear+GELU {tag}", linear_gelu, flops=flops),
           Case("gemm", f"linear+GELU fwd+bwd {tag}", linear_gelu_fwd_bwd, flops=3 * flops)]
    if not gpu and size == "full":
        # bf16 on the CPU: on CPUs with AVX512-BF16 PyTorch's bf16 matmul is oneDNN's native one
        # (about twice the fp32 rate), the path to beat; rates against the bf16 matmul ceiling
        bf = torch.bfloat16
        out += [Case("gemm", f"linear+GELU {m}x{k}x{n} bfloat16", lambda: linear_gelu(bf), flops=flops, dtype=bf),
                Case("gemm", f"linear+GELU fwd+bwd {m}x{k}x{n} bfloat16", lambda: linear_gelu_fwd_bwd(bf),
                     flops=3 * flops, dtype=bf)]
    out += [Case("gemm", f"int8 GEMM core {itag}", int8_core, flops=iflops, int8=True),
            Case("gemm", f"int8_linear W8A8 {itag} {_name(dt)}", w8a8, flops=iflops, int8=True)]
    # decoding (M = 1 and 16 tokens): GB/s of weight bytes, what bounds them
    out.append(Case("gemm", f"linear M=1 {kd}->{nd} {_name(dt)}", decode_linear(1, dt),
                    nbytes=nd * kd * torch.finfo(dt).bits // 8))
    if not gpu and size == "full":  # bf16 decoding on the CPU: the dot tiles on vdpbf16ps
        out += [Case("gemm", f"linear M={md} {kd}->{nd} bfloat16", decode_linear(md, torch.bfloat16), nbytes=nd * kd * 2)
                for md in (1, 16)]
    out += [Case("gemm", f"weight-only int8 M={md} {kd}->{nd} {_name(dt)}", weight_only(md), nbytes=nd * kd)
            for md in ((1,) if size == "quick" else (1, 16))]
    return out
