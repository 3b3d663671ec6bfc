"""Launch helpers shared by the multi-tensor Triton kernels (kernels/adamw.py, kernels/importance.py).

A launch covers every tensor of one (device, dtype...) bucket: a block table (tensor, first element)
from `segment_blocks`, int64 tables of sizes and element offsets copied to the device at once, and
tensors addressed as a typed base pointer (the bucket's first tensor) plus a per-tensor element
offset, with a 16-byte alignment hint when every data pointer allows it.
"""

import functools

import torch
import triton
import triton.language as tl

from .mask import segment_blocks


@triton.jit
def _at(base, offs_table, t, ALIGN: tl.constexpr):
    """Tensor t's data: `base` (a typed pointer, 16-byte aligned) plus its element offset from the
    table. ALIGN > 1 asserts the offset is a multiple of ALIGN elements (the launcher checked every
    pointer is 16-byte aligned), so full blocks load and store 16 bytes per instruction."""
    off = tl.load(offs_table + t)
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return base + off


@functools.lru_cache(maxsize=64)
def _block_table(numels: tuple[int, ...], block: int, device: torch.device):
    """(tensor index int32, first element int64, first block of each tensor int64 [T+1]) for blocks of
    BLOCK elements of tensors with these sizes, on `device`; cached: sizes rarely change between steps."""
    offsets = torch.tensor((0,) + numels, dtype=torch.int64).cumsum(0)
    start, _, segment = segment_blocks(offsets, block)
    counts = torch.bincount(segment, minlength=len(numels))
    first = torch.zeros(len(numels) + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=first[1:])
    return segment.to(device=device, dtype=torch.int32), (start - offsets[segment]).to(device), first.to(device)


def _buckets(tensors: list[torch.Tensor], key) -> list[tuple[torch.device, list[int]]]:
    """Indices of the non-empty tensors grouped by (device, key(i)): one launch per group."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault((t.device, key(i)), []).append(i)
    return [(device, index) for (device, _), index in groups.items()]


def _table(rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 rows (sizes, data pointers) in one host-to-device copy; returns one view per row."""
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    return list(table.unbind(0))


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 1.0 and -1.0 (grad_scale without GradScaler, maximize), 0.0 (found_inf without one)."""
    return tuple(torch.tensor([v], dtype=torch.float32, device=device) for v in (1.0, -1.0, 0.0))


def _align(*lists: list[torch.Tensor]) -> int:
    """Elements per 16 bytes when every data pointer is 16-byte aligned (what the kernel's alignment
    hint then asserts), else 1 (no hint)."""
    if all(t.data_ptr() % 16 == 0 for ts in lists for t in ts):
        return 16 // lists[0][0].element_size()
    return 1


def _offsets(ts: list[torch.Tensor]) -> list[int]:
    """Element offsets of each tensor's data from the first one's (the kernel's typed base pointer)."""
    base, size = ts[0].data_ptr(), ts[0].element_size()
    return [(t.data_ptr() - base) // size for t in ts]
