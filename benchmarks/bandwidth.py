"""The copy bandwidth the decode benchmarks divide by (benchmarks/hf_patch.py, vs_llama_cpp.py):
one definition, so their weight-read roofline fractions compare. Imports only torch (the
llama.cpp side's process loads nothing of ours)."""
from __future__ import annotations

import statistics
import time


def copy_bandwidth() -> float:
    """GB/s of a 256 MB copy with this process's threads, median of 5 after a warm-up (STREAM's
    count: bytes read plus bytes written)."""
    import torch

    src = torch.rand(64 * 2**20)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times[1:]) / 1e9
