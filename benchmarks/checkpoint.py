"""The step-time cost of a checkpoint written synchronously or in the background
(``checkpoint.async: true``), on the CPU.

    python benchmarks/checkpoint.py [--config tiny|125m] [--reps N] [--steps N] [--every N] [--out DIR]

Each repeat trains the preset three times, one process on the CPU each, each in a fresh
subprocess: without checkpoints ("none"), with sync ones and with async ones; the order of the
three rotates between repeats, so load that comes and goes falls on every mode. A short sequence
and global batch (125m: 2 sequences of 128 tokens) keep a step to a few seconds; the checkpoint
is the full model and AdamW state all the same (125m: 1.5 GB). The data is this repository's
.py and .md files in bytes, prepared once into OUT/data. From each run's log.jsonl, over the
checkpoints saved inside the loop (every --every steps; the run's last one, after the loop, is
not counted, and the steps after the last counted one leave its background write time to end):

  blocked  seconds the training loop spent in the checkpoint's save (checkpoint_s)
  write    seconds from the checkpoint's start to its last byte written (checkpoint_write_s)
  cost     the loop's time (step times + checkpoint_s, step 1 left out) minus as many steps of
           the median step time of the runs without checkpoints (all their steps pooled, so one
           slow step of theirs moves nothing), per checkpoint: what a checkpoint costs the run,
           the slower steps while a background write competes for the cores included

Prints median [min-max] over the repeats and writes OUT/checkpoint_CONFIG.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"none": ["checkpoint.every=0"], "sync": ["checkpoint.async=false"], "async": ["checkpoint.async=true"]}
SHAPES = {  # the overrides that make a step short: the model (and so the checkpoint) stays the preset's
    "tiny": ["data.seq_len=64", "train.global_batch=8", "train.micro_batch=8"],
    "125m": ["data.seq_len=128", "train.global_batch=2", "train.micro_batch=2"],
}


def _env():
    """This environment without what would make a child a distributed rank."""
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def _data(out):
    """This repository's .py and .md files in bytes, prepared once (python -m mptkernels.data prepare)."""
    path = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(path, "meta.json")):
        files = sorted(f for ext in ("py", "md") for f in glob.glob(os.path.join(ROOT, "**", f"*.{ext}"), recursive=True)
                       if not f.startswith((os.path.join(ROOT, "bench-out"), os.path.join(ROOT, "build"))))
        proc = subprocess.run([sys.executable, "-m", "mptkernels.data", "prepare", *files, "--out", path],
                              capture_output=True, text=True, cwd=ROOT, env=_env())
        if proc.returncode != 0:
            sys.exit(f"checkpoint: preparing the data failed:\n{proc.stderr[-3000:]}")
    return path


def _run(config, mode, data, run_dir, steps, every):
    """One training run in a fresh process; returns its log.jsonl records."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "mptkernels.train", config, f"data.path={data}", f"checkpoint.dir={run_dir}",
           "train.device=cpu", f"train.steps={steps}", f"checkpoint.every={every}", "checkpoint.keep=1",
           "train.warmup_steps=1", f"log.every={steps}", *SHAPES[config], *MODES[mode]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    if proc.returncode != 0:
        sys.exit(f"checkpoint: the {mode} run failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    shutil.rmtree(run_dir, ignore_errors=True)  # 1.5 GB a checkpoint at 125m
    return recs


def _summary(recs, tokens_per_step):
    """The loop's time (step 1 left out), and the blocked and write seconds of its checkpoints."""
    loop = sum(tokens_per_step / r["tokens_per_s"] + r.get("checkpoint_s", 0.0) for r in recs if r["step"] > 1)
    steps = [tokens_per_step / r["tokens_per_s"] for r in recs if r["step"] > 1 and "checkpoint_s" not in r]
    return {"loop_s": loop, "step_s": statistics.median(steps), "steps_s": steps,
            "blocked_s": [r["checkpoint_s"] for r in recs if "checkpoint_s" in r],
            "write_s": [r["checkpoint_write_s"] for r in recs if "checkpoint_write_s" in r]}


def _fmt(xs):
    return f"{statistics.median(xs):7.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(SHAPES), default="125m")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=22, help="steps of each run (default 22)")
    p.add_argument("--every", type=int, default=8, help="a checkpoint every N steps (default 8: at 8 and 16, and "
                                                         "the run's last one, after the loop, at 22)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    args = p.parse_args(argv)
    if args.reps < 1 or args.every < 1 or args.steps <= args.every:
        p.error(f"--reps and --every must be >= 1 and --steps > --every, got {args.reps}, {args.every} and {args.steps}")
    os.makedirs(args.out, exist_ok=True)
    data = _data(args.out)
    seq, batch = (int(o.split("=")[1]) for o in SHAPES[args.config][:2])
    runs = {m: [] for m in MODES}
    order = list(MODES)
    for rep in range(args.reps):
        for mode in order[rep % 3:] + order[:rep % 3]:
            t0, load = time.perf_counter(), os.getloadavg()[0]
            s = _summary(_run(args.config, mode, data, os.path.join(args.out, f"ckpt-bench-{mode}"), args.steps,
                              args.every), seq * batch)
            s["load_before"] = load  # the 1-minute load average as the run began: others' work too
            runs[mode].append(s)
            print(f"  rep {rep} {mode:5s} (load {load:.1f}): loop {s['loop_s']:.1f} s, step {s['step_s']:.2f} s, blocked "
                  f"{[round(x, 2) for x in s['blocked_s']]}, write {[round(x, 2) for x in s['write_s']]} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    n_saves, n_steps = args.steps // args.every, args.steps - 1
    base = statistics.median(x for r in runs["none"] for x in r["steps_s"])
    table = {}
    for mode in ("sync", "async"):
        rs = runs[mode]
        if any(len(r["write_s"]) < n_saves for r in rs):
            print(f"note: a {mode} checkpoint's write outlasted the loop; its cost is not all counted")
        table[mode] = {"blocked_s": [x for r in rs for x in r["blocked_s"]],
                       "write_s": [x for r in rs for x in r["write_s"]],
                       "cost_s": [(r["loop_s"] - n_steps * base) / n_saves for r in rs]}
    print(f"\n{args.config}: {n_saves} checkpoints per run in {args.steps} steps, {args.reps} repeats; "
          f"a step without checkpoints {base:.2f} s (median of {n_steps * args.reps})")
    print(f"  {'mode':6s} {'blocked s':>20s} {'write s':>20s} {'cost s / checkpoint':>22s}")
    for mode, t in table.items():
        print(f"  {mode:6s} {_fmt(t['blocked_s']):>20s} {_fmt(t['write_s']):>20s} {_fmt(t['cost_s']):>22s}")
    with open(os.path.join(args.out, f"checkpoint_{args.config}.json"), "w") as fh:
        json.dump({"args": vars(args), "table": table, "runs": runs, "cpus": os.cpu_count(),
                   "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}, fh, indent=1)


if __name__ == "__main__":
    main()
