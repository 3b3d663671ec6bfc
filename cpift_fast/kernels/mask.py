"""Triton kernels for bit-packed masks: pack, unpack, per-segment popcount, word-wise algebra.

Bit i of a segment is bit (i % 32) of word offset + i // 32. Words are int32; every kernel works
on them as uint32 so that shifts are logical. Element and word indices are int64 (a mask may hold
more than 2^31 elements); sizes are passed as int64 (`tl.int64` annotations), so one compiled
kernel serves every size. Arguments are checked by the op (cpift_fast/ops/mask.py), not here.
"""

import torch
import triton
import triton.language as tl

from ._common import FP_OPTIONS, KernelSpec, popcount32, use_libdevice

PACK_WORDS = 128  # words per program in pack (4096 bits)
ELEMENTS = 4096  # elements (unpack) or words (binary) per program
WORDS_PER_BLOCK = 1024  # words per program in popcount


@triton.jit
def _pack_kernel(bits_ptr, words_ptr, n: tl.int64, nwords: tl.int64, BLOCK: tl.constexpr):
    w = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    b = tl.arange(0, 32)
    idx = w[:, None] * 32 + b[None, :]
    bit = tl.load(bits_ptr + idx, mask=idx < n, other=0).to(tl.uint32)
    word = tl.sum(bit << b[None, :].to(tl.uint32), axis=1)
    tl.store(words_ptr + w, word.to(tl.int32, bitcast=True), mask=w < nwords)


@triton.jit
def _unpack_kernel(words_ptr, bits_ptr, n: tl.int64, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    word = tl.load(words_ptr + (i >> 5), mask=inside, other=0).to(tl.uint32, bitcast=True)
    bit = (word >> (i & 31).to(tl.uint32)) & 1
    tl.store(bits_ptr + i, bit.to(tl.int1), mask=inside)


@triton.jit
def _popcount_blocks_kernel(words_ptr, block_start_ptr, block_end_ptr, out_ptr, BLOCK: tl.constexpr,
                            USE_LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0)
    start = tl.load(block_start_ptr + pid)  # int64 word index
    end = tl.load(block_end_ptr + pid)
    i = start + tl.arange(0, BLOCK)
    word = tl.load(words_ptr + i, mask=i < end, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + pid, tl.sum(popcount32(word, USE_LIBDEVICE), axis=0))


@triton.jit
def _binary_kernel(a_ptr, b_ptr, out_ptr, n: tl.int64, OP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    a = tl.load(a_ptr + i, mask=inside, other=0)
    b = tl.load(b_ptr + i, mask=inside, other=0)
    if OP == 0:
        r = a & b
    elif OP == 1:
        r = a | b
    elif OP == 2:
        r = a & ~b
    else:
        r = a ^ b
    tl.store(out_ptr + i, r, mask=inside)


def mask_pack(bits: torch.Tensor) -> torch.Tensor:
    flat = bits.contiguous().view(-1)
    n = flat.numel()
    words = torch.empty((n + 31) // 32, dtype=torch.int32, device=flat.device)
    if words.numel():
        _pack_kernel[(triton.cdiv(words.numel(), PACK_WORDS),)](flat.view(torch.uint8), words, n, words.numel(),
                                                                 BLOCK=PACK_WORDS, **FP_OPTIONS)
    return words


def mask_unpack(words: torch.Tensor, numel: int) -> torch.Tensor:
    bits = torch.empty(numel, dtype=torch.bool, device=words.device)
    if numel:
        _unpack_kernel[(triton.cdiv(numel, ELEMENTS),)](words, bits, numel, BLOCK=ELEMENTS, **FP_OPTIONS)
    return bits


def segment_blocks(offsets: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each segment [offsets[s], offsets[s+1]) into chunks of at most `block` words.

    Returns (start, end, segment) per chunk, in segment order: the table that lets one launch cover
    every tensor.
    """
    offs = offsets.to("cpu", torch.int64)
    lengths = offs[1:] - offs[:-1]
    chunks = (lengths + block - 1) // block
    segment = torch.repeat_interleave(torch.arange(len(lengths)), chunks)
    first_chunk = torch.cumsum(chunks, 0) - chunks
    within = torch.arange(int(chunks.sum())) - torch.repeat_interleave(first_chunk, chunks)
    start = offs[:-1][segment] + within * block
    end = torch.minimum(start + block, offs[1:][segment])
    return start, end, segment


def segment_sum(partial: torch.Tensor, chunks_per_segment: torch.Tensor) -> torch.Tensor:
    """Per-segment int64 sums of consecutive runs of `partial` (run s has chunks_per_segment[s] items).

    A difference of an integer prefix sum: deterministic on every device (no atomics, unlike
    index_add_ on CUDA), exact in int64.
    """
    dev = partial.device
    prefix = torch.zeros(partial.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(partial.to(torch.int64), 0, out=prefix[1:])
    bounds = torch.zeros(chunks_per_segment.numel() + 1, dtype=torch.int64)
    torch.cumsum(chunks_per_segment.to(torch.int64), 0, out=bounds[1:])
    bounds = bounds.to(dev)
    return prefix[bounds[1:]] - prefix[bounds[:-1]]


def mask_popcount(words: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    nseg = offsets.numel() - 1
    start, end, segment = segment_blocks(offsets, WORDS_PER_BLOCK)
    if start.numel() == 0:
        return torch.zeros(nseg, dtype=torch.int64, device=words.device)
    dev = words.device
    partial = torch.empty(start.numel(), dtype=torch.int32, device=dev)
    _popcount_blocks_kernel[(start.numel(),)](words, start.to(dev), end.to(dev), partial, BLOCK=WORDS_PER_BLOCK,
                                              USE_LIBDEVICE=use_libdevice(words), **FP_OPTIONS)
    return segment_sum(partial, torch.bincount(segment, minlength=nseg))


def mask_binary(a: torch.Tensor, b: torch.Tensor, op: int) -> torch.Tensor:
    out = torch.empty_like(a)
    if a.numel():
        _binary_kernel[(triton.cdiv(a.numel(), ELEMENTS),)](a, b, out, a.numel(), OP=op, BLOCK=ELEMENTS,
                                                             **FP_OPTIONS)
    return out


def aot_specs():
    """Every specialization the launchers above can take (compiled by tools/triton_aot.py)."""
    yield KernelSpec(_pack_kernel, {"bits_ptr": "*u8", "words_ptr": "*i32"}, {"BLOCK": PACK_WORDS})
    yield KernelSpec(_unpack_kernel, {"words_ptr": "*i32", "bits_ptr": "*u1"}, {"BLOCK": ELEMENTS})
    for lib in (False, True):
        yield KernelSpec(_popcount_blocks_kernel, {"words_ptr": "*i32", "block_start_ptr": "*i64",
                                                   "block_end_ptr": "*i64", "out_ptr": "*i32"},
                         {"BLOCK": WORDS_PER_BLOCK, "USE_LIBDEVICE": lib})
    for op in range(4):
        yield KernelSpec(_binary_kernel, {"a_ptr": "*i32", "b_ptr": "*i32", "out_ptr": "*i32"},
                         {"OP": op, "BLOCK": ELEMENTS})
