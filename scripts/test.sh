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
# test-only: tests/test_cpu_isa.py runs the CPU kernels on emulated CPUs without AVX-512 / AVX2
# (qemu-user, Debian's package: as root, or with sudo that needs no password)
# the current transformers (5.x) beside the pinned one, in .hf5/ (tests/test_model.py loads exported
# models with it in a subprocess); its own huggingface_hub and tokenizers, which 4.57.1 does not take,
# and kernels, which its from_pretrained requires by default
if [ ! -d .hf5/transformers ]; then
  echo "[test] installing transformers 5.25.0 into .hf5/ (the current release, for tests/test_model.py)"
  "${PYTHON:-python3}" -m pip install --disable-pip-version-check -q --no-deps --target .hf5 \
    transformers==5.25.0 huggingface_hub==2.4.0 tokenizers==0.23.3 httpx2==2.17.0 httpcore2==2.17.0 \
    truststore==0.10.5 h11==0.16.0 kernels==0.19.1
fi
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  echo "[test] installing qemu-user (the emulated CPUs of tests/test_cpu_isa.py)"
  $sudo apt-get install -y -q qemu-user >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q qemu-user >/dev/null 2>&1; } ||
    echo "[test] could not install qemu-user: install it (apt-get install qemu-user), or test_cpu_isa's emulated-CPU tests fail"
fi
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
