"""Triton kernels, one module per op family (each defines a function per custom op, with the
op's schema as its signature), and the launch helpers they share. Imported lazily: triton is
optional, and importing it costs time."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

# the smallest legal tl.dot dimension (M, N; and K for 16/32-bit inputs)
MIN_DOT_BLOCK = 16
# tl.dot input precision for fp32 inputs: "ieee" matches the fp32 reference; "tf32x3" is close
# to it on tensor cores; "tf32" is fastest but only ~1e-3 accurate
FP32_DOT_PRECISION = "ieee"


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run in numpy on CPU tensors (the tests' way without a GPU).
    Read when a kernel module is imported (at @triton.jit), as Triton does."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def unusable_reason() -> str | None:
    """None when Triton can launch kernels here (on CUDA, or the interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton is not importable ({type(e).__name__})"
    if interpreting():
        return None
    return None if torch.cuda.is_available() else "no CUDA GPU"


def usable() -> bool:
    return unusable_reason() is None


def available() -> bool:
    """Triton can launch on a GPU (the interpreter does not count here)."""
    return usable() and not interpreting()


def version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


# ---- launch helpers of every kernel module
def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device, not on the tensor's: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter (a CPU tensor)."""
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def fit(block: int, n: int, lo: int = MIN_DOT_BLOCK) -> int:
    """Shrink a tile dimension to a small problem (a decode step, a short K), never below lo."""
    import triton

    return min(block, max(lo, triton.next_power_of_2(max(n, 1))))


def dot_precision(dtype: torch.dtype):
    """tl.dot's input_precision: only fp32 operands have a choice; None keeps the default."""
    return FP32_DOT_PRECISION if dtype == torch.float32 else None


def interpreted(kernel) -> bool:
    """Whether @triton.jit made this kernel an interpreted one (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"
