"""The benchmark table from a source checkout: the same as `mptkernels bench` (mptkernels/bench/run.py)."""
import sys

from mptkernels.bench.run import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="python benchmarks/run.py")
