"""Core-selection ops: fused |base − tuned| → key histograms, and the mask bits of a threshold.

key = bits(fp32(base) − fp32(tuned)) & 0x7fffffff: non-negative floats order like their bits, so a
radix select over keys is an exact top-k of |diff|. Zero keys are never counted or selected;
Inf/NaN land in level-0 bins >= 0x7f80 (the caller refuses them, naming the tensor).
Backends: C++ (csrc/select.cpp), Triton (cpift_fast/kernels/select.py), the reference below.
"""

from __future__ import annotations

import torch

from .._ops import Op
from .mask import mask_pack as _pack_op

_pack_reference = _pack_op.reference

SELECT_BINS = (1 << 15, 1 << 16)  # bins of level 0 (key >> 16) and level 1 (key & 0xffff)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_pair(op: str, base: torch.Tensor, tuned: torch.Tensor, index: int | None = None) -> None:
    if (base.dtype in _FLOATS and tuned.dtype in _FLOATS and base.shape == tuned.shape
            and base.device == tuned.device):
        return  # the common case, without building any message
    at = "" if index is None else f"[{index}]"
    for name, t in (("base", base), ("tuned", tuned)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{op}: {name}{at} must be float32, bfloat16 or float16, got {t.dtype}")
    if base.shape != tuned.shape:
        raise ValueError(f"{op}: base{at} has shape {list(base.shape)}, tuned{at} {list(tuned.shape)}")
    if base.device != tuned.device:
        raise ValueError(f"{op}: base{at} is on {base.device}, tuned{at} on {tuned.device}")


def _check_histogram(base, tuned, level: int, prefix: int) -> None:
    _check_pairs("select_histogram", base, tuned)
    if level not in (0, 1):
        raise ValueError(f"select_histogram: level must be 0 or 1, got {level}")
    if not 0 <= prefix < SELECT_BINS[0]:
        raise ValueError(f"select_histogram: prefix must be in [0, {SELECT_BINS[0]}), got {prefix}")


def _check_pairs(op: str, base, tuned) -> None:
    if len(base) != len(tuned):
        raise ValueError(f"{op}: {len(base)} base tensors but {len(tuned)} tuned")
    for i, (a, b) in enumerate(zip(base, tuned)):
        _check_pair(op, a, b, i)
    if len({t.device for t in base}) > 1:
        raise ValueError(f"{op}: all pairs must be on one device, got {sorted({str(t.device) for t in base})}")


def _check_mask(base, tuned, threshold: int, tie_budget: int) -> None:
    _check_pairs("select_mask", base, tuned)
    if not 0 < threshold < 2**31:
        raise ValueError(f"select_mask: threshold must be a positive key, in [1, 2^31), got {threshold}")
    if tie_budget < 0:
        raise ValueError(f"select_mask: tie_budget must be >= 0, got {tie_budget}")


def _select_keys(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """int32 keys: the bits of |fp32(base) − fp32(tuned)| (non-negative floats order like their bits)."""
    diff = base.reshape(-1).to(torch.float32) - tuned.reshape(-1).to(torch.float32)
    return diff.view(torch.int32) & 0x7FFFFFFF


def _histogram_reference(base: list[torch.Tensor], tuned: list[torch.Tensor], level: int, prefix: int):
    bins = SELECT_BINS[level]
    device = base[0].device if len(base) else torch.device("cpu")
    hist = torch.zeros(bins, dtype=torch.int64, device=device)
    top = torch.full((len(base),), -1, dtype=torch.int64, device=device)
    for i, (a, b) in enumerate(zip(base, tuned)):
        key = _select_keys(a, b)
        key = key[key != 0]
        if level == 1:
            key = key[(key >> 16) == prefix]
        h = torch.bincount(key >> 16 if level == 0 else key & 0xFFFF, minlength=bins).to(torch.int64)
        hist += h
        if key.numel():
            top[i] = int(h.nonzero().max())
    return hist, top


def _mask_reference(base: list[torch.Tensor], tuned: list[torch.Tensor], threshold: int, tie_budget: int):
    device = base[0].device if len(base) else torch.device("cpu")
    words, n_eq, left = [torch.empty(0, dtype=torch.int32, device=device)], [], tie_budget
    for a, b in zip(base, tuned):
        key = _select_keys(a, b)
        eq = key == threshold
        keep_tie = eq & (torch.cumsum(eq, 0) <= left)
        words.append(_pack_reference((key > threshold) | keep_tie))
        n_eq.append(int(eq.sum()))
        left -= min(left, n_eq[-1])
    return torch.cat(words), torch.tensor(n_eq, dtype=torch.int64, device=device)


def _histogram_fake(base, tuned, level, prefix):
    like = base[0] if len(base) else torch.empty(0)
    return (like.new_empty((SELECT_BINS[1 if level else 0],), dtype=torch.int64),
            like.new_empty((len(base),), dtype=torch.int64))


def _mask_fake(base, tuned, threshold, tie_budget):
    like = base[0] if len(base) else torch.empty(0)
    nwords = sum((t.numel() + 31) // 32 for t in base)
    return like.new_empty((nwords,), dtype=torch.int32), like.new_empty((len(base),), dtype=torch.int64)


select_histogram = Op("select_histogram(Tensor[] base, Tensor[] tuned, int level, int prefix) -> (Tensor, Tensor)",
                      check=_check_histogram, fake=_histogram_fake, reference=_histogram_reference,
                      triton_module="select")
select_histogram.__doc__ = """(hist, top) over a list of (base, tuned) pairs, one pass over all of them (the C++ kernel
splits one work list of chunks over the threads, whatever the tensor sizes). hist: int64 histogram of
the nonzero keys of every pair; level 0: 32768 bins, bin = key >> 16; level 1: 65536 bins, bin = key &
0xffff, only keys with key >> 16 == prefix. top: int64[len(base)], the highest nonempty bin of each
pair alone, -1 if it has none (a level-0 top >= 0x7f80 is an Inf/NaN diff)."""

select_mask = Op("select_mask(Tensor[] base, Tensor[] tuned, int threshold, int tie_budget) -> (Tensor, Tensor)",
                 check=_check_mask, fake=_mask_fake, reference=_mask_reference, triton_module="select")
select_mask.__doc__ = """(words, n_eq) for a list of (base, tuned) pairs, one pass over all of them. words: int32, each
pair's ceil(n / 32) mask words concatenated in list order; an element's bit is set iff key >
threshold, or key == threshold and it is among the first tie_budget such elements in (pair, flat
index) order. n_eq: int64[len(base)], the elements of each pair with key == threshold."""


def core_region_topk(base: list[tuple[str, torch.Tensor]], tuned: list[tuple[str, torch.Tensor]],
                     k: int) -> dict[str, torch.Tensor]:
    """The path users write today: concatenate every |base − tuned| (fp32) and `torch.topk` it.

    Same semantics as cpift_fast.core_region (zero diffs never selected; ties at the threshold go
    to the earliest (tensor, flat index)), but it materializes the whole diff: 4 bytes per element,
    and `topk`/`sort` on one dimension are limited to < 2^31 elements. {name: bool tensor}.
    """
    diff = torch.cat([(b.reshape(-1).float() - t.reshape(-1).float()).abs() for (_, b), (_, t) in zip(base, tuned)])
    if diff.numel() >= 2**31:
        raise ValueError(f"core_region_topk: {diff.numel()} elements; torch.topk needs < 2^31")
    k = min(k, int((diff > 0).sum()))
    bits = torch.zeros_like(diff, dtype=torch.bool)
    if k > 0:
        threshold = torch.topk(diff, k, sorted=False).values.min()
        eq = diff == threshold
        bits = (diff > threshold) | (eq & (torch.cumsum(eq, 0) <= k - int((diff > threshold).sum())))
    out, start = {}, 0
    for name, b in base:
        out[name] = bits[start:start + b.numel()].view(b.shape)
        start += b.numel()
    return out
