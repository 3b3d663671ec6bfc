"""Triton kernels for bit-packed masks: pack, unpack, per-segment popcount, word-wise algebra.

Bit i of a segment is bit (i % 32) of word offset + i // 32. Words are int32; every kernel works
on them as uint32 so that shifts are logical.
"""

import torch
import triton
import triton.language as tl

WORDS_PER_BLOCK = 1024


@triton.jit
def popcount32(x, USE_LIBDEVICE: tl.constexpr):
    """Bits set in each uint32 lane: libdevice popc on GPU, SWAR (portable, interpreter) else."""
    if USE_LIBDEVICE:
        from triton.language.extra import libdevice

        return libdevice.popc(x.to(tl.int32))
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


def use_libdevice(t: torch.Tensor) -> bool:
    import os

    return t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _pack_kernel(bits_ptr, words_ptr, n, nwords, BLOCK: tl.constexpr):
    w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.arange(0, 32)
    idx = w[:, None] * 32 + b[None, :]
    bit = tl.load(bits_ptr + idx, mask=idx < n, other=0).to(tl.uint32)
    word = tl.sum(bit << b[None, :].to(tl.uint32), axis=1)
    tl.store(words_ptr + w, word.to(tl.int32, bitcast=True), mask=w < nwords)


@triton.jit
def _unpack_kernel(words_ptr, bits_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    word = tl.load(words_ptr + (i >> 5), mask=inside, other=0).to(tl.uint32, bitcast=True)
    bit = (word >> (i & 31).to(tl.uint32)) & 1
    tl.store(bits_ptr + i, bit.to(tl.int1), mask=inside)


@triton.jit
def _popcount_blocks_kernel(words_ptr, block_start_ptr, block_end_ptr, out_ptr, BLOCK: tl.constexpr,
                            USE_LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0)
    start = tl.load(block_start_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    i = start + tl.arange(0, BLOCK)
    word = tl.load(words_ptr + i, mask=i < end, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + pid, tl.sum(popcount32(word, USE_LIBDEVICE), axis=0))


@triton.jit
def _binary_kernel(a_ptr, b_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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
        block = 128
        _pack_kernel[(triton.cdiv(words.numel(), block),)](flat.view(torch.uint8), words, n, words.numel(),
                                                            BLOCK=block)
    return words


def mask_unpack(words: torch.Tensor, numel: int) -> torch.Tensor:
    bits = torch.empty(numel, dtype=torch.bool, device=words.device)
    if numel:
        block = 4096
        _unpack_kernel[(triton.cdiv(numel, block),)](words, bits, numel, BLOCK=block)
    return bits


def segment_blocks(offsets: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each segment [offsets[s], offsets[s+1]) into chunks of at most `block` words.

    Returns (start, end, segment) per chunk: the table that lets one launch cover every tensor.
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


def mask_popcount(words: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    nseg = offsets.numel() - 1
    start, end, segment = segment_blocks(offsets, WORDS_PER_BLOCK)
    counts = torch.zeros(nseg, dtype=torch.int64, device=words.device)
    if start.numel() == 0:
        return counts
    dev = words.device
    partial = torch.empty(start.numel(), dtype=torch.int32, device=dev)
    _popcount_blocks_kernel[(start.numel(),)](words, start.to(dev), end.to(dev), partial, BLOCK=WORDS_PER_BLOCK,
                                              USE_LIBDEVICE=use_libdevice(words))
    return counts.index_add_(0, segment.to(dev), partial.to(torch.int64))


def mask_binary(a: torch.Tensor, b: torch.Tensor, op: int) -> torch.Tensor:
    out = torch.empty_like(a)
    if a.numel():
        block = 4096
        _binary_kernel[(triton.cdiv(a.numel(), block),)](a, b, out, a.numel(), OP=op, BLOCK=block)
    return out
