#!/usr/bin/env bash
# Quickstart 2: set up, then run the whole test suite (GPU tests run only where a GPU is).
#   bash scripts/test.sh [pytest args...]      e.g. bash scripts/test.sh -m gpu
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# test-only: the model tests compare against transformers' MPT (logits, generation, checkpoints)
if ! "${PYTHON:-python3}" -c "import transformers" 2>/dev/null; then
  echo "[test] installing transformers 4.57.1 (the reference MPT implementation the model tests compare with)"
  "${PYTHON:-python3}" -m pip install --disable-pip-version-check -q "transformers==4.57.1"
fi
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
