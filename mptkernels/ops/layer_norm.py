"""LayerNorm / RMSNorm with an optional fused residual add: the Python API of the family.

The ops ``torch.ops.mptkernels.layer_norm_fwd`` / ``layer_norm_bwd`` (schemas in
csrc/registration.cpp) have a C++ CPU kernel; on CUDA the kernel registered below picks
the CUDA C++ or the Triton implementation (mptkernels._backend.choose_gpu_impl).
"""
from __future__ import annotations

import functools

import numbers

import torch

from .. import _backend, reference
from .._loader import build_info

CAST_MODES = reference.CAST_MODES
_ops = torch.ops.mptkernels
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
    return _norm(x, weight, bias, eps, residual, cast, rms_norm=False, name="layer_norm")


def rms_norm(x, weight=None, eps=1e-6, residual=None, *, cast="torch"):
    """RMSNorm over the last dim (no mean subtraction, no bias); same arguments and result as layer_norm."""
    return _norm(x, weight, None, eps, residual, cast, rms_norm=True, name="rms_norm")


def _check(x, weight, bias, residual, eps, cast, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension")
    n = x.shape[-1]
    if not 1 <= n <= MAX_COLS:
        raise ValueError(f"{name}: x's last dim must be in 1..{MAX_COLS}, got {n}")
    for t, arg in ((weight, "weight"), (bias, "bias")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor or None, got {type(t).__name__}")
        if t.shape != (n,):
            raise ValueError(f"{name}: {arg} must have shape ({n},) (x's last dim), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name}: {arg} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but x is on {x.device}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{name}: bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{name}: residual must be a tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{name}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{name}: residual is on {residual.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps}")
    if cast not in CAST_MODES:
        raise ValueError(f"{name}: cast must be one of {CAST_MODES}, got {cast!r}")


def _rows(t):
    """(..., N) -> contiguous (rows, N), a view when the layout allows."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.is_contiguous() else t2.contiguous()


def _norm(x, weight, bias, eps, residual, cast, rms_norm, name):
    _check(x, weight, bias, residual, eps, cast, name)
    if cast == "mpt":  # MPT's LPLayerNorm rounds the affine parameters to the activation dtype
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    if _backend.use_reference(x.device, has_kernel=x.device.type == "cuda" and _has_gpu_kernel()):
        fn = reference.rms_norm if rms_norm else reference.layer_norm
        args = (x, weight, eps, residual) if rms_norm else (x, weight, bias, eps, residual)
        return fn(*args, cast="torch" if cast == "mpt" else cast)  # mpt's rounding is done above
    if x.device.type == "cuda" and x.dtype == torch.float64:
        raise TypeError(f"{name}: float64 runs on the CPU only; on CUDA use float32, float16 or bfloat16")
    y, s, _, _ = _ops.layer_norm_fwd(
        _rows(x), None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
        None if residual is None else _rows(residual), float(eps), rms_norm, 1.0 if cast == "gemma" else 0.0,
        cast == "llama")
    y = y.view(x.shape)
    return y if residual is None else (y, s.view(x.shape))


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


for _name, _fake in (("layer_norm_fwd", _fake_fwd), ("cuda_layer_norm_fwd", _fake_fwd),
                     ("layer_norm_bwd", _fake_bwd), ("cuda_layer_norm_bwd", _fake_bwd)):
    torch.library.register_fake(f"mptkernels::{_name}")(_fake)


# ---- autograd: the backward is itself a custom op
def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms_norm, weight_offset, cast_before_weight = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, bias, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.flags = (rms_norm, weight_offset, cast_before_weight)


def _backward(ctx, dy, dresidual_out, _dmean, _drstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    rms_norm, weight_offset, cast_before_weight = ctx.flags
    if dy is None:
        dy = torch.zeros_like(s)
    if not ctx.has_residual:  # residual_out was an empty placeholder; its gradient means nothing
        dresidual_out = None
    dx, dweight, dbias = _ops.layer_norm_bwd(dy.contiguous(), None if dresidual_out is None
                                             else dresidual_out.contiguous(), s, weight, bias, mean, rstd,
                                             rms_norm, weight_offset, cast_before_weight)
    return (dx, dweight if weight is not None else None, dbias if bias is not None else None,
            dx if ctx.has_residual else None, None, None, None, None)


torch.library.register_autograd("mptkernels::layer_norm_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mptkernels layer_norm/rms_norm: double backward (a gradient of the gradient) is not "
                       "supported; use mptkernels.backend('reference') for it")


torch.library.register_autograd("mptkernels::layer_norm_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---- CUDA: choose between the CUDA C++ kernels and the Triton kernels
@torch.compiler.assume_constant_result  # torch.compile keeps the answer as a constant
def _has_gpu_kernel() -> bool:
    from ..triton import available as triton_available

    return build_info.with_cuda or triton_available()


@functools.lru_cache(maxsize=None)  # per call it would rebuild the dict and re-import
def _gpu_impls(kind: str) -> dict:
    from ..triton import available as triton_available

    impls = {}
    if build_info.with_cuda:
        impls["cuda"] = getattr(_ops, f"cuda_layer_norm_{kind}")
    if triton_available():
        from ..triton import layer_norm as tl_norm

        impls["triton"] = getattr(tl_norm, f"layer_norm_{kind}")
    return impls


def _shape_key(t, weight, flag):
    m, n = t.shape
    return (t.dtype, n, max(m, 1).bit_length(), None if weight is None else weight.dtype, flag)


@torch.library.register_kernel("mptkernels::layer_norm_fwd", "cuda")
def _(x, weight, bias, residual, eps, rms_norm, weight_offset, cast_before_weight):
    args = (x, weight, bias, residual, eps, rms_norm, weight_offset, cast_before_weight)
    fn = _backend.choose_gpu_impl("layer_norm_fwd", _shape_key(x, weight, residual is not None),
                                  _gpu_impls("fwd"), args)
    return fn(*args)


@torch.library.register_kernel("mptkernels::layer_norm_bwd", "cuda")
def _(dy, dresidual_out, s, weight, bias, mean, rstd, rms_norm, weight_offset, cast_before_weight):
    args = (dy, dresidual_out, s, weight, bias, mean, rstd, rms_norm, weight_offset, cast_before_weight)
    fn = _backend.choose_gpu_impl("layer_norm_bwd", _shape_key(s, weight, dresidual_out is not None),
                                  _gpu_impls("bwd"), args)
    return fn(*args)
