"""``quantize_``: swap a model's linear layers for int8 ones, in place, with a report.

Which modules are swapped, and how, is a registry of one handler per module type (as torchao's
``quantize_``): ``torch.nn.Linear`` and ``mptkernels.nn.Linear`` (whose fused activation the
``Int8Linear`` carries on) are registered; a module of any other type, a subclass of a
registered type included, is left as it is. ``register_handler(type)`` adds a type.

Modes: "w8a8" (int8 activations and weights), "weight_only" (int8 weights), or "auto": from a
short calibration batch, each layer's input is captured, and every mode is run on it and
compared with the layer's own output (relative error ‖out − ref‖ / ‖ref‖) and timed at that
shape; a mode whose error passes ``max_error`` is refused (outlier-heavy layers stay in their
float dtype) and the fastest remaining mode wins. The report lists, per layer, the choice,
the errors and the times.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from .nn.linear import Int8Linear, Linear

MODES = ("w8a8", "weight_only", "auto")
FLOAT = "float"  # "auto" keeps a layer in its float dtype under this name


@dataclasses.dataclass
class LayerChoice:
    name: str
    mode: str  # "w8a8", "weight_only" or "float"
    shape: tuple  # (M, K, N) measured ("auto") or (None, K, N)
    errors: dict = dataclasses.field(default_factory=dict)  # mode -> relative error
    times_ms: dict = dataclasses.field(default_factory=dict)  # mode -> ms


@dataclasses.dataclass
class QuantizeReport:
    layers: list = dataclasses.field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def swapped(self):
        return [c for c in self.layers if c.mode != FLOAT]

    def __len__(self):
        return len(self.swapped)

    def __str__(self):
        saved = self.bytes_before - self.bytes_after
        lines = [f"mptkernels.quantize_: {len(self.swapped)} of {len(self.layers)} linear layer(s) swapped, "
                 f"weights {self.bytes_before / 2**20:.2f} -> {self.bytes_after / 2**20:.2f} MiB "
                 f"(saved {saved / 2**20:.2f} MiB)"]
        for c in self.layers:
            extra = ""
            if c.errors:
                extra = "  " + ", ".join(f"{m}: err {c.errors[m]:.2e} {c.times_ms.get(m, float('nan')):.3f} ms"
                                         for m in c.errors)
                if FLOAT in c.times_ms:  # the float layer's own time: what each mode is measured against
                    extra += f", {FLOAT}: {c.times_ms[FLOAT]:.3f} ms"
            lines.append(f"  {c.name}: {c.mode}{extra}")
        return "\n".join(lines)


# module type (exactly) -> handler(module, mode) -> its Int8Linear of that mode
_HANDLERS: dict[type, Callable[[torch.nn.Module, str], torch.nn.Module]] = {}


def register_handler(module_type: type):
    """Decorator: ``handler(module, mode)`` quantises the modules of exactly ``module_type`` (a
    linear layer: ``in_features``, ``out_features``) for ``quantize_``, mode "w8a8" or
    "weight_only", and returns the module that replaces it."""
    def register(handler):
        _HANDLERS[module_type] = handler
        return handler
    return register


@register_handler(torch.nn.Linear)
def _quantize_linear(linear, mode):
    return Int8Linear.from_float(linear, mode=mode)


@register_handler(Linear)
def _quantize_fused_linear(linear, mode):
    return Int8Linear.from_float(linear, mode=mode, activation=linear.activation)


def _nbytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def quantize_(model: torch.nn.Module, mode: str = "w8a8", *, filter=None, calibration=None, max_error: float = 0.03,
              repeats: int = 5) -> QuantizeReport:
    """Replace, in ``model`` itself, each module of a registered type (``torch.nn.Linear``,
    ``mptkernels.nn.Linear``: exactly those classes; ``filter(name, module)`` may veto) with an
    ``Int8Linear`` of ``mode`` (an ``mptkernels.nn.Linear``'s activation included).

    mode "auto" needs ``calibration``: inputs for ``model(*calibration)`` (a tuple) or
    ``model(calibration)``; each layer gets the fastest of float, weight-only and W8A8 whose
    relative error on its calibration input stays within ``max_error`` (timed ``repeats`` times
    at the captured shape). Returns a QuantizeReport (``print`` it).
    """
    if mode not in MODES:
        raise ValueError(f"quantize_: mode must be one of {MODES}, got {mode!r}")
    if mode == "auto" and calibration is None:
        raise ValueError("quantize_: mode='auto' needs a calibration batch (calibration=...)")
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) in _HANDLERS and (filter is None or filter(n, m))]
    if any(n == "" for n, _ in targets):
        raise ValueError(f"quantize_: the model itself is an {type(model).__name__}; wrap it or use "
                         "Int8Linear.from_float")
    report = QuantizeReport()
    inputs = _capture_inputs(model, targets, calibration) if mode == "auto" else {}
    for name, lin in targets:
        report.bytes_before += _nbytes(lin)
        if mode == "auto":
            choice = _choose(name, lin, inputs.get(name), max_error, repeats)
        else:
            choice = LayerChoice(name, mode, (None, lin.in_features, lin.out_features))
        report.layers.append(choice)
        if choice.mode == FLOAT:
            report.bytes_after += _nbytes(lin)
            continue
        new = _HANDLERS[type(lin)](lin, choice.mode)
        new.train(lin.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        report.bytes_after += _nbytes(new)
    return report


def _capture_inputs(model, targets, calibration):
    """The first input each target layer sees on the calibration batch (rows flattened)."""
    seen, hooks = {}, []
    for name, lin in targets:
        def hook(mod, args, name=name):
            seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*calibration) if isinstance(calibration, tuple) else model(calibration)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _time_ms(fn, device, repeats):
    fn()  # warm-up (and compilation of any kernel)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def _choose(name, lin, x, max_error, repeats):
    if x is None:  # never called on the calibration batch: nothing to measure, keep it
        return LayerChoice(name, FLOAT, (0, lin.in_features, lin.out_features))
    choice = LayerChoice(name, FLOAT, (x.shape[0], lin.in_features, lin.out_features))
    with torch.no_grad():
        ref = lin(x).float()
        norm = ref.norm().clamp_min(1e-30)
        choice.times_ms[FLOAT] = _time_ms(lambda: lin(x), x.device, repeats)
        for mode in ("weight_only", "w8a8"):
            q = _HANDLERS[type(lin)](lin, mode)
            choice.errors[mode] = ((q(x).float() - ref).norm() / norm).item()
            choice.times_ms[mode] = _time_ms(lambda: q(x), x.device, repeats)
    allowed = [FLOAT] + [m for m in ("weight_only", "w8a8") if choice.errors[m] <= max_error]
    choice.mode = min(allowed, key=lambda m: choice.times_ms[m])
    return choice
