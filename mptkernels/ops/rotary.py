"""Rotary position embedding: the Python API of the family.

``torch.ops.mptkernels.apply_rotary`` (schema in csrc/registration.cpp) has a C++ CPU kernel
and a CUDA C++ kernel (mptkernels/_dispatch.py chooses); its backward is the same op with sin
negated (the inverse rotation). PyTorch has no rotary op, so there is no ``torch``
implementation.
"""
from __future__ import annotations

import torch

from .. import _dispatch, reference

_ops = _dispatch.CUSTOM_OPS  # torch.ops.mptkernels, called directly where nothing else would run
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def apply_rotary(x, cos, sin, *, interleaved=False, seqlen_offsets=0):
    """Rotate the first rotary_dim features of each head of ``x`` by its token's angle.

    x: (batch, seqlen, heads, head_dim); cos, sin: (max_seqlen, rotary_dim / 2), rotary_dim <= head_dim
    (any float dtype; used in float32). Non-interleaved (GPT-NeoX/Llama) rotates the halves
    (x1, x2) = (x[..., :r/2], x[..., r/2:r]) to (x1*cos - x2*sin, x1*sin + x2*cos); interleaved
    (GPT-J) rotates the pairs (x[2i], x[2i+1]). Features past rotary_dim pass through.
    seqlen_offsets: int, or a (batch,) integer tensor: token t of sequence b uses row
    t + offset[b] (decoding with a KV cache). Differentiable in x (not in cos/sin).
    Returns a new contiguous tensor; x is not modified.

    Tensor offsets are checked against the table on the CPU; on CUDA they are not read back
    (that would sync the host), and a token whose row falls outside the table gets NaN.
    """
    _check_user(x, cos, sin, seqlen_offsets)
    seqlen = x.shape[1]
    if isinstance(seqlen_offsets, torch.Tensor):
        offsets, offset = _int32_offsets(seqlen_offsets, x, seqlen, cos.shape[0]), 0
    else:
        offsets, offset = None, int(seqlen_offsets)  # its range: _check
    cos32, sin32 = cos.float().contiguous(), sin.float().contiguous()
    if x.stride(-1) != 1:  # the kernels take any strides but a unit one along head_dim
        x = x.contiguous()

    def kernel(x):
        return _ops.apply_rotary.default(x, cos32, sin32, offsets, offset, interleaved, False)

    def ref(x):
        return reference.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=seqlen_offsets)

    return _dispatch.route("apply_rotary", (x,), device=x.device, dtype=x.dtype, torch_why=_dispatch.no_torch_op,
                           shape_class=tuple, kernel=kernel, torch_fn=None, reference=ref,
                           check=lambda: _check(x, cos32, sin32, offsets, offset, interleaved, False))


def _int32_offsets(seqlen_offsets, x, seqlen, rows):
    """The kernels' int32 offsets. An int64 offset must not wrap into range when cast: on the
    CPU (values readable without a sync) every offset is checked here, eagerly; on CUDA and
    under torch.compile (no data-dependent branches) the offsets are clamped to [-1, rows]
    first, which keeps an out-of-table offset out of the table (the CPU kernel raises, CUDA
    writes NaN)."""
    if (seqlen_offsets.device.type == "cpu" and seqlen_offsets.numel() and x.numel()
            and not torch.compiler.is_compiling()):
        lo, hi = (int(t) for t in torch.aminmax(seqlen_offsets))  # one pass; q and k of each layer call this
        if lo < 0 or hi + seqlen > rows:
            bad = lo if lo < 0 else hi
            raise ValueError(f"apply_rotary: seqlen_offsets holds {bad}, which puts tokens at rows [{bad}, "
                             f"{bad + seqlen}), outside the cos/sin table of {rows} rows")
    else:
        seqlen_offsets = seqlen_offsets.clamp(-1, min(rows, 2**31 - 1))
    return seqlen_offsets.to(device=x.device, dtype=torch.int32).contiguous()


def _check_user(x, cos, sin, seqlen_offsets):
    """The public arguments (cos/sin in any float dtype, offsets as an int or any integer tensor)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be a (batch, seqlen, heads, head_dim) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"apply_rotary: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    for t, name in ((cos, "cos"), (sin, "sin")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"apply_rotary: {name} must be a (max_seqlen, rotary_dim/2) tensor")
        if not t.is_floating_point():
            raise TypeError(f"apply_rotary: {name} must be a float tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"apply_rotary: {name} is on {t.device} but x is on {x.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"apply_rotary: {name} requires grad, but gradients flow to x only; "
                             f"pass {name}.detach()")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if 2 * cos.shape[1] > x.shape[-1]:
        raise ValueError(f"apply_rotary: rotary_dim = 2 * cos.shape[1] = {2 * cos.shape[1]} exceeds head_dim "
                         f"{x.shape[-1]}")
    if isinstance(seqlen_offsets, torch.Tensor):
        if (seqlen_offsets.shape != (x.shape[0],) or seqlen_offsets.is_floating_point() or seqlen_offsets.is_complex()
                or seqlen_offsets.dtype == torch.bool):
            raise ValueError(f"apply_rotary: seqlen_offsets must be an int or a ({x.shape[0]},) integer tensor, "
                             f"got {seqlen_offsets.dtype} {tuple(seqlen_offsets.shape)}")
    elif not isinstance(seqlen_offsets, int):
        raise TypeError(f"apply_rotary: seqlen_offsets must be an int or a tensor, got {type(seqlen_offsets).__name__}")


def _check(x, cos, sin, seqlen_offsets, seqlen_offset, interleaved, conjugate):
    """The one check of apply_rotary's custom-op arguments: the public checks, and the layout
    the kernels read (cos/sin contiguous float32, offsets a contiguous int32 (batch,) tensor,
    head_dim of unit stride)."""
    _check_user(x, cos, sin, seqlen_offsets if seqlen_offsets is not None else int(seqlen_offset))
    for t, name in ((cos, "cos"), (sin, "sin")):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"apply_rotary: {name} must be a contiguous float32 table here, got {t.dtype}")
    if x.stride(-1) != 1 and x.shape[-1] > 1 and x.numel():
        raise ValueError(f"apply_rotary: x's last dim (head_dim) must have stride 1 here, got strides {x.stride()}")
    if seqlen_offsets is None and not 0 <= seqlen_offset <= cos.shape[0] - x.shape[1]:
        raise ValueError(f"apply_rotary: cos/sin have {cos.shape[0]} rows but seqlen_offsets={seqlen_offset} + "
                         f"seqlen={x.shape[1]} needs {seqlen_offset + x.shape[1]}")
    if seqlen_offsets is not None:
        if seqlen_offsets.dtype != torch.int32 or not seqlen_offsets.is_contiguous():
            raise ValueError(f"apply_rotary: seqlen_offsets must be a contiguous int32 tensor here, got "
                             f"{seqlen_offsets.dtype}")
        if seqlen_offsets.device != x.device:
            raise ValueError(f"apply_rotary: seqlen_offsets is on {seqlen_offsets.device} but x is on {x.device}")
    elif x.numel() and (seqlen_offset < 0 or seqlen_offset + x.shape[1] > cos.shape[0]):
        raise ValueError(f"apply_rotary: seqlen_offset {seqlen_offset} puts positions [{seqlen_offset}, "
                         f"{seqlen_offset + x.shape[1]}) outside the cos/sin table of {cos.shape[0]} rows")


def _fake(x, cos, sin, seqlen_offsets, seqlen_offset, interleaved, conjugate):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


_dispatch.register(_dispatch.Schema(
    "apply_rotary", check=_check, public_of=lambda a: "apply_rotary", dtype_of=lambda a: a[0].dtype,
    shape_class=lambda a: (a[0].dtype,), fake=_fake))


def _setup_context(ctx, inputs, output):
    _, cos, sin, seqlen_offsets, seqlen_offset, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets)
    ctx.flags = (seqlen_offset, interleaved, conjugate)
    ctx.forced = _dispatch.forced_settings()


def _backward(ctx, dout):
    cos, sin, seqlen_offsets = ctx.saved_tensors
    seqlen_offset, interleaved, conjugate = ctx.flags
    if dout.stride(-1) != 1:  # incoming gradients may be expanded or transposed views
        dout = dout.contiguous()
    # a rotation's transpose is the rotation by the opposite angle
    with _dispatch.restored(ctx.forced):
        dx = _ops.apply_rotary.default(dout, cos, sin, seqlen_offsets, seqlen_offset, interleaved, not conjugate)
    return dx, None, None, None, None, None, None


torch.library.register_autograd("mptkernels::apply_rotary", _backward, setup_context=_setup_context)
