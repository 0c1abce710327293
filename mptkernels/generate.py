"""Generate text with an MPT checkpoint on mptkernels, streaming it to the console.

    python -m mptkernels.generate --model DIR --prompt "..." [--max-new-tokens 64]
        [--temperature 0.0] [--top-k K] [--top-p P] [--seed S] [--int8] [--device cpu|cuda[:N]]
        [--dtype float32|bfloat16|float16] [--tokenizer DIR]

DIR is a Hugging Face MPT directory (config.json + safetensors or .bin, as save_pretrained
writes). Tokenizer: --tokenizer DIR (a local directory with tokenizer.json or
tokenizer_config.json; anything else is an error, never a download or a silent fallback), or,
without it, the model directory's tokenizer when it holds one (both need transformers),
otherwise the built-in byte-level tokenizer (token = UTF-8 byte, 0..255) that the demo models
use. Arguments are checked before anything runs (--max-new-tokens >= 1, --temperature >= 0,
--top-k >= 1, 0 < --top-p <= 1, a device this torch has, a prompt within max_seq_len): a bad
one is an argparse error (exit 2). Prints tokens/s of prefill and of decoding at the end.
"""
from __future__ import annotations

import argparse
import codecs
import math
import os
import sys
import time

import torch

from .data import TOKENIZER_FILES, checked_arg, load_hf_tokenizer


class ByteTokenizer:
    """Text <-> UTF-8 bytes as token ids 0..255 (ids past 255 decode to nothing)."""
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class _ByteStream:
    """Streams bytes as text: an incremental UTF-8 decoder holds a split character back."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids):
        return self._dec.decode(bytes(i for i in ids if 0 <= i < 256))

    def flush(self):  # a split character at the very end becomes U+FFFD, as decode() gives
        return self._dec.decode(b"", final=True)


class _HFStream:
    """Streams an HF tokenizer's text: decodes everything so far and prints the new suffix."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def __call__(self, ids):
        self.ids += list(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        new, self.shown = text[self.shown:], len(text)
        return new

    def flush(self):
        return ""


class PrintStreamer:
    """``generate``'s streamer: prints sequence 0's new text as each token arrives."""

    def __init__(self, decode_new, file=sys.stdout):
        self.decode_new, self.file, self.count, self.t_first = decode_new, file, 0, None

    def put(self, tokens):
        if tokens.dim() == 2:  # HF's protocol starts with the prompt, which main() printed already
            return
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.count += 1
        print(self.decode_new([int(tokens[0])]), end="", file=self.file, flush=True)

    def end(self):
        print(self.decode_new.flush(), file=self.file, flush=True)


def load_tokenizer(path, model_dir=None):
    """The HF tokenizer in ``path`` (--tokenizer: must exist and hold one, else an error naming
    it); with no path, the model directory's tokenizer if it has one, else the byte tokenizer."""
    if path:
        return load_hf_tokenizer(path, "--tokenizer")
    if model_dir and any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return load_hf_tokenizer(model_dir, "--model")
    return ByteTokenizer()


def _device_error(device: str):
    """Why ``device`` cannot run here (None if it can): cpu, or cuda[:N] with such a GPU."""
    try:
        d = torch.device(device)
    except RuntimeError:
        return f"--device: expected cpu, cuda or cuda:N, got {device!r}"
    if d.type == "cpu":
        return None
    if d.type != "cuda":
        return f"--device: expected cpu, cuda or cuda:N, got {device!r}"
    if not torch.cuda.is_available():
        return (f"--device {device}: CUDA is not available (torch {torch.__version__}"
                f"{' is built without CUDA' if torch.version.cuda is None else ' sees no GPU'}); use --device cpu")
    if d.index is not None and d.index >= torch.cuda.device_count():
        return f"--device {device}: there are {torch.cuda.device_count()} CUDA devices"
    return None


def main(argv=None, prog="python -m mptkernels.generate"):
    """The command line; prog is the name its usage shows (``mptkernels generate`` when run by that command)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF MPT checkpoint directory")
    p.add_argument("--prompt", required=True)
    # >= 1 as model.generate requires: a run that generates nothing is a mistake, not a no-op
    p.add_argument("--max-new-tokens", type=checked_arg(int, lambda v: v >= 1, "an integer >= 1"), default=64)
    p.add_argument("--temperature", type=checked_arg(float, lambda v: math.isfinite(v) and v >= 0,
                                                  "a number >= 0 (0: greedy)"), default=0.0)
    p.add_argument("--top-k", type=checked_arg(int, lambda v: v >= 1, "an integer >= 1"))
    p.add_argument("--top-p", type=checked_arg(float, lambda v: 0 < v <= 1, "a number in (0, 1]"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8", action="store_true", help="weight-only int8 linears (quantize_) for decoding")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: the model's, else bytes)")
    args = p.parse_args(argv)
    # every check before loading anything: bad input is an argparse error, not a traceback
    if (err := _device_error(args.device)) is not None:
        p.error(err)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        what = ("holds no config.json" if os.path.isdir(args.model) else
                "is not a directory" if os.path.exists(args.model) else "does not exist")
        p.error(f"--model {args.model} {what} (expected a save_pretrained directory)")
    try:
        tok = load_tokenizer(args.tokenizer, args.model)
    except (OSError, ValueError, ImportError) as e:
        p.error(str(e))
    ids = tok.encode(args.prompt)
    if not ids:
        p.error("--prompt encodes to no tokens")

    import mptkernels
    from mptkernels.models import MPTForCausalLM

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    try:
        model = MPTForCausalLM.from_hf(args.model, device=args.device, dtype=dtype).eval()
    except (OSError, ValueError) as e:  # no weights, a config or checkpoint that is not MPT's
        p.error(f"--model {args.model}: {e}")
    cfg = model.config
    if max(ids) >= cfg.vocab_size:
        p.error(f"the tokenizer gives id {max(ids)} but the model's vocab_size is {cfg.vocab_size}")
    # model.generate's rule, checked here so the error comes before any output (from_hf models
    # are ALiBi: the new tokens may run past max_seq_len, the prompt may not)
    if len(ids) > cfg.max_seq_len:
        p.error(f"--prompt is {len(ids)} tokens but the model's max_seq_len is {cfg.max_seq_len}")
    if args.int8:
        report = mptkernels.quantize_(model, "weight_only")
        print(f"[int8] {len(report)} linear layers weight-only int8, saved "
              f"{(report.bytes_before - report.bytes_after) / 2**20:.1f} MiB", file=sys.stderr)
    input_ids = torch.tensor([ids], device=args.device)
    streamer = PrintStreamer(_ByteStream() if isinstance(tok, ByteTokenizer) else _HFStream(tok))
    print(args.prompt, end="", flush=True)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    out = model.generate(input_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_token_id=getattr(tok, "eos_token_id", None), streamer=streamer,
                         generator=gen)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    new = out.shape[1] - input_ids.shape[1]
    prefill_s = (streamer.t_first or t1) - t0
    decode_s = t1 - (streamer.t_first or t1)
    decode_tps = (new - 1) / decode_s if new > 1 and decode_s > 0 else float("nan")
    print(f"[{new} new tokens; prefill {len(ids)} tokens in {prefill_s * 1e3:.1f} ms; decode {decode_tps:.1f} tokens/s "
          f"on {args.device}, {str(dtype).replace('torch.', '')}{', int8 weights' if args.int8 else ''}]",
          file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
