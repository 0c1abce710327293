"""The MPT model on mptkernels against llama.cpp (llama-cpp-python) on the same weights (issue 21):
greedy decoding and prefill, batch 1, on the CPU.

    python benchmarks/vs_llama_cpp.py [--size 125m|350m|tiny] [--reps 3] [--threads 2]
                                   [--precisions f32,bf16,q8_0] [--llama-cpp DIR]

The model (random weights, seed 0; speed does not depend on them) is written once with
save_pretrained (transformers' MPT format) beside a minimal byte-level BPE tokenizer (no real
tokenizer is needed: both sides are fed token ids), and llama.cpp's own converter,
convert_hf_to_gguf.py, turns that directory into GGUF files at f32, bf16 and q8_0. The pairs:
our fp32 against f32, our bf16 against bf16, our weight-only int8 (quantize_(model,
"weight_only")) against q8_0. Each repeat runs every pair, one fresh process per side, the sides
alternating (A/B, B/A), each with --threads threads (torch.set_num_threads / llama n_threads),
so neither side's thread pool or caches touch the other's.

In each process: a 32-token prompt, then 128 greedy tokens; decode tokens/s = 127 / the time from
the first new token to the last (the decode steps only, after one warm-up call); prefill tokens/s
of a 32- and a 512-token prompt into an empty cache (median of 3 after a warm-up; ours with
logits_to_keep=1, as generate() prefills: the last position's logits, as llama.cpp). The process
also measures its copy bandwidth (a 256 MB copy, STREAM's count: bytes read plus written) and
gives the fraction of the weight-read roofline: decode tokens/s / (bandwidth / the weight bytes a
token reads: every weight, the input embedding as one row unless it is also the LM head; the
KV cache, ~2% at these lengths, is left out). The table gives median [min-max] over the repeats;
the ratio is ours / llama.cpp, taken per repeat. The greedy tokens of the two sides are compared:
how many of the first tokens agree.

Needs (benchmark-only, not for mptkernels itself): llama-cpp-python and gguf from the package
index, and llama.cpp's converter, which is not in the wheel: --llama-cpp DIR (or $LLAMA_CPP_DIR),
a llama.cpp checkout or the vendor/llama.cpp folder of the llama-cpp-python sdist. When one is
missing the script says so in one line and exits 0 (skipped).
Writes bench-out/llama_cpp_<size>.json; the model and GGUF files stay in bench-out/llama_cpp_<size>/
and are reused by later runs (delete the folder to write and convert them again).
(Not named llama_cpp.py: run as a script, its folder comes first on sys.path and `import llama_cpp`
would import the script itself.)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, however this script is run
from bandwidth import copy_bandwidth  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # MPT shapes of issue 21 (transformers' MPT: ALiBi, 4x FFN, no biases); tiny: the tests' smoke run
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, vocab_size=512),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, vocab_size=50432),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, vocab_size=50432),
}
# our precision of each pair, and the KV-cache type llama.cpp gets: the one our cache has (our
# weight-only int8 model keeps fp32 activations and cache), so both sides store the same bytes
PAIRS = {"f32": ("float32", "f32"), "bf16": ("bfloat16", "bf16"), "q8_0": ("int8", "f32")}
PROMPT, NEW, PREFILL = 32, 128, (32, 512)
INSTALL = ("pip install gguf llama-cpp-python (CMAKE_ARGS=\"-DGGML_NATIVE=ON\" for this CPU's "
           "instructions), and pass --llama-cpp DIR: llama.cpp's checkout or the llama-cpp-python sdist's "
           "vendor/llama.cpp, which holds convert_hf_to_gguf.py")

# llama.cpp's converter, run as its own script with two additions that change nothing it writes
# for a known model: (1) it files MPT under llm-foundry's class name (MPTForCausalLM, as MosaicML's
# checkpoints declare it) and not under transformers' MptForCausalLM, which save_pretrained
# writes: the same class is registered under both; (2) it identifies a BPE tokenizer by the hash
# of a test string's ids and refuses one it does not know, as our minimal tokenizer is: that
# tokenizer pre-splits like GPT-2 (ByteLevel), so it gets "gpt-2".
_CONVERT = """
import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0:0] = [os.path.dirname(script), os.path.join(os.path.dirname(script), "gguf-py")]
import conversion
from conversion import base, mpt
conversion.TEXT_MODEL_MAP.setdefault("MptForCausalLM", "mpt")
base.ModelBase.register("MptForCausalLM")(mpt.MPTModel)
_known = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = _pre
runpy.run_path(script, run_name="__main__")
"""


def _missing(llama_dir):
    """Why the baseline cannot run here (one line), or None. A folder given that holds no
    converter is not a reason to skip but a wrong argument (main's error)."""
    for mod, pkg in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
        if importlib.util.find_spec(mod) is None:
            return f"{pkg} is not installed"
    if not llama_dir:
        return "llama.cpp's converter was not given (--llama-cpp DIR or $LLAMA_CPP_DIR)"
    return None


def _prompts(vocab):
    """The 32-token prompt and the 512-token prefill prompt: the same ids on both sides."""
    import torch

    g = torch.Generator().manual_seed(1)
    # byte-level ids and up: no id of the tokenizer's specials, which llama.cpp may treat apart
    return {n: torch.randint(256, vocab, (n,), generator=g).tolist() for n in sorted(set(PREFILL + (PROMPT,)))}


def _export(size, work):
    """The HF directory (config.json, model.safetensors, a tokenizer) of the random model at `size`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mptkernels.models import MPTConfig, MPTForCausalLM

    hf = os.path.join(work, "hf")
    if os.path.isfile(os.path.join(hf, "model.safetensors")):
        return hf
    torch.manual_seed(0)
    MPTForCausalLM(MPTConfig(**SIZES[size], max_seq_len=2048)).save_pretrained(hf)
    # a minimal byte-level BPE: the 256 byte symbols and one merge (llama.cpp's loader needs a
    # merge list); ids above it are unused vocabulary rows, as the converter pads them
    byte_sym = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(byte_sym))}
    vocab["Ġt"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab, [("Ġ", "t")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(hf)
    return hf


def _convert(llama_dir, hf, work, outtype):
    """hf -> GGUF at outtype with llama.cpp's converter (once; the command is returned for the record)."""
    out = os.path.join(work, f"model-{outtype}.gguf")
    script = os.path.join(os.path.abspath(llama_dir), "convert_hf_to_gguf.py")
    cmd = [script, hf, "--outtype", outtype, "--outfile", out]
    if not os.path.isfile(out):
        proc = subprocess.run([sys.executable, "-c", _CONVERT, *cmd], capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(out):
            sys.exit(f"vs_llama_cpp.py: convert_hf_to_gguf.py failed for {outtype}:\n{proc.stderr[-3000:]}")
    return out, "python convert_hf_to_gguf.py " + " ".join(cmd[1:])


def _time_prefill(run, reps=3):
    """Median seconds of run() after one warm-up call."""
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _child_ours(args, prompts):
    import torch

    import mptkernels
    from mptkernels.models import MPTForCausalLM

    torch.set_num_threads(args.threads)
    ours = PAIRS[args.pair][0]
    model = MPTForCausalLM.from_hf(args.hf, dtype=torch.bfloat16 if ours == "bfloat16" else torch.float32).eval()
    if ours == "int8":
        mptkernels.quantize_(model, "weight_only")
    # the weight bytes a decode step reads; the input embedding is one row, unless the LM head is it
    seen, read = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            read += t.nbytes
    wte = model.transformer.wte.weight
    if getattr(model.lm_head, "weight", None) is not wte:
        read -= wte.nbytes

    class Stamps:  # transformers' streamer protocol: put(prompt), then put(token) per step
        def __init__(self):
            self.t, self.tokens = [], []

        def put(self, x):
            self.t.append(time.perf_counter())
            self.tokens.append(x)

        def end(self):
            pass

    ids = torch.tensor([prompts[PROMPT]])
    model.generate(ids, 8)  # warm-up: allocator, the kernels' first calls
    s = Stamps()
    model.generate(ids, NEW, streamer=s)
    tokens = [int(x) for x in s.tokens[1:]]
    decode_s = s.t[-1] - s.t[1]  # from the first new token to the last: NEW - 1 decode steps
    prefill = {}
    with torch.no_grad():
        for n in PREFILL:
            x = torch.tensor([prompts[n]])
            cache = model.new_cache(1, n)
            lens = torch.zeros(1, dtype=torch.int32)
            prefill[n] = n / _time_prefill(lambda: model(x, cache=cache, cache_seqlens=lens, logits_to_keep=1))
    return tokens, decode_s, prefill, read


def _child_llama(args, prompts):
    import numpy as np
    import torch
    import llama_cpp
    from gguf import GGUFReader

    torch.set_num_threads(args.threads)  # for the copy-bandwidth measurement only
    # ggml's type ids (ggml.h); llama-cpp-python 0.3.36 exports F32 but not BF16
    kv = {"f32": 0, "bf16": 30}[PAIRS[args.pair][1]]
    llm = llama_cpp.Llama(args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=max(PREFILL),
                          n_batch=max(PREFILL), n_ubatch=max(PREFILL), type_k=kv, type_v=kv, verbose=False)
    reader = GGUFReader(args.gguf)  # the weight bytes a decode step reads, as for ours
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    read = sum(sizes.values()) - (sizes["token_embd.weight"] if "output.weight" in sizes else 0)

    vocab = llm.n_vocab()

    def greedy(prompt, new, stamps):
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for i in range(new):
            # the last token's logits, read in place (Llama.scores is filled only with logits_all,
            # which would compute the LM head for every prompt position)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            tok = int(np.argmax(logits))
            stamps.append(time.perf_counter())
            tokens.append(tok)
            if i + 1 < new:
                llm.eval([tok])
        return tokens

    greedy(prompts[PROMPT], 8, [])  # warm-up
    stamps = []
    tokens = greedy(prompts[PROMPT], NEW, stamps)
    prefill = {}
    for n in PREFILL:
        def run(n=n):
            llm.reset()
            llm.eval(prompts[n])
        prefill[n] = n / _time_prefill(run)
    return tokens, stamps[-1] - stamps[0], prefill, read


def _child(args):
    """One side of one pair, in this process: prints one JSON line."""
    prompts = _prompts(SIZES[args.size]["vocab_size"])
    tokens, decode_s, prefill, read = (_child_ours if args.side == "ours" else _child_llama)(args, prompts)
    tps = (NEW - 1) / decode_s
    bw = copy_bandwidth()
    print(json.dumps({"side": args.side, "pair": args.pair, "decode_tps": tps, "tokens": tokens,
                      "prefill_tps": {str(n): v for n, v in prefill.items()}, "bytes_per_token": read,
                      "copy_gb_s": bw, "roofline_frac": tps / (bw * 1e9 / read)}))


def _spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _fmt(s, f="{:.1f}"):
    return f"{f.format(s['median'])} [{f.format(s['min'])}-{f.format(s['max'])}]"


def _agree(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="125m")
    ap.add_argument("--reps", type=int, default=3, help="processes per side and pair (alternating)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default=",".join(PAIRS), help="comma-separated, of " + ", ".join(PAIRS))
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                    help="the folder holding llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_DIR)")
    for hidden in ("--side", "--pair", "--hf", "--gguf"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    precisions = args.precisions.split(",")
    if any(p not in PAIRS for p in precisions):
        ap.error(f"--precisions: expected a comma-separated list of {', '.join(PAIRS)}, got {args.precisions!r}")
    if args.reps < 1 or args.threads < 1:
        ap.error(f"--reps and --threads must be >= 1, got {args.reps} and {args.threads}")
    if args.side:
        return _child(args)
    if args.llama_cpp and not os.path.isfile(os.path.join(args.llama_cpp, "convert_hf_to_gguf.py")):
        ap.error(f"--llama-cpp (or $LLAMA_CPP_DIR): expected a folder holding llama.cpp's convert_hf_to_gguf.py, "
                 f"got {args.llama_cpp!r}")
    why = _missing(args.llama_cpp)
    if why:
        print(f"vs_llama_cpp.py: skipped: {why}; to run it: {INSTALL}")
        return 0

    import llama_cpp
    import torch

    from mptkernels.bench.harness import others_busy

    work = os.path.join(ROOT, "bench-out", f"llama_cpp_{args.size}")
    os.makedirs(work, exist_ok=True)
    hf = _export(args.size, work)
    ggufs, commands = {}, {}
    for p in precisions:
        ggufs[p], commands[p] = _convert(args.llama_cpp, hf, work, p)
    busy = [others_busy()]
    runs = {p: {"ours": [], "llama.cpp": []} for p in precisions}
    for rep in range(args.reps):
        for p in precisions:
            for side in ("ours", "llama.cpp") if rep % 2 == 0 else ("llama.cpp", "ours"):
                cmd = [sys.executable, os.path.abspath(__file__), "--size", args.size, "--threads", str(args.threads),
                       "--side", side, "--pair", p, "--hf", hf, "--gguf", ggufs[p]]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
                if proc.returncode != 0:
                    sys.exit(f"vs_llama_cpp.py: the {side} {p} process failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[p][side].append(r)
                print(f"  rep {rep} {p:5s} {side:9s} decode {r['decode_tps']:7.1f} tokens/s, prefill "
                      f"{r['prefill_tps']['512']:7.1f} tokens/s at 512", flush=True)
        busy.append(others_busy())
    summary = {}
    for p in precisions:
        o, l = runs[p]["ours"], runs[p]["llama.cpp"]
        s = {"ours_precision": PAIRS[p][0], "llama_kv_cache": PAIRS[p][1]}
        for side, rs in (("ours", o), ("llama.cpp", l)):
            s[side] = {"decode_tps": _spread([r["decode_tps"] for r in rs]),
                       "roofline_frac": _spread([r["roofline_frac"] for r in rs]),
                       "copy_gb_s": _spread([r["copy_gb_s"] for r in rs]),
                       "bytes_per_token": rs[0]["bytes_per_token"]}
            for n in PREFILL:
                s[side][f"prefill{n}_tps"] = _spread([r["prefill_tps"][str(n)] for r in rs])
        s["ratio_decode"] = _spread([a["decode_tps"] / b["decode_tps"] for a, b in zip(o, l)])
        for n in PREFILL:
            s[f"ratio_prefill{n}"] = _spread([a["prefill_tps"][str(n)] / b["prefill_tps"][str(n)] for a, b in zip(o, l)])
        s["tokens_agree"] = _agree(o[0]["tokens"], l[0]["tokens"])
        s["deterministic"] = all(r["tokens"] == o[0]["tokens"] for r in o) and \
            all(r["tokens"] == l[0]["tokens"] for r in l)
        summary[p] = s
    cfg = SIZES[args.size]
    print(f"\nMPT {args.size} (d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, vocab "
          f"{cfg['vocab_size']}), batch 1, {args.threads} threads a side, prompt {PROMPT} + {NEW} greedy tokens, "
          f"{args.reps} interleaved repeats; torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}; "
          f"other processes kept {max(b or 0 for b in busy):.1f} cores busy at most (sampled between repeats)")
    print("  decode tokens/s, median [min-max]; roofline = tokens/s / (copy GB/s / weight bytes a token)")
    print(f"  {'pair':22s} {'ours':26s} {'llama.cpp':26s} {'ours/llama':20s} {'roofline ours':14s} "
          f"{'roofline llama':14s} agree")
    for p, s in summary.items():
        o, l = s["ours"], s["llama.cpp"]
        print(f"  {s['ours_precision'] + ' vs ' + p:22s} {_fmt(o['decode_tps']):26s} {_fmt(l['decode_tps']):26s} "
              f"{_fmt(s['ratio_decode'], '{:.2f}'):20s} {o['roofline_frac']['median']:13.0%} "
              f"{l['roofline_frac']['median']:14.0%} {s['tokens_agree']}/{NEW}")
    for n in PREFILL:
        print(f"  prefill of {n} tokens, tokens/s")
        for p, s in summary.items():
            print(f"  {s['ours_precision'] + ' vs ' + p:22s} {_fmt(s['ours'][f'prefill{n}_tps']):26s} "
                  f"{_fmt(s['llama.cpp'][f'prefill{n}_tps']):26s} {_fmt(s[f'ratio_prefill{n}'], '{:.2f}')}")
    for p, s in summary.items():
        print(f"  {p}: weight bytes a token: ours {s['ours']['bytes_per_token'] / 1e6:.0f} MB, llama.cpp "
              f"{s['llama.cpp']['bytes_per_token'] / 1e6:.0f} MB; copy {s['ours']['copy_gb_s']['median']:.1f} / "
              f"{s['llama.cpp']['copy_gb_s']['median']:.1f} GB/s; greedy tokens agree on the first "
              f"{s['tokens_agree']}; each side deterministic: {s['deterministic']}")
    with open(os.path.join(ROOT, "bench-out", f"llama_cpp_{args.size}.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "runs": runs, "conversion": commands,
                   "others_busy_cores": busy, "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
