#!/usr/bin/env bash
# Installs what mptkernels needs into the current Python and builds it (idempotent: a second
# run only rebuilds what changed). Keeps the torch you have; installs one only when none is.
#   PYTHON=python3.12 bash scripts/setup.sh     MPTK_CUDA=0|1|auto  MPTK_CUDA_ARCHS="90a"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch ${MPTK_TORCH_VERSION:-2.13.0}"
  pip_install "torch==${MPTK_TORCH_VERSION:-2.13.0}"
fi
if [ "$(uname -s)" = Linux ] && ! "$PY" -c "import triton" 2>/dev/null; then
  echo "[setup] installing triton 3.6.0"
  pip_install "triton==3.6.0"
fi
missing=()
for mod_pkg in numpy:numpy yaml:pyyaml pytest:pytest pytest_benchmark:pytest-benchmark matplotlib:matplotlib; do
  "$PY" -c "import ${mod_pkg%%:*}" 2>/dev/null || missing+=("${mod_pkg##*:}")
done
command -v ninja >/dev/null || missing+=(ninja)
command -v cmake >/dev/null || missing+=(cmake)
# pip builds through a wheel: setuptools < 70.1 needs the 'wheel' package for that (a fresh venv
# has setuptools 65.5 and no wheel: "invalid command 'bdist_wheel'")
"$PY" -c "import setuptools.command.bdist_wheel" 2>/dev/null || "$PY" -c "import wheel" 2>/dev/null \
  || missing+=("setuptools>=70.1")
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing ${missing[*]}"
  pip_install "${missing[@]}"
fi
echo "[setup] building mptkernels (CMake + ninja; the first build takes a minute or two)"
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
