"""The benchmark harness: cases, interleaved repeated timing, ceilings, the table, JSON and plot.

A family module (layer_norm, rotary, attention, gemm) lists its ``Case``s; ``time_case`` times
every implementation of a case as ``repeats`` independent samples taken in turn (A, B, C, A,
B, C, ... with the order rotated each round), so a burst of load from another process hits
every implementation alike and the ratio of two is taken from samples measured moments apart.
Each row reports the median and the min-max of its samples; ours also the ratio to the best
PyTorch path, per round, as median and min-max. A row whose spread is wider than ``NOISY`` of
its median is flagged noisy: the machine was too busy to call that ratio.

Ceilings are sampled in the same rounds as the case they judge, on the same bytes and so in
the same cache state (see ``_ceiling_fns``): a %ceil above 100 means the measurement is wrong;
such a cell is left empty and says so, never printed as 140%.

CPU samples are wall-clock means of a calibrated block of calls; GPU samples are
triton.testing.do_bench medians (CUDA events, L2 flushed before every call).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

SIZES = ("tiny", "quick", "full")  # tiny: the test suite's size (seconds); quick: the demo's; full: the docs'


@dataclasses.dataclass(frozen=True)
class Timing:
    repeats: int      # independent samples per implementation
    block_s: float    # CPU: seconds of calls per sample
    gpu_rep_ms: int   # GPU: do_bench's rep per sample


TIMING = {"tiny": Timing(3, 0.005, 5), "quick": Timing(5, 0.06, 20), "full": Timing(7, 0.15, 50)}
NOISY = 0.25  # (max - min) / median of a row's samples (of the ratio, for ours) above which it is flagged


@dataclasses.dataclass
class Case:
    """One computation at one shape. ``make()`` allocates the inputs and returns the
    implementations by role: {"ours": {...}, "baselines": {...}, "references": {...}}, each a
    dict name -> zero-argument callable. Baselines are PyTorch's paths for the same result
    (ours are ranked against the fastest); references compute something else and are shown
    for context only. The rate is bytes moved / time (``nbytes``) or operations / time
    (``flops``; ``int8``: int8 operations; ``dtype``: the matmul ceiling's dtype)."""
    family: str
    name: str
    make: Callable[[], dict]
    nbytes: float | None = None
    flops: float | None = None
    int8: bool = False
    dtype: torch.dtype | None = None
    # the work of a reference row that computes more or less than the case (in the case's own
    # unit: FLOPs or bytes), by its name in make(); e.g. attention without the case's window
    work_of: dict = dataclasses.field(default_factory=dict)
    # peak memory: memory(impls=[row names]) -> {name: [MB, one per measurement]} (each in a
    # fresh process, see bench/cross_entropy.py); None: not measured
    memory: Callable | None = None

    @property
    def title(self) -> str:
        return f"{self.family}: {self.name}"


def implementations(built: dict) -> dict[str, tuple[str, Callable]]:
    """The flat name -> (role, fn) of a case's make(); references get a ' (not ranked)' suffix."""
    out = {}
    for role, suffix in (("baselines", ""), ("references", " (not ranked)"), ("ours", "")):
        for name, fn in built.get(role, {}).items():
            out[name + suffix] = (role, fn)
    return out


@dataclasses.dataclass
class Row:
    family: str
    case: str          # what is computed, with shape and dtype
    impl: str          # "mptkernels (cpu)", "eager", "torch.compile", ...
    role: str          # "ours", "baselines" or "references"
    ms_median: float
    ms_min: float
    ms_max: float
    repeats: int
    rate: float        # at the median: GB/s, TFLOP/s or TOP/s (unit)
    unit: str
    ceiling: float     # the measured ceiling in the same unit
    ceiling_kind: str  # what the ceiling is
    ceiling_frac: float | None  # rate / ceiling; None when above 1 (see ceiling_note)
    ceiling_note: str | None = None
    speedup: float | None = None      # ours: median over rounds of best baseline ms / ours ms
    speedup_min: float | None = None
    speedup_max: float | None = None
    best_baseline: str | None = None
    noisy: bool = False
    samples_ms: list = dataclasses.field(default_factory=list)  # one per round, in round order
    peak_mb: list = dataclasses.field(default_factory=list)  # peak memory per measurement (Case.memory), if measured


# ---------------------------------------------------------------- timing

def _sampler(fn, device: str, timing: Timing):
    """A function returning one sample (ms per call) of fn; fn is warmed up (compiled) first."""
    if device == "cuda":
        from triton.testing import do_bench

        fn()
        torch.cuda.synchronize()
        return lambda: float(do_bench(fn, warmup=5, rep=timing.gpu_rep_ms, return_mode="median"))
    fn()  # first call: allocation, any compilation
    t = time.perf_counter()
    fn()
    one = time.perf_counter() - t
    number = max(1, round(timing.block_s / max(one, 1e-7)))

    def sample():
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number * 1e3
    return sample


def time_interleaved(fns: dict[str, Callable], device: str, size: str, label: str = "") -> dict[str, list[float]]:
    """{name: [ms per call, one per round]}: every fn sampled once per round, the order rotated
    each round. An implementation that cannot run here (e.g. compile unavailable) is reported
    on one line and left out."""
    timing = TIMING[size]
    samplers = {}
    for name, fn in fns.items():
        try:
            samplers[name] = _sampler(fn, device, timing)
        except Exception as e:
            print(f"  [{label}] {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    names = list(samplers)
    out = {n: [] for n in names}
    for r in range(timing.repeats):
        for n in names[r % max(len(names), 1):] + names[:r % max(len(names), 1)]:
            out[n].append(samplers[n]())
    return out


def _spread(xs):
    return statistics.median(xs), min(xs), max(xs)


# ---------------------------------------------------------------- ceilings

def _ceiling_fns(device: str, size: str, nbytes=None, flops_dtype=None, int8=False):
    """(fns, work per call, what) of the ceiling a case is judged against; rate = work / time.

    Bandwidth (nbytes): reading, writing and copying the same number of bytes (a sum over
    nbytes, a zero_ of nbytes, a copy of nbytes/2 to nbytes/2). Same bytes, hence the same cache
    level: a 16 MB decode that stays in L3 is judged against L3, not DRAM. Any mix of reads and
    writes of N bytes takes at least N / (the faster of the read and the write rate), so no
    kernel can honestly pass the fastest of the three.
    FLOPs: a dense square matmul of the case's dtype (bf16 8192³ on the GPU, fp32 2048³ on the
    CPU, 1024³ at size tiny), PyTorch's and ours (on AMD CPUs MKL runs AVX2 code and our AVX-512
    GEMM is about twice as fast: MKL alone would understate the machine). int8: an int8 matmul,
    torch._int_mm in its fast layout and our int8_mm (the float matmul is several times slower,
    so int8 rows would read 200-400%)."""
    if nbytes is not None:
        n = max(int(nbytes) // 4, 1024)
        a = torch.empty(n, device=device).uniform_()
        src, dst = torch.empty(n // 2, device=device).uniform_(), torch.empty(n // 2, device=device)
        # write: zero_ (memset: glibc streams large sizes with non-temporal stores, as our kernels do)
        return ({"read": lambda: a.sum(), "write": lambda: a.zero_(), "copy": lambda: dst.copy_(src)},
                n * 4 / 1e9, "of the same bytes")
    from mptkernels import ops

    n = 1024 if size == "tiny" else (8192 if device == "cuda" else 2048)
    if int8:
        a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
        return ({"torch._int_mm": lambda: torch._int_mm(a, a.t()), "int8_mm": lambda: torch.ops.mptkernels.int8_mm(a, a)},
                2 * n**3 / 1e12, f"int8 matmul {n}³")
    dt = flops_dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dt)
    return ({"torch matmul": lambda: a @ a, "ops.linear": lambda: ops.linear(a, a)}, 2 * n**3 / 1e12,
            f"{str(dt).replace('torch.', '')} matmul {n}³")


def _best(times: dict, work: float, what: str) -> tuple[float, str]:
    """The ceiling: the fastest sample of the fastest of its kernels."""
    ms, name = min((min(t), name) for name, t in times.items())
    return work / (ms * 1e-3), f"{name} {what}"


def ceiling(device: str, size: str, nbytes=None, flops_dtype=None, int8=False) -> tuple[float, str]:
    """(rate, what) of a ceiling measured on its own (the end-to-end benchmarks use it; the
    table's cases sample theirs in the same rounds as the case)."""
    fns, work, what = _ceiling_fns(device, size, nbytes, flops_dtype, int8)
    return _best(time_interleaved(fns, device, size, "ceiling"), work, what)


# ---------------------------------------------------------------- a case -> rows

def time_case(case: Case, device: str, size: str) -> list[Row]:
    """Rows of every implementation of the case. The ceiling's kernels are sampled in the same
    rounds as the implementations, so they see the same load and cache state."""
    impls = implementations(case.make())
    cfns, cwork, cwhat = _ceiling_fns(device, size, case.nbytes if not case.flops else None, case.dtype, case.int8)
    times = time_interleaved({**{n: fn for n, (_, fn) in impls.items()}, **{("ceiling", n): f for n, f in cfns.items()}},
                             device, size, case.title)
    ceiling, kind = _best({n[1]: t for n, t in times.items() if isinstance(n, tuple)}, cwork, cwhat)
    times = {n: t for n, t in times.items() if not isinstance(n, tuple)}
    unit = ("TOP/s" if case.int8 else "TFLOP/s") if case.flops else "GB/s"
    work = case.flops / 1e12 if case.flops else case.nbytes / 1e9
    base = [n for n in times if impls[n][0] == "baselines"]
    best = min(base, key=lambda n: statistics.median(times[n]), default=None)
    rows = []
    for name, ms in times.items():
        med, lo, hi = _spread(ms)
        own = case.work_of.get(name.removesuffix(" (not ranked)"))
        rate = (work if own is None else own / (1e12 if case.flops else 1e9)) / (med * 1e-3)
        frac = rate / ceiling
        row = Row(case.family, case.name, name, impls[name][0], med, lo, hi, len(ms), rate, unit, ceiling, kind,
                  frac if frac <= 1.0 else None,
                  None if frac <= 1.0 else f"{100 * frac:.0f}% of its ceiling ({kind}): the ceiling's simple kernels "
                                           "fell short of the machine's limit in this run, or noise; not shown")
        spread = (hi - lo) / med
        if row.role == "ours" and best is not None:
            ratios = [b / o for b, o in zip(times[best], ms)]  # paired by round: sampled moments apart
            row.speedup, row.speedup_min, row.speedup_max = _spread(ratios)
            row.best_baseline = best
            spread = (row.speedup_max - row.speedup_min) / row.speedup
        row.noisy = spread > NOISY
        row.samples_ms = ms
        rows.append(row)
    if case.memory is not None:
        mem = case.memory(impls=list(times))
        for row in rows:
            row.peak_mb = mem.get(row.impl, [])
    return rows


def ours(op: str, fn, device: str) -> dict:
    """The rows of mptkernels for one case: what ``auto`` runs, and, where the device has more
    than one kernel language for the op (the GPU), each one forced with mptkernels.backend, so
    the table shows every implementation beside auto. PyTorch's own op is a baseline row."""
    import mptkernels
    from mptkernels import _dispatch
    from mptkernels import triton as mtriton

    # under TRITON_INTERPRET=1 Triton "runs" CPU tensors in numpy: a test device, not a speed
    langs = [lang for lang in _dispatch.available_kernels(op, device)
             if not (lang == "triton" and mtriton.interpreting())]
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


_kept = False
_busy_before = None


def others_busy(seconds: float = 0.5) -> float | None:
    """How many cores other processes kept busy over a short idle wait of ours (from
    /proc/stat; None elsewhere). Not the load average: that counts our own work too, e.g. the
    demo's training just before its benchmarks."""
    def busy_total():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)  # minus idle and iowait
    try:
        time.sleep(0.2)  # let our own spinning threads (OpenMP waits a while before sleeping) stop
        b0, t0 = busy_total()
        time.sleep(seconds)
        b1, t1 = busy_total()
    except (OSError, ValueError, IndexError):
        return None
    return round((b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1), 2)


def setup(device: str):
    """Before a run: on the CPU keep freed memory; measure how busy other processes keep the
    machine (on a busy machine the implementations lose unequally, a bias the interleaved
    rounds cannot remove, so the table warns)."""
    global _kept, _busy_before
    if device == "cpu":
        _kept = keep_freed_memory()
    _busy_before = others_busy()


def environment(device: str, size: str) -> dict:
    import mptkernels

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mptkernels": mptkernels.__version__,
        "cpu_isa": mptkernels.info(file=io.StringIO())["CPU kernels ISA"],
        "size": size,
        "repeats": TIMING[size].repeats,
        "noisy_above": NOISY,
        "cores_busy_before": _busy_before,  # with other processes, while this run waited (others_busy)
    }
    if device == "cpu":
        env["glibc_keeps_freed_memory"] = _kept
        try:
            with open("/proc/cpuinfo") as f:
                env["device"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except Exception:
            pass
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


# ---------------------------------------------------------------- output

def _cells(r: Row) -> list[str]:
    rate = f"{r.rate:.1f}" if r.unit == "GB/s" else f"{r.rate:.3f}"
    ceil = "—" if r.ceiling_frac is None else f"{100 * r.ceiling_frac:.0f}%"
    vs = ""
    if r.speedup is not None:
        vs = f"{r.speedup:.2f}× [{r.speedup_min:.2f}–{r.speedup_max:.2f}] vs {r.best_baseline}"
    return [r.impl, f"{r.ms_median:.3f}", f"[{r.ms_min:.3f}–{r.ms_max:.3f}]", f"{rate} {r.unit}", ceil, vs,
            "noisy" if r.noisy else ""]


def format_table(rows: list[Row], env: dict) -> str:
    """The table as text: one block per case (its ceiling in the header), columns as wide as
    their longest cell."""
    head = ["implementation", "median ms", "[min–max]", "rate", "%ceil", "vs best PyTorch [min–max]", ""]
    right = {1, 2, 3, 4}
    cells = [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(len(head))]

    def line(c):
        return "  " + "  ".join(x.rjust(w) if i in right else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))).rstrip()

    out = [f"mptkernels benchmarks on {env['device']} ({env['cpu_threads']} threads; torch {env['torch']}, "
           f"triton {env['triton']}; {env['date']})",
           f"each implementation sampled {env['repeats']} times, interleaved; median and [min–max] of the samples; "
           f"ratios per round"]
    busy = env.get("cores_busy_before")
    if busy is not None and busy > 0.5:
        out.append(f"WARNING: other processes kept {busy} cores busy as this run started: they slow the "
                   "implementations unequally, so even rows not flagged noisy may be biased; rerun on an idle "
                   "machine before quoting a ratio")
    last = None
    for r, c in zip(rows, cells):
        if (r.family, r.case) != last:
            last = (r.family, r.case)
            out += ["", f"{r.family}: {r.case}   (ceiling {r.ceiling:.4g} {r.unit}, {r.ceiling_kind})", line(head)]
        out.append(line(c))
    notes = [f"noisy: the samples (for ours, the per-round ratios) spread over more than {100 * NOISY:.0f}% of their "
             "median; the machine was busy, rerun before trusting that ratio."]
    for r in rows:
        if r.peak_mb:
            med, lo, hi = _spread(r.peak_mb)
            notes.append(f"peak memory ({r.case}, {r.impl}): {med:.0f} MB [{lo:.0f}–{hi:.0f}] over "
                         f"{len(r.peak_mb)} fresh processes")
    for r in rows:
        if r.ceiling_note:
            notes.append(f"%ceil — ({r.case}, {r.impl}): {r.ceiling_note}.")
    return "\n".join(out + [""] + notes)


def print_table(rows: list[Row], env: dict):
    print("\n" + format_table(rows, env))


def write_json(rows: list[Row], env: dict, path: str, **extra):
    with open(path, "w") as f:
        json.dump({"environment": env, "results": [dataclasses.asdict(r) for r in rows], **extra}, f, indent=1)


def colours(impls: list[str]) -> dict:
    """One colour per implementation for every panel: ours in greens (darkest first), the rest
    from tab20 without its greens, in a fixed order of first appearance."""
    import matplotlib.pyplot as plt

    ours_ = [i for i in impls if i.startswith("mptkernels")]
    others = [c for k, c in enumerate(plt.cm.tab20.colors) if k not in (4, 5)]
    out = {impl: plt.cm.Greens(0.95 - 0.45 * k / max(len(ours_) - 1, 1)) for k, impl in enumerate(ours_)}
    out.update({impl: others[k % len(others)] for k, impl in enumerate(i for i in impls if i not in out)})
    return out


def write_plot(rows: list[Row], env: dict, path: str) -> bool:
    """One panel per family: a horizontal bar per implementation and case, median ms on a log
    axis with the min-max as a whisker, the time (and ours' ratio) written next to each bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    families = list(dict.fromkeys(r.family for r in rows))
    colour = colours(list(dict.fromkeys(r.impl for r in rows)))
    heights = [sum(1 for r in rows if r.family == f) + len({r.case for r in rows if r.family == f}) for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(13, 1.2 + 0.24 * sum(heights) + 0.9 * len(families)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, fam in zip(axes[:, 0], families):
        y, ticks, labels = 0, [], []
        fr = [r for r in rows if r.family == fam]
        for case in dict.fromkeys(r.case for r in fr):
            group = [r for r in fr if r.case == case]
            ticks.append(y + (len(group) - 1) / 2)
            labels.append(case)
            for r in group:
                ax.barh(y, r.ms_median, height=0.8, color=colour[r.impl], edgecolor="black" if r.role == "ours" else "none",
                        linewidth=0.6, label=r.impl)
                ax.errorbar(r.ms_median, y, xerr=[[r.ms_median - r.ms_min], [r.ms_max - r.ms_min - (r.ms_median - r.ms_min)]],
                            fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
                text = f" {r.ms_median:.3g} ms  {r.impl}"
                if r.speedup is not None:
                    text += f"  {r.speedup:.2f}×" + (" (noisy)" if r.noisy else "")
                ax.text(r.ms_max * 1.05, y, text, va="center", fontsize=8)
                y += 1
            y += 1
        ax.set_xscale("log")
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=9)
        ax.invert_yaxis()
        lo = min(r.ms_min for r in fr)
        hi = max(r.ms_max for r in fr)
        ax.set_xlim(lo / 1.5, hi * 12)  # room on the right for the labels
        ax.set_title(f"{fam} — median ms per call (log scale; whiskers: min–max of {env['repeats']} samples; "
                     "shorter is faster; ours outlined)", fontsize=10, loc="left")
        ax.grid(axis="x", which="both", alpha=0.25)
    handles = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=4, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"mptkernels on {env['device']} — torch {env['torch']}, {env['date']}", fontsize=11, y=1.0 - 0.0,
                 va="bottom")
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.1 + 0.16 * ((len(handles) + 3) // 4)) / fig.get_figheight()))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
