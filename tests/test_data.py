"""Token files: prepare, memory-mapped reading, deterministic and resumable packed batches."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mptkernels.data import TokenDataset, prepare


@pytest.fixture
def corpus(tmp_path):
    texts = ["héllo world\n", "a" * 300, "second\ndocument", "x"]
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(texts):
        (d / f"{i}.txt").write_text(t)
    (d / "empty.txt").write_text("")
    return d, texts


def test_prepare_writes_the_documents_back_to_back(corpus, tmp_path):
    d, texts = corpus
    r = subprocess.run([sys.executable, "-m", "mptkernels.data", "prepare", str(d), "--out", str(tmp_path / "tok")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ds = TokenDataset(tmp_path / "tok")
    want = b"".join(t.encode() for t in texts)
    assert ds.meta["dtype"] == "uint16" and ds.meta["n_docs"] == 4 and len(ds) == len(want)
    assert len(ds.shards) == 1 and ds.shards[0]["n_tokens"] == len(want)
    tokens, docs = ds.read(0, len(ds))
    assert bytes(tokens.astype(np.uint8)) == want
    lengths = [len(t.encode()) for t in texts]
    assert docs.tolist() == np.repeat(np.arange(4), lengths).tolist()


def test_batches_are_deterministic_resumable_and_cover_each_epoch(corpus, tmp_path):
    d, _ = corpus
    prepare([str(d)], str(tmp_path / "tok"))
    ds = TokenDataset(tmp_path / "tok")
    seq, bs = 16, 3
    run = [ds.batch(s, bs, seq, seed=5) for s in range(12)]
    fresh = TokenDataset(tmp_path / "tok")  # a restarted job, resuming at step 7
    for s in (7, 8, 11):
        a, b = fresh.batch(s, bs, seq, seed=5), run[s]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(ds.batch(0, bs, seq, seed=6)[0], run[0][0])
    # one epoch visits every window exactly once
    n_win = ds.windows(seq)
    seen = torch.cat([b[0] for b in run]).view(-1, seq)[:n_win]
    windows = torch.from_numpy(ds.read(0, n_win * seq)[0]).view(n_win, seq)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, windows.tolist()))
    # doc_ids follow the document starts
    tokens, docs = run[0]
    for row in range(bs):
        w = next(i for i in range(n_win) if torch.equal(windows[i], tokens[row]))
        assert docs[row].tolist() == ds.read(w * seq, (w + 1) * seq)[1].tolist()
    # the documents' numbers, read back: 0 up to n_docs - 1, in order
    assert np.unique(ds.read(0, len(ds))[1]).tolist() == list(range(ds.meta["n_docs"]))


def test_prepare_errors(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="no text found"):
        prepare([str(tmp_path / "e")], str(tmp_path / "out"))
    prepare([str(__file__)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenDataset(tmp_path / "out").batch(0, 1, 10**7)


def _word_tokenizer(path, words):
    """A local HF tokenizer directory: one token per word of ``words`` (ids 1..), [UNK] = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # transformers' own: scripts/test.sh installs it
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(path))
    return path


class _Cli:
    """Runs ``python -m mptkernels.data prepare ARGS`` in-process (main(argv): no torch import per
    run); returns (exit code, stdout, stderr)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args):
        from mptkernels.data import main

        code = 0
        try:
            main(["prepare", *map(str, args)])
        except SystemExit as e:
            code = e.code
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a lookup on the Hub would fail, not hang
    return _Cli(capsys)


def test_rerun_into_a_directory_it_walks_reads_only_the_text(corpus, tmp_path, cli):
    d, texts = corpus
    for _ in range(2):  # the second run must not read the first run's tokens.bin, doc_starts.npy, meta.json
        code, _, err = cli(d, "--out", d / "out")
        assert code == 0, err
        ds = TokenDataset(d / "out")
        assert ds.meta["n_docs"] == 4 and bytes(ds.read(0, len(ds))[0].astype(np.uint8)) == "".join(texts).encode()
    code, _, err = cli(d, "--out", d)
    assert code == 2 and "inside the output directory" in err
    # binary files (a NUL byte) and hidden ones found in a directory are skipped, and said so
    shutil.rmtree(d / "out")
    np.save(d / "array.npy", np.arange(10))
    (d / ".hidden.txt").write_text("not a document")
    code, out, err = cli(d, "--out", tmp_path / "o2")
    assert code == 0 and "skipped 1 binary files" in out, err
    assert TokenDataset(tmp_path / "o2").meta["n_docs"] == 4
    code, _, err = cli(d / "array.npy", "--out", tmp_path / "o3")  # named explicitly: an error
    assert code == 2 and "array.npy is not a text file" in err and not (tmp_path / "o3").exists()


def test_cli_input_errors_are_messages_and_leave_no_output(corpus, tmp_path, cli):
    d, _ = corpus
    code, _, err = cli(tmp_path / "missing.txt", "--out", tmp_path / "o")
    assert code == 2 and "error: input" in err and "missing.txt does not exist" in err
    assert not (tmp_path / "o").exists()
    code, _, err = cli(d / "empty.txt", "--out", tmp_path / "o")
    assert code == 2 and "error: no text found" in err
    assert not (tmp_path / "o").exists()  # no empty tokens.bin left behind
    code, _, err = cli(d, "--out", tmp_path / "o", "--max-bytes", "0")
    assert code == 2 and "argument --max-bytes" in err
    # a failed run into an existing dataset leaves it as it was
    assert cli(d, "--out", tmp_path / "ok")[0] == 0
    before = {f.name: f.read_bytes() for f in (tmp_path / "ok").iterdir()}
    assert cli(d / "empty.txt", "--out", tmp_path / "ok")[0] == 2
    assert {f.name: f.read_bytes() for f in (tmp_path / "ok").iterdir()} == before


def test_tokenizer_must_be_a_local_tokenizer_directory(corpus, tmp_path, cli, monkeypatch):
    d, _ = corpus
    monkeypatch.chdir(tmp_path)
    for tok, match in [(tmp_path / "nonexistent_tok", "does not exist"),  # absolute: was an HF repo-id error
                       ("nonexistent_tok", "nonexistent_tok does not exist"),  # relative: went to the network
                       (d, "holds no tokenizer")]:
        code, _, err = cli(d, "--out", tmp_path / "o", "--tokenizer", tok)
        assert code == 2 and "error: tokenizer" in err and match in err, err
        assert not (tmp_path / "o").exists()
    _word_tokenizer(tmp_path / "tok", ["second", "document"])
    code, _, err = cli(d / "2.txt", "--out", tmp_path / "o", "--tokenizer", "tok")  # relative: local, no Hub
    assert code == 0, err
    assert TokenDataset(tmp_path / "o").read(0, 2)[0].tolist() == [1, 2]


# ---- shards ---------------------------------------------------------------------------------

def _write_docs(d, texts, first=0):
    """One file per text in directory d, named so that sorted order is the order given."""
    d.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (d / f"{first + i:03d}.txt").write_text(t)
    return d


def _texts(n, seed):
    """n documents of 1..120 letters (deterministic)."""
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("abcdefgh \n"), size=int(rng.integers(1, 121)))) for _ in range(n)]


def _same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _files_of(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


def test_many_shards_give_the_batches_of_one_file(tmp_path):
    txt = _write_docs(tmp_path / "txt", _texts(30, seed=1))
    prepare([str(txt)], str(tmp_path / "one"))
    prepare([str(txt)], str(tmp_path / "many"), shard_tokens=100)
    prepare([str(txt)], str(tmp_path / "per_file"), shard_tokens=1)
    one = TokenDataset(tmp_path / "one")
    assert len(one.shards) == 1
    for name in ("many", "per_file"):
        ds = TokenDataset(tmp_path / name)
        assert len(ds) == len(one) and ds.meta["n_docs"] == one.meta["n_docs"] == 30
        assert 1 < len(ds.shards) and sum(s["n_tokens"] for s in ds.shards) == len(one)
        # a shard ends at the first document that takes it to >= shard_tokens; no document is split
        limit = 100 if name == "many" else 1
        assert all(s["n_tokens"] >= limit for s in ds.shards[:-1])
        assert len(ds.shards) == 30 if name == "per_file" else all(s["n_docs"] >= 1 for s in ds.shards)
        assert all(np.array_equal(x, y) for x, y in zip(ds.read(0, len(ds)), one.read(0, len(one))))
        ends = set(np.cumsum([s["n_tokens"] for s in ds.shards]).tolist())
        for seq in (5, 16, 64, 113):
            n_win = one.windows(seq)
            # some windows straddle a shard boundary (the point of the test)
            assert any(w * seq < e < (w + 1) * seq for w in range(n_win) for e in ends)
            bs = 7
            for step in range(0, 3 * n_win // bs + 2, max(1, n_win // bs // 3)):  # three epochs and more
                assert _same(ds.batch(step, bs, seq, seed=3), one.batch(step, bs, seq, seed=3)), (name, seq, step)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rows_are_exactly_those_rows_of_the_global_batch(tmp_path, world):
    prepare([str(_write_docs(tmp_path / "txt", _texts(20, seed=2)))], str(tmp_path / "tok"), shard_tokens=60)
    full_ds = TokenDataset(tmp_path / "tok")
    bs, seq = 8, 24
    per = bs // world
    for step in (0, 5, 17, 40):  # across epoch boundaries (about 40 windows per epoch)
        full = full_ds.batch(step, bs, seq, seed=1)
        parts = []
        for rank in range(world):
            ds = TokenDataset(tmp_path / "tok")  # a process of its own: opens only the shards it reads
            part = ds.batch(step, bs, seq, seed=1, rows=range(rank * per, (rank + 1) * per))
            assert part[0].shape == (per, seq) and _same(part, (full[0][rank * per:(rank + 1) * per],
                                                                full[1][rank * per:(rank + 1) * per]))
            assert len(ds._open) <= 2 * per  # a window lies in at most 2 shards (of >= 60 tokens)
            assert world == 1 or len(ds._open) < len(ds.shards)
            parts.append(part)
        assert _same(tuple(torch.cat(p) for p in zip(*parts)), full)
    assert _same(full_ds.batch(3, bs, seq, rows=slice(2, 5)), tuple(x[2:5] for x in full_ds.batch(3, bs, seq)))
    for rows in (range(0, bs + 1), range(-1, 2), [0, 1]):
        with pytest.raises(ValueError, match=r"TokenDataset.batch: rows must be a range or slice of range\(8\)"):
            full_ds.batch(0, bs, seq, rows=rows)


def test_workers_give_byte_identical_output(tmp_path):
    txt = _write_docs(tmp_path / "txt", _texts(12, seed=3))
    np.save(txt / "skipped.npy", np.arange(4))  # a binary file: skipped and counted either way
    for workers in (1, 2):
        meta = prepare([str(txt)], str(tmp_path / f"w{workers}"), shard_tokens=150, workers=workers)
        assert meta["skipped_binary_files"] == 1 and meta["added"]["shards"] > 1
    assert _files_of(tmp_path / "w1") == _files_of(tmp_path / "w2")
    # --max-bytes stops at the same file with workers
    for workers in (1, 2):
        prepare([str(txt)], str(tmp_path / f"m{workers}"), max_bytes=200, workers=workers)
    assert _files_of(tmp_path / "m1") == _files_of(tmp_path / "m2") and len(TokenDataset(tmp_path / "m1")) < 400


def test_append_adds_shards_and_gives_the_batches_of_one_prepare(tmp_path, cli):
    texts = _texts(16, seed=4)
    a, b = _write_docs(tmp_path / "a", texts[:10]), _write_docs(tmp_path / "b", texts[10:], first=10)
    out = tmp_path / "tok"
    assert cli(a, "--out", out, "--shard-tokens", "200")[0] == 0
    old_files = _files_of(out)
    old_shards = TokenDataset(out).shards
    code, stdout, err = cli(b, "--out", out, "--shard-tokens", "200", "--append", "--workers", "2")
    assert code == 0 and stdout.startswith("appended ") and "shards)" in stdout, err
    ds = TokenDataset(out)
    assert ds.shards[:len(old_shards)] == old_shards and len(ds.shards) > len(old_shards)
    assert all(_files_of(out)[f] == data for f, data in old_files.items() if f != "meta.json")  # old shards untouched
    assert ds.meta["n_docs"] == 16 and ds.meta["n_tokens"] == sum(len(t) for t in texts)
    prepare([str(a), str(b)], str(tmp_path / "both"))  # the same documents in one go
    both = TokenDataset(tmp_path / "both")
    for seq in (9, 32):
        for step in (0, 3, 11, 30):
            assert _same(ds.batch(step, 4, seq, seed=2), both.batch(step, 4, seq, seed=2))
    # a failed append leaves the dataset as it was; appending to no dataset is an error
    before = _files_of(out)
    (tmp_path / "empty.txt").write_text("")
    code, _, err = cli(tmp_path / "empty.txt", "--out", out, "--append")
    assert code == 2 and "error: no text found" in err and _files_of(out) == before
    code, _, err = cli(a, "--out", tmp_path / "none", "--append")
    assert code == 2 and "error: --append:" in err and "holds no dataset" in err
    assert not (tmp_path / "none").exists()
    # a fresh prepare (no --append) into the directory replaces the dataset, leaving no old shard
    assert cli(a, "--out", out)[0] == 0
    (shard,) = TokenDataset(out).shards
    assert sorted(_files_of(out)) == sorted(["meta.json", shard["tokens"], shard["doc_starts"]])


def test_append_with_another_tokenizer_is_an_error(tmp_path, cli):
    txt = _write_docs(tmp_path / "txt", ["second document", "document second"])
    out = tmp_path / "tok"
    assert cli(txt, "--out", out)[0] == 0
    before = _files_of(out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "vocab_size": 300}))  # as if prepared with a 300-token one
    code, _, err = cli(txt, "--out", out, "--append")
    assert code == 2 and "error: --append:" in err and "tokenizer bytes (vocab 300, uint16), not bytes (vocab 256)" in err
    (out / "meta.json").write_bytes(before["meta.json"])
    _word_tokenizer(tmp_path / "hf", ["second", "document"])
    code, _, err = cli(txt, "--out", out, "--append", "--tokenizer", tmp_path / "hf")
    assert code == 2 and "was prepared with tokenizer bytes (vocab 256, uint16), not " in err and "(vocab 3)" in err
    assert _files_of(out) == before
    # an HF dataset takes only the same vocabulary (not just the same size), and --workers 2 gives the same bytes
    assert cli(txt, "--out", tmp_path / "hf1", "--tokenizer", tmp_path / "hf")[0] == 0
    assert cli(txt, "--out", tmp_path / "hf2", "--tokenizer", tmp_path / "hf", "--workers", "2")[0] == 0
    assert _files_of(tmp_path / "hf1") == _files_of(tmp_path / "hf2")
    _word_tokenizer(tmp_path / "hf_other", ["document", "second"])  # same size, other ids
    code, _, err = cli(txt, "--out", tmp_path / "hf1", "--append", "--tokenizer", tmp_path / "hf_other")
    assert code == 2 and "error: --append:" in err
    assert cli(txt, "--out", tmp_path / "hf1", "--append", "--tokenizer", tmp_path / "hf")[0] == 0
    assert TokenDataset(tmp_path / "hf1").read(0, 8)[0].tolist() == [1, 2, 2, 1] * 2


def test_a_run_resumed_on_a_grown_dataset(tmp_path):
    """What the module docstring promises when shards are appended under a run."""
    texts = _texts(24, seed=5)
    a, b = _write_docs(tmp_path / "a", texts[:16]), _write_docs(tmp_path / "b", texts[16:], first=16)
    out = str(tmp_path / "tok")
    prepare([str(a)], out)
    seq, bs, resume = 16, 3, 25
    old = TokenDataset(out)
    w_old = old.windows(seq)
    trained = [old.batch(s, bs, seq, seed=7) for s in range(resume)]
    prepare([str(b)], out, append=True)
    grown = TokenDataset(out)
    w_new = grown.windows(seq)
    assert w_new > w_old and resume * bs > w_old  # the run is past its first epoch when the data grows
    # the windows that existed are unchanged: the new tokens come after the old ones
    assert np.array_equal(grown.read(0, w_old * seq)[0], old.read(0, w_old * seq)[0])
    # the batches are those of a run on the grown dataset from the start (the steps trained are done) ...
    prepare([str(a), str(b)], str(tmp_path / "both"))
    both = TokenDataset(tmp_path / "both")
    after = {s: grown.batch(s, bs, seq, seed=7) for s in range(resume, resume + 3 * w_new // bs)}
    assert all(_same(after[s], both.batch(s, bs, seq, seed=7)) for s in list(after)[:20])
    # ... not those the un-grown dataset would have given
    assert not all(_same(after[s], old.batch(s, bs, seq, seed=7)) for s in range(resume, resume + 5))
    # from the next epoch boundary on, each epoch sees every window of the grown dataset once, new ones too
    samples = {s * bs + r: tuple(after[s][0][r].tolist()) for s in after for r in range(bs)}
    e = -(-resume * bs // w_new)  # the first epoch that starts at or after the resume
    epoch = [samples[k] for k in range(e * w_new, (e + 1) * w_new)]
    windows = grown.read(0, w_new * seq)[0].reshape(w_new, seq)
    assert sorted(epoch) == sorted(map(tuple, windows.tolist()))


def test_a_directory_from_before_shards_still_loads(tmp_path):
    """tokens.bin + doc_starts.npy + a meta.json without shards: one shard, the same batches as
    before shards (the permutation of (seed, epoch) is unchanged), and --append works on it."""
    texts = _texts(10, seed=6)
    data = "".join(texts).encode()
    old = tmp_path / "old"
    old.mkdir()
    np.frombuffer(data, dtype=np.uint8).astype(np.uint16).tofile(old / "tokens.bin")
    np.save(old / "doc_starts.npy", np.cumsum([0] + [len(t) for t in texts[:-1]]).astype(np.int64))
    (old / "meta.json").write_text(json.dumps(dict(dtype="uint16", vocab_size=256, n_tokens=len(data), n_docs=10,
                                                   tokenizer="bytes", skipped_binary_files=0)))
    ds = TokenDataset(old)
    assert len(ds.shards) == 1 and ds.shards[0]["tokens"] == "tokens.bin"
    prepare([str(_write_docs(tmp_path / "txt", texts))], str(tmp_path / "new"), shard_tokens=50)
    new = TokenDataset(tmp_path / "new")
    seq, bs = 12, 5
    n_win = len(data) // seq
    for step in (0, 4, 9, 20):
        got = ds.batch(step, bs, seq, seed=3)
        assert _same(got, new.batch(step, bs, seq, seed=3))
        for r in range(bs):  # the sampling rule from before shards, written out
            epoch, pos = divmod(step * bs + r, n_win)
            w = int(torch.randperm(n_win, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))[pos])
            assert bytes(got[0][r].to(torch.uint8).tolist()) == data[w * seq:(w + 1) * seq]
    more = _write_docs(tmp_path / "more", ["appended"], first=10)
    meta = prepare([str(more)], str(old), append=True)
    assert [s["tokens"] for s in meta["shards"]] == ["tokens.bin", "shard-000000.bin"]
    assert bytes(TokenDataset(old).read(0, len(data) + 8)[0].astype(np.uint8)) == data + b"appended"


def test_bad_sharding_input_is_one_line(tmp_path, cli):
    txt = _write_docs(tmp_path / "txt", ["some text"])
    for args, what in [(("--workers", "0"), "argument --workers: expected an integer >= 1, got '0'"),
                       (("--workers", "two"), "argument --workers: expected an integer >= 1, got 'two'"),
                       (("--shard-tokens", "0"), "argument --shard-tokens: expected an integer >= 1, got '0'")]:
        code, _, err = cli(txt, "--out", tmp_path / "o", *args)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and errors[0].endswith(what) and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
    for kw, match in [(dict(workers=0), "workers must be >= 1, got 0"),
                      (dict(shard_tokens=0), "shard_tokens must be >= 1, got 0")]:
        with pytest.raises(ValueError, match=match):
            prepare([str(txt)], str(tmp_path / "o"), **kw)
    prepare([str(txt)], str(tmp_path / "o"))
    ds = TokenDataset(tmp_path / "o")
    for args, match in [((-1, 1, 4), "step must be an integer >= 0, got -1"),
                        ((0, 0, 4), "batch_size must be an integer >= 1, got 0")]:
        with pytest.raises(ValueError, match=match):
            ds.batch(*args)
    # a shard whose file does not match the index is named when the dataset is opened
    shard = tmp_path / "o" / ds.shards[0]["tokens"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"shard-000000.bin holds 8 tokens, meta.json says 9"):
        TokenDataset(tmp_path / "o")
