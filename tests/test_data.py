"""Token files: prepare, memory-mapped reading, deterministic and resumable packed batches."""
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
