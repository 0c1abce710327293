"""Token files for training: prepare them from text, read them as memory maps, and sample
packed training batches deterministically (resumable at any step).

    python -m mptkernels.data prepare --out DIR [--tokenizer HF_DIR] [--max-bytes N] FILES_OR_DIRS...

Each text file is one document. DIR gets ``tokens.bin`` (all documents' tokens back to back,
flat uint16 when the vocabulary fits, else uint32), ``doc_starts.npy`` (int64: where each
document starts) and ``meta.json`` (dtype, vocab_size, token and document counts, tokenizer).
The tokenizer is the byte-level one (token = UTF-8 byte) unless an HF tokenizer directory is
given (needs transformers).

``TokenDataset(DIR).batch(step, batch_size, seq_len, seed)`` returns ``(tokens, doc_ids)``,
each (batch_size, seq_len) int64: windows of seq_len consecutive tokens (documents packed
back to back, ``doc_ids`` saying which document each token belongs to, for
``MPTForCausalLM(..., doc_ids=)``). Epoch e visits every window once in an order drawn from
(seed, e); step n takes the next batch_size windows. A batch is a pure function of
(seed, step), so resuming at step n mid-epoch gives exactly the batches of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def _texts(paths, max_bytes=None):
    """(name, bytes) of every file given or found under a directory given, sorted."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                files += [os.path.join(root, n) for n in names]
        else:
            files.append(p)
    total = 0
    for f in sorted(files):
        with open(f, "rb") as fh:
            data = fh.read()
        if not data:
            continue
        yield f, data
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            return


def prepare(paths, out, tokenizer=None, max_bytes=None) -> dict:
    """Tokenise text files into ``out`` (see the module docstring); returns the meta dict."""
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer  # optional dependency, only for an HF tokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    vocab = 256 if tok is None else len(tok)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    os.makedirs(out, exist_ok=True)
    starts, n = [], 0
    with open(os.path.join(out, "tokens.bin"), "wb") as fh:
        for _, data in _texts(paths, max_bytes):
            ids = (np.frombuffer(data, dtype=np.uint8) if tok is None
                   else np.asarray(tok.encode(data.decode("utf-8", errors="replace")), dtype=np.int64))
            if ids.size == 0:
                continue
            starts.append(n)
            fh.write(ids.astype(dtype).tobytes())
            n += ids.size
    if n == 0:
        raise ValueError(f"prepare: no text found in {list(paths)}")
    np.save(os.path.join(out, "doc_starts.npy"), np.asarray(starts, dtype=np.int64))
    meta = dict(dtype=np.dtype(dtype).name, vocab_size=vocab, n_tokens=n, n_docs=len(starts),
                tokenizer=tokenizer or "bytes")
    with open(os.path.join(out, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    return meta


class TokenDataset:
    """A prepared token directory, memory-mapped (nothing is read until a batch needs it)."""

    def __init__(self, path):
        with open(os.path.join(path, "meta.json")) as fh:
            self.meta = json.load(fh)
        self.tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=self.meta["dtype"], mode="r")
        self.doc_starts = np.load(os.path.join(path, "doc_starts.npy"))
        if self.tokens.size != self.meta["n_tokens"]:
            raise ValueError(f"TokenDataset: {path}/tokens.bin holds {self.tokens.size} tokens, meta.json says "
                             f"{self.meta['n_tokens']}")
        self.vocab_size = self.meta["vocab_size"]

    def __len__(self):
        return self.tokens.size

    def windows(self, seq_len: int) -> int:
        return self.tokens.size // seq_len

    def _order(self, epoch: int, seq_len: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.windows(seq_len), generator=g)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0):
        """(tokens, doc_ids), each (batch_size, seq_len) int64, for training step ``step``."""
        n_win = self.windows(seq_len)
        if n_win < 1:
            raise ValueError(f"TokenDataset: {self.tokens.size} tokens are fewer than seq_len {seq_len}")
        rows, doc_rows = [], []
        first = step * batch_size
        for i in range(first, first + batch_size):
            epoch, pos = divmod(i, n_win)
            if pos == 0 or not hasattr(self, "_cached") or self._cached[0] != (epoch, seq_len, seed):
                self._cached = ((epoch, seq_len, seed), self._order(epoch, seq_len, seed))
            w = int(self._cached[1][pos])
            lo = w * seq_len
            rows.append(np.asarray(self.tokens[lo:lo + seq_len], dtype=np.int64))
            doc_rows.append(np.searchsorted(self.doc_starts, np.arange(lo, lo + seq_len), side="right") - 1)
        return torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(doc_rows).astype(np.int64))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mptkernels.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenise text files into a token directory")
    prep.add_argument("paths", nargs="+", help="text files, or directories to walk")
    prep.add_argument("--out", required=True)
    prep.add_argument("--tokenizer", default=None, help="an HF tokenizer directory (default: bytes)")
    prep.add_argument("--max-bytes", type=int, default=None, help="stop after about this much text")
    args = p.parse_args(argv)
    meta = prepare(args.paths, args.out, args.tokenizer, args.max_bytes)
    print(f"wrote {meta['n_tokens']:,} tokens of {meta['n_docs']} documents ({meta['dtype']}, "
          f"vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']}) to {args.out}")


if __name__ == "__main__":
    main()
