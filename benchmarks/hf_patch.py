"""mptkernels.patch on a transformers Llama: a training step and greedy decoding, patched against
transformers' own model on the same weights (random; speed does not depend on them).

    python benchmarks/hf_patch.py train [--dtype float32|bfloat16] [--reps N] [--quick]
    python benchmarks/hf_patch.py decode [--dtype float32|bfloat16] [--reps N] [--quick]

train: a Llama-3-shaped model of 155M parameters (hidden 512, 8 layers, 8 query / 2 key-value
heads of 64, MLP 1536, Llama 3's vocabulary of 128,256, untied), batch 1 x 1024 tokens:
forward with labels, backward, AdamW step (fused=True). Each repeat runs in a fresh process per side,
the sides alternating (A/B interleaved), and reports the median step time of the process (after
one warm-up step) and its peak RSS (ru_maxrss: the weights, gradients, AdamW state and the
step's largest moment).
decode: the same shape, batch 1, a 128-token prompt, 128 new tokens with generate(greedy);
tokens/s over the whole call after a warm-up call; the tokens of both sides are compared. Each
process also measures its copy bandwidth (a 256 MB tensor copied, STREAM's count: bytes read plus
bytes written) and the weight-read roofline: bandwidth / the bytes a token must read (every
parameter but the input embedding, of which one row is read).
--quick: 2 layers, 256 tokens (a smoke run, not a measurement).
Prints a table and writes JSON (bench-out/hf_patch_<what>_<dtype>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, however this script is run
from bandwidth import copy_bandwidth  # noqa: E402

SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1536, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=4096)


def _model(dtype, quick):
    import torch
    import transformers

    shape = dict(SHAPE, num_hidden_layers=2) if quick else SHAPE
    cfg = transformers.LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype))


def _child(args):
    """One side, in this process: prints one JSON line."""
    import torch

    import mptkernels

    model = _model(args.dtype, args.quick)
    report = None
    if args.side == "patched":
        report = mptkernels.patch(model)
    n_params = sum(p.numel() for p in model.parameters())
    seq = 256 if args.quick else 1024
    g = torch.Generator().manual_seed(1)
    if args.what == "train":
        model.train()
        ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the fastest PyTorch AdamW, both sides
        times, losses = [], []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        out = {"ms": statistics.median(times[1:]) * 1e3, "loss0": losses[0], "tokens": seq}
    else:
        model.eval()
        prompt = torch.randint(0, model.config.vocab_size, (1, 128), generator=g)
        new = 16 if args.quick else 128
        gen = lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,  # noqa: E731
                                     pad_token_id=0)
        gen()
        t0 = time.perf_counter()
        tokens = gen()
        out = {"ms": (time.perf_counter() - t0) * 1e3, "new_tokens": new, "tokens": tokens[0, 128:].tolist()}
        read = sum(p.numel() * p.element_size() for p in model.parameters()) - \
            model.get_input_embeddings().weight.nbytes
        out.update(bytes_per_token=read, copy_gb_s=copy_bandwidth())
    out.update(side=args.side, params=n_params, rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               swapped=len(report.swapped) if report else 0)
    print(json.dumps(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("train", "decode"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int, default=3, help="processes per side (alternating)")
    ap.add_argument("--steps", type=int, default=3, help="train: timed steps per process")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--side", choices=("transformers", "patched"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.steps < 1:
        ap.error(f"--reps and --steps must be >= 1, got {args.reps} and {args.steps}")
    if args.side:
        return _child(args)
    runs = {"transformers": [], "patched": []}
    for rep in range(args.reps):
        for side in ("transformers", "patched") if rep % 2 == 0 else ("patched", "transformers"):
            cmd = [sys.executable, os.path.abspath(__file__), args.what, "--dtype", args.dtype, "--side", side,
                   "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"hf_patch: the {side} process failed:\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {side:12s} rep {rep}: {runs[side][-1]['ms']:.0f} ms, peak RSS {runs[side][-1]['rss_mb']:.0f} MB",
                  flush=True)
    summary = {}
    for side, rs in runs.items():
        ms = [r["ms"] for r in rs]
        summary[side] = {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms),
                         "rss_mb_median": statistics.median(r["rss_mb"] for r in rs)}
        if args.what == "decode":
            summary[side]["tokens_per_s"] = rs[0]["new_tokens"] / (summary[side]["ms_median"] / 1e3)
            summary[side]["copy_gb_s_median"] = statistics.median(r["copy_gb_s"] for r in rs)
            summary[side]["roofline_tokens_per_s"] = summary[side]["copy_gb_s_median"] * 1e9 / rs[0]["bytes_per_token"]
    t, p = summary["transformers"], summary["patched"]
    speedup = t["ms_median"] / p["ms_median"]
    memory = 1 - p["rss_mb_median"] / t["rss_mb_median"]
    print(f"\n{args.what} {args.dtype}{' (quick)' if args.quick else ''}, {runs['patched'][0]['params'] / 1e6:.0f}M "
          f"parameters, {args.reps} processes per side:")
    rs_bytes = runs["patched"][0].get("bytes_per_token", 0)
    for side, s in summary.items():
        extra = (f", {s['tokens_per_s']:.1f} tokens/s = {s['tokens_per_s'] / s['roofline_tokens_per_s']:.0%} of the "
                 f"weight-read roofline ({s['roofline_tokens_per_s']:.0f} tokens/s at {s['copy_gb_s_median']:.0f} GB/s "
                 f"copy, {rs_bytes / 1e6:.0f} MB a token)") if args.what == "decode" else ""
        print(f"  {side:12s} {s['ms_median']:9.0f} ms [{s['ms_min']:.0f}-{s['ms_max']:.0f}]  peak RSS "
              f"{s['rss_mb_median']:7.0f} MB{extra}")
    print(f"  patched: {speedup:.2f}x faster, peak RSS {memory * 100:.0f}% lower" if memory >= 0 else
          f"  patched: {speedup:.2f}x faster, peak RSS {-memory * 100:.0f}% higher")
    same = None
    if args.what == "decode":
        same = all(r["tokens"] == runs["transformers"][0]["tokens"] for r in runs["transformers"] + runs["patched"])
        print(f"  same tokens: {same}")
    # issue 19's goals (CPU): a training step >= 1.5x faster with >= 30% less peak RSS; decoding >= 3x
    # transformers' tokens/s with the same tokens
    if args.what == "train":
        goals = {"speed >= 1.5x": speedup >= 1.5, "peak RSS >= 30% lower": memory >= 0.30}
    else:
        goals = {"tokens/s >= 3x": speedup >= 3.0, "same tokens": bool(same)}
    for name, met in goals.items():
        print(f"  goal {name}: {'met' if met else 'NOT met'}")
    out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"hf_patch_{args.what}_{args.dtype}{'_quick' if args.quick else ''}.json"),
              "w") as f:
        json.dump({"args": vars(args), "summary": summary, "speedup": speedup, "rss_reduction": memory,
                   "same_tokens": same, "goals": goals, "runs": runs, "date": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)


if __name__ == "__main__":
    main()
