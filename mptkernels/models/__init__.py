"""Models built from mptkernels ops: ``mptkernels.models.mpt`` (MPTConfig, MPTForCausalLM)."""
from .mpt import MPTConfig, MPTForCausalLM

__all__ = ["MPTConfig", "MPTForCausalLM"]
