"""Triton kernels for core selection: fused |base − tuned| → key histograms and mask bits.

key = bits(fp32(base) − fp32(tuned)) & 0x7fffffff (non-negative floats order like their
bits). Histograms use global atomics (int64 bins, relaxed ordering: only the final counts matter,
read after the launch). The mask is written in two launches: one counts
the keys equal to the threshold per block, a host cumsum turns the counts into each block's tie
rank offset, and the second writes bit = key > threshold | (key == threshold & tie rank <= budget),
so ties go to the earliest flat indices exactly as in the C++ and reference ops. Indices and sizes
are int64. Arguments are checked by the op (cpift_fast/ops/select.py), not here.
"""

import torch
import triton
import triton.language as tl

from ._common import FP_OPTIONS, KernelSpec, to_f32

HIST_BLOCK = 4096
MASK_WORDS = 64  # words per program in the mask kernels (2048 elements)


@triton.jit
def _keys(a_ptr, b_ptr, offs, inside):
    a = to_f32(tl.load(a_ptr + offs, mask=inside, other=0))
    b = to_f32(tl.load(b_ptr + offs, mask=inside, other=0))
    return (a - b).to(tl.int32, bitcast=True) & 0x7FFFFFFF  # sign cleared: fits int32, compares signed


@triton.jit
def _hist_kernel(a_ptr, b_ptr, hist_ptr, n: tl.int64, prefix: tl.int32, LEVEL: tl.constexpr, BLOCK: tl.constexpr):
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
    tl.atomic_add(hist_ptr + bins, ones, mask=valid, sem="relaxed")


@triton.jit
def _tie_count_kernel(a_ptr, b_ptr, counts_ptr, n: tl.int64, threshold: tl.int32, WORDS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * (WORDS * 32) + tl.arange(0, WORDS * 32)
    inside = offs < n
    key = _keys(a_ptr, b_ptr, offs, inside)
    eq = (inside & (key == threshold)).to(tl.int64)
    tl.store(counts_ptr + tl.program_id(0), tl.sum(eq, axis=0))


@triton.jit
def _mask_kernel(a_ptr, b_ptr, words_ptr, tie_offset_ptr, n: tl.int64, nwords: tl.int64, threshold: tl.int32,
                 tie_budget: tl.int64, WORDS: tl.constexpr):
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


HIST_ROWS = 32  # pairs histogrammed at a time, each into its own row (level 1: 16 MB of int64 rows)


def select_histogram(base: list[torch.Tensor], tuned: list[torch.Tensor], level: int, prefix: int):
    """One launch per pair, each into its own row of a [HIST_ROWS, bins] table (so each pair's top
    bin can be read off), the rows summed into the histogram after each group of pairs."""
    bins = 1 << (15 if level == 0 else 16)
    device = base[0].device if len(base) else torch.device("cpu")
    hist = torch.zeros(bins, dtype=torch.int64, device=device)
    tops = [torch.empty(0, dtype=torch.int64, device=device)]
    index = torch.arange(bins, device=device)
    for start in range(0, len(base), HIST_ROWS):
        pairs = list(zip(base[start:start + HIST_ROWS], tuned[start:start + HIST_ROWS]))
        rows = torch.zeros(len(pairs), bins, dtype=torch.int64, device=device)
        for row, (a, b) in zip(rows, pairs):
            a, b = _flat(a), _flat(b)
            n = a.numel()
            if n:
                _hist_kernel[(triton.cdiv(n, HIST_BLOCK),)](a, b, row, n, prefix, LEVEL=level, BLOCK=HIST_BLOCK,
                                                            **FP_OPTIONS)
        hist += rows.sum(dim=0)
        tops.append(torch.where(rows > 0, index, -1).amax(dim=1))
    return hist, torch.cat(tops)


def select_mask(base: list[torch.Tensor], tuned: list[torch.Tensor], threshold: int, tie_budget: int):
    """Tie counts of every pair's blocks first, one cumsum over all of them (the tie rank offsets
    across the whole list), then the mask launches: no host sync between pairs."""
    device = base[0].device if len(base) else torch.device("cpu")
    pairs = [(_flat(a), _flat(b)) for a, b in zip(base, tuned)]
    nwords = [(a.numel() + 31) // 32 for a, _ in pairs]
    words = torch.empty(sum(nwords), dtype=torch.int32, device=device)
    counts = []
    for (a, b), nw in zip(pairs, nwords):
        c = torch.zeros(triton.cdiv(nw, MASK_WORDS), dtype=torch.int64, device=device)
        if nw:
            _tie_count_kernel[(c.numel(),)](a, b, c, a.numel(), threshold, WORDS=MASK_WORDS, **FP_OPTIONS)
        counts.append(c)
    flat = torch.cat([torch.empty(0, dtype=torch.int64, device=device), *counts])
    offsets = (torch.cumsum(flat, 0) - flat).split([c.numel() for c in counts])
    start = 0
    for (a, b), nw, offset in zip(pairs, nwords, offsets):
        if nw:
            _mask_kernel[(offset.numel(),)](a, b, words[start:start + nw], offset, a.numel(), nw, threshold,
                                            tie_budget, WORDS=MASK_WORDS, **FP_OPTIONS)
        start += nw
    n_eq = torch.stack([c.sum() for c in counts]) if counts else flat
    return words, n_eq


_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}


def aot_specs():
    """Every specialization the launchers above can take (compiled by tools/triton_aot.py):
    base and tuned each float32, bfloat16 or float16."""
    for ta in _PTR.values():
        for tb in _PTR.values():
            for level in (0, 1):
                yield KernelSpec(_hist_kernel, {"a_ptr": ta, "b_ptr": tb, "hist_ptr": "*i64"},
                                 {"LEVEL": level, "BLOCK": HIST_BLOCK})
            yield KernelSpec(_tie_count_kernel, {"a_ptr": ta, "b_ptr": tb, "counts_ptr": "*i64"},
                             {"WORDS": MASK_WORDS})
            yield KernelSpec(_mask_kernel, {"a_ptr": ta, "b_ptr": tb, "words_ptr": "*i32", "tie_offset_ptr": "*i64"},
                             {"WORDS": MASK_WORDS})
