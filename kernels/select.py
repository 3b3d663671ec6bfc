"""Triton kernels for core selection: fused |base − tuned| → key histograms and mask bits.

key = bits(fp32(base) − fp32(tuned)) & 0x7fffffff (non-negative floats order like their
bits). Histograms use global atomics (int64 bins). The mask is written in two launches: one counts
the keys equal to the threshold per block, a host cumsum turns the counts into each block's tie
rank offset, and the second writes bit = key > threshold | (key == threshold & tie rank <= budget),
so ties go to the earliest flat indices exactly as in the C++ and reference ops.
"""

import torch
import triton
import triton.language as tl

HIST_BLOCK = 4096
MASK_WORDS = 64  # words per program in the mask kernels (2048 elements)


@triton.jit
def _keys(a_ptr, b_ptr, offs, inside):
    a = tl.load(a_ptr + offs, mask=inside, other=0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=inside, other=0).to(tl.float32)
    return (a - b).to(tl.int32, bitcast=True) & 0x7FFFFFFF  # sign cleared: fits int32, compares signed


@triton.jit
def _hist_kernel(a_ptr, b_ptr, hist_ptr, n, prefix, LEVEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    key = _keys(a_ptr, b_ptr, offs, inside)
    valid = inside & (key != 0)
    if LEVEL == 0:
        bins = key >> 16
    else:
        valid = valid & ((key >> 16) == prefix)
        bins = key & 0xFFFF
    ones = tl.full([BLOCK], 1, tl.int64)
    tl.atomic_add(hist_ptr + bins, ones, mask=valid)


@triton.jit
def _tie_count_kernel(a_ptr, b_ptr, counts_ptr, n, threshold, WORDS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * (WORDS * 32) + tl.arange(0, WORDS * 32)
    inside = offs < n
    key = _keys(a_ptr, b_ptr, offs, inside)
    eq = (inside & (key == threshold)).to(tl.int64)
    tl.store(counts_ptr + tl.program_id(0), tl.sum(eq, axis=0))


@triton.jit
def _mask_kernel(a_ptr, b_ptr, words_ptr, tie_offset_ptr, n, nwords, threshold, tie_budget, WORDS: tl.constexpr):
    pid = tl.program_id(0)
    w = pid.to(tl.int64) * WORDS + tl.arange(0, WORDS)
    bit = tl.arange(0, 32)
    offs = w[:, None] * 32 + bit[None, :]
    inside = offs < n
    key = _keys(a_ptr, b_ptr, offs, inside)
    gt = inside & (key > threshold)
    eq = inside & (key == threshold)
    eq_i = eq.to(tl.int64)
    row = tl.sum(eq_i, axis=1)
    row_before = tl.cumsum(row, axis=0) - row
    rank = tl.load(tie_offset_ptr + pid) + row_before[:, None] + tl.cumsum(eq_i, axis=1)  # 1-based tie rank
    take = gt | (eq & (rank <= tie_budget))
    word = tl.sum(take.to(tl.uint32) << bit[None, :].to(tl.uint32), axis=1)
    tl.store(words_ptr + w, word.to(tl.int32, bitcast=True), mask=w < nwords)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1)


def select_histogram(base: torch.Tensor, tuned: torch.Tensor, level: int, prefix: int) -> torch.Tensor:
    if level not in (0, 1):
        raise ValueError(f"select_histogram: level must be 0 or 1, got {level}")
    a, b = _flat(base), _flat(tuned)
    hist = torch.zeros(1 << (15 if level == 0 else 16), dtype=torch.int64, device=a.device)
    n = a.numel()
    if n:
        _hist_kernel[(triton.cdiv(n, HIST_BLOCK),)](a, b, hist, n, prefix, LEVEL=level, BLOCK=HIST_BLOCK)
    return hist


def select_mask(base: torch.Tensor, tuned: torch.Tensor, threshold: int, tie_budget: int):
    a, b = _flat(base), _flat(tuned)
    n = a.numel()
    nwords = (n + 31) // 32
    words = torch.empty(nwords, dtype=torch.int32, device=a.device)
    if n == 0:
        return words, torch.zeros((), dtype=torch.int64, device=a.device)
    grid = (triton.cdiv(nwords, MASK_WORDS),)
    counts = torch.empty(grid[0], dtype=torch.int64, device=a.device)
    _tie_count_kernel[grid](a, b, counts, n, threshold, WORDS=MASK_WORDS)
    tie_offset = torch.cumsum(counts, 0) - counts
    _mask_kernel[grid](a, b, words, tie_offset, n, nwords, threshold, tie_budget, WORDS=MASK_WORDS)
    return words, counts.sum()
