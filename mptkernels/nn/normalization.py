"""LayerNorm / RMSNorm modules on mptkernels.ops: subclasses of torch's, so the state_dict,
constructor and isinstance checks are torch's; only forward changes."""
from __future__ import annotations

import math

import torch

from .. import ops


def _apply(module, x, residual, norm):
    """Run norm(x_rows, weight_rows, residual_rows) over the module's normalized_shape, which may
    span several trailing dims (they are normalised together, so they are flattened into one)."""
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"{type(module).__name__}: expected input ending in {shape}, got {tuple(x.shape)}")
    n = math.prod(shape)
    lead = x.shape[: x.dim() - len(shape)]
    weight = None if module.weight is None else module.weight.reshape(n)
    out = norm(x.reshape(*lead, n), weight, None if residual is None else residual.reshape(*lead, n))
    if residual is None:
        return out.view(x.shape)
    return out[0].view(x.shape), out[1].view(x.shape)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on the fused kernel. ``cast`` as in mptkernels.ops.layer_norm
    ("mpt" reproduces MPT's low-precision LayerNorm). ``forward(x, residual=None)``: with a
    residual it returns ``(norm(x + residual), x + residual)``."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 *, cast="torch"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.cast = cast

    def forward(self, x, residual=None):
        bias = None if self.bias is None else self.bias.reshape(-1)
        return _apply(self, x, residual, lambda x, w, r: ops.layer_norm(x, w, bias, self.eps, r, cast=self.cast))

    def extra_repr(self):
        return super().extra_repr() + f", cast={self.cast!r}"


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on the fused kernel. ``cast``: "torch" (default), "llama" or "gemma"
    (the weight is then applied as 1 + weight, and should be initialised to zeros, as Gemma's)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, cast="torch"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.cast = cast

    def forward(self, x, residual=None):
        # torch.nn.RMSNorm's eps=None means the machine epsilon of the dtype it computes in
        # (ATen's opmath type: fp32 for 16-bit inputs), not of x's dtype
        eps = self.eps if self.eps is not None else torch.finfo(torch.float64 if x.dtype == torch.float64
                                                                else torch.float32).eps
        return _apply(self, x, residual, lambda x, w, r: ops.rms_norm(x, w, eps, r, cast=self.cast))

    def extra_repr(self):
        return super().extra_repr() + f", cast={self.cast!r}"
