"""The ops of mptkernels: one module per op family (see docs/ops.md)."""
from . import layer_norm as _layer_norm_family  # noqa: F401  (registers fake kernels and autograd)
from . import rotary as _rotary_family  # noqa: F401
from . import attention as _attention_family  # noqa: F401
from . import gemm as _gemm_family  # noqa: F401
from . import glu as _glu_family  # noqa: F401
from .attention import attention, attention_varlen, attention_with_kvcache, scaled_dot_product_attention
from .tables import alibi_slopes, rotary_cos_sin
from .layer_norm import layer_norm, rms_norm
from .rotary import apply_rotary
from .gemm import int8_linear, int8_mm, linear, quantize_rowwise, weight_only_int8_linear
from .glu import geglu, swiglu
from . import cross_entropy as _cross_entropy_family  # noqa: F401
from .cross_entropy import linear_cross_entropy

__all__ = ["layer_norm", "rms_norm", "apply_rotary", "attention", "attention_varlen", "attention_with_kvcache",
           "scaled_dot_product_attention", "linear", "quantize_rowwise", "int8_mm", "int8_linear",
           "weight_only_int8_linear", "swiglu", "geglu", "linear_cross_entropy",
           "rotary_cos_sin", "alibi_slopes"]
