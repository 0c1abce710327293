"""The MPT model family (MosaicML MPT / llm-foundry, Hugging Face's MptForCausalLM) on mptkernels.

    config.py      MPTConfig and its checks
    model.py       MPTBlock and MPTForCausalLM (its forward: training, prefill, decoding)
    generation.py  the static KV cache, generate, the CUDA-graph decode step, sampling
    hf_io.py       from_hf / save_pretrained: HF config conversion, checkpoint loading and writing

``MPTForCausalLM`` carries ``generate`` / ``new_cache`` and ``from_hf`` / ``save_pretrained``
as methods (from generation.py's and hf_io.py's mixins).
"""
from .config import MPTConfig
from .generation import _sample  # noqa: F401  (tests import it from here)
from .model import MPTBlock, MPTForCausalLM

__all__ = ["MPTConfig", "MPTBlock", "MPTForCausalLM"]
