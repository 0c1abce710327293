"""Token files for training: prepare them from text, read them as memory maps, and sample
packed training batches deterministically (resumable at any step).

    python -m mptkernels.data prepare --out DIR [--tokenizer HF_DIR] [--max-bytes N] FILES_OR_DIRS...

Each text file is one document: a file given, or every file under a directory given, except
hidden ones (names starting with '.'), the output directory DIR itself, empty files, and
binary files (any NUL byte: .npy, images, archives, UTF-16), which are skipped and counted
(a binary file named explicitly is an error). Text is read as UTF-8 (bad bytes become U+FFFD
for an HF tokenizer). DIR gets ``tokens.bin`` (all documents' tokens back to back,
flat uint16 when the vocabulary fits, else uint32), ``doc_starts.npy`` (int64: where each
document starts) and ``meta.json`` (dtype, vocab_size, token and document counts, tokenizer,
skipped_binary_files), written under temporary names and renamed at the end: a failed run
leaves DIR as it was. The tokenizer is the byte-level one (token = UTF-8 byte) unless a local
HF tokenizer directory (tokenizer.json or tokenizer_config.json) is given (needs
transformers; never downloads).

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_hf_tokenizer(path, name="tokenizer"):
    """An HF tokenizer from a local directory holding tokenizer.json or tokenizer_config.json.

    Never the Hub: a path that is not such a directory is an error naming it (``name``: the
    argument to name in it), not a repo id to download (nor a silent fallback to bytes).
    """
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{name} {path} {what} (expected an HF tokenizer directory)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{name} {path} holds no tokenizer (no {' or '.join(TOKENIZER_FILES)})")
    try:
        from transformers import AutoTokenizer  # optional dependency, only for an HF tokenizer
    except ImportError as e:
        raise ImportError(f"{name} {path}: an HF tokenizer needs transformers (pip install transformers)") from e
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:  # a broken or incomplete tokenizer directory
        raise ValueError(f"{name} {path}: transformers could not load it: {e}") from e


def _inside(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _files(paths, out):
    """Every file given, and every file found under a directory given (sorted), except the
    output directory ``out`` (a rerun must not read its own tokens.bin/meta.json as text) and
    hidden entries (names starting with '.': .git, editor files). Returns (files, explicit)."""
    files, explicit = [], set()
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"prepare: input {p} does not exist")
        if _inside(p, out):
            raise ValueError(f"prepare: input {p} is inside the output directory {out}")
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".") and not _inside(os.path.join(root, d), out)]
                files += [os.path.join(root, n) for n in names if not n.startswith(".")]
        else:
            files.append(p)
            explicit.add(p)
    return sorted(files), explicit


def _texts(files, explicit, max_bytes, skipped):
    """(name, bytes) of each non-empty text file, stopping once about max_bytes are read.

    Binary files (a NUL byte: .npy, images, archives, UTF-16) found in a directory are skipped
    and counted in skipped["binary"]; one named explicitly is an error."""
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        if not data:
            skipped["empty"] += 1
            continue
        if b"\0" in data:
            if f in explicit:
                raise ValueError(f"prepare: input {f} is not a text file (it has NUL bytes)")
            skipped["binary"] += 1
            continue
        yield f, data
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            return


def prepare(paths, out, tokenizer=None, max_bytes=None) -> dict:
    """Tokenise text files into ``out`` (see the module docstring); returns the meta dict.

    Inputs and the tokenizer are checked before anything is written; the files are written
    under temporary names and renamed at the end, so a failure leaves ``out`` as it was (a
    previous dataset intact, no half-written tokens.bin) and removes it if this call made it.
    """
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"prepare: max_bytes must be >= 1, got {max_bytes}")
    files, explicit = _files(paths, out)
    tok = None if not tokenizer else load_hf_tokenizer(tokenizer)
    vocab = 256 if tok is None else len(tok)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    made_out = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    names = ("tokens.bin", "doc_starts.npy", "meta.json")
    tmp = {n: os.path.join(out, f".{n}.partial") for n in names}
    skipped = dict(empty=0, binary=0)
    try:
        starts, n = [], 0
        with open(tmp["tokens.bin"], "wb") as fh:
            for _, data in _texts(files, explicit, max_bytes, skipped):
                ids = (np.frombuffer(data, dtype=np.uint8) if tok is None
                       else np.asarray(tok.encode(data.decode("utf-8", errors="replace")), dtype=np.int64))
                if ids.size == 0:
                    continue
                starts.append(n)
                fh.write(ids.astype(dtype).tobytes())
                n += ids.size
        if n == 0:
            raise ValueError(f"prepare: no text found in {list(paths)}: {len(files)} file(s), {skipped['empty']} "
                             f"empty and {skipped['binary']} binary skipped")
        with open(tmp["doc_starts.npy"], "wb") as fh:  # a file object: np.save would append .npy to a name
            np.save(fh, np.asarray(starts, dtype=np.int64))
        meta = dict(dtype=np.dtype(dtype).name, vocab_size=vocab, n_tokens=n, n_docs=len(starts),
                    tokenizer=tokenizer or "bytes", skipped_binary_files=skipped["binary"])
        with open(tmp["meta.json"], "w") as fh:
            json.dump(meta, fh, indent=2)
        for name in names:  # meta.json last: it describes the tokens.bin already in place
            os.replace(tmp[name], os.path.join(out, name))
    except BaseException:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if made_out and not os.listdir(out):
            os.rmdir(out)
        raise
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


def checked_arg(kind, ok, expected):
    """An argparse ``type=`` (for this CLI and mptkernels.generate's): parses with ``kind`` and
    rejects values failing ``ok`` (argparse then names the argument: 'argument --top-k:
    expected an integer >= 1, got '0'')."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v
    return parse


def main(argv=None, prog="python -m mptkernels.data"):
    """The command line; prog is the name its usage shows (``mptkernels data`` when run by that command)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenise text files into a token directory")
    prep.add_argument("paths", nargs="+", help="text files, or directories to walk")
    prep.add_argument("--out", required=True)
    prep.add_argument("--tokenizer", default=None, help="an HF tokenizer directory (default: bytes)")
    prep.add_argument("--max-bytes", type=checked_arg(int, lambda v: v >= 1, "an integer >= 1"), default=None,
                      help="stop after about this much text")
    args = p.parse_args(argv)
    try:
        meta = prepare(args.paths, args.out, args.tokenizer, args.max_bytes)
    except (OSError, ValueError, ImportError) as e:  # bad input: a message, not a traceback
        prep.error(str(e).removeprefix("prepare: "))
    skipped = f", skipped {meta['skipped_binary_files']} binary files" if meta["skipped_binary_files"] else ""
    print(f"wrote {meta['n_tokens']:,} tokens of {meta['n_docs']} documents ({meta['dtype']}, "
          f"vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']}) to {args.out}{skipped}")


if __name__ == "__main__":
    main()
