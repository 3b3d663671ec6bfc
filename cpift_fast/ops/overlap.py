"""Pairwise overlap of T masks: popcount(masks[i] & masks[j]) for all pairs, in one pass over the words.

Backends: C++ (csrc/overlap.cpp), Triton (cpift_fast/kernels/overlap.py), the reference below (bool tensors,
T² passes: what a user would write).
"""

from __future__ import annotations

import torch

from .._ops import Op
from .mask import mask_unpack as _unpack_op

_unpack_reference = _unpack_op.reference


def _check_overlap(masks: list[torch.Tensor]) -> None:
    if not masks:
        raise ValueError("overlap_counts: needs at least one mask")
    nwords = masks[0].numel()
    for i, w in enumerate(masks):
        if w.dtype != torch.int32 or w.dim() != 1:
            raise ValueError(f"overlap_counts: mask {i} must be 1-D int32 words, got {w.dtype} of shape "
                             f"{list(w.shape)}")
        if w.numel() != nwords:
            raise ValueError(f"overlap_counts: mask {i} has {w.numel()} words, mask 0 has {nwords} "
                             "(masks must share one layout)")
        if w.device != masks[0].device:
            raise ValueError(f"overlap_counts: mask {i} is on {w.device}, mask 0 on {masks[0].device}")


def _overlap_reference(masks: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise intersection counts of T word buffers of equal length -> int64[T, T].

    ``out[i, j] = popcount(masks[i] & masks[j])``; the diagonal holds each mask's count. Unions
    follow exactly as ``out[i, i] + out[j, j] - out[i, j]``. Reference: bool tensors, T² passes.
    """
    T = len(masks)
    device = masks[0].device if T else torch.device("cpu")
    bools = [_unpack_reference(m.reshape(-1), 32 * m.numel()) for m in masks]
    out = torch.zeros(T, T, dtype=torch.int64, device=device)
    for i in range(T):
        for j in range(i, T):
            out[i, j] = out[j, i] = (bools[i] & bools[j]).sum()
    return out


def _overlap_fake(masks):
    return masks[0].new_empty((len(masks), len(masks)), dtype=torch.int64)


overlap_counts = Op("overlap_counts(Tensor[] masks) -> Tensor", check=_check_overlap, fake=_overlap_fake,
                    reference=_overlap_reference, triton_module="overlap")
