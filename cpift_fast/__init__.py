"""cpift_fast: fast core-parameter isolation fine-tuning for PyTorch.

Public API (everything else is internal):
    ParamMask, MaskLayout      1-bit-per-element masks over named tensors
    backend_info()             what was built and which backend each op uses
"""

from ._ops import BackendUnavailable, backend_info
from .mask import MaskLayout, ParamMask

# masked AdamW (issue 3)
# core selection (issue 4)
# overlap and fusion (issue 5)

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "MaskLayout", "ParamMask", "backend_info", "__version__"]
