"""LayerNorm / RMSNorm with an optional fused residual add: the Python API of the family.

Custom ops ``torch.ops.mptkernels.layer_norm_fwd`` / ``layer_norm_bwd`` (schemas in
csrc/registration.cpp). Their implementations (C++ CPU, CUDA C++, Triton; and PyTorch's
F.layer_norm / F.rms_norm at the level of the public functions) and the choice between them
are in mptkernels/_dispatch.py; this module checks arguments, gives the fake kernels and the
autograd, and says which calls PyTorch's op covers.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _dispatch, reference, torch_impl

CAST_MODES = ("torch", "llama", "gemma", "mpt")
_ops = _dispatch.CUSTOM_OPS  # torch.ops.mptkernels, called directly where nothing else would run
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_COLS = 65536


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None, *, cast="torch"):
    """LayerNorm over the last dim of ``x``, optionally of ``x + residual``.

    x: (..., N) float32/float16/bfloat16 (float64 on the CPU), any leading shape, N in 1..65536.
    weight, bias: None or (N,) in x's dtype or float32. residual: None or x's shape and dtype.
    Statistics are float32. With ``residual`` it returns ``(out, residual_out)`` where
    ``residual_out = x + residual`` (summed in fp32, stored in x's dtype, and what is normalised):
    the pre-norm residual stream in one pass. ``cast`` picks where the result is rounded:
    "torch" (default, = torch.nn.LayerNorm), "llama" (round the normalised value to x's dtype,
    then multiply by the weight), "gemma" (multiply by 1 + weight in fp32) or "mpt"
    (weight and bias rounded to x's dtype first, as MPT's low-precision LayerNorm).
    """
    return _norm(x, weight, bias, eps, residual, cast, rms_norm=False)


def rms_norm(x, weight=None, eps=1e-6, residual=None, *, cast="torch"):
    """RMSNorm over the last dim (no mean subtraction, no bias); same arguments and result as layer_norm."""
    return _norm(x, weight, None, eps, residual, cast, rms_norm=True)


def _name(rms_norm: bool) -> str:
    return "rms_norm" if rms_norm else "layer_norm"


def _check_tensor(t, arg, op, optional=True):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")


def _check_fwd(x, weight, bias, residual, eps, rms_norm, weight_offset, cast_before_weight):
    """The one check of layer_norm_fwd's arguments (also of the public functions' after flattening)."""
    op = _name(rms_norm)
    _check_tensor(x, "x", op, optional=False)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"{op}: x must be a contiguous (rows, cols) tensor here, got {tuple(x.shape)}")
    n = x.shape[1]
    if not 1 <= n <= MAX_COLS:
        raise ValueError(f"{op}: x's last dim must be in 1..{MAX_COLS}, got {n}")
    for t, arg in ((weight, "weight"), (bias, "bias")):
        if t is None:
            continue
        _check_tensor(t, arg, op)
        if t.shape != (n,):
            raise ValueError(f"{op}: {arg} must have shape ({n},) (x's last dim), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: {arg} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {arg} is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {arg} must be contiguous")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
    if residual is not None:
        _check_tensor(residual, "residual", op)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{op}: residual is on {residual.device} but x is on {x.device}")
        if not residual.is_contiguous():
            raise ValueError(f"{op}: residual must be contiguous here")
    _check_eps(eps, op)


def _check_eps(eps, op):
    if not (type(eps) in (float, int) or isinstance(eps, numbers.Real) and not isinstance(eps, bool)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def _check_bwd(dy, dresidual_out, s, weight, bias, mean, rstd, rms_norm, weight_offset, cast_before_weight):
    op = _name(rms_norm) + " (backward)"
    _check_fwd(s, weight, bias, None, 0.0, rms_norm, weight_offset, cast_before_weight)
    m = s.shape[0]
    for t, arg in ((dy, "dy"), (dresidual_out, "dresidual_out")):
        if t is None and arg == "dresidual_out":
            continue
        _check_tensor(t, arg, op)
        if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device or not t.is_contiguous():
            raise ValueError(f"{op}: {arg} must be a contiguous {s.dtype} {tuple(s.shape)} tensor on {s.device}")
    stats = _stats_dtype(s)
    for t, arg, rows in ((mean, "mean", 0 if rms_norm else m), (rstd, "rstd", m)):
        _check_tensor(t, arg, op, optional=False)
        if t.shape != (rows,) or t.dtype != stats or t.device != s.device or not t.is_contiguous():
            raise ValueError(f"{op}: {arg} must be a contiguous {stats} ({rows},) tensor on {s.device}, got "
                             f"{t.dtype} {tuple(t.shape)}")


def _rows(t):
    """(..., N) -> contiguous (rows, N), a view when the layout allows (N = 0 too)."""
    t2 = t.reshape(t.numel() // t.shape[-1] if t.shape[-1] else math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.is_contiguous() else t2.contiguous()


def _norm(x, weight, bias, eps, residual, cast, rms_norm):
    name = _name(rms_norm)
    _check_tensor(x, "x", name, optional=False)
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension")
    if cast not in CAST_MODES:
        raise ValueError(f"{name}: cast must be one of {CAST_MODES}, got {cast!r}")
    if isinstance(residual, torch.Tensor) and residual.shape != x.shape:
        raise ValueError(f"{name}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_eps(eps, name)  # a float of the op's schema: the dispatcher would refuse anything else first
    for t, arg in ((weight, "weight"), (bias, "bias"), (residual, "residual")):
        _check_tensor(t, arg, name)
    if cast == "mpt":  # MPT's LPLayerNorm rounds the affine parameters to the activation dtype
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    base_cast = "torch" if cast == "mpt" else cast  # mpt's rounding is done above
    weight_offset, cast_before = (1.0 if cast == "gemma" else 0.0), cast == "llama"

    def schema_args(x, weight, bias, residual):
        return (_rows(x), None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
                None if residual is None else _rows(residual), eps, rms_norm, weight_offset, cast_before)

    args = schema_args(x, weight, bias, residual)
    user = (x, weight, bias, residual)

    def kernel(x, weight, bias, residual):
        # the call's own tensors (timing runs on copies): their flattened views are made already
        y, s, _, _ = _ops.layer_norm_fwd.default(*(args if x is user[0] else schema_args(x, weight, bias, residual)))
        return y.view(x.shape) if residual is None else (y.view(x.shape), s.view(x.shape))

    if rms_norm:
        torch_why = lambda: torch_impl.covers_rms_norm(x, weight, cast)  # noqa: E731
        torch_fn = lambda x, w, b, r: torch_impl.rms_norm(x, w, eps, r)  # noqa: E731
        ref = lambda x, w, b, r: reference.rms_norm(x, w, eps, r, cast=base_cast)  # noqa: E731
    else:
        torch_why = lambda: torch_impl.covers_layer_norm(x, weight, bias, cast)  # noqa: E731
        torch_fn = lambda x, w, b, r: torch_impl.layer_norm(x, w, b, eps, r)  # noqa: E731
        ref = lambda x, w, b, r: reference.layer_norm(x, w, b, eps, r, cast=base_cast)  # noqa: E731
    return _dispatch.route(name, user, device=x.device, dtype=x.dtype, torch_why=torch_why,
                           shape_class=lambda: _shape_class(args[0], weight, residual is not None),
                           kernel=kernel, torch_fn=torch_fn, reference=ref, check=lambda: _check_fwd(*args))


def _shape_class(t, weight, flag):
    """Calls of one class share one measured choice: dtype, row width, log2 of the row count,
    weight dtype, residual (forward) or its gradient (backward)."""
    m, n = t.shape
    return (t.dtype, n, max(m, 1).bit_length(), None if weight is None else weight.dtype, flag)


# ---- fake (meta) kernels: shapes and dtypes only, for torch.compile and opcheck
def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_fwd(x, weight, bias, residual, eps, rms_norm, weight_offset, cast_before_weight):
    m = x.shape[0]
    return (torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0),
            x.new_empty(0 if rms_norm else m, dtype=_stats_dtype(x)), x.new_empty(m, dtype=_stats_dtype(x)))


def _fake_bwd(dy, dresidual_out, s, weight, bias, mean, rstd, rms_norm, weight_offset, cast_before_weight):
    return (torch.empty_like(s), torch.empty_like(weight) if weight is not None else s.new_empty(0),
            torch.empty_like(bias) if bias is not None else s.new_empty(0))


_dispatch.register(_dispatch.Schema(
    "layer_norm_fwd", check=_check_fwd, public_of=lambda a: _name(a[5]), dtype_of=lambda a: a[0].dtype,
    shape_class=lambda a: _shape_class(a[0], a[1], a[3] is not None), fake=_fake_fwd))
_dispatch.register(_dispatch.Schema(
    "layer_norm_bwd", check=_check_bwd, public_of=lambda a: _name(a[7]), dtype_of=lambda a: a[2].dtype,
    shape_class=lambda a: _shape_class(a[2], a[3], a[1] is not None), fake=_fake_bwd))


# ---- autograd: the backward is itself a custom op, run under the forward's forcing
def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms_norm, weight_offset, cast_before_weight = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, bias, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.flags = (rms_norm, weight_offset, cast_before_weight)
    ctx.forced = _dispatch.forced_settings()


def _backward(ctx, dy, dresidual_out, _dmean, _drstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    rms_norm, weight_offset, cast_before_weight = ctx.flags
    if dy is None:
        dy = torch.zeros_like(s)
    if not ctx.has_residual:  # residual_out was an empty placeholder; its gradient means nothing
        dresidual_out = None
    with _dispatch.restored(ctx.forced):
        dx, dweight, dbias = _ops.layer_norm_bwd.default(dy.contiguous(), None if dresidual_out is None
                                                 else dresidual_out.contiguous(), s, weight, bias, mean, rstd,
                                                 rms_norm, weight_offset, cast_before_weight)
    return (dx, dweight if weight is not None else None, dbias if bias is not None else None,
            dx if ctx.has_residual else None, None, None, None, None)


torch.library.register_autograd("mptkernels::layer_norm_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mptkernels layer_norm/rms_norm: double backward (a gradient of the gradient) is not "
                       "supported; use mptkernels.backend('reference') for it")


torch.library.register_autograd("mptkernels::layer_norm_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
