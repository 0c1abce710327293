"""mptkernels.info(): what was built, and what each op can run and has chosen on each device
(all of it read from mptkernels._dispatch, the one table)."""
from __future__ import annotations

import platform

import torch

from . import _dispatch
from ._loader import build_info, cpu_isa, cpu_isa_supported
from .triton import version as triton_version


def _forcing() -> str:
    m = _dispatch.forced_settings()
    if not m:
        return "auto"
    return ", ".join(f"{op}={impl}" if op != "*" else impl for op, impl in m.items())


class Info(dict):
    """The facts of ``info()``: a plain dict of them, whose repr and str are one short line, not
    the report (``info()`` has printed that already; ``dict(facts)`` shows the full dict)."""

    def __repr__(self):
        return f"<mptkernels.info() facts: a dict of {len(self)} ({', '.join(list(self)[:3])}, ...)>"

    __str__ = __repr__


def info(file=None) -> Info:
    """Print a report of versions, what was compiled, each op's implementations per device (with
    why one cannot run here), what ``auto`` does and the choices measured so far; return its facts.

    The report is printed once, by the call, to ``file`` (default: stdout), so a bare
    ``mptkernels.info()`` in a script prints it. The facts come back as an ``Info``, a dict (keys
    as in the report: ``info(file=io.StringIO())["CPU kernels ISA"]`` reads one without printing)
    whose repr and str are one short line, so neither ``print(mptkernels.info())`` nor a bare
    ``mptkernels.info()`` at the REPL shows the report a second time; ``dict(facts)`` is the full dict.
    """
    from . import __version__
    from .ops.attention import SDPA_FALLBACKS

    cuda_ok = torch.cuda.is_available()
    facts = Info({
        "mptkernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version() or "not installed",
        "python": platform.python_version(),
        "built against torch": build_info.torch_version,
        "CPU kernels ISA": cpu_isa(),
        "CPU ISA levels": {"built": build_info.cpu_isa_levels, "this CPU runs up to": cpu_isa_supported()},
        "CUDA kernels": (f"yes, archs {', '.join(build_info.cuda_archs)}" if build_info.with_cuda else "no"),
        "GPU": torch.cuda.get_device_name() if cuda_ok else "none visible",
        "backend (this thread)": _forcing() + "   (MPTK_BACKEND or mptkernels.backend())",
        "auto": {d: _dispatch.auto_rule(d) for d in ("cpu", "cuda")},
        "ops": {d: _dispatch.plan(d) for d in ("cpu", "cuda")},
        "measured choices": {f"{name}: {key}": entry for name, table in _dispatch.measured.tables.items()
                             for key, entry in table.items()},
        "scaled_dot_product_attention falls back to PyTorch for": SDPA_FALLBACKS,
    })
    lines = ["mptkernels.info()"]
    for k in ("mptkernels", "torch", "triton", "python", "built against torch"):
        lines.append(f"  {k}: {facts[k]}")
    levels = facts["CPU ISA levels"]
    lines.append(f"  CPU kernels ISA: {facts['CPU kernels ISA']}   (built: {', '.join(levels['built'])}; this CPU "
                 f"runs up to {levels['this CPU runs up to']}; MPTK_CPU_ISA or mptkernels.cpu_isa() caps it)")
    for k in ("CUDA kernels", "GPU", "backend (this thread)"):
        lines.append(f"  {k}: {facts[k]}")
    for d in ("cpu", "cuda"):
        lines.append(f"  {d} tensors — auto runs {facts['auto'][d]}:")
        for op, row in facts["ops"][d].items():
            impls = ", ".join(name if state == "yes" else f"{name} ({state})" for name, state in row.items())
            lines.append(f"    {op:<24} {impls}")
    if facts["measured choices"]:
        lines.append("  measured choices (op | shape class: chosen, ms per candidate):")
        for key, e in facts["measured choices"].items():
            times = ", ".join(f"{n} {ms:.4g}" for n, ms in e["ms"].items())
            failed = f"; failed: {', '.join(e['failed'])}" if e.get("failed") else ""
            lines.append(f"    {key}: {e['choice']}  ({times}{failed})")
    lines.append(f"  scaled_dot_product_attention falls back to PyTorch for: {SDPA_FALLBACKS}")
    print("\n".join(lines), file=file)
    return facts


def main(argv=None, prog="python -m mptkernels._info"):
    """``mptkernels info``: prints the report of info()."""
    import argparse

    argparse.ArgumentParser(prog=prog, description="Print what was built (versions, the CPU ISA level, CUDA "
                            "archs) and each op's implementations on each device: what runs, what auto chooses, "
                            "and why one cannot run here.").parse_args(argv)
    info()
    return 0
