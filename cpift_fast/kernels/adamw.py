"""Triton kernels for the masked AdamW step and the masked squared gradient norm.

One launch per (device, param dtype, state dtype) bucket, whatever the number of tensors: the
launcher passes tables of raw data pointers (one row per tensor) and a block table (tensor, first
element) built with `segment_blocks`; each program loads its tensor's pointers, casts them to typed
pointers and updates BLOCK elements. Raw pointer tables work under TRITON_INTERPRET=1 as on GPU.

Frozen bit i of tensor t is bit (i % 32) of word i // 32 of that tensor's words. Frozen elements
keep their exact bits: a full block (BLOCK elements inside the tensor) loads every lane with 16-byte
vector loads and stores every lane back, frozen lanes with the raw bits it read; the tensor's last,
partial block touches only its trainable lanes.

Bits: the AdamW math is the C++ kernel's (csrc/adamw.cpp ``adamw_math``), operation for operation:
the two explicit ``tl.fma`` where torch's fused kernel has them, no contraction elsewhere (launched
with ``FP_OPTIONS``), IEEE division and sqrt (``tl.div_rn``, ``tl.sqrt_rn``), widening and
round-to-nearest-even stores through kernels/_common.py's integer helpers. So the interpreter, a
GPU and the C++ backend give the same bits. Argument checks are the op's (cpift_fast/ops/adamw.py).

Vector access: every block starts at a multiple of BLOCK inside its tensor, and the launcher
checks that every data pointer is 16-byte aligned (P_ALIGN / S_ALIGN = elements per 16 bytes, else 1:
a specialization without the hint), so a GPU compile loads and stores 16 bytes per instruction. Tensors are addressed as a typed base
pointer (the bucket's first tensor, 16-byte aligned) plus a per-tensor element offset from a table:
raw pointers cast from integers would hide that alignment from the compiler.
"""

import struct

import torch
import triton
import triton.language as tl

from ._common import FP_OPTIONS, KernelSpec, round_f32_to, to_f32
from ._launch import _align, _at, _block_table, _buckets, _constants, _offsets, _table
from .importance import QBLOCK, ROWS, _ema_tile, _hash32, _tensor_seed, _tile, scale_of

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_E_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.uint8: tl.uint8}  # EMA state

# elements per program (4 warps: 8 per thread; 1024), the interpreter runs this one too; equal to the
# fused AdamW + EMA kernel's (ROWS, QBLOCK) tile, so both use one block table
GPU_BLOCK = ROWS * QBLOCK
# warps of the fused AdamW + EMA kernel: 8 (4 elements per thread); with 4, ptxas spills 8 bytes on
# sm_90 in one specialization (bf16 params, fp32 moments, bf16 EMA state)
FUSED_WARPS = 8
SUM_BLOCK = 1024  # partial sums per iteration of the per-tensor reduction


@triton.jit
def _trainable_lanes(blk_tensor_ptr, blk_start_ptr, numel_ptr, w_ptrs, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor index, element offsets, lanes inside the tensor whose frozen bit is clear, whether the
    block lies wholly inside the tensor) of this program."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(blk_start_ptr + pid), BLOCK)  # int64; blocks start at multiples of BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numel_ptr + t)
    return t, offs, _clear_bits(w_ptrs, t, offs, offs < numel, HAS_MASK), start + BLOCK <= numel


@triton.jit
def _clear_bits(w_ptrs, t, offs, inside, HAS_MASK: tl.constexpr):
    """The lanes `inside` whose frozen bit (bit offs % 32 of word offs // 32 of tensor t's words) is
    clear; all of `inside` without a mask."""
    if HAS_MASK:
        words = tl.load(w_ptrs + t).to(tl.pointer_type(tl.int32))
        word = tl.load(words + (offs >> 5), mask=inside, other=0).to(tl.uint32, bitcast=True)
        return inside & (((word >> (offs & 31).to(tl.uint32)) & 1) == 0)
    else:
        return inside


@triton.jit
def _load(ptr, offs, inside, FULL: tl.constexpr):
    """Raw values at ptr + offs: unmasked in a full block (vector loads), else lanes `inside` only."""
    if FULL:
        return tl.load(ptr + offs)
    else:
        return tl.load(ptr + offs, mask=inside, other=0.0)


@triton.jit
def _store(ptr, offs, new, old, write, inside, DTYPE: tl.constexpr, FULL: tl.constexpr):
    """Store `new` (fp32, rounded to DTYPE) where `write`. A full block stores every lane, frozen ones
    with the raw bits they were read with (`old`: unchanged bits, one vector store); a tail block
    stores the `write` lanes only."""
    if FULL:
        tl.store(ptr + offs, tl.where(write, round_f32_to(new, DTYPE), old))
    else:
        tl.store(ptr + offs, round_f32_to(new, DTYPE), mask=write & inside)


@triton.jit
def _adamw_update(p_ptr, m_ptr, v_ptr, vmax_ptr, g, p_raw, offs, write, inside, step_size, bc2_sqrt, decay,
                  lerp_from_m, lerp_coeff, beta2, one_minus_beta2, eps, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                  AMSGRAD: tl.constexpr, FULL: tl.constexpr):
    """The AdamW math of one block (the C++ adamw_math, operation for operation) from g (fp32, already
    divided by grad_scale) and the raw param values. grad_scale carries GradScaler's scale (1.0
    without one) and maximize's sign: g / ±scale is -(g / scale) or g / scale and g / ±1.0 is ±g,
    bit for bit, so one code path serves every case."""
    m_raw = _load(m_ptr, offs, inside, FULL)
    v_raw = _load(v_ptr, offs, inside, FULL)
    p = to_f32(p_raw) * decay
    m = to_f32(m_raw)
    # exp_avg.lerp_(g, 1 - beta1) as torch computes it: one fused multiply-add from m or from g
    m = tl.fma(lerp_coeff, g - m, tl.where(lerp_from_m != 0, m, g))
    v = tl.fma(one_minus_beta2 * g, g, to_f32(v_raw) * beta2)  # as torch's compiled kernel contracts it
    vm = v
    if AMSGRAD:
        vmax_raw = _load(vmax_ptr, offs, inside, FULL)
        vm = tl.maximum(to_f32(vmax_raw), v)
        _store(vmax_ptr, offs, vm, vmax_raw, write, inside, S_DTYPE, FULL)
    denom = tl.div_rn(tl.sqrt_rn(vm), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    _store(p_ptr, offs, p, p_raw, write, inside, P_DTYPE, FULL)
    _store(m_ptr, offs, m, m_raw, write, inside, S_DTYPE, FULL)
    _store(v_ptr, offs, v, v_raw, write, inside, S_DTYPE, FULL)


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, write, inside, step_size, bc2_sqrt, decay, grad_scale,
                 lerp_from_m, lerp_coeff, beta2, one_minus_beta2, eps, P_DTYPE: tl.constexpr,
                 S_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, FULL: tl.constexpr):
    """Load g and θ of one block, then :func:`_adamw_update`."""
    g = tl.div_rn(to_f32(_load(g_ptr, offs, inside, FULL)), grad_scale)
    p_raw = _load(p_ptr, offs, inside, FULL)
    _adamw_update(p_ptr, m_ptr, v_ptr, vmax_ptr, g, p_raw, offs, write, inside, step_size, bc2_sqrt, decay,
                  lerp_from_m, lerp_coeff, beta2, one_minus_beta2, eps, P_DTYPE, S_DTYPE, AMSGRAD, FULL)


@triton.jit
def _adamw_ema_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, e_ptr, esc_ptr, offs, write, inside, rows, rows_inside,
                     step_size, bc2_sqrt, decay, grad_scale, lerp_from_m, lerp_coeff, beta2, one_minus_beta2, eps,
                     tseed, hi_hash, ema_beta, ema_one_minus_beta, signal, P_DTYPE: tl.constexpr,
                     S_DTYPE: tl.constexpr, E_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, FULL: tl.constexpr):
    """g and θ loaded once; the EMA (every lane, from θ before the step), then the AdamW update. The
    EMA's g is AdamW's g: dividing by -scale (maximize) only flips its sign, and every signal is even
    in g, so the EMA gets the bits of g / scale."""
    g = tl.div_rn(to_f32(_load(g_ptr, offs, inside, FULL)), grad_scale)
    p_raw = _load(p_ptr, offs, inside, FULL)
    _ema_tile(e_ptr, esc_ptr, g, to_f32(p_raw), offs, inside, rows, rows_inside, tseed, hi_hash, ema_beta,
              ema_one_minus_beta, signal, E_DTYPE, FULL)
    _adamw_update(p_ptr, m_ptr, v_ptr, vmax_ptr, g, p_raw, offs, write, inside, step_size, bc2_sqrt, decay,
                  lerp_from_m, lerp_coeff, beta2, one_minus_beta2, eps, P_DTYPE, S_DTYPE, AMSGRAD, FULL)


@triton.jit(do_not_specialize=["lerp_from_m"])  # a 0/1 flag: one compiled variant for both
def _masked_adamw_kernel(blk_tensor_ptr, blk_start_ptr, numel_ptr, p_base, g_base, m_base, v_base, vmax_base,
                         p_offs, g_offs, m_offs, v_offs, vmax_offs, w_ptrs, step_size_ptr, bc2_sqrt_ptr, decay_ptr,
                         grad_scale_ptr, found_inf_ptr, lerp_from_m, lerp_coeff, beta2, one_minus_beta2,
                         eps, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                         HAS_MASK: tl.constexpr, P_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """Flags that cost nothing at run time (the lerp form, maximize as the sign of grad_scale,
    GradScaler's scale and found_inf) are arguments, not specializations: fewer variants to prove."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(blk_start_ptr + pid), BLOCK)  # int64; blocks start at multiples of BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numel_ptr + t)
    inside = offs < numel
    write = _clear_bits(w_ptrs, t, offs, inside, HAS_MASK)
    write = tl.where(tl.load(found_inf_ptr) == 0.0, write, False)  # GradScaler's inf/NaN: nothing changes
    p_ptr = _at(p_base, p_offs, t, P_ALIGN)
    g_ptr = _at(g_base, g_offs, t, P_ALIGN)
    m_ptr = _at(m_base, m_offs, t, S_ALIGN)
    v_ptr = _at(v_base, v_offs, t, S_ALIGN)
    vmax_ptr = m_ptr
    if AMSGRAD:
        vmax_ptr = _at(vmax_base, vmax_offs, t, S_ALIGN)
    step_size = tl.load(step_size_ptr + t)
    bc2_sqrt = tl.load(bc2_sqrt_ptr + t)
    decay = tl.load(decay_ptr)
    grad_scale = tl.load(grad_scale_ptr)
    if start + BLOCK <= numel:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, write, inside, step_size, bc2_sqrt, decay,
                     grad_scale, lerp_from_m, lerp_coeff, beta2, one_minus_beta2, eps, P_DTYPE, S_DTYPE,
                     AMSGRAD, True)
    else:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, write, inside, step_size, bc2_sqrt, decay,
                     grad_scale, lerp_from_m, lerp_coeff, beta2, one_minus_beta2, eps, P_DTYPE, S_DTYPE,
                     AMSGRAD, False)


@triton.jit(do_not_specialize=["lerp_from_m", "signal"])
def _masked_adamw_ema_kernel(blk_tensor_ptr, blk_start_ptr, numel_ptr, p_base, g_base, m_base, v_base, vmax_base,
                             e_base, esc_base, p_offs, g_offs, m_offs, v_offs, vmax_offs, e_offs, esc_offs, w_ptrs,
                             seed_ptr, step_size_ptr, bc2_sqrt_ptr, decay_ptr, grad_scale_ptr, found_inf_ptr,
                             lerp_from_m, lerp_coeff, beta2, one_minus_beta2, eps, ema_beta, ema_one_minus_beta,
                             signal, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, E_DTYPE: tl.constexpr,
                             AMSGRAD: tl.constexpr, HAS_MASK: tl.constexpr, P_ALIGN: tl.constexpr,
                             S_ALIGN: tl.constexpr, E_ALIGN: tl.constexpr, ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    """The AdamW step and the importance EMA (kernels/importance.py's tile) of ROWS × QBLOCK elements:
    each row one 8-bit scale block. A nonzero found_inf returns before anything is stored."""
    if tl.load(found_inf_ptr) == 0.0:
        t, start, offs, numel, rows = _tile(blk_tensor_ptr, blk_start_ptr, numel_ptr, ROWS, QBLOCK)
        inside = offs < numel
        write = _clear_bits(w_ptrs, t, offs, inside, HAS_MASK)
        p_ptr = _at(p_base, p_offs, t, P_ALIGN)
        g_ptr = _at(g_base, g_offs, t, P_ALIGN)
        m_ptr = _at(m_base, m_offs, t, S_ALIGN)
        v_ptr = _at(v_base, v_offs, t, S_ALIGN)
        vmax_ptr = m_ptr
        if AMSGRAD:
            vmax_ptr = _at(vmax_base, vmax_offs, t, S_ALIGN)
        e_ptr = _at(e_base, e_offs, t, E_ALIGN)
        esc_ptr = _at(esc_base, esc_offs, t, 1)
        tseed = tl.load(seed_ptr + t).to(tl.uint32)
        hi_hash = _hash32((start >> 32).to(tl.uint32))  # blocks never straddle a multiple of 2^32
        step_size = tl.load(step_size_ptr + t)
        bc2_sqrt = tl.load(bc2_sqrt_ptr + t)
        decay = tl.load(decay_ptr)
        grad_scale = tl.load(grad_scale_ptr)
        rows_inside = rows * QBLOCK < numel
        if start + ROWS * QBLOCK <= numel:
            _adamw_ema_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, e_ptr, esc_ptr, offs, write, inside, rows,
                             rows_inside, step_size, bc2_sqrt, decay, grad_scale, lerp_from_m, lerp_coeff, beta2,
                             one_minus_beta2, eps, tseed, hi_hash, ema_beta, ema_one_minus_beta, signal, P_DTYPE,
                             S_DTYPE, E_DTYPE, AMSGRAD, True)
        else:
            _adamw_ema_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, e_ptr, esc_ptr, offs, write, inside, rows,
                             rows_inside, step_size, bc2_sqrt, decay, grad_scale, lerp_from_m, lerp_coeff, beta2,
                             one_minus_beta2, eps, tseed, hi_hash, ema_beta, ema_one_minus_beta, signal, P_DTYPE,
                             S_DTYPE, E_DTYPE, AMSGRAD, False)


@triton.jit
def _masked_sq_sum_kernel(blk_tensor_ptr, blk_start_ptr, numel_ptr, g_base, g_offs, w_ptrs, out_ptr,
                          HAS_MASK: tl.constexpr, G_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, keep, full = _trainable_lanes(blk_tensor_ptr, blk_start_ptr, numel_ptr, w_ptrs, HAS_MASK, BLOCK)
    g_ptr = _at(g_base, g_offs, t, G_ALIGN)
    if full:  # vector loads; frozen lanes count 0
        g = tl.where(keep, to_f32(tl.load(g_ptr + offs)), 0.0)
    else:
        g = to_f32(tl.load(g_ptr + offs, mask=keep, other=0.0))
    tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


@triton.jit
def _segment_sum_kernel(partial_ptr, first_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[s] = sum of partial[first[s]:first[s+1]], in a fixed order (deterministic: no atomics)."""
    s = tl.program_id(0)
    lo = tl.load(first_ptr + s)
    hi = tl.load(first_ptr + s + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(lo, hi, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + idx, mask=idx < hi, other=0.0)
    tl.store(out_ptr + s, tl.sum(acc, axis=0))


def lerp_constants(beta1: float) -> tuple[float, bool]:
    """(coefficient, from_m) of torch's exp_avg.lerp_(g, w), w = fp32(1 - beta1):
    m = fma(w, g - m, m) when |w| < 0.5, else m = fma(w - 1, g - m, g) (w - 1 is exact in fp32)."""
    w = struct.unpack("f", struct.pack("f", 1.0 - beta1))[0]  # rounded to fp32 (nearest even)
    return (w, True) if abs(w) < 0.5 else (w - 1.0, False)


def step_scalars(steps: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float, weight_decay: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(step_size float32[T], bc2_sqrt float32[T], decay float32[1]) on `device`, computed in float64
    and rounded once, as torch's fused AdamW: lr / (1 - beta1^t), sqrt(1 - beta2^t), 1 - lr * wd.
    Tensor math only (no host sync): a changing lr or step count recompiles nothing."""
    t = steps.to(device=device, dtype=torch.float64)
    lr64 = lr.to(device=device, dtype=torch.float64).reshape(1)
    step_size = (lr64 / (1.0 - torch.pow(beta1, t))).float()
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, t)).float()
    decay = (1.0 - lr64 * weight_decay).float()
    return step_size, bc2_sqrt, decay


def masked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], frozen: list[torch.Tensor],
                  steps, lr, beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool,
                  maximize: bool, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None = None) -> None:
    """Launcher of the op cpift::masked_adamw_ (arguments already checked by the op). `steps`:
    float32[T] tensor (or floats), `lr`: one-element tensor (or float)."""
    _launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2, weight_decay, eps,
            amsgrad, maximize, grad_scale, found_inf, None)


def masked_adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2,
                      weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, ema_state, ema_scales, ema_beta,
                      ema_signal, ema_seed, ema_ids) -> None:
    """Launcher of the op cpift::masked_adamw_ema_ (arguments already checked by the op)."""
    _launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2, weight_decay, eps,
            amsgrad, maximize, grad_scale, found_inf, (ema_state, ema_scales, ema_beta, ema_signal, ema_seed, ema_ids))


def _launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2, weight_decay, eps,
            amsgrad, maximize, grad_scale, found_inf, ema) -> None:
    """One launch per (device, param dtype, state dtype[, EMA state dtype]) bucket; `ema`: None, or
    (state, scales, beta, signal, seed, ids) of the fused EMA."""
    if not params:
        return
    steps = steps if isinstance(steps, torch.Tensor) else torch.tensor(list(steps), dtype=torch.float32)
    lr = lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    grads = [g.contiguous() for g in grads]
    words = [w.contiguous() for w in frozen]
    lerp_coeff, lerp_from_m = lerp_constants(beta1)
    if ema is not None:
        ema_state, ema_scales, ema_beta, ema_signal, ema_seed, ema_ids = ema
        scale_for = scale_of(ema_state, ema_scales)
    key = (lambda i: (params[i].dtype, exp_avgs[i].dtype)) if ema is None else \
        (lambda i: (params[i].dtype, exp_avgs[i].dtype, ema_state[i].dtype))
    for dev, index in _buckets(params, key):
        blk_tensor, blk_start, _ = _block_table(tuple(params[i].numel() for i in index), GPU_BLOCK, dev)

        def pick(ts):
            return [ts[i] for i in index] if ts else []

        data = [pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs)]
        data.append(pick(max_exp_avg_sqs) if amsgrad else data[2])  # unused without amsgrad
        rows = [[t.numel() for t in data[0]], *(_offsets(ts) for ts in data),
                [w.data_ptr() for w in pick(words)] if words else [0] * len(index)]
        if ema is not None:
            e_data = pick(ema_state)
            e_scales = [scale_for[i] for i in index] if index[0] in scale_for else e_data  # unused unless 8-bit
            rows += [_offsets(e_data), _offsets(e_scales),
                     [_tensor_seed(ema_seed, ema_ids[i] if ema_ids else i) for i in index]]
        numel, p_offs, g_offs, m_offs, v_offs, vmax_offs, w_ptrs, *ema_rows = _table(rows, dev)
        sel = torch.tensor(index, dtype=torch.int64, device=steps.device)
        step_size, bc2_sqrt, decay = step_scalars(steps[sel], lr, beta1, beta2, weight_decay, dev)
        one, minus_one, zero = _constants(dev)
        if grad_scale is not None:
            scale = grad_scale.to(device=dev, dtype=torch.float32).reshape(1)
            scale = -scale if maximize else scale
        else:
            scale = minus_one if maximize else one
        inf = found_inf.to(device=dev, dtype=torch.float32).reshape(1) if found_inf is not None else zero
        p_dtype, s_dtype = _TL_DTYPE[params[index[0]].dtype], _TL_DTYPE[exp_avgs[index[0]].dtype]
        p_align, s_align = _align(data[0], data[1]), _align(*data[2:])
        if ema is None:
            _masked_adamw_kernel[(blk_start.numel(),)](
                blk_tensor, blk_start, numel, *(ts[0] for ts in data), p_offs, g_offs, m_offs, v_offs, vmax_offs,
                w_ptrs, step_size, bc2_sqrt, decay, scale, inf, int(lerp_from_m), lerp_coeff, beta2, 1.0 - beta2, eps,
                P_DTYPE=p_dtype, S_DTYPE=s_dtype, AMSGRAD=amsgrad, HAS_MASK=bool(words), P_ALIGN=p_align,
                S_ALIGN=s_align, BLOCK=GPU_BLOCK, **FP_OPTIONS)
        else:
            e_offs, esc_offs, seeds = ema_rows
            _masked_adamw_ema_kernel[(blk_start.numel(),)](
                blk_tensor, blk_start, numel, *(ts[0] for ts in data), e_data[0], e_scales[0], p_offs, g_offs, m_offs,
                v_offs, vmax_offs, e_offs, esc_offs, w_ptrs, seeds, step_size, bc2_sqrt, decay, scale, inf,
                int(lerp_from_m), lerp_coeff, beta2, 1.0 - beta2, eps, ema_beta, 1.0 - ema_beta, ema_signal,
                P_DTYPE=p_dtype, S_DTYPE=s_dtype, E_DTYPE=_E_DTYPE[ema_state[index[0]].dtype], AMSGRAD=amsgrad,
                HAS_MASK=bool(words), P_ALIGN=p_align, S_ALIGN=s_align, E_ALIGN=_align(e_data), ROWS=ROWS,
                QBLOCK=QBLOCK, num_warps=FUSED_WARPS, **FP_OPTIONS)


def masked_grad_sq_norm(grads: list[torch.Tensor], frozen: list[torch.Tensor]) -> torch.Tensor:
    """Launcher of cpift::masked_grad_sq_norm: per-block partial sums, then one program per tensor
    adds its blocks' partials in order (deterministic on every device: no atomics)."""
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros(len(grads), dtype=torch.float32, device=device)
    grads = [g.contiguous() for g in grads]
    words = [w.contiguous() for w in frozen]
    for dev, index in _buckets(grads, lambda i: grads[i].dtype):
        blk_tensor, blk_start, first = _block_table(tuple(grads[i].numel() for i in index), GPU_BLOCK, dev)
        mine = [grads[i] for i in index]
        numel, g_offs, w_ptrs = _table([[g.numel() for g in mine], _offsets(mine),
                                        [words[i].data_ptr() for i in index] if words else [0] * len(index)], dev)
        partial = torch.empty(blk_start.numel(), dtype=torch.float32, device=dev)
        _masked_sq_sum_kernel[(blk_start.numel(),)](
            blk_tensor, blk_start, numel, mine[0], g_offs, w_ptrs, partial, HAS_MASK=bool(words),
            G_ALIGN=_align(mine), BLOCK=GPU_BLOCK, **FP_OPTIONS)
        sums = torch.empty(len(index), dtype=torch.float32, device=dev)
        _segment_sum_kernel[(len(index),)](partial, first, sums, BLOCK=SUM_BLOCK, **FP_OPTIONS)
        out[torch.tensor(index, dtype=torch.int64, device=device)] = sums.to(device)
    return out


def aot_specs():
    """Every specialization the launchers above can take (compiled by tools/triton_aot.py): each
    dtype pair (and EMA state dtype), amsgrad, mask, aligned or not; the interpreter runs the same
    BLOCK as a GPU."""
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16", tl.uint8: "u8"}
    tables = {name: "*i64" for name in ("blk_start_ptr", "numel_ptr", "p_offs", "g_offs", "m_offs", "v_offs",
                                        "vmax_offs", "w_ptrs")}
    scalars = {"step_size_ptr": "*fp32", "bc2_sqrt_ptr": "*fp32", "decay_ptr": "*fp32", "grad_scale_ptr": "*fp32",
               "found_inf_ptr": "*fp32", "lerp_from_m": "i32", "lerp_coeff": "fp32",
               "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32"}
    for p_dtype in (tl.float32, tl.bfloat16, tl.float16):
        p_vec = 128 // p_dtype.primitive_bitwidth
        for s_dtype in dict.fromkeys((p_dtype, tl.float32)):
            s_vec = 128 // s_dtype.primitive_bitwidth
            bases = {"p_base": f"*{names[p_dtype]}", "g_base": f"*{names[p_dtype]}"}
            bases.update({k: f"*{names[s_dtype]}" for k in ("m_base", "v_base", "vmax_base")})
            for amsgrad in (False, True):
                for has_mask in (False, True):
                    for aligned in (True, False):
                        yield KernelSpec(_masked_adamw_kernel, {"blk_tensor_ptr": "*i32", **tables, **bases, **scalars},
                                         {"P_DTYPE": p_dtype, "S_DTYPE": s_dtype, "AMSGRAD": amsgrad,
                                          "HAS_MASK": has_mask, "P_ALIGN": p_vec if aligned else 1,
                                          "S_ALIGN": s_vec if aligned else 1, "BLOCK": GPU_BLOCK})
            for e_dtype in (tl.float32, tl.bfloat16, tl.uint8):
                ema_types = {"e_base": f"*{names[e_dtype]}", "esc_base": "*fp32" if e_dtype == tl.uint8
                             else f"*{names[e_dtype]}", "e_offs": "*i64", "esc_offs": "*i64", "seed_ptr": "*i64",
                             "ema_beta": "fp32", "ema_one_minus_beta": "fp32", "signal": "i32"}
                for amsgrad in (False, True):
                    for has_mask in (False, True):
                        for aligned in (True, False):
                            yield KernelSpec(_masked_adamw_ema_kernel,
                                             {"blk_tensor_ptr": "*i32", **tables, **bases, **scalars, **ema_types},
                                             {"P_DTYPE": p_dtype, "S_DTYPE": s_dtype, "E_DTYPE": e_dtype,
                                              "AMSGRAD": amsgrad, "HAS_MASK": has_mask,
                                              "P_ALIGN": p_vec if aligned else 1, "S_ALIGN": s_vec if aligned else 1,
                                              "E_ALIGN": 128 // e_dtype.primitive_bitwidth if aligned else 1,
                                              "ROWS": ROWS, "QBLOCK": QBLOCK}, num_warps=FUSED_WARPS)
        for has_mask in (False, True):
            for aligned in (True, False):
                yield KernelSpec(_masked_sq_sum_kernel, {"blk_tensor_ptr": "*i32", "blk_start_ptr": "*i64",
                                                         "numel_ptr": "*i64", "g_base": f"*{names[p_dtype]}",
                                                         "g_offs": "*i64", "w_ptrs": "*i64", "out_ptr": "*fp32"},
                                 {"HAS_MASK": has_mask, "G_ALIGN": p_vec if aligned else 1, "BLOCK": GPU_BLOCK})
    yield KernelSpec(_segment_sum_kernel, {"partial_ptr": "*fp32", "first_ptr": "*i64", "out_ptr": "*fp32"},
                     {"BLOCK": SUM_BLOCK})
