"""FSDP training on the CPU (gloo): learning, exact resume after SIGKILL (during an async
checkpoint's write too), resharding onto fewer processes, injected OOM and NaN, incomplete and
damaged checkpoints, bf16, config errors, export."""
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "mptkernels", "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from mptkernels.data import prepare

    txt = tmp_path_factory.mktemp("txt")
    for i, line in enumerate(["the quick brown fox jumps over the lazy dog. ", "abcdefgh " * 3, "0123456789 "]):
        (txt / f"{i}.txt").write_text(line * 400)  # a learnable toy corpus, three documents
    d = tmp_path_factory.mktemp("data")
    prepare([str(txt)], str(d))
    return str(d)


def _env():
    """The test's environment without what would make a child a distributed rank or interpret Triton."""
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TRITON_INTERPRET")}


def _run(run_dir, data_dir, *overrides, nproc=1, expect_ok=True, restarts=None):
    # the CPU (gloo) on any machine: two processes on one GPU would not work with NCCL
    args = [TINY, f"data.path={data_dir}", f"checkpoint.dir={run_dir}", "log.every=100", "train.warmup_steps=4",
            "train.lr=0.01", "train.device=cpu",
            *overrides]
    if nproc == 1 and restarts is None:
        cmd = [sys.executable, "-m", "mptkernels.train", *args]
    else:
        # --standalone: a rendezvous on a free local port (no clash between runs or test processes)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *(["--max-restarts", str(restarts)] if restarts is not None else []),
               "-m", "mptkernels.train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(run_dir):
    """step -> loss of the step records in log.jsonl."""
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
    # the same unattended: torchrun restarts the group after rank 1 is killed at step 10 (in the
    # first attempt only), and the second attempt resumes from ckpt-8 on its own
    e = str(tmp_path / "e")
    r = _run(e, data_dir, *common, "test_hooks.crash_at_step=10", "test_hooks.crash_rank=1",
             "test_hooks.crash_attempts=1", nproc=2, restarts=2)
    assert "attempt     2 of 3 (torchrun --max-restarts 2); attempt 1 failed at step 10" in r.stdout, r.stdout[-3000:]
    assert _losses(e) == la
    # the 2-process checkpoint resumes on 1 process (resharded by torch.distributed.checkpoint)
    c = str(tmp_path / "c")
    shutil.copytree(a, c)
    _run(c, data_dir, "train.steps=20", "checkpoint.every=4")
    _run(a, data_dir, "train.steps=20", "checkpoint.every=4", nproc=2)
    lc, la2 = _losses(c), _losses(a)
    _assert_same_losses(la2, lc, 1e-5, steps=range(17, 21))
    # what a start reads of the checkpoint: one process of two reads its half (and the small
    # replicated entries), one process alone all of it
    newest = os.path.join(a, sorted(n for n in os.listdir(a) if n.startswith("ckpt-"))[-1])
    total = sum(os.path.getsize(os.path.join(newest, f)) for f in os.listdir(newest) if f.endswith(".distcp"))
    read_2 = [rec["load_mb"] for rec in _step_records(b) if "load_mb" in rec][-1] * 2**20
    read_1 = [rec["load_mb"] for rec in _step_records(c) if "load_mb" in rec][-1] * 2**20
    assert 0.4 * total < read_2 < 0.6 * total and 0.9 * total < read_1 <= total, (read_2, read_1, total)


def test_hybrid_sharding_matches_full_sharding_and_its_checkpoint_resumes_on_other_meshes(tmp_path, data_dir):
    # 4 processes as 2 groups of 2 (sharded inside a group, replicated across) against 4 fully
    # sharded: the same maths, summed in another order (fp tolerance, not bitwise)
    full, hybrid = str(tmp_path / "full"), str(tmp_path / "hybrid")
    common = ("train.steps=8", "checkpoint.every=4")
    _run(full, data_dir, *common, nproc=4)
    r = _run(hybrid, data_dir, *common, "train.sharding=hybrid", "train.shard_group_size=2", nproc=4)
    assert "hybrid sharding: 2 groups of 2" in r.stdout, r.stdout[-2000:]
    lf, lh = _losses(full), _losses(hybrid)
    assert sorted(lh) == list(range(1, 9))
    _assert_same_losses(lf, lh, 1e-5)
    # the 2x2 checkpoint of step 8 resumes on 1 process and on 2 (fully sharded, resharded by
    # torch.distributed.checkpoint): the same next steps as the hybrid run going on
    on1, on2 = str(tmp_path / "on1"), str(tmp_path / "on2")
    shutil.copytree(hybrid, on1)
    shutil.copytree(hybrid, on2)
    more = ("train.steps=11", "checkpoint.every=4")
    _run(hybrid, data_dir, *more, "train.sharding=hybrid", "train.shard_group_size=2", nproc=4)
    _run(on1, data_dir, *more)
    _run(on2, data_dir, *more, nproc=2)
    want = _losses(hybrid)
    for other in (on1, on2):
        _assert_same_losses(want, _losses(other), 1e-5, steps=range(9, 12))
    # a group size that does not divide the processes is a one-line error
    r = _run(str(tmp_path / "bad"), data_dir, "train.sharding=hybrid", "train.shard_group_size=3", nproc=2,
             expect_ok=False)
    assert r.returncode != 0 and "'train.shard_group_size' (3) must divide the number of processes (2)" in r.stderr, r.stderr[-2000:]


def test_a_failure_repeating_at_one_step_stops_after_the_restarts_naming_step_and_cause(tmp_path, data_dir):
    run = str(tmp_path / "run")
    r = _run(run, data_dir, "train.steps=8", "checkpoint.every=4", "test_hooks.error_at_step=5", restarts=2,
             expect_ok=False)
    assert r.returncode != 0
    assert ("error: out of restarts (torchrun --max-restarts 2): step 5 failed in all 3 attempts; the last failure "
            "(rank 0): RuntimeError: injected by test_hooks.error_at_step.") in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("error: out of restarts") == 1  # the last attempt only
    assert "attempt     3 of 3 (torchrun --max-restarts 2); attempt 1 failed at step 5: RuntimeError" in r.stdout
    assert _ckpt_steps(run) == [4] and max(_losses(run)) == 5  # the newest complete checkpoint is kept


@pytest.mark.parametrize("nproc", [1, 2])
def test_async_checkpoints_keep_the_losses_and_a_sigkill_mid_write_resumes_from_the_one_before(nproc, tmp_path,
                                                                                              data_dir):
    sync, bg, crash = (str(tmp_path / name) for name in ("sync", "async", "crash"))
    common = ("train.steps=12", "checkpoint.every=4")
    _run(sync, data_dir, *common, nproc=nproc)
    _run(bg, data_dir, *common, "checkpoint.async=true", nproc=nproc)
    want = _losses(sync)
    assert _losses(bg) == want  # bitwise: writing in the background changes nothing the training sees
    for name in ("ckpt-00000008", "ckpt-00000012"):  # the newest two (checkpoint.keep 2), complete
        assert os.path.exists(os.path.join(bg, name, "complete.json")), os.listdir(bg)
    assert sorted(os.listdir(bg)) == sorted(os.listdir(sync))
    # every write sleeps 3 s first: step 8 waits for ckpt-4 and completes it, then starts ckpt-8,
    # which is still being written when the run dies at the start of step 10
    r = _run(crash, data_dir, *common, "checkpoint.async=true", "test_hooks.async_write_delay_s=3",
             "test_hooks.crash_at_step=10", nproc=nproc, expect_ok=False)
    assert r.returncode != 0 and max(_losses(crash)) == 10
    names = os.listdir(crash)
    assert "ckpt-00000008.tmp" in names and "ckpt-00000008" not in names, names
    assert os.path.exists(os.path.join(crash, "ckpt-00000004", "complete.json")), names
    r = _run(crash, data_dir, *common, "checkpoint.async=true", nproc=nproc)  # the restart
    assert f"resumed from {os.path.join(crash, 'ckpt-00000004')} at step 4" in r.stdout, r.stdout
    assert _losses(crash) == want  # bitwise, from a checkpoint written while the training went on


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
    else:  # one line, exit 2, before the run directory exists
        assert r.returncode == 2 and r.stderr.strip() == (
            "error: config: 'log.tensorboard' needs the tensorboard package (pip install tensorboard)"), r.stderr
        assert not os.path.exists(run)


def test_compiled_blocks_give_the_same_losses(tmp_path, data_dir):
    _assert_option_keeps_losses(tmp_path, data_dir, 3, "train.compile=true", 1e-5)


def _step_records(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        return [json.loads(x) for x in fh]


def _ckpt_steps(run_dir):
    return sorted(int(n.split("-")[1]) for n in os.listdir(run_dir) if n.startswith("ckpt-"))


@contextlib.contextmanager
def _built_model(*overrides):
    """train.build_model of the tiny config with overrides, in this process (a gloo group of one)."""
    import torch.distributed as dist

    from mptkernels import train as tr

    cfg = tr.load_config(TINY, ["data.path=unused", "train.device=cpu", *overrides])
    device, _, _ = tr._init_distributed("cpu")
    try:
        yield tr.build_model(cfg, device)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # see the filter in mptkernels/train.py
@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_bf16_blocks_compute_in_bf16_and_keep_fp32_position_tables(position):
    # FSDP2 casts a block's floating-point arguments to bf16 unless told not to: the ALiBi slopes
    # (rejected by the attention op) and the rotary tables (rounded) must reach the block in fp32.
    # The rotary tables are buffers of the model's RotaryEmbedding, which the block gets as an argument
    from torch.utils._pytree import tree_leaves

    from mptkernels.nn import RotaryEmbedding

    pos = [] if position == "alibi" else ["model.attn_config={alibi: false, rope: true}"]
    with _built_model("train.precision=bf16", *pos) as model:
        seen = []
        model.transformer.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tree_leaves(args)))
        ids = torch.randint(0, 256, (2, 16))
        _, loss = model(ids, labels=ids)
    tensors = [t for t in seen[0] if isinstance(t, torch.Tensor)]
    hidden, tables = tensors[0], tensors[1:]
    tables += [t for m in seen[0] if isinstance(m, RotaryEmbedding) for t in (m.cos, m.sin)]
    assert hidden.shape == (2, 16, 64) and hidden.dtype == torch.bfloat16  # the compute stays bf16
    assert len(tables) == (1 if position == "alibi" else 2)  # slopes, or cos and sin
    assert all(t.dtype == torch.float32 for t in tables), [t.dtype for t in tables]
    assert torch.isfinite(loss)


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.parametrize("option", ["activation_checkpointing", "compile"])
def test_memory_and_speed_options_take_effect(option):
    # the same losses (the tests above) would also hold if the option did nothing: check it acts
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with _built_model(f"train.{option}=true") as model:
        calls = []
        model.transformer.blocks[0].norm_1.register_forward_hook(lambda *a: calls.append(1))
        ids = torch.randint(0, 256, (2, 16))
        model(ids, labels=ids)[1].backward()
    if option == "activation_checkpointing":
        assert len(calls) == 2, calls  # the forward, and its recomputation in the backward
    else:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_bf16_training_with_alibi_and_rope(tmp_path, data_dir):
    for name, pos in [("alibi", []), ("rope", ["model.attn_config={alibi: false, rope: true}"])]:
        run = str(tmp_path / name)
        _run(run, data_dir, "train.steps=6", "checkpoint.every=0", "train.precision=bf16", *pos)
        losses = [_losses(run)[s] for s in range(1, 7)]
        assert all(math.isfinite(x) for x in losses), (name, losses)
        assert losses[-1] < losses[0], (name, losses)


def _damage(ckpt_dir):
    for name in os.listdir(ckpt_dir):
        if name.endswith(".distcp"):
            path = os.path.join(ckpt_dir, name)
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)


def test_damaged_checkpoint_falls_back_and_another_model_is_a_clear_error(tmp_path, data_dir):
    run = str(tmp_path / "dmg")
    _run(run, data_dir, "train.steps=4", "checkpoint.every=2")
    assert _ckpt_steps(run) == [2, 4]
    _damage(os.path.join(run, "ckpt-00000004"))  # torch.distributed.checkpoint: CheckpointException
    r = _run(run, data_dir, "train.steps=6", "checkpoint.every=2")
    assert "cannot load" in r.stderr and "resumed from" in r.stdout and "ckpt-00000002" in r.stdout, r.stderr
    assert [rec["step"] for rec in _step_records(run)] == list(range(1, 7))
    # a checkpoint of another model: a one-line error, not a traceback (nor a silent fresh start)
    r = _run(run, data_dir, "train.steps=8", "model.d_model=128", expect_ok=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "does not match the configured model" in r.stderr and "model.d_model: 64 in the checkpoint, 128" in r.stderr
    for step in _ckpt_steps(run):  # none loads: an error, not training from scratch beside them
        _damage(os.path.join(run, f"ckpt-{step:08d}"))
    r = _run(run, data_dir, "train.steps=8", expect_ok=False)
    assert r.returncode == 2 and "none of the 2 checkpoints" in r.stderr, r.stderr[-2000:]


def test_last_steps_are_checkpointed_and_exported(tmp_path, data_dir):
    run = str(tmp_path / "last")
    _run(run, data_dir, "train.steps=3", "checkpoint.every=2", "checkpoint.keep=5")
    assert _ckpt_steps(run) == [2, 3]
    r = _run(run, data_dir, "train.steps=3", "checkpoint.every=2", "checkpoint.keep=5")  # done: no new checkpoint
    assert "nothing to do" in r.stdout and _ckpt_steps(run) == [2, 3]
    short = str(tmp_path / "short")
    _run(short, data_dir, "train.steps=2", "checkpoint.every=5")  # fewer steps than checkpoint.every
    assert _ckpt_steps(short) == [2]
    r = _run(str(tmp_path / "off"), data_dir, "train.steps=2", "checkpoint.every=0")
    assert not [n for n in os.listdir(tmp_path / "off") if n.startswith("ckpt-")]  # 0: no checkpoints at all
    end = _summary(r.stdout, "done: ")
    assert end["checkpoint"] == "none (checkpoint.every is 0)" and "export" not in end, end  # nothing to export


def _summary(stdout, title):
    """The rows of the summary block whose first line starts with title, as {key: value}; the
    title line itself under the key 'title'."""
    lines = stdout.splitlines()
    starts = [k for k, x in enumerate(lines) if x.startswith(title)]
    assert len(starts) == 1, stdout  # printed once (process 0)
    rows = {"title": lines[starts[0]]}
    for x in lines[starts[0] + 1:]:
        if not x.startswith("  "):
            break
        rows[x[:14].strip()] = x[14:]
    return rows


def test_the_start_and_end_summaries_say_what_runs_and_how_to_export_it(tmp_path, data_dir):
    import re
    import shlex

    from mptkernels import train as tr
    from mptkernels.data import TokenDataset
    from mptkernels.models import MPTForCausalLM

    run = str(tmp_path / "summary")
    over = [f"data.path={data_dir}", f"checkpoint.dir={run}", "train.device=cpu", "log.every=100", "train.steps=3",
            "checkpoint.every=2"]

    def train(*cmd):
        r = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=600, env=_env(),
                           cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    r = train("mptkernels", "train", "tiny", *over)  # the mptkernels command's form
    n_params = sum(p.numel() for p in MPTForCausalLM(tr.model_config(tr.load_config("tiny", over))).parameters())
    n_tok = len(TokenDataset(data_dir))

    start = _summary(r.stdout, "training")
    assert start["title"] == "training"
    assert re.fullmatch(rf"d_model 64, n_layers 2, n_heads 4, vocab 256: {n_params:,} \(.*\) parameters",
                        start["model"]), start
    assert start["data"] == f"{data_dir}: {n_tok:,} ({n_tok / 1e3:.3g} K) tokens in 3 documents (tokenizer bytes)"
    assert re.fullmatch(r"1 process on the CPU \(\d+ threads?; gloo\), micro-batch 4", start["processes"]), start
    assert start["precision"] == "fp32"
    assert start["plan"] == f"3 steps × 8 sequences × 64 tokens = 1,536 tokens ({1536 / n_tok:.2g} epochs)"
    assert start["run dir"] == f"{run} (a checkpoint every 2 steps, the newest 2 kept)"
    assert start["start"] == "from scratch"

    end = _summary(r.stdout, "done: ")
    assert end["title"] == "done: step 3 of 3"
    m = re.fullmatch(r"3 steps, 1,536 tokens in (\d+\.\d) s \(([\d,]+) tokens/s\)", end["this run"])
    assert m, end
    seconds, tps = float(m[1]), int(m[2].replace(",", ""))
    assert 1536 / (seconds + 0.05) - 1 <= tps <= 1536 / max(seconds - 0.05, 1e-3) + 1, end  # seconds is rounded
    last = [_losses(run)[s] for s in (1, 2, 3)]
    assert end["final loss"] == f"{sum(last) / 3:.4f} (mean of the last 3 steps)"
    assert end["checkpoint"] == os.path.join(run, "ckpt-00000003")
    assert os.path.isfile(os.path.join(end["checkpoint"], "complete.json"))
    # the export command: the same command line, with --export; run as printed, it writes the model trained
    export = shlex.split(end["export"])
    hf = os.path.join(run, "hf")
    assert export[0] in ("python", sys.executable) and export[1:] == ["-m", "mptkernels", "train", "tiny", *over,
                                                                      "--export", hf], export
    e = subprocess.run(export, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert e.returncode == 0 and f"exported {end['checkpoint']} to {hf}" in e.stdout, e.stdout + e.stderr
    assert sum(p.numel() for p in MPTForCausalLM.from_hf(hf).parameters()) == n_params

    # resumed: where from, and what this run did
    r = train("mptkernels.train", "tiny", *over, "train.steps=5")  # the module's own form
    start, end = _summary(r.stdout, "training"), _summary(r.stdout, "done: ")
    assert start["start"] == f"resumed from {os.path.join(run, 'ckpt-00000003')} at step 3 (2 steps to go)"
    assert end["title"] == "done: step 5 of 5" and end["this run"].startswith("2 steps, 1,024 tokens in "), end
    export = shlex.split(end["export"])
    assert export[1:] == ["-m", "mptkernels.train", "tiny", *over, "train.steps=5", "--export", hf], export


def test_export_may_come_before_the_overrides(tmp_path, data_dir):
    run, out = str(tmp_path / "order"), str(tmp_path / "hf")
    _run(run, data_dir, "train.steps=2", "checkpoint.every=2")
    r = subprocess.run([sys.executable, "-m", "mptkernels.train", TINY, "--export", out, f"data.path={data_dir}",
                        f"checkpoint.dir={run}", "train.device=cpu"], capture_output=True, text=True, timeout=600,
                       env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "config.json"))


def test_export_of_a_from_hf_run_has_the_hf_model(tmp_path, data_dir):
    from mptkernels.models import MPTConfig, MPTForCausalLM

    hf = str(tmp_path / "hf_in")
    MPTForCausalLM(MPTConfig(d_model=32, n_heads=2, n_layers=1, max_seq_len=64, vocab_size=256)).save_pretrained(hf)
    run, out = str(tmp_path / "from_hf"), str(tmp_path / "hf_out")
    _run(run, data_dir, f"model.from_hf={hf}", "train.steps=2", "checkpoint.every=2")
    r = _run(run, data_dir, f"model.from_hf={hf}", "--export", out)
    assert "ckpt-00000002" in r.stdout
    model = MPTForCausalLM.from_hf(out)
    assert (model.config.d_model, model.config.n_layers) == (32, 1)
    assert not torch.equal(model.transformer.wte.weight, MPTForCausalLM.from_hf(hf).transformer.wte.weight)  # trained


def test_resume_does_not_repeat_log_records(tmp_path, data_dir):
    run = str(tmp_path / "log")
    r = _run(run, data_dir, "train.steps=4", "checkpoint.every=2", "test_hooks.crash_at_step=3", expect_ok=False)
    assert r.returncode != 0 and [rec["step"] for rec in _step_records(run)] == [1, 2, 3]
    r = _run(run, data_dir, "train.steps=4", "checkpoint.every=2")  # resumes at step 2, runs step 3 again
    recs = _step_records(run)
    assert [rec["step"] for rec in recs] == [1, 2, 3, 4]
    # the first step of each start logs how long the start took, in parts that add up
    firsts = [rec for rec in recs if "startup_s" in rec]
    assert [rec["step"] for rec in firsts] == [1, 3], recs
    for rec in firsts:
        parts = rec["startup_s"] + rec["load_s"] + rec["data_s"] + rec["step_s"]
        assert 0 < parts <= rec["first_step_after_s"] < parts + 5, rec
        assert rec["startup_s"] > 0.5  # from the process start: the interpreter and torch's import count
    assert "first step done" in r.stdout and "checkpoint load" in r.stdout


def test_config_merges_nested_keys_takes_every_mptconfig_field_and_coerces_numbers(tmp_path):
    import dataclasses

    from mptkernels import train as tr
    from mptkernels.models import MPTConfig

    assert set(tr.DEFAULTS["model"]) == {"from_hf"} | {f.name for f in dataclasses.fields(MPTConfig)}
    yml = tmp_path / "c.yaml"
    yml.write_text("model: {attn_config: {alibi: false, rope: true}}\ntrain: {lr: 1e-3}\n")  # 1e-3: a YAML string
    cfg = tr.load_config(str(yml), ["data.path=d", "model.attn_config.kv_n_heads=2", "model.layer_norm_epsilon=1e-6",
                                    "model.resid_pdrop=0.1", "model.emb_pdrop=0", "model.logit_scale=0.5",
                                    "train.weight_decay=1", "spike.factor='2.5'"])
    attn = cfg["model"]["attn_config"]
    assert (attn["rope"], attn["alibi"], attn["kv_n_heads"], attn["rope_theta"]) == (True, False, 2, 10000.0)
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["weight_decay"] == 1.0 and cfg["spike"]["factor"] == 2.5
    mc = tr.model_config(cfg)
    assert (mc.layer_norm_epsilon, mc.resid_pdrop, mc.emb_pdrop, mc.logit_scale, mc.kv_n_heads) == (1e-6, 0.1, 0.0,
                                                                                                    0.5, 2)
    assert tr.load_config(TINY, ["data.path=d", "train.lr=1e-3"])["train"]["lr"] == 1e-3


@pytest.fixture(scope="module")
def big_vocab_data(data_dir, tmp_path_factory):
    """data_dir as if prepared with a 300-token tokenizer."""
    d = str(tmp_path_factory.mktemp("vocab300") / "data")
    shutil.copytree(data_dir, d)
    with open(os.path.join(d, "meta.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(d, "meta.json"), "w") as fh:
        json.dump({**meta, "vocab_size": 300}, fh)
    return d


@pytest.mark.parametrize("args, message", [
    (["model.d_model=65"], "model: MPTConfig: d_model (65) must be a multiple of n_heads (4)"),
    (["model.n_heads=0"], "'model.n_heads' must be >= 1"),
    (["model.attn_config.foo=1"], "unknown key 'model.attn_config.foo'"),
    (["data.path=/nonexistent"], "data.path: no meta.json in '/nonexistent'"),
    (["train.micro_batch=0"], "'train.micro_batch' must be >= 1"),
    (["log.every=0"], "'log.every' must be >= 1"),
    (["data.seq_len=1"], "'data.seq_len' must be >= 2"),
    (["train.steps=abc"], "'train.steps' must be an integer, got 'abc'"),
    (["train.steps=-1"], "'train.steps' must be >= 1"),
    (["train.global_batch=8.0"], "'train.global_batch' must be an integer, got 8.0"),
    (["train.lr=fast"], "'train.lr' must be a number, got 'fast'"),
    (["train.compile=1"], "'train.compile' must be true or false"),
    (["train.device=gpu"], "'train.device' must be auto, cpu or cuda, got 'gpu'"),
    (["checkpoint.keep=0"], "'checkpoint.keep' must be >= 1"),
    (["train.sharding=hsdp"], "'train.sharding' must be full or hybrid, got 'hsdp'"),
    (["train.shard_group_size=0"], "'train.shard_group_size' must be >= 1 or null"),
    (["model.attn_config=5"], "'model.attn_config' must be a mapping"),
    (["data.seq_len=129", "model.learned_pos_emb=true"], "data.seq_len (129) must be <= model.max_seq_len (128)"),
    (["big_vocab"], "the data's tokenizer has 300 tokens (meta.json vocab_size) but model.vocab_size is 256"),
    (["--config", "missing.yaml"], "config file missing.yaml: No such file or directory, nor a preset (125m, 1b, "),
    (["--config", "tinyy"], "config file tinyy: No such file or directory, nor a preset (125m, 1b, tiny)"),
    (["--config", "list.yaml"], "config file list.yaml: the top level must be a mapping of sections"),
])
def test_bad_input_is_a_one_line_error(args, message, tmp_path, data_dir, big_vocab_data, capsys, monkeypatch):
    from mptkernels import train as tr

    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    config = args[1] if args[0] == "--config" else TINY
    over = [] if args[0] == "--config" else [a for a in args if a != "big_vocab"]
    data = big_vocab_data if args == ["big_vocab"] else data_dir
    rc = tr.main([config, f"data.path={data}", f"checkpoint.dir={tmp_path / 'run'}", "train.device=cpu",
                  "train.steps=2", *over])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_a_preset_name_is_its_shipped_config_and_a_file_of_that_name_wins(tmp_path, monkeypatch):
    from mptkernels import train as tr

    assert tr.presets() == ["125m", "1b", "tiny"]
    assert tr.load_config("tiny", ["data.path=d"]) == tr.load_config(TINY, ["data.path=d"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("train: {steps: 3}\n")
    assert tr.load_config("tiny", ["data.path=d"])["train"]["steps"] == 3


def test_cli_error_is_one_line_without_traceback(tmp_path, data_dir):
    r = _run(str(tmp_path / "cli"), data_dir, "train.global_batch=8.0", expect_ok=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: config: 'train.global_batch' must be an integer, got 8.0"], r.stderr
