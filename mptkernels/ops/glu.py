"""SwiGLU and GeGLU, the gated activations of Llama/Mistral (SwiGLU) and Gemma/T5 v1.1 (GeGLU)
FFNs: the Python API of the family.

Custom ops ``torch.ops.mptkernels.glu_fwd`` / ``glu_bwd`` (schemas in csrc/registration.cpp),
one pair for both public ops (the activation is an argument, as layer_norm_fwd serves
layer_norm and rms_norm). Their implementations (C++ CPU, Triton; and PyTorch's
``F.silu(gate) * up`` / ``F.gelu(gate) * up`` at the level of the public functions) and the
choice between them are in mptkernels/_dispatch.py; this module checks arguments, gives the fake
kernels and the autograd. The backward recomputes act(gate) from gate and up (as Liger-Kernel's
swiglu/geglu do): the forward saves its inputs and nothing else.
"""
from __future__ import annotations

import math

import torch

from .. import _dispatch, reference, torch_impl

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # the schema's activation names
APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}  # geglu's approximate= (F.gelu's) -> activation
_ops = _dispatch.CUSTOM_OPS  # torch.ops.mptkernels, called directly where nothing else would run
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def swiglu(gate, up):
    """``silu(gate) * up`` (SwiGLU: ``F.silu(gate) * up``), one pass each way.

    gate, up: (..., N) of one shape, dtype (float32, float16, bfloat16; float64 on the CPU) and
    device, any leading dims. The maths is fp32 (fp64 for float64) and the result is rounded once
    to the inputs' dtype: a new contiguous tensor of gate's shape. Inputs whose last dim has unit
    stride are read in place, any row stride (e.g. ``gate, up = h.chunk(2, -1)`` of a fused
    projection); others are made contiguous first. Differentiable in gate and up: the backward
    reads dout, gate and up once and writes both gradients, recomputing silu(gate).
    """
    return _glu(gate, up, "silu")


def geglu(gate, up, approximate="none"):
    """``gelu(gate, approximate) * up`` (GeGLU: ``F.gelu(gate, approximate=approximate) * up``).

    approximate: "none" (exact, erf) or "tanh" (the tanh approximation), as ``F.gelu``'s.
    Shapes, dtypes, strides and gradients as ``swiglu``.
    """
    if not isinstance(approximate, str) or approximate not in APPROXIMATE:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _glu(gate, up, APPROXIMATE[approximate])


def _public(activation) -> str:
    return "swiglu" if activation == "silu" else "geglu"


def _check_user(gate, up, op):
    """The public arguments: two tensors of one shape, dtype and device."""
    for t, name in ((gate, "gate"), (up, "up")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{op}: {name} must have at least one dimension (..., N), got a 0-dim tensor")
    if gate.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: gate must be float32, float16, bfloat16 or float64, got {gate.dtype}")
    if up.shape != gate.shape:
        raise ValueError(f"{op}: up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"{op}: up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"{op}: up is on {up.device} but gate is on {gate.device}")


def _check_rows(t, name, op):
    """What the kernels read: a (rows, N) matrix of unit stride along N (any row stride)."""
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D (rows, N) tensor here, got {tuple(t.shape)}")
    if t.stride(1) != 1 and t.shape[1] > 1 and t.numel():
        raise ValueError(f"{op}: {name}'s last dim must have stride 1 here, got strides {t.stride()}")


def _check_activation(activation, op):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_fwd(gate, up, activation):
    """The one check of glu_fwd's arguments (also of the public functions' after flattening)."""
    _check_activation(activation, "glu_fwd")
    op = _public(activation)
    _check_user(gate, up, op)
    _check_rows(gate, "gate", op)
    _check_rows(up, "up", op)


def _check_bwd(dout, gate, up, activation):
    _check_fwd(gate, up, activation)
    op = _public(activation) + " (backward)"
    if not isinstance(dout, torch.Tensor) or dout.shape != gate.shape or dout.dtype != gate.dtype \
            or dout.device != gate.device:
        got = f"{dout.dtype} {tuple(dout.shape)}" if isinstance(dout, torch.Tensor) else type(dout).__name__
        raise ValueError(f"{op}: dout must be a {gate.dtype} {tuple(gate.shape)} tensor on {gate.device}, got {got}")
    _check_rows(dout, "dout", op)


def _rows(t):
    """(..., N) -> (rows, N) of unit stride along N: a view where the layout allows (a chunk()
    of a wider tensor stays one), else a contiguous copy."""
    n = t.shape[-1]
    t2 = t.reshape(math.prod(t.shape[:-1]), n)
    return t2 if t2.stride(1) == 1 or n <= 1 else t2.contiguous()


def _shape_class(t, activation):
    """Calls of one class share one measured choice: dtype, row width, log2 of the rows, activation."""
    m, n = t.shape[0], t.shape[-1]
    return (t.dtype, n, max(m, 1).bit_length(), activation)


def _glu(gate, up, activation):
    name = _public(activation)
    _check_user(gate, up, name)
    shape = gate.shape
    args = (_rows(gate), _rows(up), activation)
    user = (gate, up)

    def kernel(gate, up):
        # the call's own tensors (timing runs on copies): their flattened views are made already
        a = args if gate is user[0] else (_rows(gate), _rows(up), activation)
        return _ops.glu_fwd.default(*a).view(shape)

    if activation == "silu":
        torch_fn, ref = torch_impl.swiglu, reference.swiglu
    else:
        approx = "none" if activation == "gelu" else "tanh"
        torch_fn = lambda g, u: torch_impl.geglu(g, u, approx)  # noqa: E731
        ref = lambda g, u: reference.geglu(g, u, approx)  # noqa: E731
    return _dispatch.route(name, user, device=gate.device, dtype=gate.dtype, torch_why=_dispatch.torch_covers,
                           shape_class=lambda: _shape_class(args[0], activation), kernel=kernel, torch_fn=torch_fn,
                           reference=ref, check=lambda: _check_fwd(*args))


# ---- fake (meta) kernels: shapes and dtypes only, for torch.compile and opcheck
def _fake_fwd(gate, up, activation):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def _fake_bwd(dout, gate, up, activation):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(gate.shape, dtype=gate.dtype, device=gate.device))


_dispatch.register(_dispatch.Schema(
    "glu_fwd", check=_check_fwd, public_of=lambda a: _public(a[2]), dtype_of=lambda a: a[0].dtype,
    shape_class=lambda a: _shape_class(a[0], a[2]), fake=_fake_fwd))
_dispatch.register(_dispatch.Schema(
    "glu_bwd", check=_check_bwd, public_of=lambda a: _public(a[3]), dtype_of=lambda a: a[1].dtype,
    shape_class=lambda a: _shape_class(a[1], a[3]), fake=_fake_bwd))


# ---- autograd: the backward is itself a custom op, run under the forward's forcing; it
# recomputes act(gate), so only the inputs are saved
def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation
    ctx.forced = _dispatch.forced_settings()


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    if dout.stride(-1) != 1 and dout.shape[-1] > 1:  # incoming gradients may be expanded views
        dout = dout.contiguous()
    with _dispatch.restored(ctx.forced):
        dgate, dup = _ops.glu_bwd.default(dout, gate, up, ctx.activation)
    return (dgate if ctx.needs_input_grad[0] else None, dup if ctx.needs_input_grad[1] else None, None)


torch.library.register_autograd("mptkernels::glu_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mptkernels swiglu/geglu: double backward (a gradient of the gradient) is not supported; "
                       "use mptkernels.backend('reference') for it")


torch.library.register_autograd("mptkernels::glu_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
