"""The GEMM family: linear with a fused bias + activation epilogue, row-wise int8
quantisation, W8A8 and weight-only int8 linears.

Schemas in csrc/registration.cpp. CPU kernels: csrc/cpu/gemm.cpp (C++). CUDA: Triton
(mptkernels/triton/gemm.py) for the GEMMs; quantize_rowwise in CUDA C++ (csrc/cuda/gemm.cu)
when the package was built with CUDA, else Triton. Without either, CUDA tensors take the
reference path (mptkernels.info() says which).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math

import torch

from .. import _backend, reference
from .._loader import build_info

_ops = torch.ops.mptkernels
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = reference.ACTIVATIONS


def _rows(x):
    """x (..., K) as a (rows, K) matrix; also for K = 0, where reshape(-1, 0) is ambiguous."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def linear(x, weight, bias=None, activation=None):
    """``act(x @ weight.T + bias)`` with the bias and activation fused into the GEMM's epilogue.

    x: (..., K) float; weight: (N, K) in x's dtype (nn.Linear's layout); bias: (N,) or None;
    activation: None, "relu", "gelu" (exact erf, MPT's FFN) or "gelu_tanh". fp32 accumulation;
    the result is rounded once to x's dtype. Any leading dims, any M including 1.
    Differentiable in x, weight and bias: the backward multiplies by the activation's
    derivative in one elementwise pass (from the pre-activation the forward keeps for the
    gelus, from the output for relu), then two GEMMs.
    """
    _check_linear(x, weight, bias, activation)
    act = activation or "none"
    lead = x.shape[:-1]
    x2 = _rows(x)
    if x.dtype not in _FLOAT or _backend.use_reference(x.device, has_kernel=_has_triton()):
        return reference.linear(x, weight, bias, activation)
    out, _ = _ops.linear_fwd(x2, weight, bias, act)
    return out.reshape(*lead, weight.shape[0])


def quantize_rowwise(x):
    """Symmetric int8 quantisation of each row (the last dim) of x.

    Returns ``(x_int8, scale)``: scale = absmax / 127 in float32 with shape x.shape[:-1] (an
    all-zero row gets scale 1 and zeros, never NaN); x_int8 = round-half-to-even(x / scale)
    clamped to [-127, 127], x's shape. One pass over x. Not differentiable: the outputs never
    require grad (as a quantiser of weights that do).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach()
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("quantize_rowwise: x must be a tensor with at least one dim")
    if x.dtype not in _FLOAT:
        raise TypeError(f"quantize_rowwise: x must be float32, float16 or bfloat16, got {x.dtype}")
    has_kernel = build_info.with_cuda or _has_triton()
    if _backend.use_reference(x.device, has_kernel=has_kernel):
        return reference.quantize_rowwise(x)
    q, scale = _ops.quantize_rowwise(_rows(x))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def int8_linear(x, w_int8, w_scale, bias=None, activation=None):
    """W8A8 linear: x quantised per token (``quantize_rowwise``), int8 x int8 products with
    int32 accumulation, and an epilogue ``act(acc * x_scale[m] * w_scale[n] + bias[n])`` in x's
    dtype. ``w_int8, w_scale = quantize_rowwise(weight)`` of an (N, K) weight.
    Differentiable in x and bias: x's gradient is straight-through the activation quantisation
    (as bitsandbytes' int8 matmul), i.e. that of ``act(x @ w.T + bias)`` with the dequantised
    weight ``w = w_int8 * w_scale[:, None]`` (the gelus recompute their pre-activation). The
    int8 weight and its scale get no gradient.
    """
    _check_int8(x, w_int8, w_scale, bias, "int8_linear")
    _check_activation(activation)
    if _backend.use_reference(x.device, has_kernel=_has_triton()):
        return reference.int8_linear(x, w_int8, w_scale, bias, activation)
    out = _ops.int8_linear(_rows(x), w_int8, w_scale, bias, activation or "none")
    return out.reshape(*x.shape[:-1], w_int8.shape[0])


def weight_only_int8_linear(x, w_int8, w_scale, bias=None):
    """``x @ (w_int8 * w_scale[:, None]).T + bias`` with x in its own dtype and the weight
    dequantised on the fly (never materialised): for decoding, where reading the weight is the
    whole cost and int8 halves it. Differentiable in x and bias (dx = dout @ the dequantised
    weight, e.g. for adapters trained on a frozen int8 model); w_int8 and w_scale get none."""
    _check_int8(x, w_int8, w_scale, bias, "weight_only_int8_linear")
    if _backend.use_reference(x.device, has_kernel=_has_triton()):
        return reference.weight_only_int8_linear(x, w_int8, w_scale, bias)
    out = _ops.weight_only_int8_linear(_rows(x), w_int8, w_scale, bias)
    return out.reshape(*x.shape[:-1], w_int8.shape[0])


# ---- argument checks (clear errors before any kernel sees the tensors)
def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_linear(x, weight, bias, activation):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise TypeError("linear: x must be a float tensor (..., K)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("linear: weight must be a (N, K) tensor")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: weight is (N, K) = {tuple(weight.shape)} but x has K = {x.shape[-1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"linear: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"linear: weight is on {weight.device} but x is on {x.device}")
    _check_bias(bias, weight.shape[0], x, "linear")
    _check_activation(activation)


def _check_bias(bias, n, x, op):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or not bias.is_floating_point():
        raise ValueError(f"{op}: bias must be a float ({n},) tensor, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")


def _check_int8(x, w_int8, w_scale, bias, op):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT:
        raise TypeError(f"{op}: x must be a float32, float16 or bfloat16 tensor (..., K), got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(w_int8, torch.Tensor) or w_int8.dim() != 2 or w_int8.dtype != torch.int8:
        raise TypeError(f"{op}: w_int8 must be an int8 (N, K) tensor (quantize_rowwise of the weight), got "
                        f"{getattr(w_int8, 'dtype', type(w_int8).__name__)} {tuple(getattr(w_int8, 'shape', ()))}")
    if w_int8.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: w_int8 is (N, K) = {tuple(w_int8.shape)} but x has K = {x.shape[-1]}")
    n = w_int8.shape[0]
    if (not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32
            or tuple(w_scale.shape) != (n,)):
        raise ValueError(f"{op}: w_scale must be a float32 ({n},) tensor, got "
                         f"{getattr(w_scale, 'dtype', type(w_scale).__name__)} {tuple(getattr(w_scale, 'shape', ()))}")
    for t, name in ((w_int8, "w_int8"), (w_scale, "w_scale")):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if w_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: w_scale requires grad, but gradients flow to x and bias only; pass w_scale.detach()")
    _check_bias(bias, n, x, op)


@functools.lru_cache(maxsize=None)
def _triton_gemm():
    """mptkernels.triton.gemm when it exists and can launch, else None."""
    from ..triton import available

    if not available() or importlib.util.find_spec("mptkernels.triton.gemm") is None:
        return None
    return importlib.import_module("mptkernels.triton.gemm")


@torch.compiler.assume_constant_result  # torch.compile keeps the answer as a constant
def _has_triton() -> bool:
    return _triton_gemm() is not None


# ---- fake kernels (shapes for torch.compile and meta tensors)
@torch.library.register_fake("mptkernels::linear_fwd")
def _(x, weight, bias, activation):
    m, n = x.shape[0], weight.shape[0]
    keep = activation in ("gelu", "gelu_tanh")
    return x.new_empty((m, n)), x.new_empty((m, n) if keep else (0,))


@torch.library.register_fake("mptkernels::linear_bwd")
def _(dout, x, weight, saved, activation, has_bias):
    db = dout.new_empty((weight.shape[0],) if has_bias else (0,), dtype=torch.float32 if x.dtype != torch.float64
                        else torch.float64)
    return torch.empty_like(x), torch.empty_like(weight), db


@torch.library.register_fake("mptkernels::quantize_rowwise")
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.register_fake("mptkernels::int8_mm")
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.register_fake("mptkernels::int8_linear")
def _(x, w_int8, w_scale, bias, activation):
    return x.new_empty((x.shape[0], w_int8.shape[0]))


@torch.library.register_fake("mptkernels::weight_only_int8_linear")
def _(x, w_int8, w_scale, bias):
    return x.new_empty((x.shape[0], w_int8.shape[0]))


# ---- autograd of linear
def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, activation = inputs
    out, preact = output
    saved = preact if activation in ("gelu", "gelu_tanh") else out if activation == "relu" else preact
    ctx.save_for_backward(x, weight, saved)
    ctx.activation = activation
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, dout, _dpreact):
    x, weight, saved = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    dx, dw, db = _ops.linear_bwd(dout.contiguous(), x, weight, saved, ctx.activation, has_bias)
    return dx, dw, (db.to(ctx.bias_dtype) if has_bias else None), None


torch.library.register_autograd("mptkernels::linear_fwd", _linear_backward, setup_context=_linear_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mptkernels linear: double backward is not supported; use mptkernels.backend('reference')")


torch.library.register_autograd("mptkernels::linear_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- autograd of the int8 linears: dx through the dequantised weight (straight-through the
# activation quantisation of int8_linear), dbias; none for the int8 weight and its scale
def _int8_setup_context(ctx, inputs, output):
    x, w_int8, w_scale, bias, *rest = inputs
    ctx.activation = rest[0] if rest else "none"  # weight_only_int8_linear has no activation
    gelu = ctx.activation in ("gelu", "gelu_tanh")
    # relu's derivative reads the output's sign; the gelus recompute their pre-activation
    ctx.save_for_backward(w_int8, w_scale, x if gelu else None, bias if gelu else None,
                          output if ctx.activation == "relu" else None)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _int8_backward(ctx, dout):
    w_int8, w_scale, x, bias, out = ctx.saved_tensors
    if ctx.activation == "relu":
        dpre = reference.activation_grad(dout, out, "relu")
    elif ctx.activation in ("gelu", "gelu_tanh"):
        dpre = reference.activation_grad(dout, _ops.int8_linear(x, w_int8, w_scale, bias, "none"), ctx.activation)
    else:
        dpre = dout
    dx = db = None
    if ctx.needs_input_grad[0]:
        dx = dpre @ reference.dequantize(w_int8, w_scale).to(dpre.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        db = dpre.float().sum(0).to(ctx.bias_dtype)
    return (dx, None, None, db) + ((None,) if len(ctx.needs_input_grad) == 5 else ())


torch.library.register_autograd("mptkernels::int8_linear", _int8_backward, setup_context=_int8_setup_context)
torch.library.register_autograd("mptkernels::weight_only_int8_linear", _int8_backward,
                                setup_context=_int8_setup_context)


# ---- CUDA: Triton GEMMs (quantize_rowwise: CUDA C++ when built, registered in csrc/cuda/gemm.cu)
@torch.library.register_kernel("mptkernels::linear_fwd", "cuda")
def _(x, weight, bias, activation):
    return _triton_gemm().linear_fwd(x.contiguous(), weight.contiguous(), bias, activation)


@torch.library.register_kernel("mptkernels::linear_bwd", "cuda")
def _(dout, x, weight, saved, activation, has_bias):
    # the activation's derivative in one fused elementwise pass, then cuBLAS for the GEMMs
    dpre = dout if activation == "none" else _triton_gemm().activation_bwd(dout, saved, activation)
    dx = dpre @ weight
    dw = dpre.t() @ x
    db = dpre.float().sum(0) if has_bias else dout.new_empty((0,), dtype=torch.float32)
    return dx, dw, db


if not build_info.with_cuda:
    @torch.library.register_kernel("mptkernels::quantize_rowwise", "cuda")
    def _(x):
        return _triton_gemm().quantize_rowwise(x.contiguous())


@torch.library.register_kernel("mptkernels::int8_mm", "cuda")
def _(a, b):
    return _triton_gemm().int8_mm(a.contiguous(), b.contiguous())


@torch.library.register_kernel("mptkernels::int8_linear", "cuda")
def _(x, w_int8, w_scale, bias, activation):
    xq, xs = _ops.quantize_rowwise(x.contiguous())
    return _triton_gemm().int8_linear(xq, xs, w_int8.contiguous(), w_scale.contiguous(), bias, activation, x.dtype)


@torch.library.register_kernel("mptkernels::weight_only_int8_linear", "cuda")
def _(x, w_int8, w_scale, bias):
    return _triton_gemm().weight_only_int8_linear(x.contiguous(), w_int8.contiguous(), w_scale.contiguous(), bias)
