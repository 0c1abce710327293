"""Token files: prepare, memory-mapped reading, deterministic and resumable packed batches."""
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
    assert bytes(np.asarray(ds.tokens, dtype=np.uint8)) == want
    lengths = [len(t.encode()) for t in texts]
    assert ds.doc_starts.tolist() == [0] + np.cumsum(lengths)[:-1].tolist()


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
    windows = torch.from_numpy(np.asarray(ds.tokens[: n_win * seq], dtype=np.int64)).view(n_win, seq)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, windows.tolist()))
    # doc_ids follow the document starts
    tokens, docs = run[0]
    for row in range(bs):
        w = next(i for i in range(n_win) if torch.equal(windows[i], tokens[row]))
        pos = np.arange(w * seq, (w + 1) * seq)
        assert docs[row].tolist() == (np.searchsorted(ds.doc_starts, pos, side="right") - 1).tolist()


def test_prepare_errors(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="no text found"):
        prepare([str(tmp_path / "e")], str(tmp_path / "out"))
    prepare([str(__file__)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenDataset(tmp_path / "out").batch(0, 1, 10**7)


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
        assert ds.meta["n_docs"] == 4 and bytes(np.asarray(ds.tokens, dtype=np.uint8)) == "".join(texts).encode()
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
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "second": 1, "document": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    code, _, err = cli(d / "2.txt", "--out", tmp_path / "o", "--tokenizer", "tok")  # relative: local, no Hub
    assert code == 0, err
    assert TokenDataset(tmp_path / "o").tokens.tolist() == [1, 2]
