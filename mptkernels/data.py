"""Token files for training: prepare them from text (sharded, in parallel, appendable), read
them lazily as memory maps, and sample packed training batches deterministically (resumable at
any step, each process reading only its own rows).

    python -m mptkernels.data prepare --out DIR [--tokenizer HF_DIR] [--max-bytes N]
                                      [--shard-tokens N] [--workers K] [--append] FILES_OR_DIRS...

Each text file is one document: a file given, or every file under a directory given, except
hidden ones (names starting with '.'), the output directory DIR itself, empty files, and
binary files (any NUL byte: .npy, images, archives, UTF-16), which are skipped and counted
(a binary file named explicitly is an error). Files are taken in sorted order. Text is read as
UTF-8 (bad bytes become U+FFFD for an HF tokenizer). The tokenizer is the byte-level one
(token = UTF-8 byte) unless a local HF tokenizer directory (tokenizer.json or
tokenizer_config.json) is given (needs transformers; never downloads).

Layout. DIR/meta.json is the index: dtype (flat uint16 when the vocabulary fits, else uint32),
vocab_size, tokenizer (and tokenizer_vocab_sha256, a fingerprint of an HF vocabulary),
n_tokens, n_docs, skipped_binary_files, and ``shards``: in order, one entry per shard
``{"tokens": "shard-000000.bin", "doc_starts": "shard-000000.doc_starts.npy", "n_tokens": ...,
"n_docs": ...}``; a shard's tokens file holds its documents back to back, its doc_starts.npy
(int64) where each of them starts, counted from the shard's start. Documents are never split
across shards. A meta.json without ``shards`` (a directory from before shards) is one shard,
``tokens.bin`` + ``doc_starts.npy``. ``--shard-tokens N`` starts a new shard once one holds
>= N tokens (``--shard-tokens 1``: one shard per input file); without it everything is one
shard. ``--workers K`` tokenises K files at a time (processes); the output is byte-identical
to ``--workers 1``. ``--append`` adds the new documents as new shards after the existing ones
(the tokenizer must be the one DIR was prepared with). The files are written under temporary
or new names and meta.json is replaced last (os.replace), so a failed run leaves DIR as it was
and a reader sees the old dataset or the new one, never a mix.

Sampling. ``TokenDataset(DIR).batch(step, batch_size, seq_len, seed, rows=None)`` returns
``(tokens, doc_ids)``, each (batch_size, seq_len) int64 (or (len(rows), seq_len): exactly those
rows of the global batch, so a process reads only its rows' windows). Window w is tokens
[w*seq_len, (w+1)*seq_len) of the concatenation of all shards in index order (a window may
straddle a shard boundary); ``doc_ids`` numbers the documents over all shards, for
``MPTForCausalLM(..., doc_ids=)``. With W = n_tokens // seq_len windows, sample k = step *
batch_size + row is window ``order(seed, e)[k mod W]`` of epoch e = k div W, where order is a
permutation of the W windows drawn from (seed, e). So a batch is a pure function of (seed, step)
and the dataset: resuming at step n gives exactly the batches of an uninterrupted run, for any
number of processes, and the same documents in one shard or many give the same batches.

A dataset that grew (``--append``) since a run started: appending never changes a window that
existed (the new tokens come after the old ones), but W grows, and with it every epoch's
permutation and where the epochs begin. A run resumed on the grown dataset at step n takes the
batches that a run on the grown dataset from the start would take at step n: the steps already
trained stay as they were; the epoch in progress is re-drawn over the grown dataset (its
remaining steps may repeat windows seen earlier in it, or not reach some), and from the next
epoch boundary on every window of the grown dataset, old and new, is seen once per epoch.
(Keeping the epoch in progress and bringing new shards in at its end would need the step at
which the run first saw the new shards, which the dataset cannot know: the batches would stop
being a function of (seed, step) and the dataset.) To train on the old order, prepare the
new documents into a new directory instead of appending.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re

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
    output directory ``out`` (a rerun must not read its own shards/meta.json as text) and
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


def _tokenise(path, tok, dtype):
    """(kind, n_bytes, ids) of one file: kind "empty", "binary" (a NUL byte) or "text" with its
    tokens as ``dtype``. One function for the serial and the parallel path, so both give the
    same bytes."""
    with open(path, "rb") as fh:
        data = fh.read()
    if not data:
        return "empty", 0, None
    if b"\0" in data:
        return "binary", 0, None
    ids = (np.frombuffer(data, dtype=np.uint8) if tok is None
           else np.asarray(tok.encode(data.decode("utf-8", errors="replace")), dtype=np.int64))
    return "text", len(data), ids.astype(dtype)


_WORKER = {}  # a --workers process's tokenizer and dtype, set by _init_worker


def _init_worker(tok, dtype):
    _WORKER.update(tok=tok, dtype=dtype)


def _tokenise_in_worker(path):
    return _tokenise(path, _WORKER["tok"], _WORKER["dtype"])


def _tokenised(files, tok, dtype, workers):
    """(path, kind, n_bytes, ids) of each file, in the order of ``files``, tokenised by ``workers``
    processes (imap keeps the order, so the output does not depend on the worker count)."""
    if workers == 1:
        for f in files:
            yield (f, *_tokenise(f, tok, dtype))
        return
    import multiprocessing as mp

    # fork where there is one: a spawned worker would import torch and the ops again
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok, dtype)) as pool:
        for f, r in zip(files, pool.imap(_tokenise_in_worker, files)):
            yield (f, *r)


def _texts(files, explicit, max_bytes, skipped, tok, dtype, workers):
    """(path, ids) of each non-empty text file, stopping once about max_bytes are read.

    Binary files (a NUL byte: .npy, images, archives, UTF-16) found in a directory are skipped
    and counted in skipped["binary"]; one named explicitly is an error."""
    total = 0
    for f, kind, n_bytes, ids in _tokenised(files, tok, dtype, workers):
        if kind == "empty":
            skipped["empty"] += 1
            continue
        if kind == "binary":
            if f in explicit:
                raise ValueError(f"prepare: input {f} is not a text file (it has NUL bytes)")
            skipped["binary"] += 1
            continue
        yield f, ids
        total += n_bytes
        if max_bytes is not None and total >= max_bytes:
            return


def _shards(meta):
    """The shard list of a meta.json; one from before shards is its tokens.bin as one shard."""
    if "shards" in meta:
        return meta["shards"]
    return [dict(tokens="tokens.bin", doc_starts="doc_starts.npy", n_tokens=meta["n_tokens"], n_docs=meta["n_docs"])]


def _read_meta(out):
    """DIR's meta.json, or None when it has none."""
    path = os.path.join(out, "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _vocab_fingerprint(tok):
    """What says two HF tokenizers are the same on --append (a path can move; a vocabulary of
    the same size can differ): a hash of the token -> id table."""
    items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


class _ShardWriter:
    """Writes documents into new shards under temporary names, starting a new shard once one
    holds >= shard_tokens tokens (never splitting a document); ``commit`` renames them."""

    def __init__(self, out, first, dtype, shard_tokens):
        self.out, self.next, self.dtype, self.limit = out, first, dtype, shard_tokens
        self.shards, self.tmp, self.fh = [], [], None  # tmp: (temporary path, final path)

    def _path(self, name):
        final = os.path.join(self.out, name)
        self.tmp.append((os.path.join(self.out, f".{name}.partial"), final))
        return self.tmp[-1][0]

    def add(self, ids):
        if self.fh is None:
            self.names = (f"shard-{self.next:06d}.bin", f"shard-{self.next:06d}.doc_starts.npy")
            self.next += 1
            self.fh, self.starts, self.n = open(self._path(self.names[0]), "wb"), [], 0
        self.starts.append(self.n)
        self.fh.write(ids.tobytes())
        self.n += ids.size
        if self.limit is not None and self.n >= self.limit:
            self.close()

    def close(self):
        if self.fh is None:
            return
        self.fh.close()
        self.fh = None
        with open(self._path(self.names[1]), "wb") as fh:  # a file object: np.save would append .npy to a name
            np.save(fh, np.asarray(self.starts, dtype=np.int64))
        self.shards.append(dict(tokens=self.names[0], doc_starts=self.names[1], n_tokens=self.n,
                                n_docs=len(self.starts)))

    def commit(self):
        for tmp, final in self.tmp:
            os.replace(tmp, final)

    def remove(self):
        if self.fh is not None:
            self.fh.close()
        for tmp, final in self.tmp:
            for path in (tmp, final):  # final: a shard renamed before meta.json failed to be
                if os.path.exists(path):
                    os.remove(path)


def prepare(paths, out, tokenizer=None, max_bytes=None, shard_tokens=None, workers=1, append=False) -> dict:
    """Tokenise text files into ``out`` (see the module docstring); returns the new meta dict,
    with ``added`` (this run's shards, tokens, docs, skipped_binary_files) besides.

    ``shard_tokens``: start a new shard once one holds >= this many tokens (None: one shard);
    ``workers``: processes tokenising files at once; ``append``: add shards to the dataset in
    ``out`` instead of replacing it. Inputs, the tokenizer and (with ``append``) its match with
    the dataset are checked before anything is written; new files get new names and meta.json is
    replaced last, so a failure leaves ``out`` as it was (and removes it if this call made it).
    """
    for name, v in (("max_bytes", max_bytes), ("shard_tokens", shard_tokens)):
        if v is not None and v < 1:
            raise ValueError(f"prepare: {name} must be >= 1, got {v}")
    if workers < 1:
        raise ValueError(f"prepare: workers must be >= 1, got {workers}")
    files, explicit = _files(paths, out)
    tok = None if not tokenizer else load_hf_tokenizer(tokenizer)
    vocab = 256 if tok is None else len(tok)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    fingerprint = None if tok is None else _vocab_fingerprint(tok)
    try:
        old = _read_meta(out)
    except (OSError, ValueError) as e:
        if append:
            raise ValueError(f"prepare: --append: cannot read {out}/meta.json: {e}") from e
        old = None  # replaced anyway
    if append:
        if old is None:
            raise FileNotFoundError(f"prepare: --append: {out} holds no dataset (no meta.json)")
        same = (old["vocab_size"] == vocab and old["dtype"] == np.dtype(dtype).name
                and (old.get("tokenizer") == "bytes") == (tok is None)
                and old.get("tokenizer_vocab_sha256", fingerprint) == fingerprint)
        if not same:
            raise ValueError(f"prepare: --append: {out} was prepared with tokenizer {old.get('tokenizer')} "
                             f"(vocab {old['vocab_size']}, {old['dtype']}), not {tokenizer or 'bytes'} (vocab {vocab})")
    old_shards = [] if old is None else _shards(old)
    # new shards get names no shard of the old dataset has: its files stay untouched until
    # meta.json is replaced (a reader of the old dataset, or a failure, never sees a mix)
    numbers = [int(m[1]) for s in old_shards if (m := re.fullmatch(r"shard-(\d+)\.bin", s["tokens"]))]
    made_out = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    writer = _ShardWriter(out, max(numbers, default=-1) + 1, dtype, shard_tokens)
    meta_tmp = os.path.join(out, ".meta.json.partial")
    skipped = dict(empty=0, binary=0)
    try:
        for _, ids in _texts(files, explicit, max_bytes, skipped, tok, dtype, workers):
            if ids.size:
                writer.add(ids)
        writer.close()
        if not writer.shards:
            raise ValueError(f"prepare: no text found in {list(paths)}: {len(files)} file(s), {skipped['empty']} "
                             f"empty and {skipped['binary']} binary skipped")
        shards = (old_shards if append else []) + writer.shards
        meta = dict(format=2, dtype=np.dtype(dtype).name, vocab_size=vocab,
                    n_tokens=sum(s["n_tokens"] for s in shards), n_docs=sum(s["n_docs"] for s in shards),
                    tokenizer=old["tokenizer"] if append else tokenizer or "bytes",
                    skipped_binary_files=skipped["binary"] + (old.get("skipped_binary_files", 0) if append else 0),
                    shards=shards)
        if fingerprint is not None:
            meta["tokenizer_vocab_sha256"] = fingerprint
        with open(meta_tmp, "w") as fh:
            json.dump(meta, fh, indent=2)
        writer.commit()
        os.replace(meta_tmp, os.path.join(out, "meta.json"))  # last: it describes the shards already in place
    except BaseException:
        writer.remove()
        if os.path.exists(meta_tmp):
            os.remove(meta_tmp)
        if made_out and not os.listdir(out):
            os.rmdir(out)
        raise
    if not append:  # the replaced dataset's files (shards, or a tokens.bin from before shards)
        kept = {n for s in shards for n in (s["tokens"], s["doc_starts"])}
        for name in {n for s in old_shards for n in (s["tokens"], s["doc_starts"])} - kept:
            if os.path.basename(name) == name and os.path.exists(os.path.join(out, name)):  # only DIR's own files
                os.remove(os.path.join(out, name))
    # what this run added, for the caller's report (not in meta.json)
    meta["added"] = dict(shards=len(writer.shards), tokens=sum(s["n_tokens"] for s in writer.shards),
                         docs=sum(s["n_docs"] for s in writer.shards), skipped_binary_files=skipped["binary"])
    return meta


class TokenDataset:
    """A prepared token directory (see the module docstring). Opening reads meta.json and checks
    each shard's file size; a shard is memory-mapped only when a batch first reads from it, so
    a process reads only the shards its rows' windows fall in."""

    def __init__(self, path):
        self.path = str(path)
        with open(os.path.join(self.path, "meta.json")) as fh:
            self.meta = json.load(fh)
        self.shards = _shards(self.meta)
        self.vocab_size = self.meta["vocab_size"]
        self.dtype = np.dtype(self.meta["dtype"])
        n_tok = np.array([s["n_tokens"] for s in self.shards], dtype=np.int64)
        n_doc = np.array([s["n_docs"] for s in self.shards], dtype=np.int64)
        self._tok_end = np.cumsum(n_tok)  # shard i holds tokens [_tok_end[i] - n_tok[i], _tok_end[i])
        self._tok_start = self._tok_end - n_tok
        self._doc_start = np.cumsum(n_doc) - n_doc  # the number of shard i's first document
        self.n_tokens = int(self._tok_end[-1]) if len(self.shards) else 0
        if self.n_tokens != self.meta["n_tokens"]:
            raise ValueError(f"TokenDataset: {self.path}/meta.json: its shards hold {self.n_tokens} tokens, "
                             f"n_tokens says {self.meta['n_tokens']}")
        for s in self.shards:
            size = os.path.getsize(os.path.join(self.path, s["tokens"]))
            if size != s["n_tokens"] * self.dtype.itemsize:
                raise ValueError(f"TokenDataset: {self.path}/{s['tokens']} holds {size // self.dtype.itemsize} "
                                 f"tokens, meta.json says {s['n_tokens']}")
        self._open, self._orders = {}, {}

    def __len__(self):
        return self.n_tokens

    def windows(self, seq_len: int) -> int:
        return self.n_tokens // seq_len

    def _shard(self, i):
        """(tokens memmap, doc_starts) of shard i, opened on first use."""
        if i not in self._open:
            s = self.shards[i]
            starts = np.load(os.path.join(self.path, s["doc_starts"]))
            if starts.shape != (s["n_docs"],) or (starts.size and starts[0] != 0):
                raise ValueError(f"TokenDataset: {self.path}/{s['doc_starts']} holds {starts.size} document starts "
                                 f"from {starts[:1].tolist()}, meta.json says {s['n_docs']} from [0]")
            self._open[i] = (np.memmap(os.path.join(self.path, s["tokens"]), dtype=self.dtype, mode="r"), starts)
        return self._open[i]

    def read(self, start: int, stop: int):
        """(tokens, doc_ids), int64 arrays, of positions [start, stop) of the concatenated shards."""
        tokens, docs = [], []
        i = int(np.searchsorted(self._tok_end, start, side="right"))
        while start < stop:
            lo, hi = start - self._tok_start[i], min(stop, self._tok_end[i]) - self._tok_start[i]
            if hi > lo:  # an empty shard (none is written, one may be listed) is never opened
                toks, starts = self._shard(i)
                tokens.append(np.asarray(toks[lo:hi], dtype=np.int64))
                docs.append(np.searchsorted(starts, np.arange(lo, hi), side="right") - 1 + self._doc_start[i])
            start, i = self._tok_start[i] + hi, i + 1
        return np.concatenate(tokens), np.concatenate(docs).astype(np.int64)

    def _order(self, epoch: int, seq_len: int, seed: int, n_win: int):
        """Epoch ``epoch``'s permutation of the windows, kept for the last two epochs (a batch
        may straddle an epoch boundary); the seed formula predates shards: same batches as before."""
        key = (epoch, seq_len, seed, n_win)
        if key not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[next(iter(self._orders))]
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._orders[key] = torch.randperm(n_win, generator=g)
        return self._orders[key]

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0, rows=None):
        """(tokens, doc_ids), each (batch_size, seq_len) int64, for training step ``step``;
        with ``rows`` (a range or slice of range(batch_size)) only those rows of that batch,
        read without touching the others' windows."""
        for name, v, least in (("step", step, 0), ("batch_size", batch_size, 1), ("seq_len", seq_len, 1)):
            if not isinstance(v, (int, np.integer)) or v < least:
                raise ValueError(f"TokenDataset.batch: {name} must be an integer >= {least}, got {v!r}")
        n_win = self.windows(seq_len)
        if n_win < 1:
            raise ValueError(f"TokenDataset: {self.n_tokens} tokens are fewer than seq_len {seq_len}")
        if rows is None:
            rows = range(batch_size)
        elif isinstance(rows, slice):
            rows = range(batch_size)[rows]
        elif not (isinstance(rows, range) and all(0 <= rows[k] < batch_size for k in ((0, -1) if rows else ()))):
            raise ValueError(f"TokenDataset.batch: rows must be a range or slice of range({batch_size}), got {rows!r}")
        tokens = np.empty((len(rows), seq_len), dtype=np.int64)
        docs = np.empty((len(rows), seq_len), dtype=np.int64)
        for j, r in enumerate(rows):
            epoch, pos = divmod(step * batch_size + r, n_win)
            w = int(self._order(epoch, seq_len, seed, n_win)[pos])
            tokens[j], docs[j] = self.read(w * seq_len, (w + 1) * seq_len)
        return torch.from_numpy(tokens), torch.from_numpy(docs)


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
    prep.add_argument("--shard-tokens", type=checked_arg(int, lambda v: v >= 1, "an integer >= 1"), default=None,
                      help="start a new shard once one holds this many tokens (1: one shard per file; "
                           "default: one shard)")
    prep.add_argument("--workers", type=checked_arg(int, lambda v: v >= 1, "an integer >= 1"), default=1,
                      help="processes tokenising files at once (the output does not depend on it)")
    prep.add_argument("--append", action="store_true",
                      help="add the files as new shards to the dataset in --out (same tokenizer)")
    args = p.parse_args(argv)
    try:
        meta = prepare(args.paths, args.out, args.tokenizer, args.max_bytes, args.shard_tokens, args.workers,
                       args.append)
    except (OSError, ValueError, ImportError) as e:  # bad input: a message, not a traceback
        prep.error(str(e).removeprefix("prepare: "))
    new = meta["added"]
    skipped = f", skipped {new['skipped_binary_files']} binary files" if new["skipped_binary_files"] else ""
    total = (f" (now {meta['n_tokens']:,} tokens in {len(meta['shards'])} shards)" if args.append else "")
    print(f"{'appended' if args.append else 'wrote'} {new['tokens']:,} tokens of {new['docs']} documents in "
          f"{new['shards']} shard{'s' * (new['shards'] != 1)} ({meta['dtype']}, vocab {meta['vocab_size']}, "
          f"tokenizer {meta['tokenizer']}) to {args.out}{total}{skipped}")

if __name__ == "__main__":
    main()
