"""Which implementation runs each op: the one table, ``backend()``, and the ``auto`` choice.

Every public op has implementations of two kinds:

* kernels, behind the op's custom op (``torch.ops.mptkernels.<schema op>``): ``cpu`` (C++,
  csrc/cpu/), ``cuda`` (CUDA C++, csrc/cuda/), ``triton`` (mptkernels/triton/). The custom op's
  CPU and CUDA kernels are the choosers made here from ``TABLE``: they pick the language and
  call it, so autograd and torch.compile see one op whichever language runs.
* composites, run by the public function itself with PyTorch's autograd: ``torch`` (PyTorch's
  own ops, mptkernels/torch_impl.py: what a model ran before our op was swapped in) and
  ``reference`` (mptkernels/reference.py, the oracle; any device).

``TABLE`` is the only place that says which of them exist for which op and dtypes. The
kernel registrations, the reference fallback, ``mptkernels.info()`` and the op table of
docs/architecture.md (``python -m mptkernels._dispatch``) are all made from it.

Choosing (``route`` for the public function, ``_choose_kernel`` inside the custom op):

* forced, with ``backend()`` / ``MPTK_BACKEND``: that implementation runs, or a ValueError names
  the op, what was asked and what exists for this call; never a silent fallback. A forward's
  forcing also holds for its backward, wherever that runs (the autograd context keeps it).
* ``auto`` on the CPU: the C++ kernel wherever it covers the call (measured faster than
  PyTorch's ops, docs/benchmarks.md), then ``torch``, then the reference.
* ``auto`` on a GPU: every candidate that covers the call (the kernels, and PyTorch's own op at
  the level of the public function) is timed once per (op, shape class) on the call's own
  arguments, and the fastest runs from then on. Choices are kept on disk per GPU name and
  torch / triton / mptkernels build (``cache_path()``), so a new process does not time again.
  While a CUDA graph is captured nothing is timed: an unmeasured class takes the first
  candidate. Under torch.compile the choice is read when the graph is traced.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import json
import os
import platform
import re
import threading
import time
import types
import warnings
from typing import Callable

import torch

from ._loader import build_info

IMPLS = ("cpu", "cuda", "triton", "torch", "reference")
KERNELS = ("cpu", "cuda", "triton")
# auto's order of preference per device: the first candidate that covers a call runs where
# nothing is measured (the CPU, a CUDA graph capture of an unmeasured class)
ORDER = {"cpu": ("cpu", "triton", "torch", "reference"), "cuda": ("cuda", "triton", "torch", "reference")}
# "first": take the first candidate in ORDER; "measure": time the candidates once per shape class
POLICY = {"cpu": "first", "cuda": "measure"}

F3 = (torch.float32, torch.float16, torch.bfloat16)
F4 = F3 + (torch.float64,)


@dataclasses.dataclass(frozen=True)
class Op:
    """A public op: its family (mptkernels/{ops,triton}/<family>.py), the custom ops it runs
    (forward first), the dtypes each kernel language takes, and whether PyTorch has an op of
    its own for it (mptkernels/torch_impl.py; which calls it covers is asked of that module)."""
    family: str
    schema: tuple
    kernels: dict
    torch: bool
    doc: str = ""


TABLE = {
    "layer_norm": Op("layer_norm", ("layer_norm_fwd", "layer_norm_bwd"), {"cpu": F4, "cuda": F3, "triton": F3},
                     torch=True, doc="F.layer_norm (casts torch, mpt; weight in x's dtype)"),
    "rms_norm": Op("layer_norm", ("layer_norm_fwd", "layer_norm_bwd"), {"cpu": F4, "cuda": F3, "triton": F3},
                   torch=True, doc="F.rms_norm (cast torch; weight in x's dtype)"),
    "apply_rotary": Op("rotary", ("apply_rotary",), {"cpu": F4, "cuda": F3}, torch=False),
    "attention": Op("attention", ("attention_fwd", "attention_bwd"), {"cpu": F3, "triton": F3}, torch=True,
                    doc="F.scaled_dot_product_attention (ALiBi as a bias tensor; not causal with seqlen_q > seqlen_k)"),
    "attention_varlen": Op("attention", ("attention_varlen_fwd", "attention_varlen_bwd"),
                           {"cpu": F3, "triton": F3}, torch=False),
    "attention_with_kvcache": Op("attention", ("attention_with_kvcache",), {"cpu": F3, "triton": F3}, torch=False),
    "linear": Op("gemm", ("linear_fwd", "linear_bwd"), {"cpu": F4, "triton": F3}, torch=True,
                 doc="F.linear + the activation"),
    "quantize_rowwise": Op("gemm", ("quantize_rowwise",), {"cpu": F3, "cuda": F3, "triton": F3}, torch=False),
    "int8_mm": Op("gemm", ("int8_mm",), {"cpu": (torch.int8,), "triton": (torch.int8,)}, torch=True,
                  doc="torch._int_mm with the (N, K) operand transposed (its fast layout)"),
    "int8_linear": Op("gemm", ("int8_linear",), {"cpu": F3, "triton": F3}, torch=True,
                      doc="torch._int_mm between PyTorch quantisation and epilogue ops"),
    "weight_only_int8_linear": Op("gemm", ("weight_only_int8_linear",), {"cpu": F3, "triton": F3}, torch=True,
                                  doc="F.linear on the weight converted to x's dtype, times the scales"),
    # the GLU family: one custom-op pair for both (the activation is an argument)
    "swiglu": Op("glu", ("glu_fwd", "glu_bwd"), {"cpu": F4, "triton": F3}, torch=True, doc="F.silu(gate) * up"),
    "geglu": Op("glu", ("glu_fwd", "glu_bwd"), {"cpu": F4, "triton": F3}, torch=True,
                doc="F.gelu(gate, approximate) * up"),
    # cross_entropy family
    "linear_cross_entropy": Op("cross_entropy", ("linear_cross_entropy_fwd", "linear_cross_entropy_bwd"),
                               {"cpu": F4, "triton": F3}, torch=True,
                               doc="F.linear, then F.cross_entropy on the whole float32 logits (+ z-loss)"),
}
OPS = tuple(TABLE)


@dataclasses.dataclass
class Schema:
    """What a family module tells the dispatcher about one custom op (``register``)."""
    name: str
    check: Callable  # args -> None, or raises naming the bad argument (the one check of the op)
    public_of: Callable  # args -> the public op of this call (layer_norm_fwd serves two)
    dtype_of: Callable  # args -> the dtype that decides which kernels cover the call
    shape_class: Callable  # args -> a tuple: calls of one class share one measured choice
    fake: Callable
    host_check: Callable | None = None  # data-dependent checks (reads tensors); not while capturing


SCHEMAS: dict[str, Schema] = {}


# ---------------------------------------------------------------------------------------
# backend(): the forced implementations, per thread and per task
# ---------------------------------------------------------------------------------------
def _validate(mapping: dict, source: str) -> dict:
    for op, impl in mapping.items():
        if op != "*" and op not in TABLE:
            raise ValueError(f"{source}: unknown op {op!r}; the ops are {', '.join(OPS)}")
        if impl not in IMPLS + ("auto",):
            raise ValueError(f"{source}: {impl!r} is not an implementation; choose from auto, {', '.join(IMPLS)}")
    return mapping


def _parse_env(value: str) -> dict:
    """MPTK_BACKEND: "auto", an implementation for every op ("triton"), per op
    ("attention=triton,layer_norm=torch"), or both ("cpu,attention=reference")."""
    mapping = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        op, eq, impl = part.partition("=")
        if eq:
            mapping[op.strip()] = impl.strip()
        else:
            mapping["*"] = op
    return _validate(mapping, f"MPTK_BACKEND={value!r}")


_forced: contextvars.ContextVar[dict] = contextvars.ContextVar(
    "mptkernels_backend", default=_parse_env(os.environ.get("MPTK_BACKEND", "")))


@contextlib.contextmanager
def backend(name: str | None = None, /, **per_op: str):
    """Force implementations inside the block, for this thread (or asyncio task) only.

    ``backend("triton")`` forces one implementation for every op; ``backend(attention="triton",
    layer_norm="torch")`` one per op (keys: the public op names, ``OPS``); both combine, and
    blocks nest (an inner name replaces the outer settings, inner per-op ones add to them).
    Implementations: "auto", "cpu" (C++), "cuda" (CUDA C++), "triton", "torch" (PyTorch's own
    op) and "reference". An op asked for an implementation that is not built, does not run on
    the tensors' device or does not cover the call raises a ValueError naming what exists.
    torch.compile reads the forcing when it traces (compile again after changing it).
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend: the implementation must be a string, got {type(name).__name__}")
    new = {"*": name} if name is not None else dict(_forced.get())
    new.update(per_op)
    token = _forced.set(_validate(new, "backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_settings() -> dict:
    """The forcing in effect here (e.g. for a backward to run under its forward's)."""
    return _forced.get()


@contextlib.contextmanager
def restored(settings: dict):
    token = _forced.set(settings)
    try:
        yield
    finally:
        _forced.reset(token)


def forced(op: str) -> str:
    """The implementation forced for a public op here, or "auto"."""
    m = _forced.get()
    return m.get(op) or m.get("*") or "auto"


def _constant_when_traced(fn):
    """torch.compiler.assume_constant_result(fn): torch.compile takes fn's answer as a constant of
    the graph. That function only sets this attribute, but it imports torch._dynamo to do so
    (~1 s at `import mptkernels`); tests/test_dispatch.py checks the attribute is what it sets."""
    fn._dynamo_marked_constant = True
    return fn


# torch.compile cannot trace a ContextVar: it takes the answer as a constant of the graph
_forced_for_trace = _constant_when_traced(forced)


# ---------------------------------------------------------------------------------------
# What exists, per op and device
# ---------------------------------------------------------------------------------------
def _triton_module(family: str):
    """mptkernels.triton.<family>, or None where triton cannot run it (no triton; no GPU and
    not the interpreter)."""
    from . import triton as mtriton

    if not mtriton.usable():
        return None
    try:
        return importlib.import_module(f"mptkernels.triton.{family}")
    except ImportError:
        return None


def _kernel_fn(op: Op, schema: str, lang: str):
    # .default: the overload itself (the packet resolves it again on every call, a few us)
    if lang == "cpu":
        return getattr(torch.ops.mptkernels_cpu, schema).default
    if lang == "cuda":
        return getattr(torch.ops.mptkernels_cuda, schema).default
    return getattr(_triton_module(op.family), schema)


_available_cache: dict = {}  # what exists and the choices that need no timing, per op, device, dtype, forcing


def kernel_status(public: str, lang: str, device_type: str) -> str | None:
    """None when kernel language ``lang`` of ``public`` can run on ``device_type`` in this
    process; else why not (for errors and info())."""
    op = TABLE[public]
    if lang not in op.kernels:
        return "none exists"
    if lang == "cpu":
        return None if device_type == "cpu" else "runs on CPU tensors"
    if lang == "cuda":
        if device_type != "cuda":
            return "runs on CUDA tensors"
        if not build_info.with_cuda:
            return "not built (mptkernels._C was compiled without CUDA)"
        return None
    from . import triton as mtriton

    if device_type == "cpu":
        usable = mtriton.interpreting() and _triton_module(op.family)
        return None if usable else "runs on CUDA tensors (or the interpreter)"
    if device_type != "cuda":
        return "runs on CUDA tensors"
    why = mtriton.unusable_reason()
    return why or (None if _triton_module(op.family) else "its module does not import")


def available_kernels(public: str, device_type: str) -> tuple:
    """The kernel languages of ``public`` that can run on ``device_type`` here, in auto's order."""
    key = (public, device_type)
    if key not in _available_cache:
        order = ORDER.get(device_type, ())
        _available_cache[key] = tuple(lang for lang in order if lang in KERNELS
                                      and kernel_status(public, lang, device_type) is None)
    return _available_cache[key]


def _lang_covers(public: str, lang: str, dtype) -> bool:
    return dtype in TABLE[public].kernels.get(lang, ())


def _torch_why(public: str, device_type: str, torch_why: str | None) -> str | None:
    """None when PyTorch's op can run this call, else why not."""
    if not TABLE[public].torch:
        return "PyTorch has no op for it"
    if device_type not in ORDER:
        return "runs on CPU and CUDA tensors"
    return torch_why


def _existing(public: str, device_type: str, dtype, torch_why: str | None) -> list:
    """What can run this call: kernel languages, then torch, then the reference."""
    have = [lang for lang in available_kernels(public, device_type) if _lang_covers(public, lang, dtype)]
    if _torch_why(public, device_type, torch_why) is None:
        have.append("torch")
    return have + ["reference"]


def _not_available(public: str, asked: str, device_type: str, dtype, torch_why: str | None) -> ValueError:
    if asked in KERNELS:
        why = kernel_status(public, asked, device_type)
        why = why or (f"takes {', '.join(str(d).replace('torch.', '') for d in TABLE[public].kernels[asked])}, "
                      f"not {str(dtype).replace('torch.', '')}")
    elif asked == "torch":
        why = _torch_why(public, device_type, torch_why)
    else:
        why = "no implementation covers it"
    have = ", ".join(_existing(public, device_type, dtype, torch_why))
    return ValueError(f"mptkernels.{public}: backend {asked!r} cannot run this call ({why}); implementations for "
                      f"these {device_type} tensors: {have}")


# ---------------------------------------------------------------------------------------
# The public function's choice: a kernel (the custom op), torch or the reference
# ---------------------------------------------------------------------------------------
@_constant_when_traced
def _static_route(public: str, device_type: str, dtype: torch.dtype, torch_why: str | None, asked: str) -> str:
    """"kernel", "torch", "reference" or "measure" (kernel and torch both cover: time them)."""
    key = ("route", public, device_type, dtype, torch_why, asked)
    how = _available_cache.get(key)
    if how is None:
        how = _available_cache[key] = _route_uncached(public, device_type, dtype, torch_why, asked)
    return how


def _route_uncached(public, device_type, dtype, torch_why, asked) -> str:
    if asked == "reference":
        return "reference"
    kernel_ok = any(_lang_covers(public, lang, dtype) for lang in available_kernels(public, device_type))
    torch_ok = _torch_why(public, device_type, torch_why) is None
    if asked == "torch":
        if not torch_ok:
            raise _not_available(public, asked, device_type, dtype, torch_why)
        return "torch"
    if asked in KERNELS:
        if asked not in available_kernels(public, device_type) or not _lang_covers(public, asked, dtype):
            raise _not_available(public, asked, device_type, dtype, torch_why)
        return "kernel"
    # auto
    if kernel_ok and torch_ok and POLICY.get(device_type) == "measure":
        return "measure"
    return "kernel" if kernel_ok else "torch" if torch_ok else "reference"


def no_torch_op():
    """route()'s torch_why for an op PyTorch has no op for."""
    return "PyTorch has no op for it"


def torch_covers():
    """route()'s torch_why where PyTorch's op covers every call the op's check lets through."""
    return None


@_constant_when_traced
def _kernel_regardless(public: str, device_type: str, dtype: torch.dtype, asked: str) -> bool:
    """Whether the custom op runs whatever PyTorch's op covers (a forced kernel language that
    can run, or auto where nothing is measured and a kernel covers): the common case, which
    then needs neither torch_why nor a shape class."""
    key = ("regardless", public, device_type, dtype, asked)
    hit = _available_cache.get(key)
    if hit is None:
        langs = [lang for lang in available_kernels(public, device_type) if _lang_covers(public, lang, dtype)]
        hit = _available_cache[key] = (asked in langs or asked == "auto" and bool(langs)
                                       and POLICY.get(device_type) != "measure")
    return hit


def route(public: str, args: tuple, *, device: torch.device, dtype: torch.dtype, torch_why: Callable,
          shape_class: Callable, kernel: Callable, torch_fn: Callable | None, reference: Callable,
          check: Callable | None = None):
    """Run the public op ``public`` on ``args`` with the implementation chosen for it: the
    custom op (``kernel``, where the language is chosen again per device), PyTorch's op
    (``torch_fn``) or ``reference``. ``torch_why()``: None when PyTorch's op covers these
    arguments, else why not (mptkernels.torch_impl.covers_*); ``shape_class()``: the tuple that
    keys a measured choice. Both are called only when the answer depends on them. ``check``: the
    custom op's argument check on this call; the custom op runs it itself, the other paths run it
    here, so every implementation refuses the same input, and a call checks once."""
    asked = _forced_for_trace(public)
    if _kernel_regardless(public, device.type, dtype, asked):
        return kernel(*args)
    how = _static_route(public, device.type, dtype, torch_why(), asked)
    if how != "kernel" and check is not None:
        check()
    if how == "measure":
        how = _measured_route(public, device, shape_class(), args, kernel, torch_fn)
    fn = kernel if how == "kernel" else torch_fn if how == "torch" else reference
    return fn(*args)


def fixed_kernel(public: str, schema: str, device: torch.device, dtype: torch.dtype):
    """The kernel that route() runs for the public op ``public`` (custom op ``schema``) on
    tensors of this device and dtype whatever their shapes (e.g. torch.ops.mptkernels_cpu.
    <schema>.default), or None where the choice is not fixed: a backend forced here that is no
    kernel, a measured choice, no kernel for the dtype. For a caller that replays calls it has
    made once through the public op (generate()'s CPU decode step): the kernel then runs with
    neither the argument checks nor the choice, which that first call did."""
    asked = forced(public)
    if not _kernel_regardless(public, device.type, dtype, asked):
        return None
    fn = _choose_kernel_uncached(SCHEMAS[schema], device, (), public, dtype, asked)
    return None if fn is _MEASURE else fn


def _measured_route(public, device, shape_class, args, kernel, torch_fn) -> str:
    training = _training(args)  # a class of its own: its forward and backward are timed together
    key = _key(public, shape_class + (("train",) if training else ()))
    if torch.compiler.is_compiling():
        return _traced_choice(device.type, key) or "kernel"
    entry = measured.get(device, key)
    if entry is None:
        entry = measured.measure(device, key, {"kernel": kernel, "torch": torch_fn}, args, training=training)
    return entry["choice"]


@_constant_when_traced
def _traced_choice(device_type: str, key: str):
    entry = measured.lookup(device_type, key)
    return None if entry is None else entry["choice"]


def _training(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _key(name: str, shape_class: tuple) -> str:
    return name + "|" + ",".join(str(c).replace("torch.", "") for c in shape_class)


# ---------------------------------------------------------------------------------------
# The custom op's kernels: choose the language
# ---------------------------------------------------------------------------------------
def _choose_kernel(schema: Schema, device: torch.device, args: tuple):
    public = schema.public_of(args)
    dtype = schema.dtype_of(args)
    asked = forced(public)
    key = ("kernel", schema.name, device.type, dtype, asked)
    fn = _available_cache.get(key)  # the answer where nothing is measured, kept (a dict lookup a call)
    if fn is None:
        fn = _choose_kernel_uncached(schema, device, args, public, dtype, asked)
        if fn is not _MEASURE:
            _available_cache[key] = fn
    if fn is _MEASURE:
        fn = _measured_kernel(schema, device, args, public, dtype)
    return fn


_MEASURE = object()  # "time the languages for this shape class"


def _choose_kernel_uncached(schema, device, args, public, dtype, asked):
    langs = [lang for lang in available_kernels(public, device.type) if _lang_covers(public, lang, dtype)]
    if asked != "auto":
        if asked not in langs:
            if asked in ("torch", "reference"):
                raise ValueError(f"mptkernels.{public}: backend {asked!r} runs at the public function "
                                 f"(mptkernels.ops.{public}), not inside torch.ops.mptkernels.{schema.name}; "
                                 f"kernels for these {device.type} tensors: {', '.join(langs) or 'none'}")
            raise _not_available(public, asked, device.type, dtype, torch_why="not inside the custom op")
        return _kernel_fn(TABLE[public], schema.name, asked)
    if not langs:
        raise _not_available(public, "auto", device.type, dtype, torch_why="not inside the custom op")
    if len(langs) == 1 or POLICY.get(device.type) != "measure":
        return _kernel_fn(TABLE[public], schema.name, langs[0])
    return _MEASURE


def _measured_kernel(schema, device, args, public, dtype):
    langs = [lang for lang in available_kernels(public, device.type) if _lang_covers(public, lang, dtype)]
    key = _key(schema.name, schema.shape_class(args))
    entry = measured.get(device, key)
    if entry is None:
        fns = {lang: _kernel_fn(TABLE[public], schema.name, lang) for lang in langs}
        entry = measured.measure(device, key, fns, args, training=False)
    return _kernel_fn(TABLE[public], schema.name, entry["choice"])


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_lib = torch.library.Library("mptkernels", "IMPL")  # the choosers' registrations live as long as it


def register(schema: Schema):
    """Register a custom op's fake kernel (for it and its C++ twins) and its CPU and CUDA
    kernels: the choosers above, which check the arguments once for every implementation.
    Called once per op by its family module."""
    SCHEMAS[schema.name] = schema

    def fake(*args):
        schema.check(*args)  # metadata only: torch.compile reports bad input when it traces
        return schema.fake(*args)

    for ns in ("mptkernels", "mptkernels_cpu", "mptkernels_cuda"):
        if hasattr(getattr(torch.ops, ns), schema.name):
            torch.library.register_fake(f"{ns}::{schema.name}")(fake if ns == "mptkernels" else schema.fake)

    check, host_check = schema.check, schema.host_check

    def kernel(*args):
        check(*args)  # every implementation trusts the arguments after this
        device = args[0].device  # every schema's first argument is its main tensor
        if host_check is not None and not _capturing(device):
            host_check(*args)
        return _choose_kernel(schema, device, args)(*args)

    kernel.__name__ = f"{schema.name}_chooser"
    for key in ("CPU", "CUDA"):  # Library.impl: no torch.compile guard around it (it runs at run time only)
        _lib.impl(schema.name, kernel, key)
    setattr(CUSTOM_OPS, schema.name, _DirectOp(getattr(torch.ops.mptkernels, schema.name).default, kernel))


# CUSTOM_OPS.<schema op>.default(*args): what the ops modules call instead of
# torch.ops.mptkernels.<schema op>.default; the same op, with one shortcut (_DirectOp)
CUSTOM_OPS = types.SimpleNamespace()
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _DirectOp:
    """The custom op, or its CPU/CUDA kernel (the chooser) called directly where the dispatcher
    would run nothing else before it: no gradient to record, not traced (torch.compile, fake
    or meta tensors), no dispatch or function mode, no tensor subclass. The dispatcher's round
    trip into Python and the autograd wrapper cost ~30 us a call on the CPU, as much as a small
    op's whole kernel (a decode step is hundreds of them)."""

    __slots__ = ("op", "chooser")

    def __init__(self, op, chooser):
        self.op, self.chooser = op, chooser

    def default(self, *args):
        if not torch.compiler.is_compiling() and _plain(args):
            return self.chooser(*args)
        return self.op(*args)


def _plain(args) -> bool:
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    device = None
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or grad and a.requires_grad:
                return False
            device = device or a.device.type
    return device in ("cpu", "cuda")


# ---------------------------------------------------------------------------------------
# Measured choices: timed once per process, kept on disk per device and build
# ---------------------------------------------------------------------------------------
def cache_path(device_name: str) -> str | None:
    """Where the measured choices of a device are kept: $MPTK_CACHE_DIR, else
    $XDG_CACHE_HOME/mptkernels or ~/.cache/mptkernels; MPTK_CACHE_DIR=off keeps none."""
    root = os.environ.get("MPTK_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mptkernels")
    if root.lower() in ("off", "0", "none", ""):
        return None
    return os.path.join(root, "dispatch-" + re.sub(r"[^A-Za-z0-9._-]+", "_", device_name) + ".json")


def _build_id() -> dict:
    from . import __version__, triton as mtriton

    so = [f for f in os.listdir(os.path.dirname(__file__)) if f.startswith("_C") and f.endswith(".so")]
    stat = os.stat(os.path.join(os.path.dirname(__file__), so[0])) if so else None
    return {"torch": torch.__version__, "triton": mtriton.version() or "", "mptkernels": __version__,
            "_C": f"{stat.st_size}-{stat.st_mtime_ns}" if stat else ""}


def _device_name(device: torch.device) -> str:
    return _device_name_of(device.type, device.index)


@functools.lru_cache(maxsize=None)  # asked on every measured call
def _device_name_of(device_type: str, index) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    return f"{device_type}-{platform.machine()}-{platform.processor() or 'unknown'}"


def time_ms(name: str, fn: Callable, device: torch.device, reps: int = 5) -> float:
    """Median milliseconds of fn() (candidate ``name``) after one warm-up call (which also
    compiles Triton kernels): CUDA events on a GPU, the wall clock elsewhere."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _training_call(fn: Callable, args: tuple) -> Callable:
    """fn(*args) and its backward, on detached copies of the arguments (the caller's tensors
    get no gradient), with a fixed random output gradient."""
    copies = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    grads = {}

    def call():
        out = fn(*copies)
        outs = [o for o in (out if isinstance(out, tuple) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        for i, o in enumerate(outs):
            if i not in grads:
                grads[i] = torch.randn_like(o)
        torch.autograd.backward(outs, [grads[i] for i in range(len(outs))])

    return call


class Measured:
    """The measured choices of this process, per device name, backed by one JSON file each."""

    def __init__(self):
        self.lock = threading.RLock()  # timing "our kernel" times the languages inside it: re-entered
        self.tables: dict[str, dict] = {}  # device name -> {key: {"choice", "ms", "failed"?}}
        self.names: dict[str, str] = {}  # device type -> name of the last device seen (for traced lookups)
        self.timer = time_ms  # (name, fn, device) -> ms; tests replace it

    def _table(self, device: torch.device) -> dict:
        name = _device_name(device)
        self.names[device.type] = name
        if name not in self.tables:
            self.tables[name] = self._load(name)
        return self.tables[name]

    def get(self, device: torch.device, key: str):
        return self._table(device).get(key)

    def lookup(self, device_type: str, key: str):
        name = self.names.get(device_type)
        return None if name is None else self.tables.get(name, {}).get(key)

    def measure(self, device: torch.device, key: str, fns: dict, args: tuple, *, training: bool) -> dict:
        """Time each of fns (name -> callable taking args) on args and keep the fastest. While a
        CUDA graph is captured nothing can be timed: the first one runs, unrecorded."""
        if _capturing(device):
            return {"choice": next(iter(fns)), "ms": {}}
        with self.lock:
            table = self._table(device)
            if key in table:
                return table[key]
            ms, failed = {}, {}
            for name, fn in fns.items():
                call = _training_call(fn, args) if training else (lambda fn=fn: fn(*args))
                try:
                    ms[name] = float(self.timer(name, call, device))
                except Exception as e:  # a candidate that fails here is not chosen, and info() says why
                    failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    warnings.warn(f"mptkernels: {name} failed while timing {key} and is not used for it: "
                                  f"{failed[name]}", RuntimeWarning, stacklevel=3)
            if not ms:
                raise RuntimeError(f"mptkernels: every implementation failed for {key}: {failed}")
            entry = {"choice": min(ms, key=ms.get), "ms": ms, **({"failed": failed} if failed else {})}
            table[key] = entry
            self._save(_device_name(device), table)
            return entry

    # ---- the file
    def _load(self, name: str) -> dict:
        path = cache_path(name)
        if path is None or not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
                raise ValueError("not a mptkernels dispatch cache")
            for k, v in data["choices"].items():
                if not isinstance(v, dict) or not isinstance(v.get("choice"), str) or not isinstance(v.get("ms"), dict):
                    raise ValueError(f"entry {k!r} is malformed")
        except (OSError, ValueError) as e:
            warnings.warn(f"mptkernels: ignoring the dispatch cache {path} ({e}); timing again", RuntimeWarning,
                          stacklevel=4)
            return {}
        build = _build_id()
        if data.get("device") != name or data.get("build") != build:
            warnings.warn(f"mptkernels: ignoring the stale dispatch cache {path} (made for {data.get('device')} with "
                          f"{data.get('build')}, this is {name} with {build}); timing again", RuntimeWarning,
                          stacklevel=4)
            return {}
        return dict(data["choices"])

    def _save(self, name: str, table: dict):
        path = cache_path(name)
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"device": name, "build": _build_id(), "choices": table}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: another process reads the old file or the new one
        except OSError as e:
            warnings.warn(f"mptkernels: cannot write the dispatch cache {path} ({e}); choices are kept in memory "
                          "only", RuntimeWarning, stacklevel=4)

    def clear(self):
        """Forget this process's choices (the files stay): the next call loads or times again."""
        with self.lock:
            self.tables.clear()
            self.names.clear()


measured = Measured()


# ---------------------------------------------------------------------------------------
# Reports: info() and the docs' table
# ---------------------------------------------------------------------------------------
def plan(device_type: str) -> dict:
    """Per public op: each implementation on ``device_type`` and whether it can run here."""
    out = {}
    for public, op in TABLE.items():
        row = {}
        for lang in KERNELS:
            if lang in op.kernels:
                row[lang] = kernel_status(public, lang, device_type) or "yes"
        if op.torch:
            row["torch"] = "yes" if device_type in ORDER else "runs on CPU and CUDA tensors"
        row["reference"] = "yes"
        out[public] = row
    return out


def auto_rule(device_type: str) -> str:
    if POLICY.get(device_type) == "measure":
        return "the fastest of the candidates that cover the call, timed once per op and shape class"
    return "the first of " + " > ".join(ORDER.get(device_type, ("reference",))) + " that covers the call"


def markdown_table() -> str:
    """The op table of docs/architecture.md, made from TABLE."""
    def langs(op, device):
        names = {"cpu": "C++", "cuda": "CUDA C++", "triton": "Triton"}
        have = [f"{names[lang]} (`{lang}`)" for lang in ORDER[device] if lang in op.kernels
                and (device == "cuda") == (lang != "cpu")]
        if op.torch:
            have.append("PyTorch (`torch`)")
        return ", ".join(have + ["`reference`"])

    lines = ["| op | custom ops | CPU | CUDA | PyTorch's op (`torch`) |", "|---|---|---|---|---|"]
    for public, op in TABLE.items():
        lines.append(f"| `{public}` | {', '.join(f'`{s}`' for s in op.schema)} | {langs(op, 'cpu')} | "
                     f"{langs(op, 'cuda')} | {op.doc if op.torch else '—'} |")
    return "\n".join(lines)


DOC_BEGIN, DOC_END = "<!-- dispatch table: begin (python scripts/dispatch_table.py --write) -->", \
    "<!-- dispatch table: end -->"


def _docs_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "architecture.md")


def docs_table_in_file(path: str | None = None) -> str | None:
    text = open(path or _docs_path()).read()
    if DOC_BEGIN not in text or DOC_END not in text:
        return None
    return text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip()


def write_docs_table(path: str | None = None):
    path = path or _docs_path()
    text = open(path).read()
    head, rest = text.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{DOC_BEGIN}\n{markdown_table()}\n{DOC_END}{tail}")

