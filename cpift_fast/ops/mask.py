"""Bit-packed mask ops: pack, unpack, per-segment popcount, word-wise set algebra.

Layout: bit i of a segment is bit (i % 32) of word ``offset + i // 32`` (int32 words, read as
uint32). Backends: C++ (csrc/mask.cpp) on CPU, Triton (cpift_fast/kernels/mask.py) on CUDA, the reference
below elsewhere; ``cpift_cuda`` CUDA C++ kernels (csrc/cuda/mask.cu) for popcount and binary.
"""

from __future__ import annotations

import torch

from .._ops import Op

MASK_AND, MASK_OR, MASK_ANDNOT, MASK_XOR = 0, 1, 2, 3


def _check_words(op: str, name: str, words: torch.Tensor) -> None:
    if words.dtype != torch.int32 or words.dim() != 1:
        raise ValueError(f"{op}: {name} must be a 1-D int32 tensor of mask words, got {words.dtype} of shape "
                         f"{list(words.shape)}")


# ---------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------

def _check_pack(bits: torch.Tensor) -> None:
    if bits.dtype != torch.bool:
        raise ValueError(f"mask_pack: bits must be bool, got {bits.dtype}")


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=device), torch.arange(32, device=device))


def _to_int32_wrapping(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _pack_reference(bits: torch.Tensor) -> torch.Tensor:
    """bool[n] (any shape, flattened) -> int32[ceil(n/32)]; padding bits zero."""
    flat = bits.reshape(-1).to(torch.int64)
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 32)).view(-1, 32)
    return _to_int32_wrapping((padded * _bit_values(bits.device)).sum(dim=1))


def _pack_fake(bits):
    return bits.new_empty(((bits.numel() + 31) // 32,), dtype=torch.int32)


mask_pack = Op("mask_pack(Tensor bits) -> Tensor", check=_check_pack, fake=_pack_fake,
               reference=_pack_reference, triton_module="mask")


def _check_unpack(words: torch.Tensor, numel: int) -> None:
    _check_words("mask_unpack", "words", words)
    if numel < 0 or (numel + 31) // 32 > words.numel():
        raise ValueError(f"mask_unpack: numel {numel} needs {(max(numel, 0) + 31) // 32} words, got {words.numel()}")


def _unpack_reference(words: torch.Tensor, numel: int) -> torch.Tensor:
    """int32 words -> bool[numel] (inverse of mask_pack)."""
    w = words[: (numel + 31) // 32].to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(1) >> torch.arange(32, device=words.device)) & 1
    return bits.view(-1)[:numel].to(torch.bool)


def _unpack_fake(words, numel):
    return words.new_empty((numel,), dtype=torch.bool)


mask_unpack = Op("mask_unpack(Tensor words, int numel) -> Tensor", check=_check_unpack, fake=_unpack_fake,
                 reference=_unpack_reference, triton_module="mask")


# ---------------------------------------------------------------------------------------------
# popcount per segment
# ---------------------------------------------------------------------------------------------

def _check_popcount(words: torch.Tensor, offsets: torch.Tensor) -> None:
    _check_words("mask_popcount", "words", words)
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"mask_popcount: offsets must be a 1-D int64 tensor of T+1 word offsets, got "
                         f"{offsets.dtype} of shape {list(offsets.shape)}")
    # values decide which memory the kernels read: checked here, once, for every backend (a host
    # read of T+1 offsets; callers build them on the host)
    bounds = offsets.tolist()
    if bounds[0] < 0 or bounds[-1] > words.numel() or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"mask_popcount: offsets must be non-decreasing from >= 0 and end within the "
                         f"{words.numel()} words, got {bounds if len(bounds) <= 8 else bounds[:4] + ['...']}")


def popcount_words(words: torch.Tensor) -> torch.Tensor:
    """Bits set per int32 word, as int64 (SWAR on int64 lanes)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return ((w * 0x01010101) & 0xFFFFFFFF) >> 24


def _popcount_reference(words: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """int64[T]: bits set in each segment words[offsets[s]:offsets[s+1]]."""
    per_word = popcount_words(words)
    bounds = offsets.tolist()
    counts = [per_word[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=words.device)
    return torch.stack(counts).to(torch.int64)


def _popcount_fake(words, offsets):
    return offsets.new_empty((offsets.shape[0] - 1,), dtype=torch.int64)


mask_popcount = Op("mask_popcount(Tensor words, Tensor offsets) -> Tensor", check=_check_popcount,
                   fake=_popcount_fake, reference=_popcount_reference, triton_module="mask", cuda_cpp=True)


# ---------------------------------------------------------------------------------------------
# word-wise algebra
# ---------------------------------------------------------------------------------------------

def _check_binary(a: torch.Tensor, b: torch.Tensor, op: int) -> None:
    _check_words("mask_binary", "a", a)
    _check_words("mask_binary", "b", b)
    if a.numel() != b.numel():
        raise ValueError(f"mask_binary: word counts differ ({a.numel()} vs {b.numel()})")
    if a.device != b.device:
        raise ValueError(f"mask_binary: a is on {a.device}, b on {b.device}")
    if op not in (MASK_AND, MASK_OR, MASK_ANDNOT, MASK_XOR):
        raise ValueError(f"mask_binary: op must be 0 (and), 1 (or), 2 (andnot), 3 (xor); got {op}")


def _binary_reference(a: torch.Tensor, b: torch.Tensor, op: int) -> torch.Tensor:
    """Word-wise a & b (0), a | b (1), a & ~b (2), a ^ b (3)."""
    return (a & b, a | b, a & ~b, a ^ b)[op]


def _binary_fake(a, b, op):
    return torch.empty_like(a)


mask_binary = Op("mask_binary(Tensor a, Tensor b, int op) -> Tensor", check=_check_binary, fake=_binary_fake,
                 reference=_binary_reference, triton_module="mask", cuda_cpp=True)
