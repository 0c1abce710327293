"""The cross_entropy family: the LM head and its loss fused, chunk by chunk (Liger-Kernel's
fused linear cross entropy), so the (tokens x vocab) logits never exist.

Custom ops ``linear_cross_entropy_fwd`` / ``linear_cross_entropy_bwd`` (schemas in
csrc/registration.cpp); implementations: C++ (csrc/cpu/cross_entropy.cpp), Triton
(mptkernels/triton/cross_entropy.py), PyTorch's unfused logits + F.cross_entropy
(mptkernels/torch_impl.py) and the reference. This module checks arguments, gives the fake
kernels and the autograd, and owns the one kernel fact of the family: the chunk size.

Gradients: with reduction "mean" or "sum" the forward computes dx, dweight and dbias in the
same pass as the loss (each chunk's dlogits is used at once and dropped) and keeps them; the
backward only scales them by the incoming scalar gradient (and, outside torch.compile, returns
them as they are when that gradient is exactly 1, the usual ``loss.backward()``, so they are
never copied). With "none" the incoming gradient differs per row, so the forward computes no
gradient and the backward runs the chunks again with it (twice the forward's GEMMs).
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _dispatch, reference, torch_impl

_ops = _dispatch.CUSTOM_OPS
REDUCTIONS = ("mean", "sum", "none")
_FLOAT = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Bytes of float32 logits per chunk (chunk_rows x V x 4): a few tens of MB, as Liger's chunks,
# whatever the number of tokens: 130 rows of a 128256-token vocabulary. Beyond the inputs,
# outputs and gradients, this (in x's dtype) is the op's memory. Tests make it smaller to
# exercise many chunks.
CHUNK_BYTES = 64 << 20


def chunk_rows(n: int, v: int) -> int:
    """Rows of logits per chunk for n rows of a v-class vocabulary (every implementation's)."""
    return max(1, min(max(n, 1), CHUNK_BYTES // (4 * max(v, 1))))


def linear_cross_entropy(x, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         logit_softcap=None, z_loss=0.0):
    """The cross-entropy loss of the logits ``x @ weight.T + bias`` without materialising them.

    x: (..., H) float (the tokens' hidden states; leading dims flattened to N rows); weight:
    (V, H) in x's dtype (the LM head, nn.Linear's layout); target: (...) int64 with x's leading
    shape, each in [0, V) or ``ignore_index``; bias: (V,) in x's dtype or None.
    Equals ``F.cross_entropy(logits, target, ignore_index=, reduction=, label_smoothing=)`` with
    ``logits = c * tanh((x @ weight.T + bias) / c)`` when ``logit_softcap`` c (> 0) is given
    (Gemma 2's final logit softcapping), plus ``z_loss * lse**2`` per row not ignored, lse the
    row's logsumexp (PaLM's z-loss; Liger's lse_square_scale), reduced like the loss.
    reduction: "mean" over the rows not ignored (NaN when all are, as F.cross_entropy), "sum", or
    "none" (target's shape, 0 at ignored rows). The loss is float32 (float64 for float64 x);
    GEMMs run in x's dtype with fp32 accumulation, the softmax and loss in fp32; the gradients
    of x, weight and bias come in their dtypes. Memory beyond inputs, outputs and gradients:
    one chunk of logits (``CHUNK_BYTES``). Not twice differentiable.
    """
    _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, logit_softcap, z_loss)
    softcap = 0.0 if logit_softcap is None else float(logit_softcap)
    ls, zl, ii = float(label_smoothing), float(z_loss), int(ignore_index)

    def kernel(x, weight, bias):
        rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        grad = torch.is_grad_enabled() and reduction != "none"  # "none": the backward runs the chunks
        mask = [grad and x.requires_grad, grad and weight.requires_grad,
                grad and bias is not None and bias.requires_grad]
        loss = _ops.linear_cross_entropy_fwd.default(rows, weight, target.reshape(-1), bias, ii, reduction, ls,
                                                     softcap, zl, mask, chunk_rows(rows.shape[0], weight.shape[0]))[0]
        return loss.reshape(target.shape) if reduction == "none" else loss

    return _dispatch.route(
        "linear_cross_entropy", (x, weight, bias), device=x.device, dtype=x.dtype, torch_why=_dispatch.torch_covers,
        shape_class=lambda: _class(x, weight, bias, reduction, softcap), kernel=kernel,
        torch_fn=lambda x, w, b: torch_impl.linear_cross_entropy(x, w, target, b, ii, reduction, ls, logit_softcap,
                                                                 zl),
        reference=lambda x, w, b: reference.linear_cross_entropy(x, w, target, b, ii, reduction, ls, logit_softcap,
                                                                 zl),
        check=lambda: _check_targets(target, weight.shape[0], ii))


def _class(x, weight, bias, reduction, softcap):
    n = x.numel() // max(x.shape[-1], 1)
    return (x.dtype, max(n, 1).bit_length(), x.shape[-1], weight.shape[0], bias is not None, reduction, softcap > 0)


# ---- argument checks (one-line errors naming the argument)
def _desc(t):
    return (f"a {str(t.dtype).replace('torch.', '')} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
            else type(t).__name__)


def _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, logit_softcap, z_loss):
    op = "linear_cross_entropy"
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT:
        raise TypeError(f"{op}: x must be a float32, float64, float16 or bfloat16 tensor (..., H), got {_desc(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be a (V, H) tensor with H = x.shape[-1] = {x.shape[-1]}, got "
                         f"{_desc(weight)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must have at least one row (V >= 1), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        raise TypeError(f"{op}: target must be an int64 tensor of class indices, got {_desc(target)}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{op}: target must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype:
            raise ValueError(f"{op}: bias must be a {str(x.dtype).replace('torch.', '')} ({weight.shape[0]},) tensor, "
                             f"got {_desc(bias)}")
    for t, name in ((weight, "weight"), (target, "target"), (bias, "bias")):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if logit_softcap is not None and (not isinstance(logit_softcap, numbers.Real) or not
                                      (0.0 < logit_softcap < math.inf)):
        raise ValueError(f"{op}: logit_softcap must be a positive number or None, got {logit_softcap!r}")
    if not isinstance(z_loss, numbers.Real) or not 0.0 <= z_loss < math.inf:
        raise ValueError(f"{op}: z_loss must be a finite number >= 0, got {z_loss!r}")


def _check_targets(target, V, ignore_index):
    """Data-dependent: every target in [0, V) or ignore_index (never while traced or captured)."""
    if torch.compiler.is_compiling() or target.numel() == 0 or target.is_meta:
        return
    t = target[target != ignore_index]
    if t.numel() and (bool((t < 0).any()) or bool((t >= V).any())):
        bad = t[(t < 0) | (t >= V)][0].item()
        raise ValueError(f"linear_cross_entropy: target holds {bad}, out of range: expected 0 <= target < V = {V} "
                         f"or ignore_index ({ignore_index})")


def _check_op_common(x, weight, target, bias, ignore_index, reduction, label_smoothing, logit_softcap, z_loss,
                     output_mask, chunk):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"linear_cross_entropy: x must be a 2-D (N, H) tensor here, got {_desc(x)}")
    if not isinstance(target, torch.Tensor) or target.dim() != 1:
        raise ValueError(f"linear_cross_entropy: target must be a 1-D (N,) tensor here, got {_desc(target)}")
    _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, None if logit_softcap == 0 else
           logit_softcap, z_loss)
    if len(output_mask) != 3 or chunk < 1:
        raise ValueError(f"linear_cross_entropy: output_mask must hold 3 bools and chunk_rows be >= 1, got "
                         f"{output_mask}, {chunk}")


def _check_fwd(*args):
    _check_op_common(*args)


def _check_bwd(grad_loss, x, weight, target, bias, dx, dweight, dbias, *options):
    _check_op_common(x, weight, target, bias, *options)
    ignore_index, reduction, *_ = options
    want = (x.shape[0],) if reduction == "none" else ()
    if not isinstance(grad_loss, torch.Tensor) or tuple(grad_loss.shape) != want or not grad_loss.is_floating_point():
        raise ValueError(f"linear_cross_entropy (backward): grad_loss must be a float tensor of shape {want}, got "
                         f"{_desc(grad_loss)}")
    for g, like, name in ((dx, x, "dx"), (dweight, weight, "dweight"), (dbias, bias, "dbias")):
        ok = isinstance(g, torch.Tensor) and (g.shape == (0,) or like is not None and g.shape == like.shape
                                              and g.dtype == like.dtype)
        if not ok:
            raise ValueError(f"linear_cross_entropy (backward): {name} must be the forward's gradient or an empty "
                             f"(0,) tensor, got {_desc(g)}")


# ---- fake kernels
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grads_like(x, weight, bias, mask):
    def one(like, want):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if want else x.new_empty((0,))
    return one(x, mask[0]), one(weight, mask[1]), one(bias, mask[2] and bias is not None)


def _fake_fwd(x, weight, target, bias, ignore_index, reduction, ls, softcap, zl, mask, chunk):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=_acc(x.dtype))
    return (loss,) + _grads_like(x, weight, bias, mask)


def _fake_bwd(grad_loss, x, weight, target, bias, dx, dweight, dbias, ignore_index, reduction, ls, softcap, zl, mask,
              chunk):
    return _grads_like(x, weight, bias, mask)


for _schema in (
        _dispatch.Schema("linear_cross_entropy_fwd", check=_check_fwd, public_of=lambda a: "linear_cross_entropy",
                         dtype_of=lambda a: a[0].dtype,
                         shape_class=lambda a: _class(a[0], a[1], a[3], a[5], a[7]), fake=_fake_fwd,
                         host_check=lambda x, w, t, b, ii, *rest: _check_targets(t, w.shape[0], ii)),
        _dispatch.Schema("linear_cross_entropy_bwd", check=_check_bwd, public_of=lambda a: "linear_cross_entropy",
                         dtype_of=lambda a: a[1].dtype,
                         shape_class=lambda a: _class(a[1], a[2], a[4], a[9], a[11]), fake=_fake_bwd)):
    _dispatch.register(_schema)


# ---- autograd: the forward's gradients, scaled; or ("none") the chunks again
def _eager(t) -> bool:
    """A plain tensor outside any tracing (torch.compile, make_fx, fake or functional tensors)."""
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor and t.device.type in ("cpu", "cuda")
            and not torch._C._is_torch_function_mode_enabled() and not torch._C._len_torch_dispatch_stack())


def _setup_context(ctx, inputs, output):
    x, weight, target, bias, *options = inputs  # ignore_index ... z_loss, output_mask, chunk_rows
    _loss, dx, dw, db = output
    ctx.mark_non_differentiable(dx, dw, db)
    ctx.set_materialize_grads(False)  # else autograd hands the backward zeros shaped like dx, dW, db: +1 dW
    ctx.options = options
    ctx.forced = _dispatch.forced_settings()
    if _eager(dx):
        # eager: the forward's gradients held by ctx itself, not saved, so the backward can drop
        # ctx's reference before autograd stores them as .grad (a saved tensor would still be
        # referenced there, and AccumulateGrad would then copy dW: +1 GB at an LM's vocabulary)
        ctx.grads = [dx, dw, db]
        ctx.save_for_backward(x, weight, target, bias)
    else:
        ctx.grads = None
        ctx.save_for_backward(x, weight, target, bias, dx, dw, db)


def _is_one(g) -> bool:
    """Whether the incoming gradient is a plain tensor equal to 1, in eager mode (a host read)."""
    return _eager(g) and not g.requires_grad and g.item() == 1.0


def _backward(ctx, dloss, _ddx, _ddw, _ddb):
    x, weight, target, bias, *saved = ctx.saved_tensors
    if ctx.grads is not None:
        saved, ctx.grads = ctx.grads, None  # this backward owns them now
    elif not saved:  # eager, and an earlier backward (retain_graph) took them: the op computes them again
        saved = [x.new_empty((0,))] * 3
    dx, dw, db = saved
    ignore_index, reduction, ls, softcap, zl, fwd_mask, chunk = ctx.options
    need = ctx.needs_input_grad
    mask = [need[0], need[1], bias is not None and need[3]]
    computed = all(not m or g.shape == like.shape for m, g, like in zip(mask, (dx, dw, db), (x, weight, bias)))
    if reduction != "none" and computed and _is_one(dloss):  # loss.backward(): the forward's, not copied
        gx, gw, gb = dx, dw, db
    else:
        with _dispatch.restored(ctx.forced):
            gx, gw, gb = _ops.linear_cross_entropy_bwd.default(dloss.contiguous(), x, weight, target, bias, dx, dw, db,
                                                               ignore_index, reduction, ls, softcap, zl, mask, chunk)
    del saved, dx, dw, db
    return (gx if mask[0] else None, gw if mask[1] else None, None, gb if mask[2] else None) + (None,) * len(ctx.options)


torch.library.register_autograd("mptkernels::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mptkernels linear_cross_entropy: double backward is not supported; use "
                       "mptkernels.backend('reference') for it")


torch.library.register_autograd("mptkernels::linear_cross_entropy_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
