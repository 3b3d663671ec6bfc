"""Triton kernels for fused per-tensor SLERP: one reduction pass and one elementwise pass.

- ``slerp_stats``: per-block partial sums of u·v, u², v² (u = a − base, v = b − base in fp32;
  products and sums in fp64, where a product of two fp32 values is exact), summed by the launcher.
- ``slerp_apply``: ``c0·a + c1·b + c2·base`` in fp32, rounded to a's dtype, then the core
  transplant in the same pass: a runtime loop over the K task cores reads each core's mask word for
  the element and its value through a pointer table (offsets relative to the first value tensor,
  so no stacking copy). Transplanted values move as raw bits (int16 / int32 views), so they are
  bit-exact; rule 2 (mean) widens them to fp32.
"""

import torch
import triton
import triton.language as tl

from cpift_fast.reference import check_slerp_args

BLOCK = 4096  # elements per program; a multiple of 32, so a block owns whole mask words

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _bits_to_f32(bits, CODE: tl.constexpr):
    """Raw bits (int32 for fp32, int16 for fp16 / bf16) -> fp32 values."""
    if CODE == 0:
        return bits.to(tl.float32, bitcast=True)
    elif CODE == 1:
        return bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bits(x, CODE: tl.constexpr):
    """fp32 -> raw bits of the value rounded to nearest even in the target dtype."""
    if CODE == 0:
        return x.to(tl.int32, bitcast=True)
    elif CODE == 1:
        return x.to(tl.float16).to(tl.int16, bitcast=True)
    else:
        u = x.to(tl.uint32, bitcast=True)
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(is_nan, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _stats_kernel(a_ptr, b_ptr, base_ptr, partial_ptr, n, A_CODE: tl.constexpr, B_CODE: tl.constexpr,
                  BASE_CODE: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    u = _bits_to_f32(tl.load(a_ptr + i, mask=inside, other=0), A_CODE)
    v = _bits_to_f32(tl.load(b_ptr + i, mask=inside, other=0), B_CODE)
    if HAS_BASE:
        w = _bits_to_f32(tl.load(base_ptr + i, mask=inside, other=0), BASE_CODE)
        u = u - w
        v = v - w
    u = u.to(tl.float64)  # products of fp32 values are exact in fp64
    v = v.to(tl.float64)
    tl.store(partial_ptr + pid * 3 + 0, tl.sum(u * v, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(u * u, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(v * v, axis=0))


@triton.jit
def _apply_kernel(a_ptr, b_ptr, base_ptr, out_ptr, c0, c1, c2, val_ptr, val_offs_ptr, word_ptr, word_offs_ptr,
                  K, n, A_CODE: tl.constexpr, B_CODE: tl.constexpr, BASE_CODE: tl.constexpr,
                  HAS_BASE: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    x = c0 * _bits_to_f32(tl.load(a_ptr + i, mask=inside, other=0), A_CODE)
    x = x + c1 * _bits_to_f32(tl.load(b_ptr + i, mask=inside, other=0), B_CODE)
    if HAS_BASE:
        x = x + c2 * _bits_to_f32(tl.load(base_ptr + i, mask=inside, other=0), BASE_CODE)
    out = _f32_to_bits(x, A_CODE)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(K):
        w_off = tl.load(word_offs_ptr + k)
        v_off = tl.load(val_offs_ptr + k)
        word = tl.load(word_ptr + w_off + (i >> 5), mask=inside, other=0).to(tl.uint32, bitcast=True)
        hit = ((word >> (i & 31).to(tl.uint32)) & 1) != 0
        val = tl.load(val_ptr + v_off + i, mask=inside & hit, other=0)
        if MEAN:
            total += tl.where(hit, _bits_to_f32(val, A_CODE), 0.0)
            count += hit.to(tl.int32)
        else:
            out = tl.where(hit, val, out)
    if MEAN:
        mean = total / tl.maximum(count, 1).to(tl.float32)
        out = tl.where(count > 0, _f32_to_bits(mean, A_CODE), out)
    tl.store(out_ptr + i, out, mask=inside)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(_INT_VIEW[t.dtype])


def slerp_stats(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    check_slerp_args("slerp_stats", a, b, base)
    n = a.numel()
    if n == 0:
        return torch.zeros(3, dtype=torch.float64, device=a.device)
    grid = triton.cdiv(n, BLOCK)
    partial = torch.empty(grid, 3, dtype=torch.float64, device=a.device)
    ra, rb = _raw(a), _raw(b)
    rbase = _raw(base) if base is not None else ra
    _stats_kernel[(grid,)](ra, rb, rbase, partial, n, A_CODE=_CODE[a.dtype], B_CODE=_CODE[b.dtype],
                           BASE_CODE=_CODE[base.dtype] if base is not None else 0, HAS_BASE=base is not None,
                           BLOCK=BLOCK)
    return partial.sum(dim=0, dtype=torch.float64)


def _pointer_table(tensors: list[torch.Tensor], itemsize: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Element offsets of each tensor relative to the first (cloning any that is misaligned)."""
    tensors = list(tensors)
    base = tensors[0].data_ptr()
    for k in range(1, len(tensors)):
        if (tensors[k].data_ptr() - base) % itemsize:
            tensors[k] = tensors[k].clone()
    offs = [(t.data_ptr() - base) // itemsize for t in tensors]
    return tensors, torch.tensor(offs, dtype=torch.int64, device=tensors[0].device)


def slerp_apply(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None, c0: float, c1: float, c2: float,
                values: list[torch.Tensor], words: list[torch.Tensor], rule: int) -> torch.Tensor:
    check_slerp_args("slerp_apply", a, b, base, values, words, rule)
    n = a.numel()
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if n == 0:
        return out
    ra, rb = _raw(a), _raw(b)
    rbase = _raw(base) if base is not None else ra
    if rule == 1:  # first wins == last wins over the reversed order
        values, words = list(values)[::-1], list(words)[::-1]
    if values:
        vals, val_offs = _pointer_table([_raw(v) for v in values], a.element_size())
        wrds, word_offs = _pointer_table([w.contiguous().view(-1) for w in words], 4)
    else:
        vals, val_offs = [ra], torch.zeros(1, dtype=torch.int64, device=a.device)
        wrds, word_offs = [torch.zeros(1, dtype=torch.int32, device=a.device)], val_offs
    _apply_kernel[(triton.cdiv(n, BLOCK),)](
        ra, rb, rbase, out.view(-1).view(_INT_VIEW[a.dtype]), float(c0), float(c1), float(c2), vals[0], val_offs,
        wrds[0], word_offs, len(values), n, A_CODE=_CODE[a.dtype], B_CODE=_CODE[b.dtype],
        BASE_CODE=_CODE[base.dtype] if base is not None else 0, HAS_BASE=base is not None, MEAN=rule == 2,
        BLOCK=BLOCK)
    del vals, wrds  # the kernel read them through raw pointer offsets; keep them alive until here
    return out
