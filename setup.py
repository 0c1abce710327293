"""Thin driver: runs CMake (ninja) to build mptkernels/_C.so; the build logic is in CMakeLists.txt.

Environment: MPTK_CUDA=auto|0|1, MPTK_CUDA_ARCHS="80;90a" (default: the visible GPU's arch,
else 80;90a), MPTK_CPU_ISA=auto|avx512|avx2|default, MAX_JOBS=N.
Build with `pip install --no-build-isolation -e .` so it uses the torch you have.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def default_cuda_archs() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            # sm_90 needs the "a" suffix for the Hopper-only instructions
            return f"{major}{minor}{'a' if major == 9 else ''}"
    except Exception:
        pass
    return "80;90a"


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        # the file name setuptools expects (e.g. _C.cpython-311-x86_64-linux-gnu.so)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # a fixed build folder in the source tree, so rebuilding after an edit is incremental
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        env = os.environ
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DMPTK_OUTPUT_DIR={target.parent}",
            f"-DMPTK_OUTPUT_SUFFIX={target.name[len('_C'):]}",
            f"-DMPTK_CUDA={env.get('MPTK_CUDA', 'auto')}",
            f"-DMPTK_CUDA_ARCHS={env.get('MPTK_CUDA_ARCHS') or default_cuda_archs()}",
            f"-DMPTK_CPU_ISA={env.get('MPTK_CPU_ISA', 'auto')}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = env.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[Extension("mptkernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
