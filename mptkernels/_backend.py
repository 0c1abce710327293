"""Which implementation each op uses: MPTK_BACKEND (env) or `with mptkernels.backend(...)`.

"auto" (default): the C++ kernel on the CPU; on the GPU the fastest GPU implementation as
measured for the shape (see choose_gpu_impl). "cuda" / "triton" force one GPU language,
"cpu" the C++ CPU kernels, "reference" the plain-PyTorch ops of mptkernels.reference.
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_current = _validate(os.environ.get("MPTK_BACKEND", "auto") or "auto", "MPTK_BACKEND")


def current() -> str:
    return _current


@contextlib.contextmanager
def backend(name: str):
    """Force one backend inside the block: ``with mptkernels.backend("triton"): ...``."""
    global _current
    previous, _current = _current, _validate(name, "backend")
    try:
        yield
    finally:
        _current = previous


def use_reference(device: torch.device, has_kernel: bool) -> bool:
    """True when the op should run mptkernels.reference instead of a custom op.

    has_kernel: whether a compiled/Triton kernel exists for this device at all.
    """
    b = _current
    if b == "reference":
        return True
    if device.type == "cpu":
        if b in ("cuda", "triton"):
            raise ValueError(f"backend {b!r} runs on CUDA tensors; these are on the CPU "
                             "(use 'auto', 'cpu' or 'reference')")
        return False
    if device.type == "cuda":
        if b == "cpu":
            raise ValueError("backend 'cpu' runs on CPU tensors; these are on CUDA (use 'auto', 'cuda', "
                             "'triton' or 'reference')")
        return not has_kernel
    return True  # other devices (mps, xpu, ...): the reference ops run wherever torch runs


# measured choice between GPU implementations, keyed by (op, shape class); info() prints it
gpu_choices: dict[tuple, str] = {}


def choose_gpu_impl(op: str, key: tuple, impls: dict, args: tuple):
    """Pick the GPU implementation to run: forced by the backend, else the faster as measured.

    impls maps a language ("cuda", "triton") to a callable taking *args; only those that
    exist in this build are present. The first call for a key times each (CUDA events,
    median of a few runs on the real arguments) and remembers the winner; during CUDA-graph
    capture nothing can be timed, so an unmeasured key takes the first implementation.
    """
    if not impls:
        raise RuntimeError(f"{op}: no GPU implementation is available (mptkernels._C was built without CUDA "
                           "and triton is not importable)")
    b = _current
    if b in ("cuda", "triton"):
        if b not in impls:
            raise RuntimeError(f"{op}: backend {b!r} is not available in this build (have: {sorted(impls)})")
        return impls[b]
    if len(impls) == 1:
        return next(iter(impls.values()))
    full_key = (op,) + key
    name = gpu_choices.get(full_key)
    if name is None:
        if torch.cuda.is_current_stream_capturing():
            return next(iter(impls.values()))
        name = min(impls, key=lambda n: _time_cuda(impls[n], args))
        gpu_choices[full_key] = name
    return impls[name]


def _time_cuda(fn, args, reps: int = 5) -> float:
    fn(*args)  # warm-up (and Triton compile)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
