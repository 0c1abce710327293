"""How long a restarted training run takes to its first new step, on the CPU.

    python benchmarks/resume.py [--config tiny|125m ...] [--nproc 1 2] [--reps 3] [--steps 4]

For each config and process count: train --steps steps with a checkpoint at the end (not
timed), then start the run again --reps times, one more step each time, and read what the
trainer logs for the first step of each process (log.jsonl): start-up (process start to the
model and optimiser built: interpreter, imports, process group, model), checkpoint load
(torch.distributed.checkpoint reading this process's shards of model and optimiser state; the
MB this process read),
data positioning (the first batch: the batch of step n is a function of (seed, n), nothing is
replayed) and the step itself; plus the whole "process start -> first new step". Reported as
median [min-max] over the repeats. A second table times data positioning alone at steps
10 to 10**8 (TokenDataset.batch): it does not grow with the step.

Data: the repository's own .py and .md files, tokenised as bytes (`mptkernels data prepare`).
125m runs at data.seq_len 128, one sequence per process (fp32 on the CPU: the restart costs,
not training speed, are measured). Writes resume.json to --out (default bench-out/).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {  # what makes a step short on a 2-core CPU
    "tiny": [],
    "125m": ["data.seq_len=128", "train.precision=fp32", "train.peak_tflops=null"],
}
_TRAINED = set()  # the run directories trained before: their next start must resume
PARTS = ("startup_s", "load_s", "load_mb", "data_s", "step_s", "first_step_after_s")


def _train(config, data, run_dir, nproc, steps):
    """Trains run_dir up to ``steps`` (a checkpoint at the end: checkpoint.every past the run's
    length saves only the last step); returns the log record of this start's first step."""
    args = [config, f"data.path={data}", f"checkpoint.dir={run_dir}", f"train.steps={steps}",
            f"train.global_batch={nproc}", "train.micro_batch=1", "checkpoint.every=1000000", "log.every=1000",
            "train.device=cpu", *OVERRIDES[config]]
    launcher = (["-m", "mptkernels.train"] if nproc == 1 else
                ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "mptkernels.train"])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"resume: the {config} run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        first = [json.loads(line) for line in fh if "startup_s" in line][-1]  # this start's first step
    if run_dir in _TRAINED and "resumed from" not in r.stdout:
        sys.exit(f"resume: the {config} run did not resume from a checkpoint:\n{r.stdout[-2000:]}")
    _TRAINED.add(run_dir)
    return first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", nargs="+", default=["tiny", "125m"], choices=sorted(OVERRIDES))
    ap.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps trained before the restarts")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"), help="where resume.json goes")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.steps < 1 or min(args.nproc) < 1:
        ap.error(f"--reps, --steps and --nproc must be >= 1, got {args.reps}, {args.steps}, {args.nproc}")
    sys.path.insert(0, ROOT)
    from mptkernels.data import TokenDataset, prepare

    tmp = tempfile.mkdtemp(prefix="mptk-resume-")
    results = {}
    try:
        texts = os.path.join(tmp, "texts")
        for sub in ("mptkernels", "docs", "benchmarks", "tests"):
            shutil.copytree(os.path.join(ROOT, sub), os.path.join(texts, sub),
                            ignore=lambda d, names: [n for n in names if not n.endswith((".py", ".md")) and
                                                     not os.path.isdir(os.path.join(d, n))])
        data = os.path.join(tmp, "data")
        meta = prepare([texts], data)
        print(f"data: {meta['n_tokens']:,} tokens (the repository's .py and .md files, bytes)\n")
        print(f"{'config':7s} {'procs':>5s} {'start-up s':>16s} {'ckpt load s':>16s} {'MB read':>8s} {'data ms':>16s} "
              f"{'step s':>16s} {'start -> 1st step s':>20s}")
        for config in args.config:
            for nproc in args.nproc:
                run_dir = os.path.join(tmp, f"run-{config}-{nproc}")
                _train(config, data, run_dir, nproc, args.steps)
                firsts = [_train(config, data, run_dir, nproc, args.steps + 1 + rep) for rep in range(args.reps)]
                row = {}
                for part in PARTS:
                    vals = [f[part] for f in firsts]
                    row[part] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                results[f"{config}/{nproc}"] = row
                cell = lambda p, k=1: (f"{row[p]['median'] * k:.2f} [{row[p]['min'] * k:.2f}-"  # noqa: E731
                                       f"{row[p]['max'] * k:.2f}]")
                print(f"{config:7s} {nproc:5d} {cell('startup_s'):>16s} {cell('load_s'):>16s} "
                      f"{row['load_mb']['median']:8.1f} "
                      f"{cell('data_s', 1e3):>16s} {cell('step_s'):>16s} {cell('first_step_after_s'):>20s}",
                      flush=True)
        # data positioning alone, far into a run: the batch of step n without the n - 1 before it
        print("\ndata positioning (a freshly opened TokenDataset's first batch, 8 x 128 tokens, as after a "
              "restart; median of 5):")
        positioning = {}
        for step in (10, 10**3, 10**5, 10**6, 10**8):
            times = []
            for _ in range(5):
                ds = TokenDataset(data)
                t0 = time.perf_counter()
                ds.batch(step, 8, 128, seed=0)
                times.append(time.perf_counter() - t0)
            positioning[step] = statistics.median(times)
            print(f"  step {step:>9,}: {positioning[step] * 1e3:7.2f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "resume.json"), "w") as fh:
        json.dump({"args": vars(args), "results": results, "positioning_s": positioning,
                   "date": time.strftime("%Y-%m-%d %H:%M")}, fh, indent=1)


if __name__ == "__main__":
    main()
