"""The tables some ops take as input: rotary cos/sin and MPT's ALiBi slopes (float32, any device)."""
from __future__ import annotations

import math
import numbers

import torch


def rotary_cos_sin(max_seqlen: int, rotary_dim: int, base: float = 10000.0, device=None):
    """The standard (GPT-NeoX / Llama) tables: angle[t, i] = t * base^(-2i/rotary_dim), float32."""
    if not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"rotary_cos_sin: max_seqlen must be an int >= 0, got {max_seqlen!r}")
    if not isinstance(rotary_dim, numbers.Integral) or rotary_dim < 0 or rotary_dim % 2:
        raise ValueError(f"rotary_cos_sin: rotary_dim must be an even int >= 0, got {rotary_dim!r}")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float64) / rotary_dim))
    angle = torch.outer(torch.arange(max_seqlen, device=device, dtype=torch.float64), inv_freq)
    return angle.cos().float(), angle.sin().float()


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """MPT's ALiBi slopes (float32, (n_heads,)), as llm-foundry's gen_slopes computes them."""
    if not isinstance(n_heads, numbers.Integral) or n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be an int >= 1, got {n_heads!r}")
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float32) * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2, m)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes
