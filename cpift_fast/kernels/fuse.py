"""Triton kernels for fused per-tensor SLERP: one reduction pass and one elementwise pass.

- ``slerp_stats``: per-block partial sums of u·v, u², v² (u = a − base, v = b − base in fp32;
  products and sums in fp64, where a product of two fp32 values is exact), summed by the launcher.
- ``slerp_apply``: ``c0·a + c1·b + c2·base`` in fp32 (each product and sum rounded once: no FMA
  contraction), rounded to nearest even into a's dtype, then the core transplant in the same pass:
  a runtime loop over the K task cores reads each core's mask word for the element and its value
  through a pointer table (offsets relative to the first value tensor, so no stacking copy).
  Transplanted values move as raw bits (int16 / int32 views), so they are bit-exact; rule 2 (mean)
  widens them to fp32 and divides with IEEE division (``tl.div_rn``).

Every tensor is read through its raw integer view (int32 for fp32, int16 for bf16 / fp16) and the
dtype travels as a constexpr. Indices and sizes are int64. Arguments are checked by the op
(cpift_fast/ops/fuse.py), not here.
"""

import torch
import triton
import triton.language as tl

from ._common import FP_OPTIONS, KernelSpec, bits_to_f32, f32_to_bits

STATS_BLOCK = 4096  # elements per program in slerp_stats
APPLY_BLOCK = 1024  # elements per program in slerp_apply; a multiple of 32, so a block owns whole mask words

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _stats_kernel(a_ptr, b_ptr, base_ptr, partial_ptr, n: tl.int64, A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr,
                  BASE_DTYPE: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    u = bits_to_f32(tl.load(a_ptr + i, mask=inside, other=0), A_DTYPE)
    v = bits_to_f32(tl.load(b_ptr + i, mask=inside, other=0), B_DTYPE)
    if HAS_BASE:
        w = bits_to_f32(tl.load(base_ptr + i, mask=inside, other=0), BASE_DTYPE)
        u = u - w
        v = v - w
    u = u.to(tl.float64)  # products of fp32 values are exact in fp64
    v = v.to(tl.float64)
    tl.store(partial_ptr + pid * 3 + 0, tl.sum(u * v, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(u * u, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(v * v, axis=0))


@triton.jit
def _apply_kernel(a_ptr, b_ptr, base_ptr, out_ptr, c0, c1, c2, val_ptr, val_offs_ptr, word_ptr, word_offs_ptr,
                  K: tl.int32, n: tl.int64, A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, BASE_DTYPE: tl.constexpr,
                  HAS_BASE: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    x = c0 * bits_to_f32(tl.load(a_ptr + i, mask=inside, other=0), A_DTYPE)
    x = x + c1 * bits_to_f32(tl.load(b_ptr + i, mask=inside, other=0), B_DTYPE)
    if HAS_BASE:
        x = x + c2 * bits_to_f32(tl.load(base_ptr + i, mask=inside, other=0), BASE_DTYPE)
    out = f32_to_bits(x, A_DTYPE)
    if MEAN:
        total = tl.zeros([BLOCK], dtype=tl.float32)
        count = tl.zeros([BLOCK], dtype=tl.int32)
    shift = (i & 31).to(tl.uint32)
    for k in range(K):
        word = tl.load(word_ptr + tl.load(word_offs_ptr + k) + (i >> 5), mask=inside, other=0)
        hit = ((word.to(tl.uint32, bitcast=True) >> shift) & 1) != 0
        val = tl.load(val_ptr + tl.load(val_offs_ptr + k) + i, mask=inside & hit, other=0)
        if MEAN:
            total += tl.where(hit, bits_to_f32(val, A_DTYPE), 0.0)
            count += hit.to(tl.int32)
        else:
            out = tl.where(hit, val, out)
    if MEAN:
        mean = tl.div_rn(total, tl.maximum(count, 1).to(tl.float32))
        out = tl.where(count > 0, f32_to_bits(mean, A_DTYPE), out)
    tl.store(out_ptr + i, out, mask=inside)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(_INT_VIEW[t.dtype])


def slerp_stats(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    n = a.numel()
    if n == 0:
        return torch.zeros(3, dtype=torch.float64, device=a.device)
    grid = triton.cdiv(n, STATS_BLOCK)
    partial = torch.empty(grid, 3, dtype=torch.float64, device=a.device)
    ra, rb = _raw(a), _raw(b)
    rbase = _raw(base) if base is not None else ra
    _stats_kernel[(grid,)](ra, rb, rbase, partial, n, A_DTYPE=_TL[a.dtype], B_DTYPE=_TL[b.dtype],
                           BASE_DTYPE=_TL[base.dtype] if base is not None else _TL[a.dtype],
                           HAS_BASE=base is not None, BLOCK=STATS_BLOCK, **FP_OPTIONS)
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
    _apply_kernel[(triton.cdiv(n, APPLY_BLOCK),)](
        ra, rb, rbase, out.view(-1).view(_INT_VIEW[a.dtype]), float(c0), float(c1), float(c2), vals[0], val_offs,
        wrds[0], word_offs, len(values), n, A_DTYPE=_TL[a.dtype], B_DTYPE=_TL[b.dtype],
        BASE_DTYPE=_TL[base.dtype] if base is not None else _TL[a.dtype], HAS_BASE=base is not None,
        MEAN=rule == 2, BLOCK=APPLY_BLOCK, **FP_OPTIONS)
    del vals, wrds  # the kernel read them through raw pointer offsets; keep them alive until here
    return out


def slerp_stats_list(a: list[torch.Tensor], b: list[torch.Tensor], base: list[torch.Tensor | None]) -> torch.Tensor:
    """Row t = slerp_stats(a[t], b[t], base[t]): the per-tensor launcher, pair by pair (the same bits)."""
    device = a[0].device if len(a) else torch.device("cpu")
    rows = [slerp_stats(x, y, z) for x, y, z in zip(a, b, base)]
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64, device=device)


def slerp_apply_list(a: list[torch.Tensor], b: list[torch.Tensor], base: list[torch.Tensor | None], coeffs: list[float],
                     values: list[torch.Tensor], words: list[torch.Tensor], counts: list[int],
                     rule: int) -> list[torch.Tensor]:
    """out[t] = slerp_apply on tensor t with coeffs[3t:3t+3] and its counts[t] cores: the per-tensor
    launcher, pair by pair (the same bits)."""
    out, start = [], 0
    for t, (x, y, z, c) in enumerate(zip(a, b, base, counts)):
        out.append(slerp_apply(x, y, z, *coeffs[3 * t:3 * t + 3], values[start:start + c], words[start:start + c], rule))
        start += c
    return out


def aot_specs():
    """Every specialization the launchers above can take (compiled by tools/triton_aot.py): a, b and
    base each float32, bfloat16 or float16 (read as raw int32 / int16), base present or not."""
    raw = {tl.float32: "*i32", tl.bfloat16: "*i16", tl.float16: "*i16"}
    for ad, a_ptr in raw.items():
        for bd in raw:
            for based in (None, *raw):
                has_base = based is not None
                based = based if has_base else ad
                stats_types = {"a_ptr": a_ptr, "b_ptr": raw[bd], "base_ptr": raw[based], "partial_ptr": "*fp64"}
                dtypes = {"A_DTYPE": ad, "B_DTYPE": bd, "BASE_DTYPE": based, "HAS_BASE": has_base}
                yield KernelSpec(_stats_kernel, stats_types, {**dtypes, "BLOCK": STATS_BLOCK})
                apply_types = {"a_ptr": a_ptr, "b_ptr": raw[bd], "base_ptr": raw[based], "out_ptr": a_ptr,
                               "c0": "fp32", "c1": "fp32", "c2": "fp32", "val_ptr": a_ptr, "val_offs_ptr": "*i64",
                               "word_ptr": "*i32", "word_offs_ptr": "*i64"}
                for mean in (False, True):
                    yield KernelSpec(_apply_kernel, apply_types, {**dtypes, "MEAN": mean, "BLOCK": APPLY_BLOCK})
