"""Swap mptkernels modules into a model you already have (the instance given; no class is
patched globally). Returns a report of every swap; later op families add their own swaps."""
from __future__ import annotations

import dataclasses

import torch

from .nn import LayerNorm, RMSNorm


@dataclasses.dataclass
class PatchReport:
    swapped: list = dataclasses.field(default_factory=list)  # (module name, old class, new class, cast)
    int8: object = None  # the QuantizeReport when patch(..., int8=...) quantised linears

    def __len__(self):
        return len(self.swapped) + (len(self.int8) if self.int8 is not None else 0)

    def __str__(self):
        lines = []
        if self.swapped:
            lines = [f"mptkernels.patch: swapped {len(self.swapped)} module(s)"]
            lines += [f"  {name or '<root>'}: {old} -> {new} (cast={cast!r})" for name, old, new, cast in self.swapped]
        if self.int8 is not None:
            lines.append(str(self.int8))
        return "\n".join(lines) if lines else "mptkernels.patch: nothing swapped"


def _layer_norm_from(m, cast):
    new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None,
                    bias=getattr(m, "bias", None) is not None, device="meta", cast=cast)
    new.weight, new.bias = m.weight, getattr(m, "bias", None)  # share the parameters, no copy
    return new


def _rms_norm_from(m, cast):
    new = RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None, device="meta", cast=cast)
    new.weight = m.weight
    return new


def _hf_rms_norm_from(m, cast):
    # HF's Llama/Gemma RMSNorm: a 1-D `weight` and the epsilon as variance_epsilon or eps
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
    new = RMSNorm(m.weight.shape, eps=eps, device="meta", cast=cast)
    new.weight = m.weight
    return new


# exact class -> how to rebuild it. Subclasses are left alone: their forward may differ.
# llm-foundry's LPLayerNorm and HF's Llama/Gemma norms are matched by class name, so
# neither library is imported here.
def _swap_rule(m):
    t = type(m)
    if t is torch.nn.LayerNorm:
        return lambda: _layer_norm_from(m, "torch"), "torch"
    if t is torch.nn.RMSNorm:
        return lambda: _rms_norm_from(m, "torch"), "torch"
    if t.__name__ == "LPLayerNorm" and isinstance(m, torch.nn.LayerNorm):
        return lambda: _layer_norm_from(m, "mpt"), "mpt"
    if t.__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") and getattr(m, "weight", None) is not None:
        return lambda: _hf_rms_norm_from(m, "llama"), "llama"
    if t.__name__ == "GemmaRMSNorm" and getattr(m, "weight", None) is not None:
        return lambda: _hf_rms_norm_from(m, "gemma"), "gemma"
    return None


def patch(model: torch.nn.Module, *, layer_norm: bool = True, int8=False, calibration=None) -> PatchReport:
    """Replace, in ``model`` itself, every norm module mptkernels has a drop-in for.

    layer_norm: swap torch.nn.LayerNorm / RMSNorm (and llm-foundry's LPLayerNorm, HF's
    Llama/Mistral/Qwen2/Gemma RMSNorm, with the cast mode that reproduces each) for
    mptkernels.nn.LayerNorm / RMSNorm sharing the same parameters (state_dict unchanged).
    int8: False, or a mode of ``mptkernels.quantize_`` ("w8a8", "weight_only", "auto"; True
    means "w8a8") applied to the model's nn.Linear layers; "auto" needs ``calibration``.
    """
    report = PatchReport()
    if int8:
        from .quantize import quantize_

        report.int8 = quantize_(model, "w8a8" if int8 is True else int8, calibration=calibration)
    if not layer_norm:
        return report
    for name, module in list(model.named_modules()):
        rule = _swap_rule(module)
        if rule is None:
            continue
        make, cast = rule
        new = make()
        new.train(module.training)
        if name == "":
            raise ValueError("patch: the model itself is a norm module; wrap it or use mptkernels.nn directly")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        report.swapped.append((name, type(module).__name__, type(new).__name__, cast))
    return report
