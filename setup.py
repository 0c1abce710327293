"""Thin driver: runs CMake (ninja) to build mptkernels' _C; the build logic is in CMakeLists.txt.

Build with `pip install --no-build-isolation -e .` (scripts/setup.sh does it) so it compiles
against the torch you have; `bash scripts/build_wheel.sh` builds a manylinux wheel.

Environment:
  MPTK_CUDA=auto|0|1         the CUDA kernels (auto: when torch has CUDA and nvcc is found)
  MPTK_CUDA_ARCHS="80;90a"   CUDA archs to compile. Default: the visible GPU's arch for an in-place
                             or editable build (it runs here), "80;90a" for a wheel (it must run on
                             A100 and H100/H200) and where no GPU is visible
  MAX_JOBS=N                 parallel compile jobs (default: the number of CPUs)
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def fail(message: str):
    sys.exit(f"mptkernels: {message}")


def find_tool(name: str):
    """cmake or ninja: the one pip installed for this Python (its scripts folder, the venv's bin,
    activated or not), else the one on PATH. The same one whether or not the venv is activated:
    another cmake or ninja version would regenerate the build folder and recompile everything."""
    return shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)


def check_prerequisites():
    """Everything the build needs, checked before anything runs: one line naming what is missing
    and the command that installs it. Returns (torch, cmake path, ninja path)."""
    # setuptools < 70.1 builds wheels only with the 'wheel' package; without it pip fails with
    # "invalid command 'bdist_wheel'" (a fresh `python -m venv` has setuptools 65.5, no wheel)
    if not (importlib.util.find_spec("setuptools.command.bdist_wheel") or importlib.util.find_spec("wheel")):
        fail(f"building a wheel needs setuptools>=70.1 (this is {setuptools.__version__}) or the 'wheel' "
             "package: pip install -U 'setuptools>=70.1'")
    try:
        import torch
    except ImportError as e:
        fail(f"the build compiles against the installed torch, but {sys.executable} cannot import it ({e}): "
             "pip install torch")
    tools = {name: find_tool(name) for name in ("cmake", "ninja")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        where = sysconfig.get_path("scripts")
        fail(f"{' and '.join(missing)} not found in {where} nor on PATH: pip install {' '.join(missing)}")
    return torch, tools["cmake"], tools["ninja"]


torch, CMAKE, NINJA = check_prerequisites()


def build_dir() -> Path:
    """One CMake build folder per environment (Python, torch, and the venv: a short hash of
    sys.prefix), so building from a second venv does not make the first rebuild everything."""
    prefix = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    return ROOT / "build" / f"{sys.implementation.cache_tag}-torch{torch.__version__}-{prefix}"


def default_cuda_archs(in_place: bool) -> str:
    """A wheel runs elsewhere: A100 (80) and H100/H200 (90a). An in-place build runs here: the
    visible GPU's arch, else the same two."""
    if in_place and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}{minor}{'a' if major == 9 else ''}"  # sm_90 needs "a" for the Hopper-only instructions
    return "80;90a"


class CMakeBuild(build_ext):
    def run(self):
        # setuptools' run() clears inplace while it builds into build/lib* (then copies the
        # extension into the source package through copy_extensions_to_source): note it first
        self.in_place = self.inplace
        super().run()

    def build_extension(self, ext):
        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        env = os.environ
        configure = [
            CMAKE, str(ROOT), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={NINJA}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DMPTK_OUTPUT_DIR={out}",
            f"-DMPTK_OUTPUT_SUFFIX={self.suffix(ext)}",
            f"-DMPTK_CUDA={env.get('MPTK_CUDA', 'auto')}",
            f"-DMPTK_CUDA_ARCHS={env.get('MPTK_CUDA_ARCHS') or default_cuda_archs(self.in_place)}",
        ]
        subprocess.run(configure, cwd=out, check=True)
        jobs = env.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([CMAKE, "--build", ".", "-j", jobs], cwd=out, check=True)
        self.install_outputs(ext)

    def copy_extensions_to_source(self):
        # in-place and editable builds: setuptools would copy only _C from build/lib*
        for ext in self.extensions:
            self.install_outputs(ext)

    def suffix(self, ext) -> str:
        """_C's file suffix, e.g. .cpython-311-x86_64-linux-gnu.so."""
        return Path(self.get_ext_fullpath(ext.name)).name[len("_C"):]

    def install_outputs(self, ext):
        """Copies _C and _build_info.py from the build folder to where setuptools wants the
        extension (the source package in place, build/lib*/mptkernels for a wheel). Every time:
        it is cheap, and switching venvs then always installs that venv's build. Written under a
        temporary name and renamed, so a process that has the old _C loaded keeps it intact."""
        dest = Path(self.get_ext_fullpath(ext.name)).parent
        dest.mkdir(parents=True, exist_ok=True)
        for name in (f"_C{self.suffix(ext)}", "_build_info.py"):  # what CMake writes into MPTK_OUTPUT_DIR
            tmp = dest / f".{name}.tmp"
            shutil.copyfile(build_dir() / name, tmp)
            os.replace(tmp, dest / name)


setup(
    ext_modules=[Extension("mptkernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    # The wheel's _C is compiled against one torch's C++ ABI (as flash-attn's wheels are), so
    # its metadata pins that torch's public version: == without the local label (+cpu, +cu128)
    # matches every build of that version (PEP 440). pyproject.toml marks dependencies dynamic.
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pyyaml"],  # pyyaml: the configs
)
