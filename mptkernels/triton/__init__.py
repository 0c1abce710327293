"""Triton kernels (GPU), one module per op family. Imported lazily: triton is optional."""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Triton is importable and can launch on CUDA (the interpreter does not count here)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None
