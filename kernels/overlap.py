"""Triton kernel for pairwise mask overlap: popcount(m_i & m_j) for all pairs of T masks, one pass.

Masks are separate int32 buffers; the launcher passes the first one's pointer plus each mask's
word offset relative to it (no stacking copy). A program loads a [T_PAD, BLOCK] tile of words
(each word from memory once), ANDs it with each of the T rows (re-read from cache) and writes
per-block partial counts [T_PAD, T_PAD]; the blocks are summed in int64.
"""

import torch
import triton
import triton.language as tl

from .mask import popcount32, use_libdevice

BLOCK_WORDS = 1024  # words per program for T <= 8; fewer for more masks


@triton.jit
def _overlap_kernel(base_ptr, offs_ptr, partial_ptr, nwords, T: tl.constexpr, T_PAD: tl.constexpr,
                    BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    rows = tl.arange(0, T_PAD)
    row_off = tl.load(offs_ptr + rows, mask=rows < T, other=0)
    inside = cols < nwords
    tile = tl.load(base_ptr + row_off[:, None] + cols[None, :], mask=(rows[:, None] < T) & inside[None, :],
                   other=0).to(tl.uint32, bitcast=True)
    for i in tl.static_range(T):
        off_i = tl.load(offs_ptr + i)
        row = tl.load(base_ptr + off_i + cols, mask=inside, other=0).to(tl.uint32, bitcast=True)
        counts = tl.sum(popcount32(tile & row[None, :], USE_LIBDEVICE), axis=1)
        tl.store(partial_ptr + (pid * T_PAD + i) * T_PAD + rows, counts)


def overlap_counts(masks: list[torch.Tensor]) -> torch.Tensor:
    T = len(masks)
    if T == 0:
        return torch.zeros(0, 0, dtype=torch.int64)
    words = [m.reshape(-1) for m in masks]
    nwords = words[0].numel()
    for i, w in enumerate(words):
        if w.dtype != torch.int32:
            raise ValueError(f"overlap_counts: mask {i} must be int32 words, got {w.dtype}")
        if w.numel() != nwords:
            raise ValueError(f"overlap_counts: mask {i} has {w.numel()} words, mask 0 has {nwords} "
                             "(masks must share one layout)")
        if w.device != words[0].device:
            raise ValueError(f"overlap_counts: mask {i} is on {w.device}, mask 0 on {words[0].device}")
    words = [w if w.is_contiguous() else w.contiguous() for w in words]
    dev = words[0].device
    out = torch.zeros(T, T, dtype=torch.int64, device=dev)
    if nwords == 0:
        return out
    base = words[0].data_ptr()
    offs = torch.tensor([(w.data_ptr() - base) // 4 for w in words], dtype=torch.int64, device=dev)
    t_pad = triton.next_power_of_2(T)
    block = max(64, min(BLOCK_WORDS, 8192 // t_pad))  # keep the [T_PAD, BLOCK] tile in registers
    grid = triton.cdiv(nwords, block)
    partial = torch.empty(grid, t_pad, t_pad, dtype=torch.int32, device=dev)
    _overlap_kernel[(grid,)](words[0], offs, partial, nwords, T=T, T_PAD=t_pad, BLOCK=block,
                             USE_LIBDEVICE=use_libdevice(words[0]))
    counts = partial.sum(dim=0, dtype=torch.int64)[:T, :T]
    # keep every input alive until the kernel has read it (offsets are raw pointer differences)
    del words
    return counts.contiguous()
