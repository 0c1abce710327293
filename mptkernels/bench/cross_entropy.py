"""The cross_entropy family: linear_cross_entropy forward + backward against PyTorch's unfused
path on the same device, in time and in peak memory.

Baseline (what a training step runs without a fused loss): ``F.cross_entropy(x @ w.T, target)``
in eager mode and its backward through both (the (N, V) logits, their log-softmax and gradient
all materialised). Each call is loss + backward with the gradients of x and w written (both
reset first, so neither times an accumulation). FLOPs: the three GEMMs, 3 · 2·N·H·V.

Timing (CPU): each implementation runs in a worker process of its own, driven call by call from
the harness's interleaved rounds (so the unfused path's multi-GB temporaries never fragment a heap
shared with ours; glibc's default allocator there).

Peak memory: each implementation runs once in a fresh subprocess (``python -m
mptkernels.bench.cross_entropy --peak ...``) after a small warm-up call of it (libraries and
thread pools initialised); the kernel's high-water mark of resident memory (VmHWM) is reset
(/proc/self/clear_refs = 5) once the inputs exist, and the growth of VmHWM over the resident
size at that moment is the call's peak: every page it touched at once, gradients included, as
the OS sees it (glibc's default allocator, which returns large blocks to the OS on free).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from mptkernels import ops

from .harness import Case, ours

BASELINE = "x @ w.T + F.cross_entropy eager"
SHAPES = {"tiny": (64, 64, 500), "quick": (1024, 1024, 32000), "full": (4096, 2048, 128256)}  # N, H, V


def _name(dt):
    return str(dt).replace("torch.", "")


def _inputs(n, h, v, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(v, h, generator=g).mul_(h ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    return x, w, t


def _calls(x, w, t):
    """{name: loss + backward, both gradients written} of ours and of the baseline."""
    def step(loss_fn):
        def call():
            x.grad = w.grad = None
            loss_fn().backward()
        return call

    return {"ours": step(lambda: ops.linear_cross_entropy(x, w, t)),
            BASELINE: step(lambda: F.cross_entropy(x @ w.T, t))}


class _Worker:
    """One implementation's calls in a process of its own (``--worker``), driven over a pipe: the
    unfused path's multi-GB temporaries never share a heap with ours (with the harness's
    keep-freed-memory setting one process fragmented past 16 GB and was killed), and each keeps
    its inputs. A call from the harness is one request; the pipe adds well under a millisecond."""

    def __init__(self, impl, n, h, v, dtype, device):
        env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
        self.p = subprocess.Popen([sys.executable, "-m", "mptkernels.bench.cross_entropy", "--worker", impl, "--shape",
                                   f"{n},{h},{v}", "--dtype", _name(dtype), "--device", device],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._ask("ready")

    def _ask(self, what):
        self.p.stdin.write(what + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark worker stopped (exit code {self.p.wait()})")
        return line

    def __call__(self):
        self._ask("run")

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(timeout=60)


def cases(device: str, size: str) -> list[Case]:
    n, h, v = SHAPES[size]
    dts = [torch.float32] + ([torch.bfloat16] if size == "full" and device == "cpu" else [])
    out = []
    for dt in dts:
        workers = []

        def make(dt=dt, workers=workers):
            if device == "cuda":  # one process: the caching allocator reuses its blocks
                calls = _calls(*_inputs(n, h, v, dt, device))
            else:
                workers[:] = [_Worker("ours", n, h, v, dt, device), _Worker(BASELINE, n, h, v, dt, device)]
                calls = {"ours": workers[0], BASELINE: workers[1]}
            return {"ours": ours("linear_cross_entropy", calls["ours"], device),
                    "baselines": {BASELINE: calls[BASELINE]}}

        def memory(dt=dt, impls=None, workers=workers):
            for wk in workers:  # timed: free their memory before the fresh processes measure
                wk.close()
            return {name: [peak_mb("ours" if name.startswith("mptkernels") else BASELINE, n, h, v, dt, device)
                           for _ in range(1 if size != "full" else 2)] for name in impls}

        out.append(Case("cross_entropy", f"linear_cross_entropy fwd+bwd {n}x{h}x{v} {_name(dt)}", make,
                        flops=3 * 2 * n * h * v, dtype=dt, memory=memory))
    return out


# ---------------------------------------------------------------- peak memory, in a subprocess

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_mb(impl: str, n: int, h: int, v: int, dtype, device="cpu") -> float:
    """MB of resident memory one call of impl ("ours" or BASELINE) adds at its peak, measured in a
    fresh process (see the module's docstring)."""
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "mptkernels.bench.cross_entropy", "--peak", impl, "--shape",
                        f"{n},{h},{v}", "--dtype", _name(dtype), "--device", device], capture_output=True, text=True,
                       env=env, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"peak memory of {impl}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_mb"]


def _measure_peak(impl: str, n: int, h: int, v: int, dtype, device: str) -> float:
    if device == "cuda":  # the caching allocator's own peak
        small = _calls(*_inputs(8, h, 16, dtype, device))[impl]
        small()
        x, w, t = _inputs(n, h, v, dtype, device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _calls(x, w, t)[impl]()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    _calls(*_inputs(8, h, 16, dtype))[impl]()  # warm-up: libraries, thread pools, the dispatcher
    x, w, t = _inputs(n, h, v, dtype)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS")
    _calls(x, w, t)[impl]()
    return (_status_kb("VmHWM") - base) / 1024


def _serve(impl: str, n: int, h: int, v: int, dtype, device: str):
    """--worker: one line in, one call (or "ready" after the inputs exist), one line out."""
    call = _calls(*_inputs(n, h, v, dtype, device))[impl]
    import sys as _sys

    for line in _sys.stdin:
        if line.strip() == "run":
            call()
        print("done", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="one call's peak memory, or a worker (used by the cross_entropy bench)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--peak", choices=["ours", BASELINE])
    group.add_argument("--worker", choices=["ours", BASELINE])
    p.add_argument("--shape", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    n, h, v = map(int, a.shape.split(","))
    if a.worker:
        _serve(a.worker, n, h, v, getattr(torch, a.dtype), a.device)
    else:
        print(json.dumps({"peak_mb": _measure_peak(a.peak, n, h, v, getattr(torch, a.dtype), a.device)}))
