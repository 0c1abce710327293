"""nn.Module drop-ins with the state_dict keys of the torch/HF modules they replace."""
from .normalization import LayerNorm, RMSNorm
from .rotary import RotaryEmbedding

__all__ = ["LayerNorm", "RMSNorm", "RotaryEmbedding"]
