"""Triton kernel for pairwise mask overlap: popcount(m_i & m_j) for all pairs of T masks, one pass.

Masks are separate int32 buffers; the launcher passes the first one's pointer plus each mask's
word offset relative to it (no stacking copy). A program loads a [T_PAD, BLOCK] tile of words
(each word from memory once), ANDs it with each of the T rows (re-read from cache) and writes
per-block partial counts [T_PAD, T_PAD]; the blocks are summed in int64. Word indices and partial
offsets are int64. Arguments (same layout, int32, one device) are checked by the op
(cpift_fast/ops/overlap.py), not here.
"""

import torch
import triton
import triton.language as tl

from ._common import FP_OPTIONS, KernelSpec, popcount32, use_libdevice

BLOCK_WORDS = 1024  # words per program for T <= 8; fewer for more masks
MAX_T = 16  # masks the AOT gate compiles for (every T in 1..MAX_T); more is legal, just not pre-compiled


def _block(t_pad: int) -> int:
    return max(64, min(BLOCK_WORDS, 8192 // t_pad))  # keep the [T_PAD, BLOCK] tile in registers


def _warps(t_pad: int) -> int:
    return 8 if t_pad >= 16 else 4  # 16+ rows: spread the tile over more threads (4 warps spill on sm_90)


@triton.jit
def _overlap_kernel(base_ptr, offs_ptr, partial_ptr, nwords: tl.int64, T: tl.constexpr, T_PAD: tl.constexpr,
                    BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
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
    words = [m.reshape(-1) for m in masks]
    words = [w if w.is_contiguous() else w.contiguous() for w in words]
    nwords = words[0].numel()
    dev = words[0].device
    out = torch.zeros(T, T, dtype=torch.int64, device=dev)
    if nwords == 0:
        return out
    base = words[0].data_ptr()
    offs = torch.tensor([(w.data_ptr() - base) // 4 for w in words], dtype=torch.int64, device=dev)
    t_pad = triton.next_power_of_2(T)
    block = _block(t_pad)
    grid = triton.cdiv(nwords, block)
    partial = torch.empty(grid, t_pad, t_pad, dtype=torch.int32, device=dev)
    _overlap_kernel[(grid,)](words[0], offs, partial, nwords, T=T, T_PAD=t_pad, BLOCK=block,
                             USE_LIBDEVICE=use_libdevice(words[0]), num_warps=_warps(t_pad), **FP_OPTIONS)
    counts = partial.sum(dim=0, dtype=torch.int64)[:T, :T]
    # keep every input alive until the kernel has read it (offsets are raw pointer differences)
    del words
    return counts.contiguous()


def aot_specs():
    """Specializations the launcher takes for T = 1..MAX_T masks (compiled by tools/triton_aot.py)."""
    for T in range(1, MAX_T + 1):
        t_pad = triton.next_power_of_2(T)
        for lib in (False, True):
            yield KernelSpec(_overlap_kernel, {"base_ptr": "*i32", "offs_ptr": "*i64", "partial_ptr": "*i32"},
                             {"T": T, "T_PAD": t_pad, "BLOCK": _block(t_pad), "USE_LIBDEVICE": lib},
                             num_warps=_warps(t_pad))
