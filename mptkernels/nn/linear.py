"""Linear layers on the GEMM family: a fused linear + activation and int8 linears."""
from __future__ import annotations

import torch

from .. import ops
from ..ops.activations import ACTIVATIONS
from ..ops.activations import activation as _activation  # the ops' own activation functions (see Int8Linear.forward)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` (same parameters and state_dict) whose optional activation runs in
    the GEMM's epilogue: ``Linear(d, 4 * d, bias=False, activation="gelu")`` is MPT's up
    projection + GELU in one kernel."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, activation=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if activation not in ACTIVATIONS:
            raise ValueError(f"Linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


def is_plain_linear(m) -> bool:
    """Whether m computes exactly x @ m.weight.T + m.bias (torch's nn.Linear, or ours without an
    activation), so a fused op may read its weight instead of calling it (linear_cross_entropy)."""
    return type(m) is torch.nn.Linear or type(m) is Linear and m.activation is None


class Int8Linear(torch.nn.Module):
    """A linear layer with an int8 weight quantised per output row (``quantize_rowwise``).

    mode "w8a8": activations are quantised per token too and the product runs in int8
    (``ops.int8_linear``); "weight_only": activations stay in their dtype and the weight is
    dequantised in registers (``ops.weight_only_int8_linear``, for decoding). ``activation``
    (one of ``ops.linear``'s) is fused into the W8A8 GEMM's epilogue; in weight_only mode it is
    applied to the GEMM's output (in its dtype), as ``ops.linear``'s reference path applies it.
    Buffers ``w_int8`` (N, K) int8, ``w_scale`` (N,) float32 and ``bias`` (N,) or None make up
    the state_dict; the output has the input's dtype. Inference only (no gradients).
    """

    MODES = ("w8a8", "weight_only")

    def __init__(self, in_features, out_features, bias=True, *, mode="w8a8", activation=None, device=None,
                 bias_dtype=torch.float32):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Int8Linear: mode must be one of {self.MODES}, got {mode!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Int8Linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_features, self.out_features, self.mode, self.activation = in_features, out_features, mode, activation
        self.register_buffer("w_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, mode="w8a8", activation=None):
        """Quantise an ``nn.Linear`` (its weight per output row; the bias stays in its dtype) whose
        output then goes through ``activation``: by default the layer's own (an
        ``mptkernels.nn.Linear``'s fused one; none for ``torch.nn.Linear``)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"Int8Linear.from_float: expected an nn.Linear, got {type(linear).__name__}")
        own = linear.activation if isinstance(linear, Linear) else None
        if activation is None:
            activation = own
        elif own is not None and activation != own:
            raise ValueError(f"Int8Linear.from_float: the layer applies activation {own!r}; got activation="
                             f"{activation!r}")
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode,
                  activation=activation, device=w.device,
                  bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        q, s = ops.quantize_rowwise(w if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else w.float())
        new.w_int8.copy_(q)
        new.w_scale.copy_(s)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        return new

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.mode == "w8a8":
            return ops.int8_linear(x, self.w_int8, self.w_scale, bias, self.activation)
        out = ops.weight_only_int8_linear(x, self.w_int8, self.w_scale, bias)
        return _activation(out, self.activation) if self.activation else out

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode!r}" + (f", activation={self.activation!r}" if self.activation else ""))
