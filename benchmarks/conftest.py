"""pytest-benchmark over the same cases as `mptkernels bench` (mptkernels/bench/):

    pytest benchmarks/ --benchmark-only [--bench-size tiny|quick|full] [--bench-device cpu|cuda]
           [-k attention] [--benchmark-autosave] [--benchmark-compare]

One test per (case, implementation), grouped by case, so pytest-benchmark's table puts ours
beside PyTorch's paths and --benchmark-compare compares a saved run with this one. GPU cases
are timed with CUDA events (CudaEventTimer), CPU cases with pytest-benchmark's clock.
"""
from __future__ import annotations

import pytest
import torch

from mptkernels.bench import harness, run


def pytest_addoption(parser):
    group = parser.getgroup("mptkernels benchmarks")
    group.addoption("--bench-size", choices=harness.SIZES, default="quick",
                    help="shapes of the cases: tiny, quick (default) or full, as mptkernels bench --size")
    group.addoption("--bench-device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda when torch sees a GPU, else cpu")


def _device(config) -> str:
    dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device: cuda was asked for, but torch sees no CUDA GPU here")
    return dev


class CudaEventTimer:
    """A pytest-benchmark timer in seconds of GPU time: each call records a CUDA event, waits
    for it and adds the time since the previous call's event, so the difference of two calls is
    the GPU time between them (per step, not since a fixed origin: float ms stay precise)."""

    def __init__(self):
        self.prev, self.total = None, 0.0

    def __call__(self) -> float:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        if self.prev is not None:
            self.total += self.prev.elapsed_time(ev) / 1e3
        self.prev = ev
        return self.total


def pytest_generate_tests(metafunc):
    if "bench_impl" not in metafunc.fixturenames:
        return
    device, size = _device(metafunc.config), metafunc.config.getoption("--bench-size")
    harness.setup(device)
    params, ids = [], []
    for case in run.all_cases(device, size):
        # the implementations' names need the case built once (ours() depends on what the device runs)
        for name in harness.implementations(case.make()):
            params.append((case, name))
            ids.append(f"{case.family}/{case.name}/{name}".replace(" ", "_"))
    metafunc.parametrize("bench_impl", params, ids=ids)


def pytest_collection_modifyitems(config, items):
    timer = CudaEventTimer() if _device(config) == "cuda" else None
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "bench_impl" not in callspec.params:
            continue
        case, _ = callspec.params["bench_impl"]
        kw = {"group": case.title}
        if timer is not None:
            kw["timer"] = timer
        item.add_marker(pytest.mark.benchmark(**kw))


_built: dict = {}


@pytest.fixture
def bench_fn(bench_impl):
    """(role, fn) of this test's implementation; the case's inputs are built once for all its
    implementations (tests run in collection order) and the previous case's freed."""
    case, name = bench_impl
    if _built.get("case") is not case:
        _built.clear()
        _built.update(case=case, impls=harness.implementations(case.make()))
    return _built["impls"][name]
