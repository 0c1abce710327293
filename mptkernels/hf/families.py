"""The transformers model families patch() knows: one line of ``FAMILIES`` each.

A family is data, not code: which module classes it has and how each one is laid out; the
forwards that use this data are written once, in mptkernels/hf/forwards.py. Classes are matched
by name (transformers is not imported here) and only exact classes, never subclasses, whose
forward may differ. Adding a family that reuses a known layout is one line here.
"""
from __future__ import annotations

import dataclasses

# transformers versions the forwards were written and tested against: 4.57 (tests/test_patch_families.py
# under scripts/test.sh's pinned install) and the 5.x release series (the same tests, run on
# transformers 5.25 from .hf5/). Another version gets the norms only, and the report says why.
SUPPORTED_TRANSFORMERS = ("4.57", "5.")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    prefix: str  # class names: <prefix>Attention, <prefix>MLP, <prefix>RMSNorm, <prefix>ForCausalLM
    qkv: str  # "separate" (q_proj, k_proj, v_proj), "fused" (Phi-3's qkv_proj: q | k | v),
    #           "neox" (query_key_value: per head q | k | v), "mpt" (Wqkv, ALiBi, no rotary)
    out: str = "o_proj"  # the attention's output projection
    mlp: str | None = "separate"  # "separate" (gate_proj, up_proj), "fused" (gate_up_proj: gate | up), None: not gated
    norm_cast: str | None = "llama"  # the RMSNorm's cast mode (mptkernels.nn.RMSNorm), None: it uses nn.LayerNorm
    # the causal LM's decoder and output projection are asked of the model (forwards.decoder_of,
    # get_output_embeddings(): GPT-NeoX's is embed_out in 4.57, lm_head in 5.x)


FAMILIES = (
    Family("Llama", "Llama", "separate"),
    Family("Mistral", "Mistral", "separate"),
    Family("Qwen2", "Qwen2", "separate"),
    Family("Qwen3", "Qwen3", "separate"),  # + q_norm / k_norm on each head (found on the module)
    Family("Gemma 2", "Gemma2", "separate", norm_cast="gemma"),  # + attention softcap, logit softcap
    Family("Gemma 3 (text)", "Gemma3", "separate", norm_cast="gemma"),  # + q_norm / k_norm
    Family("Phi-3", "Phi3", "fused", mlp="fused"),
    Family("GPT-NeoX", "GPTNeoX", "neox", out="dense", mlp=None, norm_cast=None),
    Family("MPT", "Mpt", "mpt", out="out_proj", mlp=None, norm_cast=None),
)


def _by_class(suffix):
    return {f.prefix + suffix: f for f in FAMILIES}


ATTENTION = _by_class("Attention")
MLP = _by_class("MLP")
CAUSAL_LM = _by_class("ForCausalLM")
RMS_NORMS = {f.prefix + "RMSNorm": f.norm_cast for f in FAMILIES if f.norm_cast} | {"GemmaRMSNorm": "gemma"}

# the gated MLP's activation, by the config's name: (glu op, geglu's approximate)
ACTIVATIONS = {"silu": ("swiglu", None), "swish": ("swiglu", None), "gelu": ("geglu", "none"),
               "gelu_pytorch_tanh": ("geglu", "tanh"), "gelu_new": ("geglu", "tanh")}
