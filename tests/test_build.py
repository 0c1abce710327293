"""The build: _C loads and is checked against torch; info(); every .cu compiles for sm_80/sm_90a."""
import glob
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import mptkernels
from mptkernels import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_stale_build_is_detected_with_a_rebuild_message(monkeypatch):
    from mptkernels import _build_info

    monkeypatch.setattr(_build_info, "torch_version", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 but torch .* is installed; rebuild it: pip "):
        _loader._load()
    # an installed wheel (no source folder around it) is told to get the wheel for this torch
    assert _loader.rebuild_hint(from_source=False).startswith("install the mptkernels wheel built for this torch")


def test_the_torch_build_label_does_not_matter_but_the_version_and_cuda_do(monkeypatch):
    """A wheel built against 2.13.0+cpu loads under PyPI's 2.13.0 (its metadata pins torch==2.13.0);
    another version does not; CUDA kernels need a torch with the same CUDA major version."""
    public = torch.__version__.split("+")[0]
    info = lambda **kw: types.SimpleNamespace(**{"torch_version": public, "with_cuda": False, "torch_cuda": "", **kw})
    for label in ("", "+cpu", "+cu128"):
        assert _loader._torch_mismatch(info(torch_version=public + label)) is None
    assert "built against torch 1.0.0+cpu" in _loader._torch_mismatch(info(torch_version="1.0.0+cpu"))
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CUDA kernels built against torch" in _loader._torch_mismatch(info(with_cuda=True, torch_cuda="12.8"))
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert _loader._torch_mismatch(info(with_cuda=True, torch_cuda="12.8")) is None
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "(CUDA 13.0) is installed" in _loader._torch_mismatch(info(with_cuda=True, torch_cuda="12.8"))


def test_missing_build_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(_loader, "_HERE", str(tmp_path))
    with pytest.raises(ImportError, match="mptkernels._C is not built"):
        _loader._load()


def test_info_reports_build_and_backends(capsys):
    facts = mptkernels.info()
    printed = capsys.readouterr().out
    assert facts["torch"] == torch.__version__ and "CPU kernels ISA" in printed
    # the level in use, the levels built (tests/test_cpu_isa.py checks the choice itself)
    assert facts["CPU kernels ISA"] == mptkernels.cpu_isa() and f"CPU kernels ISA: {mptkernels.cpu_isa()}" in printed
    assert facts["CPU ISA levels"]["built"] == mptkernels.build_info.cpu_isa_levels
    assert "built: " + ", ".join(mptkernels.build_info.cpu_isa_levels) in printed
    assert facts["ops"]["cpu"]["layer_norm"]["cpu"] == "yes" and "layer_norm" in printed
    with mptkernels.backend("reference"):
        assert mptkernels.info(file=open(os.devnull, "w"))["backend (this thread)"].startswith("reference")


def test_every_op_is_registered():
    # every schema csrc/registration.cpp defines (MPTK_DEF(m, name)), public and C++ CPU twin
    with open(os.path.join(ROOT, "csrc", "registration.cpp")) as f:
        names = set(re.findall(r"MPTK_DEF\(m, ([a-z_0-9]+)\)", f.read())) - {"op"}  # not the macro itself
    assert len(names) >= 16, names
    for name in sorted(names):
        assert hasattr(torch.ops.mptkernels, name) and hasattr(torch.ops.mptkernels_cpu, name), name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_for_sm80_and_sm90a(source, tmp_path):
    """The CPU machines cannot run CUDA, but nvcc checks every kernel compiles for both archs."""
    torch_dir = os.path.dirname(torch.__file__)
    includes = [os.path.join(ROOT, "csrc"), os.path.join(torch_dir, "include"),
                os.path.join(torch_dir, "include", "torch", "csrc", "api", "include")]
    if not os.path.exists(os.path.join(torch_dir, "include", "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        includes.append(os.path.join(ROOT, "tests", "cuda_shim"))  # the CPU wheel lacks one generated header
    cmd = ["nvcc", "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
           *[f"-I{i}" for i in includes], "-c", source, "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0


def test_cuda_sources_exist():
    names = {os.path.basename(p) for p in CUDA_SOURCES}
    assert {"layer_norm.cu", "rotary.cu"} <= names


def test_import_costs_at_most_half_a_second_more_than_torch():
    """Nothing heavy at import (torch._dynamo, triton, transformers load when first needed):
    `import mptkernels` within torch's own import time + 0.5 s, each the best of 3 fresh
    processes (a busy machine only ever adds time)."""
    def best(stmt):
        code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                        check=True).stdout) for _ in range(3))

    heavy = subprocess.run([sys.executable, "-c", "import sys, mptkernels; print(sorted(m for m in "
                            "('torch._dynamo', 'triton', 'transformers') if m in sys.modules))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "[]", f"imported by `import mptkernels`: {heavy}"
    t_torch, t_ours = best("import torch"), best("import mptkernels")
    assert t_ours <= t_torch + 0.5, (t_torch, t_ours)


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages a wheel carries: every folder of mptkernels with an
    __init__.py must be there (a missing one imports from the source tree, then not from a wheel)."""
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, root).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(root, "mptkernels"))
             if "__init__.py" in files and "__pycache__" not in d}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
