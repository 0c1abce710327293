"""The speed goals the issues set, in one table, and how a run's rows meet them.

A goal names the device, the family, the case (the start of its name), the measure (the
ratio to a named PyTorch baseline, to the best one, or the rate itself) and the target. It is
met when the median reaches the target; when the samples' range straddles the target the
verdict says so ("met, but the spread reaches below"), since a busy machine cannot call it.
"""
from __future__ import annotations

import dataclasses
import statistics

from .harness import Row


@dataclasses.dataclass(frozen=True)
class Goal:
    device: str
    family: str
    case: str               # the start of the case's name
    target: float
    vs: str | None = None   # a baseline's name: ratio to it; "best": to the best; None: the rate (its unit)
    source: str = ""        # where the goal was set
    unit: str = "×"         # of the target: × for a ratio, else the rows' rate unit
    measure: str = "time"   # "time", or "memory": the baseline's peak memory over ours (Row.peak_mb)

    def describe(self) -> str:
        if self.measure == "memory":
            return f"{self.case}: peak memory ≤ 1/{self.target:g} of {self.vs}"
        vs = f" {'the best PyTorch path' if self.vs == 'best' else self.vs}" if self.vs else ""
        return f"{self.case}: ≥ {self.target:g} {self.unit}{vs}"


GOALS = [
    # CPU: the foundation issue (norms), the attention issue, the GEMM issue
    Goal("cpu", "layer_norm", "add+LayerNorm fwd 4096x2048 float32", 1.5, "eager", "foundation issue"),
    Goal("cpu", "layer_norm", "add+LayerNorm fwd 4096x2048 bfloat16", 1.5, "eager", "foundation issue"),
    Goal("cpu", "attention", "causal fwd B1 S2048 H16 d64 float32", 1.0, "SDPA", "attention issue"),
    Goal("cpu", "attention", "causal+ALiBi fwd B1 S2048 H16 d64 float32", 2.0, "SDPA + bias tensor", "attention issue"),
    Goal("cpu", "gemm", "linear+GELU 512x2048x2048 float32", 1.0, "F.gelu(F.linear) eager", "GEMM issue"),
    # the GLU issue: one pass against PyTorch's two-kernel composite (F.silu(gate) * up), eager;
    # set from the first measurements on a 2-core machine shared with other jobs (docs/benchmarks.md)
    Goal("cpu", "glu", "SwiGLU fwd 4096x5632 float32", 1.5, "eager", "GLU issue"),
    Goal("cpu", "glu", "SwiGLU fwd 4096x5632 bfloat16", 1.2, "eager", "GLU issue"),
    Goal("cpu", "glu", "GeGLU fwd 4096x5632 bfloat16", 1.0, "eager", "GLU issue"),
    Goal("cpu", "glu", "SwiGLU fwd+bwd 4096x5632 bfloat16", 1.2, "eager", "GLU issue"),
    # the fused linear cross entropy issue: not slower than the unfused loss, a quarter of its memory
    Goal("cpu", "cross_entropy", "linear_cross_entropy fwd+bwd 4096x2048x128256 float32", 1.0,
         "x @ w.T + F.cross_entropy eager", "linear cross entropy issue"),
    Goal("cpu", "cross_entropy", "linear_cross_entropy fwd+bwd 4096x2048x128256 float32", 4.0,
         "x @ w.T + F.cross_entropy eager", "linear cross entropy issue", measure="memory"),
    # the flash-attn features issue: each against the same call without the feature (≤ 10%
    # slower is a ratio ≥ 1 / 1.1)
    Goal("cpu", "attention", "sliding window bidirectional (2048, 2048) fwd B1 S16384", 3.0,
         "mptkernels, no window (not ranked)", "flash-attn features issue"),
    Goal("cpu", "attention", "softcap 50 causal fwd B1 S2048", 1 / 1.1, "mptkernels, no softcap (not ranked)",
         "flash-attn features issue"),
    Goal("cpu", "attention", "paged decode 1 token B4 cache2048", 1 / 1.1, "mptkernels, contiguous cache (not ranked)",
         "flash-attn features issue"),
    # GPU (H100/H200): rates in TB/s are written as GB/s, the rows' unit
    Goal("cuda", "layer_norm", "add+LayerNorm fwd 16384x4096 bfloat16", 2800, None, "foundation issue", "GB/s"),
    Goal("cuda", "layer_norm", "LayerNorm fwd+bwd 16384x4096 bfloat16", 2300, None, "foundation issue", "GB/s"),
    Goal("cuda", "rotary", "rotary q,k (8,4096,32,128) bfloat16", 2800, None, "foundation issue", "GB/s"),
    Goal("cuda", "attention", "causal+ALiBi fwd B4 S4096 H32 d128", 580, None, "attention issue", "TFLOP/s"),
    Goal("cuda", "attention", "causal+ALiBi fwd B1 S16384 H32 d128", 580, None, "attention issue", "TFLOP/s"),
    Goal("cuda", "attention", "causal+ALiBi fwd B4 S4096 H32 d128", 1.5, "FlexAttention (compiled)", "attention issue"),
    Goal("cuda", "attention", "causal+ALiBi fwd B4 S4096 H32 d128", 3.5, "SDPA + bias tensor", "attention issue"),
    Goal("cuda", "attention", "causal+ALiBi fwd+bwd B4 S4096 H32 d128", 1.3, "FlexAttention (compiled)",
         "attention issue"),
    Goal("cuda", "attention", "causal fwd B4 S4096 H32 d128", 1.0, "SDPA cuDNN", "attention issue"),
    Goal("cuda", "attention", "ALiBi decode 1 token B1 cache4096", 2600, None, "attention issue", "GB/s"),
    Goal("cuda", "attention", "sliding window bidirectional (2048, 2048) fwd B1 S16384", 3.0,
         "mptkernels, no window (not ranked)", "flash-attn features issue"),
    Goal("cuda", "attention", "softcap 50 causal fwd B4 S4096", 1 / 1.1, "mptkernels, no softcap (not ranked)",
         "flash-attn features issue"),
    Goal("cuda", "attention", "softcap 50 causal fwd B4 S4096", 1.0, "FlexAttention (compiled)",
         "flash-attn features issue"),
    Goal("cuda", "attention", "paged decode 1 token B8 cache4096", 1 / 1.1,
         "mptkernels, contiguous cache (not ranked)", "flash-attn features issue"),
]


def for_device(device: str) -> list[Goal]:
    return [g for g in GOALS if g.device == device]


def matches(goal: Goal, family: str, case: str) -> bool:
    return goal.family == family and case.startswith(goal.case)


def _ours(rows: list[Row], goal: Goal) -> Row | None:
    """The row of ours that auto runs (on the CPU the only one)."""
    mine = [r for r in rows if matches(goal, r.family, r.case) and r.role == "ours"]
    return next((r for r in mine if r.impl == "mptkernels (auto)"), mine[0] if mine else None)


def evaluate(goal: Goal, rows: list[Row]) -> dict:
    """{goal, case, impl, measured median, min, max, unit, verdict}: the ratio per round (to the
    baseline sampled in the same round) or the rate per sample."""
    row = _ours(rows, goal)
    res = {"goal": goal.describe(), "source": goal.source, "target": goal.target}
    if row is None:
        return {**res, "verdict": "not measured (no such case in this run)"}
    mine = row.samples_ms
    if goal.measure == "memory":
        base = next((r for r in rows if (r.family, r.case, r.impl) == (row.family, row.case, goal.vs)), None)
        if base is None or not row.peak_mb or not base.peak_mb:
            return {**res, "verdict": "not measured (no peak memory of both)"}
        vals, unit = [b / o for b, o in zip(base.peak_mb, row.peak_mb)], "× less peak memory"
    elif goal.vs is None:
        work = row.rate * row.ms_median  # rate x ms: the same for every sample
        vals, unit = [work / ms for ms in mine], row.unit
    else:
        name = row.best_baseline if goal.vs == "best" else goal.vs
        base = next((r for r in rows if (r.family, r.case, r.impl) == (row.family, row.case, name)), None)
        if base is None:
            return {**res, "verdict": f"not measured ({name!r} did not run)"}
        vals, unit = [b / o for b, o in zip(base.samples_ms, mine)], "×"
    med, lo, hi = statistics.median(vals), min(vals), max(vals)
    verdict = "met" if med >= goal.target else "not met"
    if lo < goal.target <= hi:
        verdict += " (the samples straddle the target: noisy)"
    return {**res, "case": row.case, "impl": row.impl, "median": med, "min": lo, "max": hi, "unit": unit,
            "verdict": verdict}


def format_goals(results: list[dict]) -> str:
    cells = [[r["goal"], (f"{r['median']:.3g} [{r['min']:.3g}–{r['max']:.3g}] {r['unit']}" if "median" in r else "—"),
              r["verdict"], r["source"]] for r in results]
    head = ["goal", "measured median [min–max]", "verdict", "set by"]
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(4)]
    return "\n".join("  " + "  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip() for c in [head] + cells)
