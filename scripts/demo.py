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


def _corpus(max_bytes=2_000_000):
    """Text found on this machine: the package's docs, then Python's own library sources."""
    import glob
    import sysconfig

    files = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]
    files += sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    chunks, total = [], 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def _bar(i, n, text, width=30):
    """A progress bar redrawn in place on a terminal; in a log, one line per tenth."""
    done = int(width * (i + 1) / n)
    line = f"  [{'#' * done}{'.' * (width - done)}] {i + 1}/{n} {text}"
    if sys.stdout.isatty():
        print("\r" + line, end="\n" if i + 1 == n else "", flush=True)
    elif (i + 1) * 10 // n != i * 10 // n or i + 1 == n:
        print(line, flush=True)


def train_and_generate(device, out_dir, seconds):
    """Train a small byte-level MPT on local text for about `seconds`, save it in HF format,
    load it back and generate from it with the KV cache."""
    import time

    from mptkernels.models import MPTConfig, MPTForCausalLM
    from mptkernels.generate import ByteTokenizer

    torch.manual_seed(0)
    data = _corpus()
    gpu = device == "cuda"
    cfg = MPTConfig(d_model=256 if gpu else 128, n_heads=4, n_layers=4 if gpu else 3, max_seq_len=256,
                    vocab_size=256, attn_config=dict(alibi=True))
    model = MPTForCausalLM(cfg, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    batch, seq = (32, 256) if gpu else (8, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    print(f"\ntraining a {n_params / 1e6:.2f}M-parameter byte-level MPT on {len(data) / 1e6:.1f} MB of local text "
          f"({device}, about {seconds} s):")
    g = torch.Generator().manual_seed(0)
    t0, losses, step = time.perf_counter(), [], 0
    est_steps = None
    while True:
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + seq] for i in idx]).to(device)
        _, loss = model(x, labels=x)  # fp32 master weights and compute: a tiny model, no mixed precision
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        elapsed = time.perf_counter() - t0
        if est_steps is None and elapsed > 2:
            est_steps = max(step + 1, int(step * seconds / elapsed))
        if est_steps:
            _bar(min(step, est_steps) - 1, est_steps, f"loss {losses[-1]:.3f}  {step * batch * seq / elapsed:,.0f} tok/s")
            if step >= est_steps:
                break
    print(f"  loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} (nats per byte) in {step} steps")
    path = os.path.join(out_dir, "demo-mpt")
    model.save_pretrained(path)
    model = MPTForCausalLM.from_hf(path, device=device).eval()
    prompt = "def "
    ids = torch.tensor([ByteTokenizer().encode(prompt)], device=device)
    t = time.perf_counter()
    out = model.generate(ids, 200, temperature=0.8, top_k=20, generator=torch.Generator(device=device).manual_seed(0))
    dt = time.perf_counter() - t
    text = ByteTokenizer().decode(out[0].tolist())
    print(f"  saved to {path} (HF MPT format); generated with the KV cache, {200 / dt:.0f} tokens/s:")
    print("  | " + text.replace("\n", "\n  | "))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(ROOT, "bench-out"), help="benchmark JSON and plot folder")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmarks")
    p.add_argument("--train-seconds", type=int, default=60, help="how long the demo model trains (0: skip)")
    args = p.parse_args()
    mptkernels.info()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_ops(device)
    if args.train_seconds > 0:
        os.makedirs(args.out, exist_ok=True)
        train_and_generate(device, args.out, args.train_seconds)
    if not args.no_bench:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import run as bench_run

        bench_run.main(["--quick", "--out", args.out, "--device", device])


if __name__ == "__main__":
    main()
