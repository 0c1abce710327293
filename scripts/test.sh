#!/usr/bin/env bash
# Quickstart 2: set up, then run the whole test suite (GPU tests run only where a GPU is).
#   bash scripts/test.sh [pytest args...]      e.g. bash scripts/test.sh -m gpu
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
