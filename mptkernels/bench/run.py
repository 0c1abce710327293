"""Time every benchmark family on the device there is; print the table, write JSON and a plot.

    mptkernels bench [--quick | --size tiny|quick|full] [--only layer_norm,rotary] [--goals] [--out DIR]
    (also: python -m mptkernels.bench.run, python benchmarks/run.py)

Each implementation of a case is sampled several times, interleaved with the others; the
table shows the median and [min–max], ours' ratio to the fastest PyTorch path per round, and
flags a row "noisy" when its samples spread wider than 25% of the median. --goals times only
the cases the issues set goals for and says, goal by goal, whether it is met. The same cases
run as pytest-benchmark tests: pytest benchmarks/ --benchmark-only (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import os

import torch

from . import attention, cross_entropy, gemm, glu, goals, harness, layer_norm, rotary

FAMILIES = {"layer_norm": layer_norm, "rotary": rotary, "attention": attention, "gemm": gemm, "glu": glu,
            "cross_entropy": cross_entropy}


def all_cases(device: str, size: str, only=None) -> list[harness.Case]:
    return [c for name in (only or FAMILIES) for c in FAMILIES[name].cases(device, size)]


def _families(s: str) -> list[str]:
    names = [n for n in s.split(",") if n]
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(FAMILIES)}, got {s!r}")
    return names


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=harness.SIZES, default="full",
                   help="shapes and sampling: tiny (seconds, for tests), quick (the demo's), full (default)")
    p.add_argument("--quick", dest="size", action="store_const", const="quick", help="the same as --size quick")
    p.add_argument("--out", default="bench-out", help="folder for results.json and benchmarks.png (default: bench-out)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", type=_families, default=list(FAMILIES), metavar="FAMILIES",
                   help=f"comma-separated families (default: all of {','.join(FAMILIES)})")
    p.add_argument("--goals", action="store_true",
                   help="time only the cases with a goal (at full size) and print each goal: met or not")
    p.add_argument("--no-plot", action="store_true", help="write results.json only")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device: cuda was asked for, but torch sees no CUDA GPU here")
    harness.setup(args.device)
    cases = all_cases(args.device, "full" if args.goals else args.size, args.only)
    if args.goals:
        wanted = goals.for_device(args.device)
        cases = [c for c in cases if any(goals.matches(g, c.family, c.name) for g in wanted)]
        args.size = "full"
    rows = []
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case.title}", flush=True)
        rows += harness.time_case(case, args.device, args.size)
    env = harness.environment(args.device, args.size)
    harness.print_table(rows, env)
    extra = {}
    if args.goals:
        results = [goals.evaluate(g, rows) for g in goals.for_device(args.device)
                   if any(g.family == f for f in args.only)]
        print(f"\ngoals on {args.device}:\n" + goals.format_goals(results))
        extra["goals"] = results
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, "results.json")]
    harness.write_json(rows, env, paths[0], **extra)
    if not args.no_plot and harness.write_plot(rows, env, os.path.join(args.out, "benchmarks.png")):
        paths.append(os.path.join(args.out, "benchmarks.png"))
    print(f"\nwrote {' and '.join(paths)}")
    return rows


if __name__ == "__main__":
    main(prog="python -m mptkernels.bench.run")
