"""The main job, run by scripts/demo.sh (which builds first): what was built, each op run on
this device against the reference, a small byte-level MPT trained from scratch on the standard
library's Python, saved in HF format, loaded back and sampled with the KV cache, the quick
benchmarks, and a summary of what was shown with the total time.

    python scripts/demo.py [--no-bench] [--train-seconds 75] [--out bench-out]
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # the total time the summary reports starts here, before torch is imported

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

import mptkernels  # noqa: E402
from mptkernels import ops, reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_ops(device):
    """Every op family on this device against mptkernels.reference; returns [(what, relative error)]."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"\nops on {device} ({str(dtype).replace('torch.', '')}) vs mptkernels.reference (relative error):")
    errors = []

    def show(what, err, extra=""):
        errors.append((what, err))
        print(f"  {what:<23} {err:.2e}{extra}")

    x = torch.randn(4, 333, 1024, device=device, dtype=dtype)
    r, w, b = torch.randn_like(x), torch.randn(1024, device=device, dtype=dtype), torch.randn(1024, device=device, dtype=dtype)
    y, s = ops.layer_norm(x, w, b, 1e-5, r)
    show("layer_norm (+residual)", rel(y, reference.layer_norm(x, w, b, 1e-5, r)[0]))
    y, s = ops.rms_norm(x, w, 1e-6, r, cast="llama")
    show("rms_norm (llama cast)", rel(y, reference.rms_norm(x, w, 1e-6, r, cast='llama')[0]))
    q = torch.randn(2, 257, 8, 64, device=device, dtype=dtype, requires_grad=True)
    cos, sin = ops.rotary_cos_sin(512, 64, device=device)
    out = ops.apply_rotary(q, cos, sin, seqlen_offsets=100)
    show("apply_rotary (offset)", rel(out, reference.apply_rotary(q, cos, sin, seqlen_offsets=100)))
    out.float().pow(2).sum().backward()
    print(f"  apply_rotary backward   |grad| finite: {bool(torch.isfinite(q.grad).all())}")
    # attention: causal + ALiBi + GQA, packed sequences, and a decode step over a KV cache
    hq, hk, d = 8, 2, 64
    slopes = ops.alibi_slopes(hq).to(device)
    qa = torch.randn(2, 300, hq, d, device=device, dtype=dtype, requires_grad=True)
    ka, va = (torch.randn(2, 300, hk, d, device=device, dtype=dtype) for _ in range(2))
    out = ops.attention(qa, ka, va, causal=True, alibi_slopes=slopes)
    want = reference.attention(qa.detach(), ka, va, causal=True, alibi_slopes=slopes)
    show("attention causal+ALiBi", rel(out, want))
    out.float().pow(2).sum().backward()
    print(f"  attention backward      |grad| finite: {bool(torch.isfinite(qa.grad).all())}")
    cu = torch.tensor([0, 100, 117, 300], dtype=torch.int32, device=device)
    qv, kv, vv = (t.detach()[0] for t in (qa, ka, va))
    got = ops.attention_varlen(qv, kv, vv, cu, cu, 183, 183, causal=True, alibi_slopes=slopes)
    show("attention_varlen", rel(got, reference.attention_varlen(qv, kv, vv, cu, cu, causal=True, alibi_slopes=slopes)))
    kc, vc = (torch.randn(2, 512, hk, d, device=device, dtype=dtype) for _ in range(2))
    lens = torch.tensor([37, 400], dtype=torch.int32, device=device)
    qn, kn, vn = (torch.randn(2, 1, h, d, device=device, dtype=dtype) for h in (hq, hk, hk))
    kc2, vc2 = kc.clone(), vc.clone()
    got = ops.attention_with_kvcache(qn, kc, vc, lens, k=kn, v=vn, alibi_slopes=slopes)
    want = reference.attention_with_kvcache(qn, kc2, vc2, lens, kn, vn, alibi_slopes=slopes)
    show("attention_with_kvcache", rel(got, want), f" (cache written: {bool(torch.equal(kc, kc2))})")
    # GEMMs: linear + GELU, W8A8 and weight-only int8 (errors vs the dequantised reference)
    xg = torch.randn(77, 512, device=device, dtype=dtype)
    wg = torch.randn(384, 512, device=device, dtype=dtype) * 512 ** -0.5
    show("linear + GELU", rel(ops.linear(xg, wg, None, 'gelu'), reference.linear(xg, wg, None, 'gelu')))
    wq, ws = ops.quantize_rowwise(wg.float())
    show("int8_linear (W8A8)", rel(ops.int8_linear(xg, wq, ws), reference.int8_linear(xg, wq, ws)),
         f"  (vs the float linear: {rel(ops.int8_linear(xg, wq, ws), xg.float() @ wg.float().t()):.2e})")
    show("weight_only_int8_linear", rel(ops.weight_only_int8_linear(xg, wq, ws),
                                        reference.weight_only_int8_linear(xg, wq, ws)))
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.LayerNorm(64))
    print(" ", str(mptkernels.patch(model, int8="weight_only")).replace("\n", "\n  "))
    return errors


def _corpus(max_bytes=500_000):
    """Text that is on every machine with Python: the standard library's own public modules
    (Lib/*.py in name order, those starting with "_" left out), as code only: docstrings and
    comment lines removed (a small model trained on them half learns English, and greedy
    decoding then prints "the the the"). Returns (uint8 ids as int64, the number of files)."""
    import glob
    import sysconfig

    chunks, total, n_files = [], 0, 0
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        if os.path.basename(f).startswith("_"):
            continue
        try:
            with open(f, encoding="utf-8") as fh:
                code = _code_only(fh.read())
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # unreadable, or Python syntax this interpreter does not parse
        data = code.encode("utf-8")
        chunks.append(data)
        total += len(data)
        n_files += 1
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long(), n_files


def _code_only(src):
    """Python source without its docstrings and comment-only lines (and runs of blank lines
    cut to one)."""
    import ast
    import re

    drop = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                drop.update(range(first.lineno, first.end_lineno + 1))
    lines = [line for i, line in enumerate(src.splitlines(), 1) if i not in drop and not line.lstrip().startswith("#")]
    return re.sub(r"\n[ \t]*\n([ \t]*\n)+", "\n\n", "\n".join(lines)) + "\n"


class _Bar:
    """A progress bar redrawn in place on a terminal; in a log, one line per tenth."""

    def __init__(self, width=30):
        self.width, self.shown = width, -1

    def __call__(self, frac, text, final=False):
        frac = 1.0 if final else min(frac, 0.999)
        done = int(self.width * frac)
        line = f"  [{'#' * done}{'.' * (self.width - done)}] {text}"
        if sys.stdout.isatty():
            print("\r" + line, end="\n" if final else "", flush=True)
        elif int(10 * frac) > self.shown:
            self.shown = int(10 * frac)
            print(line, flush=True)


# The demo model and its training, per device. The CPU's were chosen by measuring on 2 cores
# (model shape, heads, learning rate, batch, text size; the commit message has the numbers)
# for the most recognisable greedy Python in about a minute: 8 heads beat 4 and 16, a peak lr
# of 2e-3 beat 3e-3 and 5e-3, batch 8 beat 16 (more steps), 0.5 MB of text (about 5 passes)
# beat 2 MB (under one pass) and 0.25 MB (memorised, and worse at indentation).
SETTINGS = {
    "cpu": dict(d_model=128, n_heads=8, n_layers=3, batch=8, seq=128, lr=2e-3, text_bytes=500_000),
    "cuda": dict(d_model=256, n_heads=8, n_layers=4, batch=32, seq=256, lr=2e-3, text_bytes=4_000_000),  # not tuned
}
WARMUP = 0.05      # fraction of the time: linear warm-up of the learning rate, then a cosine
FINAL_LR = 0.1     # down to this fraction of the peak at the end
# Each prompt starts with a newline, so the model knows it is at the start of a line (training
# windows start anywhere: without it, "import " could be the middle of an indented line). Greedy
# decoding of a model this small gets stuck in whitespace where it loses count of the
# indentation (an unclosed bracket at a line end opens a continuation line, aligned to a column
# it cannot count to). Greedy outputs stuck, of 10 models trained with these settings (seeds,
# demo runs, one of 40 s): "\ndef " 4, "\nclass " 6, the class Point prompt 4; this one, a
# method that has begun setting attributes, 1 ("\n        self." and "\nimport " 0, but
# they show less: "import sys" 40 times).
GREEDY_PROMPTS = ("\n    def __init__(self, name):\n        self.name = name\n        self.",)
SAMPLED_PROMPT = "\ndef "
NEW_TOKENS = 200


def train_and_generate(device, out_dir, seconds):
    """Train a small byte-level MPT on the standard library's Python for about `seconds` (the
    learning rate follows the elapsed time: warm-up, then a cosine decay that ends on time),
    save it in HF format, load it back with ``from_hf`` and generate from it with the KV
    cache, greedy and sampled. Returns what the summary reports."""
    import math

    from mptkernels.models import MPTConfig, MPTForCausalLM
    from mptkernels.generate import ByteTokenizer

    torch.manual_seed(0)
    hp = SETTINGS["cuda" if device == "cuda" else "cpu"]
    data, n_files = _corpus(hp["text_bytes"])
    batch, seq, peak = hp["batch"], hp["seq"], hp["lr"]
    cfg = MPTConfig(d_model=hp["d_model"], n_heads=hp["n_heads"], n_layers=hp["n_layers"], max_seq_len=1024,
                    vocab_size=256, attn_config=dict(alibi=True))
    model = MPTForCausalLM(cfg, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.99), weight_decay=0.0)
    print(f"\ntraining a {n_params / 1e6:.2f}M-parameter byte-level MPT ({cfg.n_layers} layers, d_model "
          f"{cfg.d_model}, ALiBi) on {len(data) / 1e6:.1f} MB of Python: {n_files} modules of this Python's "
          f"standard library, code only ({device}, {seconds} s, batch {batch} x {seq} bytes):")
    g = torch.Generator().manual_seed(0)
    bar = _Bar()
    t0, losses, step = time.perf_counter(), [], 0
    while (frac := (time.perf_counter() - t0) / seconds) < 1:
        # warm-up, then cosine decay to FINAL_LR of the peak, over the time budget
        f = (frac - WARMUP) / (1 - WARMUP)
        lr = peak * frac / WARMUP if frac < WARMUP else peak * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * f)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + seq] for i in idx]).to(device)
        _, loss = model(x, labels=x)  # fp32 weights and compute: a tiny model, no mixed precision
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        elapsed = time.perf_counter() - t0
        progress = f"{elapsed:3.0f}/{seconds} s  step {step}  loss {losses[-1]:.3f}  {step * batch * seq / elapsed:,.0f} tok/s"
        bar(elapsed / seconds, progress)
    bar(1.0, progress, final=True)
    train_s = time.perf_counter() - t0
    end_loss = sum(losses[-20:]) / len(losses[-20:])
    print(f"  loss {losses[0]:.3f} -> {end_loss:.3f} nats per byte in {step} steps, {step * batch * seq / 1e6:.1f}M "
          f"tokens ({step * batch * seq / len(data):.1f} passes over the text)")
    path = os.path.join(out_dir, "demo-mpt")
    model.save_pretrained(path)
    model = MPTForCausalLM.from_hf(path, device=device).eval()
    print(f"  saved to {path} (HF MPT format) and loaded back with MPTForCausalLM.from_hf")
    tok = ByteTokenizer()
    n_tokens, gen_s = 0, 0.0
    samples = [(p, 0.0) for p in GREEDY_PROMPTS] + [(SAMPLED_PROMPT, 0.8)]
    for prompt, temperature in samples:
        ids = torch.tensor([tok.encode(prompt)], device=device)
        t = time.perf_counter()
        out = model.generate(ids, NEW_TOKENS, temperature=temperature, top_k=20 if temperature else None,
                             generator=torch.Generator(device=device).manual_seed(0))
        gen_s += time.perf_counter() - t
        n_tokens += NEW_TOKENS
        how = "greedy (temperature 0)" if not temperature else f"sampled (temperature {temperature}, top-k 20)"
        text = tok.decode(out[0].tolist()).lstrip("\n")
        shown = text.rstrip()
        print(f"\n  {how}, prompt {prompt!r}, {NEW_TOKENS} new bytes:")
        print("  | " + shown.replace("\n", "\n  | "))
        if len(text) - len(shown) > 16:  # a small byte-level model can lose count of the indentation
            print(f"  | ... and {len(text) - len(shown)} bytes of whitespace (the model lost count of the indentation)")
    print(f"\n  generated with the KV cache: {n_tokens / gen_s:.0f} tokens/s ({len(samples)} x {NEW_TOKENS} tokens, "
          f"batch 1, prefill included)")
    return dict(n_params=n_params, tokens=step * batch * seq, steps=step, loss=(losses[0], end_loss),
                seconds=train_s, tok_per_s=n_tokens / gen_s, path=path, text_mb=len(data) / 1e6, n_files=n_files)


def _speedup_summary(rows):
    """The summary's lines about the benchmarks: per case, what ``auto`` runs against the fastest
    PyTorch path, the median [min-max] of the per-round ratios (mptkernels.bench.harness), the
    noisy ones marked; then how many cases are faster, and how many the machine was too busy
    to call."""
    per_case = {}
    for r in rows or []:
        if r.speedup is not None and (r.impl == "mptkernels (auto)" or (r.family, r.case) not in per_case):
            per_case[(r.family, r.case)] = r
    if not per_case:
        return []
    width = max(len(f"{f}: {c}") for f, c in per_case)
    lines = [f"{f'{r.family}: {r.case}':<{width}}  {r.speedup:5.2f}× [{r.speedup_min:.2f}–{r.speedup_max:.2f}] vs "
             f"{r.best_baseline}" + ("  (noisy)" if r.noisy else "") for r in per_case.values()]
    clean = [r for r in per_case.values() if not r.noisy]
    faster = sum(r.speedup_min > 1 for r in clean)
    lines.append(f"faster than PyTorch's best path in every round: {faster} of {len(per_case)} cases"
                 f"; noisy (rerun on a quiet machine): {len(per_case) - len(clean)}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench-out"), help="folder for the model, benchmark JSON and plot")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmarks")
    p.add_argument("--train-seconds", type=int, default=75, help="how long the demo model trains (0: skip)")
    args = p.parse_args()
    mptkernels.info()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    errors = check_ops(device)
    trained = None
    if args.train_seconds > 0:
        os.makedirs(args.out, exist_ok=True)
        trained = train_and_generate(device, args.out, args.train_seconds)
    rows = None
    if not args.no_bench:
        from mptkernels.bench import run as bench_run

        rows = bench_run.main(["--quick", "--out", args.out, "--device", device])

    print("\nwhat you just saw:")
    worst = max(e for _, e in errors)
    print(f"  - every op family run on {device} against mptkernels.reference, relative error: "
          + ", ".join(f"{what.split()[0]} {err:.1e}" for what, err in errors) + f" (largest {worst:.1e}); "
          "the rotary and attention gradients finite")
    if trained:
        t = trained
        print(f"  - a {t['n_params'] / 1e6:.2f}M-parameter byte-level MPT (ALiBi) trained from scratch for {t['seconds']:.0f} s "
              f"on {t['text_mb']:.1f} MB of the standard library's Python ({t['n_files']} modules): {t['steps']} steps, "
              f"{t['tokens'] / 1e6:.1f}M bytes, loss {t['loss'][0]:.2f} -> {t['loss'][1]:.2f} nats per byte")
        print(f"  - saved, loaded back with from_hf, and generated from with the KV cache at {t['tok_per_s']:.0f} tokens/s")
        print(f"  - the model: {t['path']}/ (config.json + model.safetensors, HF's MPT format; MPTForCausalLM.from_hf, "
              f"transformers' MptForCausalLM.from_pretrained or `python -m mptkernels.generate --model {t['path']} "
              f"--prompt 'def ' --temperature 0.8 --top-k 20` load it)")
    if rows is not None:
        lines = _speedup_summary(rows)
        print(f"  - benchmarks: {os.path.join(args.out, 'results.json')} and benchmarks.png"
              + ("; speed-ups over the best PyTorch path:" if lines else ""))
        for line in lines:
            print(f"      {line}")
    elif args.no_bench:
        print("  - benchmarks: skipped (--no-bench)")
    print(f"total time: {time.perf_counter() - T0:.0f} s")


if __name__ == "__main__":
    main()
