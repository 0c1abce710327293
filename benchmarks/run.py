"""Run every benchmark family on the device there is; print the table, write JSON and a plot.

    python benchmarks/run.py [--quick] [--out DIR] [--device cpu|cuda] [--only layer_norm,rotary]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attention  # noqa: E402
import gemm  # noqa: E402
import harness  # noqa: E402
import layer_norm  # noqa: E402
import rotary  # noqa: E402

FAMILIES = {"layer_norm": layer_norm, "rotary": rotary, "attention": attention, "gemm": gemm}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing (the demo uses it)")
    p.add_argument("--out", default="bench-out", help="folder for results.json and benchmarks.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=",".join(FAMILIES), help="comma-separated families")
    args = p.parse_args(argv)
    harness.setup(args.device)
    rows = []
    for name in args.only.split(","):
        if name not in FAMILIES:
            p.error(f"--only: unknown family {name!r}; have {sorted(FAMILIES)}")
        print(f"running {name} on {args.device} ...", flush=True)
        rows += FAMILIES[name].run(args.device, args.quick)
    env = harness.environment(args.device)
    harness.print_table(rows, env)
    harness.write_outputs(rows, env, args.out)
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and benchmarks.png")
    return rows


if __name__ == "__main__":
    main()
