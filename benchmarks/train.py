"""Training-step speed of the MPT model on mptkernels against transformers' MptForCausalLM.

    python benchmarks/train.py [--device cpu|cuda] [--model 1.3b|125m|tiny] [--batch B] [--seq S] [--steps N]
                               [--dtype float32|bfloat16]

One process, one device: forward + backward + AdamW on the same shape and random weights for
both (bf16 weights and compute on the GPU, fp32 on the CPU, or --dtype). MFU counts the
llm-foundry way: 6 * params + 12 * n_layers * d_model * seq FLOPs per token (the attention
term at full, non-causal cost), against 989 TFLOP/s on the GPU (H100 bf16 dense) or the
matmul ceiling of the dtype measured here on the CPU. Reports tokens/s, MFU and peak memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # d_model, n_layers, n_heads
    "1.3b": (2048, 24, 16), "125m": (768, 12, 12), "tiny": (256, 4, 4),
}


def _step_fn(model, opt, ids, ours):
    def step():
        if ours:
            _, loss = model(ids, labels=ids)
        else:
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _time(step, device, steps):
    step()  # warm-up: compilation, allocator, optimizer state
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], mem


def run(device, model_name, batch, seq, steps, dtype=None):
    import transformers

    from mptkernels.models import MPTForCausalLM
    from mptkernels.bench.harness import setup

    setup(device)  # on the CPU: glibc keeps freed memory, as in run.py (see harness.keep_freed_memory)

    d, layers, heads = SHAPES[model_name]
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    cfg = transformers.MptConfig(d_model=d, n_heads=heads, n_layers=layers, max_seq_len=seq, vocab_size=50368,
                                 attn_config={"alibi": True})
    torch.manual_seed(0)
    hf = transformers.MptForCausalLM(cfg).to(device, dtype).train()
    n_params = sum(p.numel() for p in hf.parameters())
    flops_per_token = 6 * n_params + 12 * layers * d * seq
    if device == "cuda":
        peak = 989e12
    else:
        from mptkernels.bench.harness import ceiling

        peak = ceiling("cpu", "quick", flops_dtype=dtype)[0] * 1e12
    ids = torch.randint(0, 50368, (batch, seq), device=device)
    rows = []
    for name in ("transformers", "mptkernels"):
        if name == "mptkernels":
            model = MPTForCausalLM.from_hf(hf).train()
            del hf
        else:
            model = hf
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        sec, mem = _time(_step_fn(model, opt, ids, name == "mptkernels"), device, steps)
        tps = batch * seq / sec
        rows.append((name, tps, tps * flops_per_token / peak, mem))
        del model, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"training step, MPT {model_name} ({n_params / 1e6:.0f}M params, d{d} L{layers} H{heads}), batch {batch} x "
          f"seq {seq}, {str(dtype).replace('torch.', '')}, {device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; peak {peak / 1e12:.3g} TFLOP/s")
    for name, tps, mfu, mem in rows:
        memory = f"  peak memory {mem:.2f} GiB" if mem == mem else ""  # NaN: not measured on the CPU
        print(f"  {name:14s} {tps:12,.0f} tokens/s  MFU {mfu:6.1%}{memory}")
    print(f"  mptkernels / transformers: {rows[1][1] / rows[0][1]:.2f}x tokens/s")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on the GPU, float32 on the CPU")
    a = p.parse_args()
    gpu = a.device == "cuda"
    run(a.device, a.model or ("1.3b" if gpu else "tiny"), a.batch or (4 if gpu else 2), a.seq or (2048 if gpu else 256),
        a.steps, getattr(torch, a.dtype) if a.dtype else None)
