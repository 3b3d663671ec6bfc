"""Triton helpers shared by every kernel: float rounding, widening, popcount, the GPU switch.

Why these exist: the Triton interpreter (TRITON_INTERPRET=1, how CPU CI runs the kernels) and a
GPU compile must give the same bits.

- ``round_f32_to(x, OUT_DTYPE)``: fp32 -> OUT_DTYPE (float32, bfloat16, float16) rounded to
  nearest, ties to even, with integer bit operations only. ``x.to(tl.bfloat16)`` truncates under the
  interpreter and rounds on a GPU; integer arithmetic is the same everywhere. Special values:
  NaN -> bf16 0x7FC0 (c10::BFloat16's and the C++ backend's quiet NaN) or fp16 sign|0x7E00
  (c10::Half's); ±Inf -> ±Inf; finite values beyond the format round to ±Inf as IEEE RNE does
  (bf16 above 0x7F7F7FFF, fp16 from 65520); fp16 subnormals are rounded (ties to even) and fp32
  values below half the smallest fp16 subnormal flush to ±0. Every other result equals torch's
  ``.to(torch.bfloat16 / torch.float16)`` bit for bit.
- ``f32_to_bits`` / ``bits_to_f32``: the same rounding / the exact widening on raw bits (int32 for
  fp32, int16 for bf16 / fp16), for kernels that move values as raw bits.
- ``to_f32(x)``: exact widening of a float32 / bfloat16 / float16 tensor to float32.
- ``popcount32(x, USE_LIBDEVICE)``: bits set per uint32 lane; libdevice ``popc`` when compiled for a
  GPU (one instruction), a SWAR sum under the interpreter, which cannot run libdevice.
- ``use_libdevice(t)``: the value of USE_LIBDEVICE for a launch on tensor ``t``.
- ``KernelSpec``: one specialization a launcher can take; each kernel module's ``aot_specs()``
  yields all of them, and the AOT gate (tools/triton_aot.py) compiles each for sm_80 and sm_90.

Contract for every kernel (the AOT gate in tools/triton_aot.py checks it in the PTX): launches and
compiles use ``enable_fp_fusion=False`` (``FP_OPTIONS``), so ``a * b + c`` rounds twice on GPU as
in the interpreter; an ``tl.fma`` written in the source is a real fused multiply-add in both
(Triton 3.9's interpreter computes it with one rounding). Division that must be exact uses
``tl.div_rn``. Index arithmetic that can pass 2^31 is done in int64.
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# keyword arguments of every kernel launch: no FMA contraction on GPU (the interpreter never contracts)
FP_OPTIONS = {"enable_fp_fusion": False}


class KernelSpec(NamedTuple):
    """One compiled variant of a kernel: `types` gives the type of each runtime parameter that has no
    `tl.<dtype>` annotation ("*fp32", "*i32", "fp32", ...), `constexprs` every tl.constexpr value."""
    kernel: object
    types: dict
    constexprs: dict
    num_warps: int = 4


def use_libdevice(t: torch.Tensor) -> bool:
    """True when a launch on `t` is compiled for a GPU (libdevice available), False under the interpreter."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def popcount32(x, USE_LIBDEVICE: tl.constexpr):
    """Bits set in each uint32 lane, as int32: libdevice popc on GPU, SWAR (interpreter) else."""
    if USE_LIBDEVICE:
        return libdevice.popc(x.to(tl.int32, bitcast=True))
    else:
        x = x.to(tl.uint32, bitcast=True)
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _f32_to_bf16_u32(u):
    """uint32 fp32 bits -> bf16 bits (in the low 16 bits of a uint32), RNE, NaN -> 0x7FC0."""
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)


@triton.jit
def _f32_to_f16_u32(u):
    """uint32 fp32 bits -> fp16 bits (in the low 16 bits of a uint32), RNE with subnormals,
    overflow to Inf, NaN -> sign | 0x7E00."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # normal fp16 range (a >= 2^-14): re-bias the exponent (127 -> 15), drop 13 bits, ties to even;
    # a carry rolls into the exponent, up to 0x7C00 (Inf) from 65520 on; Inf / huge values clamp there
    normal = tl.minimum((a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13, 0x7C00)
    # subnormal fp16: the value in units of 2^-24 is m * 2^(e - 126), m with its implicit bit;
    # shift = 126 - e >= 14 here; lanes of other ranges get a clamped, harmless shift
    e = (a >> 23).to(tl.int32)
    shift = tl.minimum(tl.maximum(126 - e, 1), 31).to(tl.uint32)
    m = (a & 0x7FFFFF) | 0x800000
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    sub = q + up.to(tl.uint32)
    h = tl.where(a < 0x38800000, sub, normal)
    h = tl.where(a > 0x7F800000, 0x7E00, h)
    return h | sign


@triton.jit
def f32_to_bits(x, OUT_DTYPE: tl.constexpr):
    """fp32 -> raw bits of x rounded to nearest even in OUT_DTYPE: int32 for float32, int16 for
    bfloat16 / float16 (integer operations only: the same bits in the interpreter and on GPU)."""
    u = x.to(tl.float32).to(tl.uint32, bitcast=True)
    if OUT_DTYPE == tl.float32:
        return u.to(tl.int32, bitcast=True)
    elif OUT_DTYPE == tl.bfloat16:
        return _f32_to_bf16_u32(u).to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        tl.static_assert(OUT_DTYPE == tl.float16, "f32_to_bits: OUT_DTYPE must be float32, bfloat16 or float16")
        return _f32_to_f16_u32(u).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def round_f32_to(x, OUT_DTYPE: tl.constexpr):
    """fp32 -> OUT_DTYPE (float32, bfloat16, float16), rounded to nearest even (see f32_to_bits)."""
    return f32_to_bits(x, OUT_DTYPE).to(OUT_DTYPE, bitcast=True)


@triton.jit
def bits_to_f32(bits, DTYPE: tl.constexpr):
    """Raw bits (int32 for float32, int16 for bfloat16 / float16) -> the fp32 value (exact)."""
    if DTYPE == tl.float32:
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.bfloat16:
        return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        tl.static_assert(DTYPE == tl.float16, "bits_to_f32: DTYPE must be float32, bfloat16 or float16")
        return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def to_f32(x):
    """Exact widening of a float32 / bfloat16 / float16 tensor to float32."""
    if x.dtype == tl.bfloat16:
        return bits_to_f32(x.to(tl.int16, bitcast=True), tl.bfloat16)
    else:
        return x.to(tl.float32)
