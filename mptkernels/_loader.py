"""Loads mptkernels/_C (every op's schema and C++ kernel) and checks it matches this torch.

A _C built against another torch fails with an undefined-symbol error deep inside the
loader; we compare the torch version recorded at build time first and say what to do.
"""
from __future__ import annotations

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
REBUILD = "rebuild it: pip install --no-build-isolation --no-deps --force-reinstall -e . (from the mptkernels source folder)"


def _load():
    libs = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    try:
        from . import _build_info
    except ImportError:
        _build_info = None
    if not libs or _build_info is None:
        raise ImportError(f"mptkernels._C is not built (no _C*.so or _build_info.py in {_HERE}); build it: "
                          "pip install --no-build-isolation -e .")
    if _build_info.torch_version != torch.__version__:
        raise ImportError(f"mptkernels._C was built against torch {_build_info.torch_version} but torch "
                          f"{torch.__version__} is installed; {REBUILD}")
    try:
        torch.ops.load_library(libs[0])
    except OSError as e:
        raise ImportError(f"mptkernels._C failed to load ({e}); {REBUILD}") from e
    return _build_info


build_info = _load()
