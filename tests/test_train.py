"""FSDP training on the CPU (gloo): learning, exact resume after SIGKILL, resharding onto fewer
processes, injected OOM and NaN, incomplete checkpoints, config errors, export."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from mptkernels.data import prepare

    txt = tmp_path_factory.mktemp("txt")
    for i, line in enumerate(["the quick brown fox jumps over the lazy dog. ", "abcdefgh " * 3, "0123456789 "]):
        (txt / f"{i}.txt").write_text(line * 400)  # a learnable toy corpus, three documents
    d = tmp_path_factory.mktemp("data")
    prepare([str(txt)], str(d))
    return str(d)


def _run(run_dir, data_dir, *overrides, nproc=1, expect_ok=True):
    # the CPU (gloo) on any machine: two processes on one GPU would not work with NCCL
    args = [TINY, f"data.path={data_dir}", f"checkpoint.dir={run_dir}", "log.every=100", "train.warmup_steps=4",
            "train.lr=0.01", "train.device=cpu",
            *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "mptkernels.train", *args]
    else:
        # --standalone: a rendezvous on a free local port (no clash between runs or test processes)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "mptkernels.train", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TRITON_INTERPRET")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(run_dir):
    """step -> loss, the last record of each step (a resumed run logs some steps twice)."""
    out = {}
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if "loss" in rec and "event" not in rec:
                out[rec["step"]] = rec["loss"]
    return out


def _assert_same_losses(want, got, rtol, steps=None):
    for s in steps or want:
        assert abs(want[s] - got[s]) <= rtol * abs(want[s]), (s, want[s], got[s])


def test_two_processes_learn_and_resume_exactly_after_sigkill(tmp_path, data_dir):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ("train.steps=16", "checkpoint.every=4")
    _run(a, data_dir, *common, nproc=2)
    la = _losses(a)
    assert sorted(la) == list(range(1, 17))
    assert sum(list(la.values())[-3:]) / 3 < 0.9 * sum(list(la.values())[:3]) / 3, la  # it learns
    r = _run(b, data_dir, *common, "test_hooks.crash_at_step=10", nproc=2, expect_ok=False)
    assert r.returncode != 0
    assert max(_losses(b)) == 10
    _run(b, data_dir, *common, nproc=2)  # restart: resumes from ckpt-8
    lb = _losses(b)
    assert lb == la, (lb, la)  # bitwise the same losses as the uninterrupted run
    # the 2-process checkpoint resumes on 1 process (resharded by torch.distributed.checkpoint)
    c = str(tmp_path / "c")
    shutil.copytree(a, c)
    _run(c, data_dir, "train.steps=20", "checkpoint.every=4")
    _run(a, data_dir, "train.steps=20", "checkpoint.every=4", nproc=2)
    lc, la2 = _losses(c), _losses(a)
    _assert_same_losses(la2, lc, 1e-5, steps=range(17, 21))


def test_injected_oom_halves_the_micro_batch_and_keeps_the_maths(tmp_path, data_dir):
    base, oom = str(tmp_path / "base"), str(tmp_path / "oom")
    _run(base, data_dir, "train.steps=8", "checkpoint.every=0")
    r = _run(oom, data_dir, "train.steps=8", "checkpoint.every=0", "test_hooks.oom_at_step=3")
    assert "micro_batch -> 2" in r.stdout
    lb, lo = _losses(base), _losses(oom)
    assert sorted(lo) == list(range(1, 9))
    _assert_same_losses(lb, lo, 1e-5)
    with open(os.path.join(oom, "log.jsonl")) as fh:
        last = [json.loads(x) for x in fh][-1]
    assert last["micro_batch"] == 2  # the chosen micro-batch is kept


def test_nan_step_is_skipped_counted_and_rolled_back(tmp_path, data_dir):
    run = str(tmp_path / "nan")
    r = _run(run, data_dir, "train.steps=8", "checkpoint.every=2", "test_hooks.nan_at_step=5",
             "spike.max_consecutive=1")
    assert "skipped (1 so far)" in r.stdout and "rolled back to" in r.stdout
    with open(os.path.join(run, "log.jsonl")) as fh:
        recs = [json.loads(x) for x in fh]
    assert recs[-1]["step"] == 8 and recs[-1]["skipped_total"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


def test_incomplete_checkpoint_is_ignored_and_bad_keys_are_named(tmp_path, data_dir):
    run = str(tmp_path / "inc")
    _run(run, data_dir, "train.steps=4", "checkpoint.every=2")
    os.makedirs(os.path.join(run, "ckpt-00000099"))  # half-written: no completion mark
    os.makedirs(os.path.join(run, "ckpt-00000100.tmp"))
    r = _run(run, data_dir, "train.steps=6", "checkpoint.every=2")
    assert "ignoring the incomplete checkpoint" in r.stderr and "resumed from" in r.stdout
    assert "ckpt-00000004" in r.stdout
    r = _run(run, data_dir, "train.stepz=3", expect_ok=False)
    assert r.returncode == 2 and "unknown key 'train.stepz'" in r.stderr
    out = str(tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "mptkernels.train", TINY, f"data.path={data_dir}",
                        f"checkpoint.dir={run}", "train.device=cpu", "--export", out], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    from mptkernels.models import MPTForCausalLM

    model = MPTForCausalLM.from_hf(out)
    assert model.generate(torch.tensor([[65, 66]]), 4).shape == (1, 6)


def _assert_option_keeps_losses(tmp_path, data_dir, steps, option, tol):
    """A run with `option` has the losses of the same run without it, within tol."""
    plain, other = str(tmp_path / "plain"), str(tmp_path / "option")
    _run(plain, data_dir, f"train.steps={steps}", "checkpoint.every=0")
    _run(other, data_dir, f"train.steps={steps}", "checkpoint.every=0", option)
    _assert_same_losses(_losses(plain), _losses(other), tol)


def test_activation_checkpointing_gives_the_same_losses(tmp_path, data_dir):
    _assert_option_keeps_losses(tmp_path, data_dir, 4, "train.activation_checkpointing=true", 1e-6)


def test_tensorboard_logging_or_a_clear_error(tmp_path, data_dir):
    import importlib.util

    run = str(tmp_path / "tb")
    has_tb = importlib.util.find_spec("tensorboard") is not None
    r = _run(run, data_dir, "train.steps=2", "checkpoint.every=0", "log.tensorboard=true", expect_ok=has_tb)
    if has_tb:
        assert os.listdir(os.path.join(run, "tensorboard"))
    else:
        assert r.returncode != 0 and "needs the tensorboard package" in r.stderr


def test_compiled_blocks_give_the_same_losses(tmp_path, data_dir):
    _assert_option_keeps_losses(tmp_path, data_dir, 3, "train.compile=true", 1e-5)
