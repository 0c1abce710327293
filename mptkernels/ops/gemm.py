"""The GEMM family: linear with a fused bias + activation epilogue, row-wise int8
quantisation, W8A8 and weight-only int8 linears.

Custom ops ``linear_fwd`` / ``linear_bwd``, ``quantize_rowwise``, ``int8_mm``, ``int8_linear``
and ``weight_only_int8_linear`` (schemas in csrc/registration.cpp). Their implementations (C++
CPU, Triton, CUDA C++ for quantize_rowwise; PyTorch's F.linear / torch._int_mm at the level of
the public functions) and the choice between them are in mptkernels/_dispatch.py; this module
checks arguments, gives the fake kernels and the autograd.
"""
from __future__ import annotations

import math

import torch

from .. import _dispatch, reference, torch_impl
from .activations import ACTIVATIONS, activation_grad, check_activation

_ops = _dispatch.CUSTOM_OPS  # torch.ops.mptkernels, called directly where nothing else would run
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
# int8 products accumulate in int32: K * 127 * 127 must stay below 2**31 (every implementation)
INT8_MAX_K = 130000


def _rows(x):
    """x (..., K) as a (rows, K) matrix; also for K = 0, where reshape(-1, 0) is ambiguous."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _gemm_class(x, n, *flags):
    """Calls of one class share one measured choice: dtype, log2 of the rows, K, N, flags."""
    k = x.shape[-1]
    return (x.dtype, max(x.numel() // max(k, 1), 1).bit_length(), k, n) + flags


def linear(x, weight, bias=None, activation=None):
    """``act(x @ weight.T + bias)`` with the bias and activation fused into the GEMM's epilogue.

    x: (..., K) float; weight: (N, K) in x's dtype (nn.Linear's layout); bias: (N,) or None;
    activation: None, "relu", "gelu" (exact erf, MPT's FFN) or "gelu_tanh". fp32 accumulation;
    the result is rounded once to x's dtype. Any leading dims, any M including 1.
    Differentiable in x, weight and bias: the backward multiplies by the activation's
    derivative in one elementwise pass (from the pre-activation the forward keeps for the
    gelus, from the output for relu), then two GEMMs.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        _check_linear(x, weight, bias, activation)  # says which (the op's check runs on the chosen path)
    act = check_activation(activation, "linear")  # a str of the schema: the dispatcher refuses others first

    def kernel(x, weight, bias):
        out, _ = _ops.linear_fwd.default(_rows(x), weight, bias, act)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    return _dispatch.route("linear", (x, weight, bias), device=x.device, dtype=x.dtype,
                           torch_why=_dispatch.torch_covers,
                           shape_class=lambda: _gemm_class(x, weight.shape[0], act, bias is not None),
                           kernel=kernel, torch_fn=lambda x, w, b: torch_impl.linear(x, w, b, activation),
                           reference=lambda x, w, b: reference.linear(x, w, b, activation),
                           check=lambda: _check_linear(x, weight, bias, activation))


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
    _check_quantize(x)

    def kernel(x):
        rows = _rows(x)
        if rows.stride(1) != 1:  # the kernels take padded rows but not a strided last dim
            rows = rows.contiguous()
        q, scale = _ops.quantize_rowwise.default(rows)
        return q.reshape(x.shape), scale.reshape(x.shape[:-1])

    return _dispatch.route("quantize_rowwise", (x,), device=x.device, dtype=x.dtype, torch_why=_dispatch.no_torch_op,
                           shape_class=tuple,
                           kernel=kernel, torch_fn=None, reference=reference.quantize_rowwise)


def int8_mm(a, b):
    """The exact int8 GEMM core: a (M, K) int8 @ b (N, K)^T int8 -> (M, N) int32 (int32
    accumulation; K up to INT8_MAX_K). b in nn.Linear's (N, K) weight layout. Not differentiable."""
    _check_int8_mm(a, b)
    return _dispatch.route("int8_mm", (a, b), device=a.device, dtype=a.dtype,
                           torch_why=lambda: torch_impl.covers_int8_mm(a, b),
                           shape_class=lambda: _gemm_class(a, b.shape[0]),
                           kernel=_ops.int8_mm.default, torch_fn=torch_impl.int8_mm, reference=reference.int8_mm)


def int8_linear(x, w_int8, w_scale, bias=None, activation=None):
    """W8A8 linear: x quantised per token (``quantize_rowwise``), int8 x int8 products with
    int32 accumulation, and an epilogue ``act(acc * x_scale[m] * w_scale[n] + bias[n])`` in x's
    dtype. ``w_int8, w_scale = quantize_rowwise(weight)`` of an (N, K) weight.
    Differentiable in x and bias: x's gradient is straight-through the activation quantisation
    (as bitsandbytes' int8 matmul), i.e. that of ``act(x @ w.T + bias)`` with the dequantised
    weight ``w = w_int8 * w_scale[:, None]`` (the gelus recompute their pre-activation). The
    int8 weight and its scale get no gradient.
    """
    _int8_precheck(x, w_int8, w_scale, bias, "int8_linear")
    act = check_activation(activation, "int8_linear")

    def kernel(x, bias):
        out = _ops.int8_linear.default(_rows(x), w_int8, w_scale, bias, act)
        return out.reshape(*x.shape[:-1], w_int8.shape[0])

    return _dispatch.route("int8_linear", (x, bias), device=x.device, dtype=x.dtype,
                           torch_why=lambda: torch_impl.covers_int8_linear(x, w_int8),
                           shape_class=lambda: _gemm_class(x, w_int8.shape[0], act, bias is not None), kernel=kernel,
                           torch_fn=lambda x, b: torch_impl.int8_linear(x, w_int8, w_scale, b, activation),
                           reference=lambda x, b: reference.int8_linear(x, w_int8, w_scale, b, activation),
                           check=lambda: (_check_int8(x, w_int8, w_scale, bias, "int8_linear"),
                                          check_activation(activation, "int8_linear")))


def weight_only_int8_linear(x, w_int8, w_scale, bias=None):
    """``x @ (w_int8 * w_scale[:, None]).T + bias`` with x in its own dtype and the weight
    dequantised on the fly (never materialised): for decoding, where reading the weight is the
    whole cost and int8 halves it. Differentiable in x and bias (dx = dout @ the dequantised
    weight, e.g. for adapters trained on a frozen int8 model); w_int8 and w_scale get none."""
    _int8_precheck(x, w_int8, w_scale, bias, "weight_only_int8_linear")

    def kernel(x, bias):
        out = _ops.weight_only_int8_linear.default(_rows(x), w_int8, w_scale, bias)
        return out.reshape(*x.shape[:-1], w_int8.shape[0])

    return _dispatch.route("weight_only_int8_linear", (x, bias), device=x.device, dtype=x.dtype,
                           torch_why=_dispatch.torch_covers,
                           shape_class=lambda: _gemm_class(x, w_int8.shape[0], bias is not None), kernel=kernel,
                           torch_fn=lambda x, b: torch_impl.weight_only_int8_linear(x, w_int8, w_scale, b),
                           reference=lambda x, b: reference.weight_only_int8_linear(x, w_int8, w_scale, b),
                           check=lambda: _check_int8(x, w_int8, w_scale, bias, "weight_only_int8_linear"))


# ---- argument checks (clear errors before any kernel sees the tensors)
def _check_linear(x, weight, bias, activation):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = (f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise TypeError(f"linear: x must be a float tensor (..., K), got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("linear: weight must be a (N, K) tensor")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: weight is (N, K) = {tuple(weight.shape)} but x has K = {x.shape[-1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"linear: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"linear: weight is on {weight.device} but x is on {x.device}")
    _check_bias(bias, weight.shape[0], x, "linear")
    check_activation(activation, "linear")


def _check_bias(bias, n, x, op):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or not bias.is_floating_point():
        raise ValueError(f"{op}: bias must be a float ({n},) tensor, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")


def _int8_precheck(x, w_int8, w_scale, bias, op):
    """What the public int8 functions check themselves: enough to build the op's arguments (the
    rest is _check_int8's, on the chosen path), and what only autograd sees (inside the custom
    op grad mode is off)."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and isinstance(w_int8, torch.Tensor) and w_int8.dim() == 2):
        _check_int8(x, w_int8, w_scale, bias, op)  # says which
    if isinstance(w_scale, torch.Tensor) and w_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: w_scale requires grad, but gradients flow to x and bias only; pass w_scale.detach()")


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
    _check_bias(bias, n, x, op)
    _check_int8_k(x.shape[-1], op)


def _check_int8_k(k, op):
    if k > INT8_MAX_K:
        raise ValueError(f"{op}: K = {k} could overflow the int32 accumulators of the int8 product "
                         f"(K <= {INT8_MAX_K})")


def _check_quantize(x):
    if x.dtype not in _FLOAT:
        raise TypeError(f"quantize_rowwise: x must be float32, float16 or bfloat16, got {x.dtype}")


def _check_matrix(op, **tensors):
    """The custom ops take the (rows, K) matrices the public functions make (_rows): the C++ and
    Triton kernels trust these checks."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D tensor here, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def _check_quantize_op(x):
    _check_matrix("quantize_rowwise", x=x)
    _check_quantize(x)
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"quantize_rowwise: x's last dim must have stride 1 here, got strides {x.stride()}")


def _check_linear_bwd(dout, x, weight, saved, activation, has_bias):
    _check_linear(x, weight, None, activation)
    _check_matrix("linear (backward)", x=x)
    shape = (x.shape[0], weight.shape[0])
    if not isinstance(dout, torch.Tensor) or tuple(dout.shape) != shape or dout.dtype != x.dtype:
        raise ValueError(f"linear (backward): dout must be a {x.dtype} {shape} tensor")
    if activation != "none" and (not isinstance(saved, torch.Tensor) or tuple(saved.shape) != shape):
        raise ValueError(f"linear (backward): saved must be the forward's {shape} pre-activation or output")


def _check_int8_mm(a, b):
    for t, name in ((a, "a"), (b, "b")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"int8_mm: {name} must be a 2-D int8 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if a.shape[1] != b.shape[1] or a.device != b.device:
        raise ValueError(f"int8_mm: a (M, K) = {tuple(a.shape)} and b (N, K) = {tuple(b.shape)}: their K must "
                         f"match, on one device")
    _check_int8_k(a.shape[1], "int8_mm")


# ---- fake kernels (shapes for torch.compile and meta tensors)
def _fake_linear_fwd(x, weight, bias, activation):
    m, n = x.shape[0], weight.shape[0]
    keep = activation in ("gelu", "gelu_tanh")
    return x.new_empty((m, n)), x.new_empty((m, n) if keep else (0,))


def _fake_linear_bwd(dout, x, weight, saved, activation, has_bias):
    db = dout.new_empty((weight.shape[0],) if has_bias else (0,), dtype=torch.float32 if x.dtype != torch.float64
                        else torch.float64)
    return torch.empty_like(x), torch.empty_like(weight), db


def _fake_quantize(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


def _fake_int8_mm(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


def _fake_int8_linear(x, w_int8, w_scale, bias, *activation):
    return x.new_empty((x.shape[0], w_int8.shape[0]))


def _dtype0(a):
    return a[0].dtype


for _schema in (
        _dispatch.Schema("linear_fwd", check=lambda x, w, b, act: (_check_linear(x, w, b, act), _check_matrix("linear", x=x)),
                         public_of=lambda a: "linear", dtype_of=_dtype0,
                         shape_class=lambda a: _gemm_class(a[0], a[1].shape[0], a[3], a[2] is not None),
                         fake=_fake_linear_fwd),
        _dispatch.Schema("linear_bwd", check=_check_linear_bwd, public_of=lambda a: "linear",
                         dtype_of=lambda a: a[1].dtype,
                         shape_class=lambda a: _gemm_class(a[1], a[2].shape[0], a[4], a[5]), fake=_fake_linear_bwd),
        _dispatch.Schema("quantize_rowwise", check=_check_quantize_op, public_of=lambda a: "quantize_rowwise",
                         dtype_of=_dtype0, shape_class=lambda a: (a[0].dtype, a[0].shape[1]), fake=_fake_quantize),
        _dispatch.Schema("int8_mm", check=_check_int8_mm, public_of=lambda a: "int8_mm", dtype_of=_dtype0,
                         shape_class=lambda a: _gemm_class(a[0], a[1].shape[0]), fake=_fake_int8_mm),
        _dispatch.Schema("int8_linear", check=lambda x, w, s, b, act: (_check_int8(x, w, s, b, "int8_linear"),
                                                                        _check_matrix("int8_linear", x=x),
                                                                        check_activation(act, "int8_linear")),
                         public_of=lambda a: "int8_linear", dtype_of=_dtype0,
                         shape_class=lambda a: _gemm_class(a[0], a[1].shape[0], a[4], a[3] is not None),
                         fake=_fake_int8_linear),
        _dispatch.Schema("weight_only_int8_linear",
                         check=lambda x, w, s, b: (_check_int8(x, w, s, b, "weight_only_int8_linear"),
                                                   _check_matrix("weight_only_int8_linear", x=x)),
                         public_of=lambda a: "weight_only_int8_linear", dtype_of=_dtype0,
                         shape_class=lambda a: _gemm_class(a[0], a[1].shape[0], a[3] is not None),
                         fake=_fake_int8_linear)):
    _dispatch.register(_schema)


# ---- autograd of linear: the backward is a custom op, run under the forward's forcing
def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, activation = inputs
    out, preact = output
    saved = preact if activation in ("gelu", "gelu_tanh") else out if activation == "relu" else preact
    ctx.save_for_backward(x, weight, saved)
    ctx.activation = activation
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.forced = _dispatch.forced_settings()


def _linear_backward(ctx, dout, _dpreact):
    x, weight, saved = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    with _dispatch.restored(ctx.forced):
        dx, dw, db = _ops.linear_bwd.default(dout.contiguous(), x, weight, saved, ctx.activation, has_bias)
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
    ctx.forced = _dispatch.forced_settings()


def _int8_backward(ctx, dout):
    w_int8, w_scale, x, bias, out = ctx.saved_tensors
    if ctx.activation == "relu":
        dpre = activation_grad(dout, out, "relu")
    elif ctx.activation in ("gelu", "gelu_tanh"):
        with _dispatch.restored(ctx.forced):
            preact = _ops.int8_linear.default(x, w_int8, w_scale, bias, "none")
        dpre = activation_grad(dout, preact, ctx.activation)
    else:
        dpre = dout
    dx = db = None
    if ctx.needs_input_grad[0]:
        dx = dpre @ (w_int8.to(dpre.dtype) * w_scale.to(dpre.dtype).unsqueeze(1))  # the dequantised weight
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        db = dpre.float().sum(0).to(ctx.bias_dtype)
    return (dx, None, None, db) + ((None,) if len(ctx.needs_input_grad) == 5 else ())


torch.library.register_autograd("mptkernels::int8_linear", _int8_backward, setup_context=_int8_setup_context)
torch.library.register_autograd("mptkernels::weight_only_int8_linear", _int8_backward,
                                setup_context=_int8_setup_context)
