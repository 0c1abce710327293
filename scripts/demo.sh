#!/usr/bin/env bash
# Quickstart 1: set up, then run the main job: build info, every op checked against the
# reference on the device there is, and the quick benchmarks (table, JSON, plot in bench-out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" scripts/demo.py "$@"
