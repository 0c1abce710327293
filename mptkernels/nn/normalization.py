"""LayerNorm / RMSNorm modules on mptkernels.ops: subclasses of torch's, so the state_dict,
constructor and isinstance checks are torch's; only forward changes."""
from __future__ import annotations

import math

import torch

from .. import ops


def _flat(t, n):
    return None if t is None else t.reshape(n)


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
        # a multi-dim normalized_shape normalises the trailing dims together: flatten them
        n = math.prod(self.normalized_shape)
        if tuple(x.shape[-len(self.normalized_shape):]) != tuple(self.normalized_shape):
            raise ValueError(f"LayerNorm: expected input ending in {tuple(self.normalized_shape)}, got {tuple(x.shape)}")
        lead = x.shape[: x.dim() - len(self.normalized_shape)]
        out = ops.layer_norm(x.reshape(*lead, n), _flat(self.weight, n), _flat(self.bias, n), self.eps,
                             None if residual is None else residual.reshape(*lead, n), cast=self.cast)
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)

    def extra_repr(self):
        return super().extra_repr() + f", cast={self.cast!r}"


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on the fused kernel. ``cast``: "torch" (default), "llama" or "gemma"
    (the weight is then applied as 1 + weight, and should be initialised to zeros, as Gemma's)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, cast="torch"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.cast = cast

    def forward(self, x, residual=None):
        n = math.prod(self.normalized_shape)
        if tuple(x.shape[-len(self.normalized_shape):]) != tuple(self.normalized_shape):
            raise ValueError(f"RMSNorm: expected input ending in {tuple(self.normalized_shape)}, got {tuple(x.shape)}")
        # torch.nn.RMSNorm's eps=None means the dtype's machine epsilon
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        lead = x.shape[: x.dim() - len(self.normalized_shape)]
        out = ops.rms_norm(x.reshape(*lead, n), _flat(self.weight, n), eps,
                           None if residual is None else residual.reshape(*lead, n), cast=self.cast)
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)

    def extra_repr(self):
        return super().extra_repr() + f", cast={self.cast!r}"
