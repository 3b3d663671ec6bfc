"""Pure-PyTorch implementation of every cpift op.

Three roles: the fallback on any device, the oracle the tests compare the fused kernels with, and
the "pure-PyTorch path" every benchmark measures against. Signatures match `torch.ops.cpift.*`
and `cpift_fast.kernels.*` exactly; clarity beats speed here.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# masks: bit i of a segment is bit (i % 32) of word offset + i // 32
# ---------------------------------------------------------------------------------------------


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=device), torch.arange(32, device=device))


def _to_int32_wrapping(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def mask_pack(bits: torch.Tensor) -> torch.Tensor:
    flat = bits.reshape(-1).to(torch.int64)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % 32)).view(-1, 32)
    return _to_int32_wrapping((padded * _bit_values(bits.device)).sum(dim=1))


def mask_unpack(words: torch.Tensor, numel: int) -> torch.Tensor:
    w = words[: (numel + 31) // 32].to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(1) >> torch.arange(32, device=words.device)) & 1
    return bits.view(-1)[:numel].to(torch.bool)


def _popcount_words(words: torch.Tensor) -> torch.Tensor:
    """Bits set per word (SWAR on int64 lanes)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return ((w * 0x01010101) & 0xFFFFFFFF) >> 24


def mask_popcount(words: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    per_word = _popcount_words(words)
    bounds = offsets.tolist()
    counts = [per_word[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=words.device)
    return torch.stack(counts).to(torch.int64)


def mask_binary(a: torch.Tensor, b: torch.Tensor, op: int) -> torch.Tensor:
    if op == 0:
        return a & b
    if op == 1:
        return a | b
    if op == 2:
        return a & ~b
    if op == 3:
        return a ^ b
    raise ValueError(f"mask_binary: op must be 0 (and), 1 (or), 2 (andnot), 3 (xor); got {op}")


# ---------------------------------------------------------------------------------------------
# masked AdamW (issue 3)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# core selection (issue 4)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# overlap and fusion (issue 5)
# ---------------------------------------------------------------------------------------------
