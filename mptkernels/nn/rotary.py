"""RotaryEmbedding: holds the cos/sin tables and rotates q and k with mptkernels.ops.apply_rotary."""
from __future__ import annotations

import torch

from .. import ops
from ..ops.tables import rotary_cos_sin


class RotaryEmbedding(torch.nn.Module):
    """Rotary embedding of the first ``dim`` features of each head (GPT-NeoX/Llama layout by
    default; ``interleaved=True`` for GPT-J's). The tables are float32 buffers, not saved in
    the state_dict (they are a function of dim, base and max_seqlen), grown on demand. They
    follow the module to another device but keep float32 through a cast of the module (a model
    cast to bf16 keeps exact tables) and their values through ``to_empty``."""

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, max_seqlen: int = 2048,
                 device=None):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim (rotary_dim) must be a positive even number, got {dim}")
        self.dim, self.base, self.interleaved = dim, base, interleaved
        cos, sin = rotary_cos_sin(max_seqlen, dim, base, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        tables = self.cos, self.sin
        super()._apply(fn, recurse)
        device = self.cos.device
        if tables[0].is_meta and device.type != "meta":  # to_empty of a meta-device module: made there
            self.cos, self.sin = rotary_cos_sin(tables[0].shape[0], self.dim, self.base, device=device)
        else:
            self.cos, self.sin = (t.to(device) for t in tables)
        return self

    def _grow(self, needed: int):
        if needed > self.cos.shape[0]:
            cos, sin = rotary_cos_sin(max(needed, 2 * self.cos.shape[0]), self.dim, self.base, device=self.cos.device)
            self.cos, self.sin = cos, sin

    def forward(self, q, k, seqlen_offsets=0):
        """q: (batch, seqlen, heads, head_dim), k: (batch, seqlen, kv_heads, head_dim) -> rotated (q, k)."""
        if isinstance(seqlen_offsets, int):
            self._grow(seqlen_offsets + q.shape[1])
        if q.shape[-1] < self.dim:
            raise ValueError(f"RotaryEmbedding: head_dim {q.shape[-1]} is smaller than rotary dim {self.dim}")
        rot = dict(interleaved=self.interleaved, seqlen_offsets=seqlen_offsets)
        return ops.apply_rotary(q, self.cos, self.sin, **rot), ops.apply_rotary(k, self.cos, self.sin, **rot)
