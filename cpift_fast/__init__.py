"""cpift_fast: fast core-parameter isolation fine-tuning for PyTorch.

Public API (everything else is internal):
    ParamMask, MaskLayout            1-bit-per-element masks over named tensors
    MaskedAdamW, masked_grad_norm    AdamW that never touches frozen elements
    core_region                      exact global top-k of |tuned - base| -> CoreMask
    jaccard_matrix, group_tasks, order_stages, overlap_counts, plot_overlap
    slerp, fuse_models, plot_fusion  core transplant + SLERP fusion
    open_tensors, ShardedWriter, save_sharded   streamed safetensors checkpoints
    backend_info()                   what was built and which backend each op uses
"""

from ._ops import BackendUnavailable, backend_info
from .mask import MaskLayout, ParamMask

# masked AdamW (issue 3)
from .optim import MaskedAdamW, masked_grad_norm  # noqa: E402
# core selection (issue 4)
from .io import ShardedWriter, TensorSource, open_tensors, save_sharded  # noqa: E402
from .select import CoreMask, SelectionInfo, core_region  # noqa: E402
# overlap and fusion (issue 5)
from .fuse import fuse_models, plot_fusion, slerp  # noqa: E402
from .overlap import group_tasks, jaccard_matrix, order_stages, overlap_counts, plot_overlap  # noqa: E402
# EPI: importance tracked online, masks refreshed during training (issue 11)
from .importance import ImportanceTracker  # noqa: E402
from .evolving import EvolvingIsolation, TaskBatchSampler  # noqa: E402

from ._version import __version__  # noqa: E402

__all__ = [
    "BackendUnavailable", "MaskLayout", "ParamMask", "backend_info",
    "MaskedAdamW", "masked_grad_norm",
    "CoreMask", "SelectionInfo", "core_region", "ShardedWriter", "TensorSource", "open_tensors", "save_sharded",
    "fuse_models", "plot_fusion", "slerp",
    "group_tasks", "jaccard_matrix", "order_stages", "overlap_counts", "plot_overlap",
    "ImportanceTracker", "EvolvingIsolation", "TaskBatchSampler",
    "__version__",
]
