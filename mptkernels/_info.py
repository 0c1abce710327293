"""mptkernels.info(): what was built and what each op will run on each device."""
from __future__ import annotations

import importlib.util
import platform

import torch

from . import _backend
from ._loader import build_info
from .triton import version as triton_version

FAMILIES = {  # op -> its GPU implementations: "cuda" (in _C) or "triton:<module of mptkernels.triton>"
    "layer_norm / rms_norm": ("cuda", "triton:layer_norm"),
    "apply_rotary": ("cuda",),
    "attention / attention_varlen / attention_with_kvcache": ("triton:attention",),
    "linear / int8_linear / weight_only_int8_linear": ("triton:gemm",),
    "quantize_rowwise": ("cuda", "triton:gemm"),
}
# ops whose GPU implementation is chosen by timing each shape (the others take the first built)
MEASURED = {"layer_norm / rms_norm"}


def _built(lang: str) -> bool:
    if lang == "cuda":
        return build_info.with_cuda
    return triton_version() is not None and importlib.util.find_spec(f"mptkernels.triton.{lang[7:]}") is not None


def _plan(op, gpu_langs) -> dict:
    b = _backend.current()
    have = [g.split(":")[0] for g in gpu_langs if _built(g)]
    cpu = "reference (PyTorch)" if b == "reference" else "cpu (C++)"
    if b == "reference" or not have:
        gpu = "reference (PyTorch)" + ("" if b == "reference" else ": no GPU kernel in this build")
    elif b in ("cuda", "triton"):
        gpu = b if b in have else f"{b} requested but not built"
    elif len(have) == 1 or op not in MEASURED:
        gpu = have[0]
    else:
        gpu = f"fastest of {'/'.join(have)}, measured per shape on first use"
    return {"cpu": cpu, "cuda": gpu}


def info(file=None) -> dict:
    """Print (and return as a dict) versions, what was compiled and each op's backend per device."""
    from . import __version__

    cuda_ok = torch.cuda.is_available()
    facts = {
        "mptkernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version() or "not installed",
        "python": platform.python_version(),
        "built against torch": build_info.torch_version,
        "CPU kernels ISA": " + ".join([build_info.cpu_isa, *getattr(build_info, "cpu_extensions", [])]),
        "CUDA kernels": (f"yes, archs {', '.join(build_info.cuda_archs)}" if build_info.with_cuda else "no"),
        "GPU": torch.cuda.get_device_name() if cuda_ok else "none visible",
        "backend": _backend.current() + " (MPTK_BACKEND or mptkernels.backend())",
        "ops": {op: _plan(op, langs) for op, langs in FAMILIES.items()},
    }
    from .ops.attention import SDPA_FALLBACKS

    facts["scaled_dot_product_attention falls back to PyTorch for"] = SDPA_FALLBACKS
    if _backend.gpu_choices:
        facts["measured GPU choices"] = {" ".join(map(str, k)): v for k, v in _backend.gpu_choices.items()}
    lines = ["mptkernels.info()"]
    for k, v in facts.items():
        if isinstance(v, dict):
            lines.append(f"  {k}:")
            lines += [f"    {op}: " + (", ".join(f"{d}={w}" for d, w in plan.items()) if isinstance(plan, dict) else str(plan))
                      for op, plan in v.items()]
        else:
            lines.append(f"  {k}: {v}")
    print("\n".join(lines), file=file)
    return facts
