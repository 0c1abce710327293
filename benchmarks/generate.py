"""Greedy decoding speed of the MPT model on mptkernels against transformers' MptForCausalLM
on the same weights (random; speed does not depend on them).

    python benchmarks/generate.py [--device cpu|cuda] [--quick] [--dtype float32|bfloat16|float16]
                                  [--prompt-len N]

CPU: MPT-125M's shape (d_model 768, 12 layers, 12 heads, vocab 50432) in fp32 (or --dtype),
batch 1. GPU: MPT-1.3B's shape (d_model 2048, 24 layers, 16 heads, vocab 50432) in bf16, batch 1
and 8, and weight-only int8. Prompt --prompt-len tokens (128); tokens/s counts new tokens over
the whole generate call after a warm-up call. The roofline is the weight bytes read per decoded
token at the measured copy bandwidth (GPU). The side-by-side with llama.cpp on the CPU (issue 21)
is benchmarks/vs_llama_cpp.py.

transformers' MptForCausalLM.generate() (4.57.1 and 5.25.0) does not use a KV cache: every step
runs the whole sequence so far through the model again (the script checks it and says so), so
its tokens/s falls as the prompt grows and the ratio to it grows with --prompt-len.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _timed(fn, device, reps):
    # warm-up: kernel compilation, allocator. Each generate() call captures its own CUDA graph
    # of the decode step (a new cache per call), so every timed GPU call includes one capture,
    # amortised over its new tokens, as a user's call would
    fn()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _hf_feeds_one_token(hf, prompt) -> bool:
    """Whether transformers' generate() feeds the model one new token a step (it decodes over a
    KV cache) rather than the whole sequence again."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.shape[1])

    handle = hf.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        hf.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    return all(n == 1 for n in seen[1:])


def run(device: str, quick: bool, dtype=None, prompt_len=128):
    import mptkernels
    from mptkernels.models import MPTForCausalLM
    from mptkernels.bench.harness import setup

    setup(device)  # on the CPU: glibc keeps freed memory, as in run.py (see harness.keep_freed_memory)

    try:
        import transformers
    except ImportError:
        transformers = None
    gpu = device == "cuda"
    d, layers, heads = (2048, 24, 16) if gpu else (768, 12, 12)
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    new_tokens = 256 if gpu else (16 if quick else 64)
    cfg = transformers.MptConfig(d_model=d, n_heads=heads, n_layers=layers, max_seq_len=2048, vocab_size=50432,
                                 attn_config={"alibi": True}) if transformers else None
    rows = []
    torch.manual_seed(0)
    if transformers:
        hf = transformers.MptForCausalLM(cfg).to(device, dtype).eval()
        ours = MPTForCausalLM.from_hf(hf).eval()
    else:
        from mptkernels.models import MPTConfig

        hf = None
        ours = MPTForCausalLM(MPTConfig(d_model=d, n_heads=heads, n_layers=layers, vocab_size=50432),
                              device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    for batch in ((1, 8) if gpu else (1,)):
        prompt = torch.randint(0, 50432, (batch, prompt_len), device=device)
        reps = 1 if quick else 3
        t_ours = _timed(lambda: ours.generate(prompt, new_tokens), device, reps)
        rows.append((f"B{batch} mptkernels", batch * new_tokens / t_ours))
        if hf is not None:
            t_hf = _timed(lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False, pad_token_id=0), device, reps)
            rows.append((f"B{batch} transformers", batch * new_tokens / t_hf))
        if batch == 1:
            q = MPTForCausalLM.from_hf(hf).eval() if hf is not None else None
            if q is not None:
                mptkernels.quantize_(q, "weight_only")
                t_q = _timed(lambda: q.generate(prompt, new_tokens), device, reps)
                rows.append((f"B{batch} mptkernels int8 weights", batch * new_tokens / t_q))
    # prefill: one forward over a long prompt into the cache, against the time its FLOPs take at
    # 700 TFLOP/s on the GPU (the yardstick) or at the measured matmul ceiling here
    plen = 2048 if gpu else 512
    prompt = torch.randint(0, 50432, (1, plen), device=device)
    flops = 2 * n_params * plen + 2 * layers * plen * plen * d  # matmuls + causal attention
    with torch.no_grad():
        cache = ours.new_cache(1, plen)
        lens = torch.zeros(1, dtype=torch.int32, device=device)
        t_pre = _timed(lambda: ours(prompt, cache=cache, cache_seqlens=lens), device, 1 if quick else 3)
    if gpu:
        ideal = flops / 700e12
    else:
        from mptkernels.bench.harness import ceiling

        ideal = flops / (ceiling("cpu", "quick", flops_dtype=dtype)[0] * 1e12)
    rows.append((f"prefill {plen} tokens (ms)", t_pre * 1e3))
    print(f"greedy decode, {n_params / 1e6:.0f}M-parameter MPT (d{d} L{layers} H{heads}), "
          f"{str(dtype).replace('torch.', '')}, prompt {prompt_len}, {new_tokens} new tokens, {device}, "
          f"torch {torch.__version__}, transformers {getattr(transformers, '__version__', 'not installed')}")
    for name, tps in rows:
        print(f"  {name:32s} {tps:9.1f} " + ("ms" if name.startswith("prefill") else "tokens/s"))
    print(f"  prefill time / ideal ({'700 TFLOP/s' if gpu else 'the matmul ceiling'}): {t_pre / ideal:.2f}x")
    by = dict(rows)
    if "B1 transformers" in by:
        print(f"  mptkernels / transformers at batch 1: {by['B1 mptkernels'] / by['B1 transformers']:.2f}x")
        if not _hf_feeds_one_token(hf, torch.randint(0, 50432, (1, 8), device=device)):
            print(f"  (transformers {transformers.__version__}'s MPT generate() runs the whole sequence again every "
                  "step, without a KV cache: its tokens/s falls as the prompt grows)")
    if gpu:
        from mptkernels.bench.harness import ceiling

        weight_bytes = n_params * 2
        roof = ceiling(device, "quick", nbytes=weight_bytes)[0] * 1e9 / weight_bytes
        print(f"  weight-bandwidth roofline at batch 1: {roof:.0f} tokens/s "
              f"({by['B1 mptkernels'] / roof:.0%} reached)")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on the GPU, float32 on the CPU")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (1 to 1024)")
    a = p.parse_args()
    if not 1 <= a.prompt_len <= 1024:
        p.error(f"--prompt-len: expected 1 to 1024, got {a.prompt_len}")
    run(a.device, a.quick, getattr(torch, a.dtype) if a.dtype else None, a.prompt_len)
