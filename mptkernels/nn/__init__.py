"""nn.Module drop-ins with the state_dict keys of the torch/HF modules they replace."""
from .linear import Int8Linear, Linear
from .normalization import LayerNorm, RMSNorm
from .rotary import RotaryEmbedding

__all__ = ["LayerNorm", "RMSNorm", "RotaryEmbedding", "Linear", "Int8Linear"]
