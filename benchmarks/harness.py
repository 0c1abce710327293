"""Shared benchmark harness: timing, the measured ceiling, the result table, JSON and plot.

GPU timings are triton.testing.do_bench medians; CPU timings are torch.utils.benchmark
medians (blocked_autorange). Every family script returns Rows; run.py prints them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import time

import torch


@dataclasses.dataclass
class Row:
    family: str
    case: str          # what is computed, with shape and dtype
    impl: str          # "mptkernels", "eager", "torch.compile", ...
    ms: float
    gbps: float        # the rate: bytes moved / time in GB/s, or (unit "TFLOP/s" / "TOP/s") operations / time
    ceiling_frac: float  # rate / the measured ceiling of this device (copy, or matmul for FLOPs)
    speedup: float | None = None  # vs the best PyTorch baseline of the same case (ours only)
    best_baseline: str | None = None
    unit: str = "GB/s"


def bench(fn, device: str, quick: bool) -> float:
    """Median milliseconds of fn() on device."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
    from torch.utils.benchmark import Timer

    fn()  # warm-up (first-call allocation and any compilation)
    # the least of a few medians: CPU timings here are disturbed by other processes, which
    # only ever add time
    # only ever add time. Timer runs on one thread unless told: give it the process's threads,
    # so every implementation (ours through at::parallel_for, PyTorch's) uses the whole CPU
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    runs = [timer.blocked_autorange(min_run_time=0.3 if quick else 0.5).median for _ in range(2 if quick else 3)]
    return min(runs) * 1e3


def keep_freed_memory():
    """CPU runs: ask glibc to keep freed memory instead of returning it to the OS.

    Without this, every 16-32 MB output of every implementation is a fresh mmap whose pages
    the OS zeroes on first touch (~2.5 GB/s on the CI machines), so the table would time the
    page faults, not the kernels. It applies to all implementations alike, and matches what a
    model at steady state sees (freed activations are reused). No effect on the GPU.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))  # a C int
    except OSError:  # not glibc
        return False


_ceilings: dict[str, float] = {}


def copy_ceiling_gbps(device: str, quick: bool) -> float:
    """Measured bytes/s (read + write) of a large device-to-device copy: the roofline we compare to."""
    if device not in _ceilings:
        n = (256 << 20) if device == "cuda" else (64 << 20)
        src = torch.randn(n // 4, device=device)
        dst = torch.empty_like(src)
        ms = bench(lambda: dst.copy_(src), device, quick)
        _ceilings[device] = 2 * n / (ms * 1e-3) / 1e9
    return _ceilings[device]


def matmul_ceiling_tflops(device: str, quick: bool, dtype=None) -> float:
    """Measured dense matmul throughput (bf16 8192^3 on the GPU, fp32 2048^3 on the CPU, or the
    dtype asked for): the faster of PyTorch's matmul and ours (on AMD CPUs MKL runs AVX2 code
    and our AVX-512 GEMM is about twice as fast, so MKL alone would understate what the
    machine does; bf16 on CPUs with AVX512-BF16 runs at about twice the fp32 rate)."""
    dt = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    key = f"{device}:mm:{str(dt).replace('torch.', '')}"
    if key not in _ceilings:
        from mptkernels import ops

        n = 8192 if device == "cuda" else 2048
        a = torch.randn(n, n, device=device, dtype=dt)
        ms = min(bench(lambda: a @ a, device, quick), bench(lambda: ops.linear(a, a), device, quick))
        _ceilings[key] = 2 * n**3 / (ms * 1e-3) / 1e12
    return _ceilings[key]


def int8_ceiling_tops(device: str, quick: bool) -> float:
    """Measured int8 matmul throughput (8192^3 on the GPU, 2048^3 on the CPU): the faster of
    torch._int_mm in its fast layout and our int8_mm. Int8 rows are compared with this, not
    with the float matmul (several times slower, so int8 rows would read as 200-400%)."""
    key = device + ":int8"
    if key not in _ceilings:
        n = 8192 if device == "cuda" else 2048
        a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
        ms = min(bench(lambda: torch._int_mm(a, a.t()), device, quick),
                 bench(lambda: torch.ops.mptkernels.int8_mm(a, a), device, quick))
        _ceilings[key] = 2 * n**3 / (ms * 1e-3) / 1e12
    return _ceilings[key]


def case_rows(family, case, device, quick, nbytes, ours: dict, baselines: dict, flops=None, int8=False,
              references=None, dtype=None) -> list[Row]:
    """Time every implementation of one case; ours get the speedup vs the best baseline.
    nbytes: the traffic (rate in GB/s vs the copy ceiling); or flops: rate in TFLOP/s vs the
    matmul ceiling of `dtype` (the device's default when None; int8: TOP/s vs the int8
    ceiling). references: timed and shown for context but never ranked (they compute
    something else, e.g. without quantisation or bias)."""
    if flops:
        ceiling = int8_ceiling_tops(device, quick) if int8 else matmul_ceiling_tflops(device, quick, dtype)
    else:
        ceiling = copy_ceiling_gbps(device, quick)
    references = {f"{name} (not ranked)": fn for name, fn in (references or {}).items()}
    timed = {}
    for name, fn in {**baselines, **references, **ours}.items():
        try:
            timed[name] = bench(fn, device, quick)
        except Exception as e:  # a baseline that cannot run here (e.g. compile unavailable) is reported, not fatal
            print(f"  [{family}] {case}: {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    rows = []
    best = min(((timed[b], b) for b in baselines if b in timed), default=None)
    for name, ms in timed.items():
        rate = flops / (ms * 1e-3) / 1e12 if flops else nbytes / (ms * 1e-3) / 1e9
        row = Row(family, case, name, ms, rate, rate / ceiling,
                  unit=("TOP/s" if int8 else "TFLOP/s") if flops else "GB/s")
        if name in ours and best is not None:
            row.speedup, row.best_baseline = best[0] / ms, best[1]
        rows.append(row)
    return rows


def ours(op: str, fn, device: str) -> dict:
    """The rows of mptkernels for one case: what ``auto`` runs, and, where the device has more
    than one kernel language for the op (the GPU), each one forced with mptkernels.backend, so
    the table shows every implementation beside auto. PyTorch's own op is a baseline row."""
    import mptkernels
    from mptkernels import _dispatch

    langs = _dispatch.available_kernels(op, device)
    if len(langs) <= 1:  # nothing to choose: auto runs this one
        return {f"mptkernels ({langs[0] if langs else 'auto'})": fn}
    out = {"mptkernels (auto)": fn}
    for lang in langs:
        def forced(lang=lang):
            with mptkernels.backend(**{op: lang}):
                return fn()
        out[f"mptkernels ({lang})"] = forced
    return out


def compiled(fn):
    """torch.compile of fn, compiled on first call (the harness's warm-up)."""
    return torch.compile(fn, fullgraph=True)


_kept = False


def setup(device: str):
    global _kept
    if device == "cpu":
        _kept = keep_freed_memory()


def environment(device: str) -> dict:
    import mptkernels

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mptkernels": mptkernels.__version__,
        "cpu_isa": mptkernels.info(file=io.StringIO())["CPU kernels ISA"],
    }
    if device == "cpu":
        env["glibc_keeps_freed_memory"] = _kept
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                env["device"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except Exception:
            pass
    env["copy_ceiling_GBps"] = round(copy_ceiling_gbps(device, True), 1)
    for key, tflops in sorted(_ceilings.items()):  # every matmul ceiling the run measured
        if key.startswith(device + ":mm:"):
            env[f"matmul_ceiling_{key.rsplit(':', 1)[1]}_TFLOPs"] = round(tflops, 3)
    if any(k.endswith(":int8") for k in _ceilings):
        env["int8_ceiling_TOPs"] = round(int8_ceiling_tops(device, True), 3)
    return env


def print_table(rows: list[Row], env: dict):
    mm = "".join(f", {k.split('_')[2]} matmul ceiling {v} TFLOP/s" for k, v in env.items()
                 if k.startswith("matmul_ceiling_"))
    mm += f", int8 ceiling {env['int8_ceiling_TOPs']} TOP/s" if "int8_ceiling_TOPs" in env else ""
    print(f"\nmptkernels benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date']}); "
          f"copy ceiling {env['copy_ceiling_GBps']} GB/s{mm}")
    head = f"{'family':<11} {'case':<44} {'impl':<22} {'ms':>9} {'rate':>15} {'%ceil':>6} {'vs best PyTorch':>22}"
    print(head)
    print("-" * len(head))
    for r in rows:
        vs = f"{r.speedup:.2f}x ({r.best_baseline})" if r.speedup is not None else ""
        rate = f"{r.gbps:.1f} GB/s" if r.unit == "GB/s" else f"{r.gbps:.3f} {r.unit}"
        print(f"{r.family:<11} {r.case:<44} {r.impl:<22} {r.ms:>9.3f} {rate:>15} {100 * r.ceiling_frac:>5.0f}% {vs:>22}")


def write_outputs(rows: list[Row], env: dict, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"environment": env, "results": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    cases = list(dict.fromkeys((r.family, r.case) for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 5))
    width = 0.8 / max(len(impls), 1)
    # ours in greens, the baselines in the other tab20 colours (never a green): with more
    # implementations than a 10-colour cycle, a baseline would otherwise share our colour
    ours = [impl for impl in impls if impl.startswith("mptkernels")]
    others = [c for k, c in enumerate(plt.cm.tab20.colors) if k not in (4, 5)]
    colors = {impl: plt.cm.Greens(0.9 - 0.4 * k / max(len(ours) - 1, 1)) for k, impl in enumerate(ours)}
    colors.update({impl: others[k % len(others)] for k, impl in enumerate(i for i in impls if i not in colors)})
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, c in enumerate(cases):
            hit = [100 * r.ceiling_frac for r in rows if (r.family, r.case) == c and r.impl == impl]
            if hit:
                xs.append(j + i * width)
                ys.append(hit[0])
        ax.bar(xs, ys, width, label=impl, color=colors[impl])
    ax.axhline(100, color="k", linestyle="--", linewidth=1, label="measured ceiling (copy; matmul for attention)")
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels([c[1] for c in cases], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("% of the measured ceiling (higher is better)")
    ax.set_title(f"mptkernels on {env['device']} — torch {env['torch']}, {env['date']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "benchmarks.png"), dpi=120)
    plt.close(fig)
