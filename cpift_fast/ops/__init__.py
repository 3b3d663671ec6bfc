"""The cpift ops, one home per op (schema, argument check, fake, reference, registration).

Importing this package defines every ``torch.ops.cpift.<op>`` and then loads the C++ kernels;
call the ops through the functions re-exported here (they check arguments and honour
``CPIFT_BACKEND``), e.g. ``ops.mask_pack(bits)``.
"""

from .. import _ops
from .mask import MASK_AND, MASK_ANDNOT, MASK_OR, MASK_XOR, mask_binary, mask_pack, mask_popcount, mask_unpack
from .adamw import masked_adamw_, masked_adamw_ema_, masked_grad_sq_norm
from .importance import importance_ema_
from .select import SELECT_BINS, select_histogram, select_mask
from .overlap import overlap_counts
from .fuse import slerp_apply, slerp_apply_list, slerp_stats, slerp_stats_list

_ops.extension()  # every schema is defined: the C++ kernels can register now

__all__ = [
    "MASK_AND", "MASK_ANDNOT", "MASK_OR", "MASK_XOR", "mask_binary", "mask_pack", "mask_popcount", "mask_unpack",
    "masked_adamw_", "masked_adamw_ema_", "masked_grad_sq_norm",
    "SELECT_BINS", "select_histogram", "select_mask", "overlap_counts",
    "slerp_apply", "slerp_apply_list", "slerp_stats", "slerp_stats_list", "importance_ema_",
]
