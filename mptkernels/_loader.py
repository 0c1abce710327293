"""Loads mptkernels/_C (every op's schema and C++ kernel) and checks it matches this torch;
chooses the ISA level of the C++ CPU kernels (MPTK_CPU_ISA, cpu_isa()).

A _C built against another torch fails with an undefined-symbol error deep inside the
loader; we compare the torch version recorded at build time first and say what to do.
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def rebuild_hint(from_source: bool) -> str:
    if from_source:
        return ("rebuild it: pip install --no-build-isolation --no-deps --force-reinstall -e . (from the mptkernels "
                "source folder)")
    return ("install the mptkernels wheel built for this torch (a wheel pins the torch it was built against), "
            "or build from source: pip install --no-build-isolation <mptkernels source folder>")


# a source checkout (an editable install) has setup.py beside the package; a wheel does not
REBUILD = rebuild_hint(os.path.exists(os.path.join(_HERE, os.pardir, "setup.py")))


def _public(version: str) -> str:
    return version.split("+")[0]


def _torch_mismatch(info) -> str | None:
    """Why this torch cannot load _C, or None. _C uses the C++ ABI of one torch version, the same
    in its CPU and CUDA builds (+cpu, +cu128: the local label), so the public versions must match;
    CUDA kernels also link torch's CUDA libraries, so then the CUDA major version must match too."""
    if _public(info.torch_version) != _public(torch.__version__):
        return f"mptkernels._C was built against torch {info.torch_version} but torch {torch.__version__} is installed"
    if info.with_cuda and (torch.version.cuda or "").split(".")[0] != info.torch_cuda.split(".")[0]:
        return (f"mptkernels._C has CUDA kernels built against torch {info.torch_version} (CUDA {info.torch_cuda}) "
                f"but torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) is installed")
    return None


def library_path() -> str | None:
    """The compiled library, _C<python's extension suffix>, beside this file (None if not built)."""
    libs = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    return libs[0] if libs else None


def _load():
    lib = library_path()
    try:
        from . import _build_info
    except ImportError:
        _build_info = None
    if lib is None or _build_info is None:
        raise ImportError(f"mptkernels._C is not built (no _C*.so or _build_info.py in {_HERE}); build it: "
                          "pip install --no-build-isolation -e .")
    mismatch = _torch_mismatch(_build_info)
    if mismatch:
        raise ImportError(f"{mismatch}; {REBUILD}")
    try:
        torch.ops.load_library(lib)
    except OSError as e:
        raise ImportError(f"mptkernels._C failed to load ({e}); {REBUILD}") from e
    return _build_info


def cpu_isa(level: str | None = None) -> str:
    """The ISA level the C++ CPU kernels run at: one of ``build_info.cpu_isa_levels`` (lowest
    first: default, avx2, avx512, avx512_bf16 on x86-64). ``_C`` starts at the highest level
    this CPU runs (csrc/cpu/isa.cpp says what each needs). With ``level``, cap it there
    (``"auto"``: no cap), as ``MPTK_CPU_ISA`` does at import: for the same numerics on
    different machines, or to test a lower level. A cap above what this CPU runs is lowered to
    what it runs, with a warning. Returns the level now in use; process-wide."""
    if level is not None and not isinstance(level, str):
        raise TypeError(f"cpu_isa: level must be a str such as 'avx2', got {type(level).__name__}")
    try:
        in_use, cpu_best = torch.ops.mptkernels_isa.cpu_isa(level)
    except RuntimeError as e:  # an unknown level: the C++ message lists the valid ones
        raise ValueError(f"cpu_isa: {str(e).splitlines()[0]}") from None
    if level not in (None, "auto") and in_use != level:
        warnings.warn(f"mptkernels: CPU ISA level {level!r} asked for, but this CPU runs at most {cpu_best!r}; "
                      f"the CPU kernels use {in_use!r}", stacklevel=2)
    return in_use


def cpu_isa_supported() -> str:
    """The highest ISA level built that this CPU runs (what cpu_isa() uses without a cap)."""
    return torch.ops.mptkernels_isa.cpu_isa(None)[1]


def _cap_from_env():
    value = os.environ.get("MPTK_CPU_ISA")
    if value:
        try:
            cpu_isa(value)
        except ValueError as e:
            raise ValueError(f"MPTK_CPU_ISA={value!r}: {str(e).removeprefix('cpu_isa: ')}") from None


build_info = _load()
_cap_from_env()
