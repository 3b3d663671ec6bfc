"""Triton kernel for the importance EMA step (cpift::importance_ema_; math and contract in
cpift_fast/ops/importance.py, which checks the arguments).

One launch per (device, param dtype, state dtype) bucket, whatever the number of tensors, laid out
like kernels/adamw.py: a block table (tensor, first element) from `segment_blocks`, tensors
addressed as a typed base pointer plus per-tensor element offsets (16-byte alignment hints when
every pointer is aligned), full blocks without lane masks, the tensor's last block masked.

A program updates BLOCK = ROWS × QBLOCK elements as a (ROWS, QBLOCK) tile: row r is one 8-bit
scale block (blocks start at multiples of BLOCK, a multiple of QBLOCK), so the 8-bit state's
per-block max is a row reduction. Bits: no FMA contraction (``FP_OPTIONS``; the source writes no
``tl.fma``), ``tl.div_rn`` for every division, exact widening through kernels/_common.py, and the
random numbers are the same uint32 hash as the reference's (``hash32``): the interpreter, a GPU
and the reference give the same bits.
"""

import torch
import triton
import triton.language as tl

from ._common import FP_OPTIONS, KernelSpec, to_f32
from ._launch import _align, _at, _block_table, _buckets, _constants, _offsets, _table

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.uint8: tl.uint8}
QBLOCK = 256  # elements per scale of the 8-bit state (cpift_fast.ops.importance.QBLOCK)
ROWS = 4  # scale blocks per program
GPU_BLOCK = ROWS * QBLOCK
_M32 = 0xFFFFFFFF


def _hash32_host(x: int) -> int:
    """The kernel's hash on a Python int (see cpift_fast.ops.importance.hash32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x1B873593) & _M32
    return x ^ (x >> 16)


def _tensor_seed(seed: int, tensor_id: int) -> int:
    """The 32-bit random stream of the tensor with this id (cpift_fast.ops.importance.tensor_seed)."""
    return _hash32_host((seed ^ _hash32_host((tensor_id + 1) & _M32)) & _M32)


def scale_of(state: list[torch.Tensor], scales: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """{i: scales of state[i]} for the uint8 state tensors (scales hold one tensor each, in order)."""
    out = {}
    for i, s in enumerate(state):
        if s.dtype == torch.uint8:
            out[i] = scales[len(out)]
    return out


@triton.jit
def _hash32(x):
    """uint32 -> uint32 (multiplications wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x1B873593
    return x ^ (x >> 16)


@triton.jit
def _ema_tile(s_ptr, sc_ptr, g, p, offs, inside, rows, rows_inside, tseed, hi_hash, beta, one_minus_beta, signal,
              S_DTYPE: tl.constexpr, FULL: tl.constexpr):
    """The EMA of one (ROWS, QBLOCK) tile from g (fp32, divided by GradScaler's scale) and θ (fp32);
    `signal` (0 |g·θ|, 1 g², 2 |g|) is a run-time value: computing all three costs nothing in a
    memory-bound kernel and a third of the specializations:
    `offs` element offsets, `rows` its scale-block indices; a full tile (FULL) lies inside the
    tensor, else `inside` / `rows_inside` say which lanes / rows do (g and θ must be 0 outside).
    Shared with the fused AdamW + EMA kernel (kernels/adamw.py)."""
    if FULL:
        s_raw = tl.load(s_ptr + offs)
    else:
        s_raw = tl.load(s_ptr + offs, mask=inside, other=0)
    sig = tl.where(signal == 0, tl.abs(g * p), tl.where(signal == 1, g * g, tl.abs(g)))
    if S_DTYPE == tl.uint8:
        if FULL:
            step_old = tl.load(sc_ptr + rows)
        else:
            step_old = tl.load(sc_ptr + rows, mask=rows_inside, other=0.0)
        old = s_raw.to(tl.float32) * step_old[:, None]
    else:
        old = to_f32(s_raw)
    x = old * beta + sig * one_minus_beta
    if S_DTYPE == tl.float32:
        new = x
    else:
        r = _hash32((offs & 0xFFFFFFFF).to(tl.uint32) ^ tseed ^ hi_hash)
        if S_DTYPE == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            bits = tl.where(x != x, 0x7FC0, (u + (r >> 16)) >> 16)  # NaN: bf16's quiet NaN
            new = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            x = tl.where(inside, x, 0.0)
            step = tl.div_rn(tl.max(x, axis=1), 255.0)
            safe = tl.where(step > 0.0, step, 1.0)
            y = tl.div_rn(x, safe[:, None])
            u01 = (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
            q = tl.minimum(tl.floor(y + u01), 255.0)
            new = tl.where(step[:, None] > 0.0, q, 0.0).to(tl.uint8)
            if FULL:
                tl.store(sc_ptr + rows, step)
            else:
                tl.store(sc_ptr + rows, step, mask=rows_inside)
    if FULL:
        tl.store(s_ptr + offs, new)
    else:
        tl.store(s_ptr + offs, new, mask=inside)


@triton.jit
def _load_gp(g_ptr, p_ptr, offs, inside, grad_scale, FULL: tl.constexpr):
    """(g / grad_scale, θ) in fp32 at `offs` (0 outside `inside` unless FULL)."""
    if FULL:
        g = to_f32(tl.load(g_ptr + offs))
        p = to_f32(tl.load(p_ptr + offs))
    else:
        g = to_f32(tl.load(g_ptr + offs, mask=inside, other=0.0))
        p = to_f32(tl.load(p_ptr + offs, mask=inside, other=0.0))
    return tl.div_rn(g, grad_scale), p


@triton.jit
def _tile(blk_tensor_ptr, blk_start_ptr, numel_ptr, ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    """This program's (tensor index, first element, (ROWS, QBLOCK) element offsets, the tensor's size,
    scale-block index of each row); the offsets are int64 (tensors may pass 2^31 elements)."""
    t = tl.load(blk_tensor_ptr + tl.program_id(0))
    start = tl.multiple_of(tl.load(blk_start_ptr + tl.program_id(0)), ROWS * QBLOCK)  # a multiple of the block
    row = tl.arange(0, ROWS)
    offs = start + row[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    return t, start, offs, tl.load(numel_ptr + t), (start // QBLOCK) + row


@triton.jit(do_not_specialize=["signal"])
def _importance_ema_kernel(blk_tensor_ptr, blk_start_ptr, numel_ptr, s_base, sc_base, g_base, p_base, s_offs,
                           sc_offs, g_offs, p_offs, seed_ptr, grad_scale_ptr, found_inf_ptr, beta, one_minus_beta,
                           signal, S_DTYPE: tl.constexpr, P_ALIGN: tl.constexpr,
                           S_ALIGN: tl.constexpr, ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    """GradScaler's found_inf and scale are arguments (no specialization); a nonzero found_inf
    returns before anything is stored."""
    if tl.load(found_inf_ptr) == 0.0:
        t, start, offs, numel, rows = _tile(blk_tensor_ptr, blk_start_ptr, numel_ptr, ROWS, QBLOCK)
        s_ptr = _at(s_base, s_offs, t, S_ALIGN)
        g_ptr = _at(g_base, g_offs, t, P_ALIGN)
        p_ptr = _at(p_base, p_offs, t, P_ALIGN)
        sc_ptr = _at(sc_base, sc_offs, t, 1)
        tseed = tl.load(seed_ptr + t).to(tl.uint32)
        hi_hash = _hash32((start >> 32).to(tl.uint32))  # blocks never straddle a multiple of 2^32
        grad_scale = tl.load(grad_scale_ptr)
        inside = offs < numel
        if start + ROWS * QBLOCK <= numel:
            g, p = _load_gp(g_ptr, p_ptr, offs, inside, grad_scale, True)
            _ema_tile(s_ptr, sc_ptr, g, p, offs, inside, rows, rows * QBLOCK < numel, tseed, hi_hash, beta,
                      one_minus_beta, signal, S_DTYPE, True)
        else:
            g, p = _load_gp(g_ptr, p_ptr, offs, inside, grad_scale, False)
            _ema_tile(s_ptr, sc_ptr, g, p, offs, inside, rows, rows * QBLOCK < numel, tseed, hi_hash, beta,
                      one_minus_beta, signal, S_DTYPE, False)


def importance_ema_(state: list[torch.Tensor], scales: list[torch.Tensor], grads: list[torch.Tensor],
                    params: list[torch.Tensor], beta: float, signal: int, seed: int,
                    grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, ids=()) -> None:
    """Launcher of the op cpift::importance_ema_ (arguments already checked by the op)."""
    grads = [g.contiguous() for g in grads]
    params = [p.contiguous() for p in params]
    scale_for = scale_of(state, scales)
    for dev, index in _buckets(params, lambda i: (params[i].dtype, state[i].dtype)):
        blk_tensor, blk_start, _ = _block_table(tuple(params[i].numel() for i in index), GPU_BLOCK, dev)
        data = [[state[i] for i in index], [grads[i] for i in index], [params[i] for i in index]]
        sc = [scale_for[i] for i in index] if index[0] in scale_for else data[0]  # unused without 8-bit state
        numel, s_offs, sc_offs, g_offs, p_offs, seeds = _table(
            [[t.numel() for t in data[2]], _offsets(data[0]), _offsets(sc), _offsets(data[1]), _offsets(data[2]),
             [_tensor_seed(seed, ids[i] if ids else i) for i in index]], dev)
        one, _, zero = _constants(dev)
        scale = grad_scale.to(device=dev, dtype=torch.float32).reshape(1) if grad_scale is not None else one
        inf = found_inf.to(device=dev, dtype=torch.float32).reshape(1) if found_inf is not None else zero
        _importance_ema_kernel[(blk_start.numel(),)](
            blk_tensor, blk_start, numel, data[0][0], sc[0], data[1][0], data[2][0], s_offs, sc_offs, g_offs, p_offs,
            seeds, scale, inf, beta, 1.0 - beta, signal, S_DTYPE=_TL_DTYPE[state[index[0]].dtype],
            P_ALIGN=_align(data[1], data[2]), S_ALIGN=_align(data[0]), ROWS=ROWS, QBLOCK=QBLOCK, **FP_OPTIONS)


def aot_specs():
    """Every specialization the launcher can take: param dtype x state dtype, aligned or not."""
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16", tl.uint8: "u8"}
    tables = {name: "*i64" for name in ("blk_start_ptr", "numel_ptr", "s_offs", "sc_offs", "g_offs", "p_offs",
                                        "seed_ptr")}
    scalars = {"grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "beta": "fp32", "one_minus_beta": "fp32",
               "signal": "i32"}
    for p_dtype in (tl.float32, tl.bfloat16, tl.float16):
        for s_dtype in (tl.float32, tl.bfloat16, tl.uint8):
            bases = {"s_base": f"*{names[s_dtype]}", "g_base": f"*{names[p_dtype]}", "p_base": f"*{names[p_dtype]}",
                     "sc_base": "*fp32" if s_dtype == tl.uint8 else f"*{names[s_dtype]}"}
            for aligned in (True, False):
                yield KernelSpec(_importance_ema_kernel, {"blk_tensor_ptr": "*i32", **tables, **bases, **scalars},
                                 {"S_DTYPE": s_dtype, "P_ALIGN": 128 // p_dtype.primitive_bitwidth if aligned else 1,
                                  "S_ALIGN": 128 // s_dtype.primitive_bitwidth if aligned else 1,
                                  "ROWS": ROWS, "QBLOCK": QBLOCK})
