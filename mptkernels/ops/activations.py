"""The activations of the linears (the runtime's, on PyTorch's fused elementwise ops)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")  # the public names; the custom ops say "none" for None
_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


def check_activation(activation, op: str) -> str:
    """The schema's name of a public activation (None -> "none"), or a ValueError naming op."""
    if activation not in ACTIVATIONS and activation != "none":
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation or "none"


def activation(h, name):
    """act(h): None/"none", "relu", "gelu" (exact erf, MPT's FFN) or "gelu_tanh"."""
    if name is None or name == "none":
        return h
    if name == "relu":
        return F.relu(h)
    return F.gelu(h, approximate=_GELU_APPROX[name])


def activation_grad(dout, saved, name):
    """d(loss)/d(pre-activation) from dout = d(loss)/d(output), one fused PyTorch kernel.
    saved: the pre-activation for the gelus; for relu the pre-activation or the output (same sign)."""
    if name is None or name == "none":
        return dout
    if name == "relu":
        return torch.ops.aten.threshold_backward(dout, saved, 0)
    return torch.ops.aten.gelu_backward(dout, saved, approximate=_GELU_APPROX[name])
