"""Sweep the Triton attention tile configs on the GPU and print the time of each.

    python benchmarks/tune_attention.py [--kernel fwd,bwd] [--head-dims 64,128] [--budget-s 240]

For each head dim it times ``mptkernels.triton.attention`` at about 16k tokens (causal +
ALiBi, bf16) with every (BLOCK_M, BLOCK_N, num_warps, num_stages) of a small grid patched
into the config tables, fastest first. The winners go into the ``*_CONFIGS`` tables of
mptkernels/triton/attention.py by hand (with the figure in a comment).
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import triton.testing

from mptkernels import reference
from mptkernels.triton import attention as ta


def _time(fn):
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=40)
    except Exception as e:  # out of resources: shared memory or registers
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def _sweep_decode(t_end):
    """Decode kernel: (BLOCK_N, num_warps, num_stages) x programs per SM, one query token over
    a 4096-token bf16 cache, timed as CUDA-graph replays (GB/s of cache read)."""
    from mptkernels import ops

    for b, s, hq, hk, d in ((1, 4096, 32, 32, 128), (8, 4096, 32, 8, 128)):
        kc, vc = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
        slopes = reference.alibi_slopes(hq).cuda()
        nbytes = 2 * kc.numel() * kc.element_size()
        keep = ta.DECODE_CONFIGS[128], ta.DECODE_PROGRAMS_PER_SM
        res = []
        for bn, nw, ns, pps in itertools.product((32, 64, 128), (4,), (3, 4), (1, 2, 3, 4)):
            if time.time() > t_end:
                break
            ta.DECODE_CONFIGS[128], ta.DECODE_PROGRAMS_PER_SM = (bn, nw, ns), pps
            try:
                fn = lambda: ops.attention_with_kvcache(q, kc, vc, lens, alibi_slopes=slopes)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                r = triton.testing.do_bench(g.replay, warmup=10, rep=40)
            except Exception as e:
                r = f"failed: {type(e).__name__}"
            res.append((r, (bn, nw, ns, pps)))
        ta.DECODE_CONFIGS[128], ta.DECODE_PROGRAMS_PER_SM = keep
        print(f"decode B{b} cache{s} Hq{hq} Hkv{hk} d{d} (BLOCK_N, warps, stages, programs/SM):")
        for r, cfg in sorted(res, key=lambda x: (isinstance(x[0], str), x[0] if not isinstance(x[0], str) else 0)):
            print(f"  {cfg}: " + (r if isinstance(r, str) else f"{r * 1e3:.1f} us {nbytes / (r * 1e-3) / 1e9:.0f} GB/s"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", default="fwd,bwd", help="any of fwd, bwd, decode")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--budget-s", type=float, default=240)
    args = p.parse_args()
    t_end = time.time() + args.budget_s
    if "decode" in args.kernel:
        _sweep_decode(t_end)
    for d in map(int, args.head_dims.split(",")):
        b, s, h = (4, 4096, 32) if d == 128 else (8, 2048, 32)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        slopes = reference.alibi_slopes(h).cuda()
        scale = d ** -0.5
        flops = 4 * b * h * s * s * d / 2
        bd = ta._block_d(d)
        if "fwd" not in args.kernel and "bwd" not in args.kernel:
            continue
        if "fwd" in args.kernel:
            keep = ta.FWD_CONFIGS[bd]
            res = []
            for cfg in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
                if time.time() > t_end:
                    break
                ta.FWD_CONFIGS[bd] = cfg
                r = _time(lambda: ta.attention_fwd(q, k, v, slopes, scale, True))
                res.append((r, cfg))
            ta.FWD_CONFIGS[bd] = keep
            print(f"fwd d{d} B{b} S{s} H{h} causal+alibi:")
            for r, cfg in sorted(res, key=lambda x: (isinstance(x[0], str), x[0] if not isinstance(x[0], str) else 0)):
                print(f"  {cfg}: " + (r if isinstance(r, str) else f"{r:.3f} ms {flops / r / 1e9:.0f} TFLOP/s"))
        if "bwd" in args.kernel:
            out, lse = ta.attention_fwd(q, k, v, slopes, scale, True)
            do = torch.randn_like(out)
            for name, table, grid in (
                ("dkdv", ta.BWD_DKDV_CONFIGS, itertools.product((16, 32, 64), (64, 128), (4, 8), (2, 3))),
                ("dq", ta.BWD_DQ_CONFIGS, itertools.product((64, 128), (32, 64), (4, 8), (2, 3))),
            ):
                keep = table[bd]
                res = []
                for cfg in grid:
                    if time.time() > t_end:
                        break
                    table[bd] = cfg
                    r = _time(lambda: ta.attention_bwd(do, q, k, v, out, lse, slopes, scale, True))
                    res.append((r, cfg))
                table[bd] = keep
                print(f"bwd ({name} config varied, the other at its default) d{d}:")
                for r, cfg in sorted(res, key=lambda x: (isinstance(x[0], str), x[0] if not isinstance(x[0], str) else 0)):
                    print(f"  {cfg}: " + (r if isinstance(r, str) else f"{r:.3f} ms {2.5 * flops / r / 1e9:.0f} TFLOP/s"))


if __name__ == "__main__":
    main()
