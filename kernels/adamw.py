"""Triton kernels for the masked AdamW step and the masked squared gradient norm.

One launch per (device, param dtype, state dtype) bucket, whatever the number of tensors: the
launcher passes tables of raw data pointers (one row per tensor) and a block table (tensor, first
element) built with `segment_blocks`; each program loads its tensor's pointers, casts them to typed
pointers and updates BLOCK elements. Raw pointer tables work under TRITON_INTERPRET=1 as on GPU.

Frozen bit i of tensor t is bit (i % 32) of word i // 32 of that tensor's words. Frozen lanes are
neither loaded nor stored, so they keep their exact bits.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from cpift_fast.reference import check_masked_adamw_args

from .mask import segment_blocks

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _block() -> int:
    # the interpreter runs one program at a time: fewer, larger blocks keep CPU test grids small
    return 4096 if os.environ.get("TRITON_INTERPRET") == "1" else 1024


@triton.jit
def _trainable_lanes(blk_tensor_ptr, blk_start_ptr, numel_ptr, w_ptrs, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor index, element offsets, lanes inside the tensor whose frozen bit is clear) of this program."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor_ptr + pid)
    offs = tl.load(blk_start_ptr + pid) + tl.arange(0, BLOCK)
    lanes = offs < tl.load(numel_ptr + t)
    if HAS_MASK:
        words = tl.load(w_ptrs + t).to(tl.pointer_type(tl.int32))
        word = tl.load(words + (offs >> 5), mask=lanes, other=0).to(tl.uint32, bitcast=True)
        lanes = lanes & (((word >> (offs & 31).to(tl.uint32)) & 1) == 0)
    return t, offs, lanes


@triton.jit
def _masked_adamw_kernel(blk_tensor_ptr, blk_start_ptr, numel_ptr, p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs,
                         w_ptrs, step_size_ptr, bc2_sqrt_ptr, grad_scale_ptr, decay, one_minus_beta1, beta2,
                         one_minus_beta2, eps, grad_sign, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                         AMSGRAD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
                         BLOCK: tl.constexpr):
    t, offs, write = _trainable_lanes(blk_tensor_ptr, blk_start_ptr, numel_ptr, w_ptrs, HAS_MASK, BLOCK)
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(S_DTYPE))
    step_size = tl.load(step_size_ptr + t)
    bc2_sqrt = tl.load(bc2_sqrt_ptr + t)

    g = tl.load(g_ptr + offs, mask=write, other=0.0).to(tl.float32) * grad_sign
    if HAS_SCALE:
        g = g * (1.0 / tl.load(grad_scale_ptr))
    p = tl.load(p_ptr + offs, mask=write, other=0.0).to(tl.float32) * decay
    m = tl.load(m_ptr + offs, mask=write, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=write, other=0.0).to(tl.float32)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    vm = v
    if AMSGRAD:
        vmax_ptr = tl.load(vmax_ptrs + t).to(tl.pointer_type(S_DTYPE))
        vm = tl.maximum(tl.load(vmax_ptr + offs, mask=write, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptr + offs, vm.to(S_DTYPE), mask=write)
    # IEEE sqrt and division (Triton's defaults are approximate on GPU), as torch's fused kernels
    denom = tl.div_rn(tl.sqrt_rn(vm), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=write)
    tl.store(m_ptr + offs, m.to(S_DTYPE), mask=write)
    tl.store(v_ptr + offs, v.to(S_DTYPE), mask=write)


@triton.jit
def _masked_sq_sum_kernel(blk_tensor_ptr, blk_start_ptr, numel_ptr, g_ptrs, w_ptrs, out_ptr,
                          G_DTYPE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, keep = _trainable_lanes(blk_tensor_ptr, blk_start_ptr, numel_ptr, w_ptrs, HAS_MASK, BLOCK)
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DTYPE))
    g = tl.load(g_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


@functools.lru_cache(maxsize=64)
def _block_table(numels: tuple[int, ...], block: int, device: torch.device):
    """(tensor index int32, first element int64, per-block tensor index on the CPU) of every block
    of BLOCK elements of tensors with these sizes; cached: sizes rarely change between steps."""
    offsets = torch.tensor((0,) + numels, dtype=torch.int64).cumsum(0)
    start, _, segment = segment_blocks(offsets, block)
    return segment.to(device=device, dtype=torch.int32), (start - offsets[segment]).to(device), segment


def _buckets(tensors: list[torch.Tensor], key) -> list[tuple[torch.device, list[int]]]:
    """Indices of the non-empty tensors grouped by (device, key(i)): one launch per group."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault((t.device, key(i)), []).append(i)
    return [(device, index) for (device, _), index in groups.items()]


def _table(rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 rows (sizes, data pointers) in one host-to-device copy; returns one view per row."""
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    return list(table.unbind(0))


def masked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], frozen: list[torch.Tensor],
                  steps: list[float], lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                  amsgrad: bool, maximize: bool, grad_scale: torch.Tensor | None) -> None:
    check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, amsgrad)
    grads = [g.contiguous() for g in grads]
    words = [w.contiguous() for w in frozen]
    block = _block()
    for dev, index in _buckets(params, lambda i: (params[i].dtype, exp_avgs[i].dtype)):
        blk_tensor, blk_start, _ = _block_table(tuple(params[i].numel() for i in index), block, dev)

        def ptrs(ts):
            return [ts[i].data_ptr() for i in index] if ts else [0] * len(index)

        numel, p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, w_ptrs = _table(
            [[params[i].numel() for i in index], ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs),
             ptrs(max_exp_avg_sqs if amsgrad else []), ptrs(words)], dev)
        step_size, bc2_sqrt = torch.tensor(
            [[lr / (1.0 - beta1 ** steps[i]) for i in index], [(1.0 - beta2 ** steps[i]) ** 0.5 for i in index]],
            dtype=torch.float32).to(dev, non_blocking=True).unbind(0)
        scale = grad_scale.to(device=dev, dtype=torch.float32) if grad_scale is not None else step_size
        _masked_adamw_kernel[(blk_start.numel(),)](
            blk_tensor, blk_start, numel, p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, w_ptrs, step_size, bc2_sqrt,
            scale, 1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps, -1.0 if maximize else 1.0,
            P_DTYPE=_TL_DTYPE[params[index[0]].dtype], S_DTYPE=_TL_DTYPE[exp_avgs[index[0]].dtype], AMSGRAD=amsgrad,
            HAS_MASK=bool(words), HAS_SCALE=grad_scale is not None, BLOCK=block)


def masked_grad_sq_norm(grads: list[torch.Tensor], frozen: list[torch.Tensor]) -> torch.Tensor:
    if frozen and len(frozen) != len(grads):
        raise ValueError(f"masked_grad_sq_norm: frozen must be empty or hold one word tensor per grad, got "
                         f"{len(frozen)} for {len(grads)} grads")
    for i, g in enumerate(grads):
        if g.dtype not in _TL_DTYPE:
            raise TypeError(f"masked_grad_sq_norm: grads[{i}] must be float32, bfloat16 or float16, got {g.dtype}")
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros(len(grads), dtype=torch.float32, device=device)
    grads = [g.contiguous() for g in grads]
    words = [w.contiguous() for w in frozen]
    block = _block()
    for dev, index in _buckets(grads, lambda i: grads[i].dtype):
        blk_tensor, blk_start, segment = _block_table(tuple(grads[i].numel() for i in index), block, dev)
        numel, g_ptrs, w_ptrs = _table([[grads[i].numel() for i in index], [grads[i].data_ptr() for i in index],
                                        [words[i].data_ptr() for i in index] if words else [0] * len(index)], dev)
        partial = torch.empty(blk_start.numel(), dtype=torch.float32, device=dev)
        _masked_sq_sum_kernel[(blk_start.numel(),)](
            blk_tensor, blk_start, numel, g_ptrs, w_ptrs, partial,
            G_DTYPE=_TL_DTYPE[grads[index[0]].dtype], HAS_MASK=bool(words), BLOCK=block)
        target = torch.tensor(index, dtype=torch.int64)[segment]
        out.index_add_(0, target.to(out.device), partial.to(out.device))
    return out
