"""mptkernels: fast kernels for MPT-style transformers as PyTorch custom ops.

Public surface: ``mptkernels.ops`` (functional ops), ``mptkernels.nn`` (module drop-ins),
``mptkernels.patch(model)``, ``mptkernels.quantize_(model)``, ``mptkernels.backend(name)``, ``mptkernels.info()``,
``mptkernels.cpu_isa()``.
Importing loads the compiled op library (_C) and registers the Python parts of each op;
nothing is compiled or measured at import.
"""
__version__ = "0.1.0"

from ._loader import build_info, cpu_isa  # noqa: E402  (loads _C: every op schema and C++ kernel)
from . import ops, nn, reference  # noqa: E402
from ._dispatch import backend  # noqa: E402
from ._info import info  # noqa: E402
from .patch import patch, PatchReport  # noqa: E402
from .quantize import quantize_, QuantizeReport  # noqa: E402

__all__ = ["ops", "nn", "reference", "backend", "info", "patch", "PatchReport", "quantize_", "QuantizeReport",
           "build_info", "cpu_isa", "__version__"]
