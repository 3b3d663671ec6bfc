"""Importance EMA: one step of a per-element exponential moving average of a gradient signal (EPI).

For every element of every tensor i (all math in fp32, each operation rounded to nearest even)::

    g = fp32(grads[i]) / grad_scale          (no division without a grad_scale)
    s = |g·θ|  (signal 0, grad_x_param)  |  g·g  (signal 1, grad_sq)  |  |g|  (signal 2, grad_abs)
    x = fp32(β)·I + fp32(1 − β)·s            (two products and one sum, no fused multiply-add)

with θ = params[i] and I the element's current EMA, read from ``state[i]``. ``x`` is stored back:

- float32 state: ``x`` itself.
- bfloat16 state: ``x`` stochastically rounded: its fp32 bits plus a 16-bit random integer r, the
  low 16 bits then dropped — rounded up with probability (distance to the lower bf16) / (bf16 step),
  so E[stored] = x and increments below bf16's resolution are kept on average (round-to-nearest
  would drop every increment smaller than half a step: with β = 0.999 the EMA would stall). NaN is
  stored as bf16 0x7FC0.
- 8-bit state (uint8), blockwise: the tensor's elements in blocks of ``QBLOCK`` = 256 (the last one
  may be shorter), each with one float32 step ``scales[i][b]``; the element's value is q·step.
  A step recomputes, per block, step = max(x) / 255 and q = min(floor(x / step + u), 255) (q = 0 where
  step = 0), u ∈ [0, 1) uniform: stochastic rounding to the block's grid, E[q·step] = x.

Random numbers are a counter-based hash (``hash32``) of (seed, tensor id, element index), the
tensor id being ``ids[i]`` (``ids`` empty: the position i): the same bits on every backend, thread
count and launch order, so a seeded run is reproducible, and a caller that passes a tensor in
another call or position (the fused step, cpift::masked_adamw_ema_) gets the same stream by
passing the same id.
Importance is non-negative: state holding negative values is outside the contract, and so are
non-finite grads with 8-bit state (fp32 / bf16 state carry Inf and NaN through). A nonzero
``found_inf`` (GradScaler saw inf/NaN) leaves every state and scale untouched.

Backends: C++ (csrc/importance.cpp) on CPU, Triton (cpift_fast/kernels/importance.py) on CUDA, the reference
below elsewhere; all three store the same bits.
"""

from __future__ import annotations

import torch

from .._ops import Op

QBLOCK = 256  # elements per scale of the 8-bit state
SIGNALS = ("grad_x_param", "grad_sq", "grad_abs")  # the op's `signal` is the index in this tuple
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_M32 = 0xFFFFFFFF
_HASH_MUL = (0x7FEB352D, 0x1B873593)  # odd, < 2^31: products of a 32-bit value fit int64 exactly


def hash32(x):
    """A 32-bit integer hash (xor-shift / multiply rounds): Python ints or int64 tensors holding
    values in [0, 2^32); the Triton kernel computes the same function on uint32."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL[0]) & _M32
    x = x ^ (x >> 15)
    x = (x * _HASH_MUL[1]) & _M32
    return x ^ (x >> 16)


def tensor_seed(seed: int, i: int) -> int:
    """The 32-bit random stream of tensor position i in a call with `seed`."""
    return hash32((seed ^ hash32((i + 1) & _M32)) & _M32)


def random_bits(stream: int, numel: int, device: torch.device) -> torch.Tensor:
    """int64[numel] in [0, 2^32): hash32(lo32(j) ^ stream ^ hash32(hi32(j))) for element j, with
    stream = tensor_seed(seed, i)."""
    j = torch.arange(numel, dtype=torch.int64, device=device)
    return hash32((j & _M32) ^ stream ^ hash32(j >> 32))


def num_scales(numel: int) -> int:
    return (numel + QBLOCK - 1) // QBLOCK


def _check(state, scales, grads, params, beta, signal, seed, grad_scale, found_inf, ids=(), op="importance_ema_",
           prefix=""):
    """Raise a ValueError/TypeError naming the first bad argument (shapes, dtypes, devices: no value
    is read, no host sync). `op` and `prefix` name the caller's op and argument names (the fused
    AdamW step checks its ema_* arguments here)."""
    T = len(params)
    if len(state) != T or len(grads) != T:
        raise ValueError(f"{op}: {prefix}state, grads and params must have the same length ({len(state)}, "
                         f"{len(grads)}, {T})")
    if len(ids) not in (0, T) or any(not 0 <= i <= _M32 for i in ids):
        raise ValueError(f"{op}: {prefix}ids must be empty or hold one id in [0, 2^32) per tensor ({T}), got "
                         f"{len(ids)} ids" + (f" ({min(ids)}..{max(ids)})" if ids else ""))
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{op}: {prefix}beta must be in [0, 1), got {beta}")
    if signal not in range(len(SIGNALS)):
        raise ValueError(f"{op}: {prefix}signal must be 0 ({SIGNALS[0]}), 1 ({SIGNALS[1]}) or 2 ({SIGNALS[2]}), "
                         f"got {signal}")
    if not 0 <= seed <= _M32:
        raise ValueError(f"{op}: {prefix}seed must be in [0, 2^32), got {seed}")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and t.numel() != 1:
            raise ValueError(f"{op}: {name} must hold one value, got shape {list(t.shape)}")
    quantized = [i for i, s in enumerate(state) if s.dtype == torch.uint8]
    if len(scales) != len(quantized):
        raise ValueError(f"{op}: {prefix}scales must hold one float32 tensor per uint8 {prefix}state tensor "
                         f"({len(quantized)}), got {len(scales)}")
    for k, i in enumerate(quantized):
        if scales[k].dtype != torch.float32 or scales[k].numel() != num_scales(params[i].numel()) \
                or not scales[k].is_contiguous() or scales[k].device != params[i].device:
            raise ValueError(f"{op}: {prefix}scales[{k}] (of {prefix}state[{i}]) must be a contiguous float32 tensor "
                             f"of {num_scales(params[i].numel())} elements on {params[i].device}, got "
                             f"{scales[k].dtype}, {scales[k].numel()} elements on {scales[k].device}")
    for i, p in enumerate(params):
        if p.dtype not in _FLOATS:
            raise TypeError(f"{op}: params[{i}] must be float32, bfloat16 or float16, got {p.dtype}")
        if grads[i].dtype != p.dtype or grads[i].shape != p.shape:
            raise TypeError(f"{op}: grads[{i}] is {grads[i].dtype} of shape {list(grads[i].shape)}, "
                            f"params[{i}] is {p.dtype} of shape {list(p.shape)}")
        s = state[i]
        if s.dtype not in STATE_DTYPES or s.numel() != p.numel() or not s.is_contiguous():
            raise ValueError(f"{op}: {prefix}state[{i}] must be a contiguous float32, bfloat16 or uint8 tensor of "
                             f"{p.numel()} elements, got {s.dtype} with {s.numel()} elements"
                             f"{'' if s.is_contiguous() else ' (not contiguous)'}")
        for name, t in (("grads", grads[i]), (prefix + "state", s)):
            if t.device != p.device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device}, params[{i}] on {p.device}")
        if p.device != params[0].device:
            raise ValueError(f"{op}: params[{i}] is on {p.device}, params[0] on {params[0].device}: "
                             f"one call updates tensors of one device")


def signal_of(g: torch.Tensor, p: torch.Tensor, signal: int) -> torch.Tensor:
    """s(g, θ) in fp32 (g, θ fp32)."""
    if signal == 0:
        return (g * p).abs()
    if signal == 1:
        return g * g
    return g.abs()


def _reference(state, scales, grads, params, beta, signal, seed, grad_scale, found_inf, ids=()):
    """The module doc's math, tensor by tensor, in plain PyTorch."""
    if found_inf is not None and float(found_inf) != 0.0:
        return
    k = 0
    for i, (s, g, p) in enumerate(zip(state, grads, params)):
        scale = scales[k] if s.dtype == torch.uint8 else None
        k += s.dtype == torch.uint8
        if not p.numel():
            continue
        g32 = g.reshape(-1).float()
        if grad_scale is not None:
            g32 = g32 / grad_scale.to(device=g.device, dtype=torch.float32).reshape(())
        sig = signal_of(g32, p.reshape(-1).float(), signal)
        beta32 = torch.tensor(beta, dtype=torch.float32, device=p.device)
        rest32 = torch.tensor(1.0 - beta, dtype=torch.float32, device=p.device)
        flat = s.view(-1)
        n = flat.numel()
        if s.dtype == torch.uint8:
            pad = num_scales(n) * QBLOCK - n
            old = (torch.nn.functional.pad(flat.float(), (0, pad)).view(-1, QBLOCK) * scale[:, None]).view(-1)[:n]
        else:
            old = flat.float()
        x = old * beta32 + sig * rest32
        if s.dtype == torch.float32:
            flat.copy_(x)
        elif s.dtype == torch.bfloat16:
            r = random_bits(tensor_seed(seed, ids[i] if ids else i), n, p.device) >> 16
            bits = ((x.view(torch.int32).to(torch.int64) & _M32) + r) & 0xFFFF0000
            rounded = (bits - (bits >= 2**31).to(torch.int64) * 2**32).to(torch.int32).view(torch.float32)
            flat.copy_(torch.where(x.isnan(), x, rounded))  # exact: the low 16 bits are zero; NaN -> 0x7FC0
        else:
            u = (random_bits(tensor_seed(seed, ids[i] if ids else i), n, p.device) >> 8).float() * 2.0**-24
            blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, QBLOCK)
            step = blocks.amax(1) / 255.0
            safe = torch.where(step > 0, step, 1.0)
            y = (blocks / safe[:, None]).view(-1)[:n]
            q = torch.floor(y + u).clamp(0, 255)
            stepn = torch.repeat_interleave(step, QBLOCK)[:n]
            flat.copy_(torch.where(stepn > 0, q, 0.0).to(torch.uint8))
            scale.copy_(step)


def _fake(state, scales, grads, params, beta, signal, seed, grad_scale, found_inf, ids=()):
    return None


importance_ema_ = Op(
    "importance_ema_(Tensor(a!)[] state, Tensor(b!)[] scales, Tensor[] grads, Tensor[] params, float beta, "
    "int signal, int seed, Tensor? grad_scale, Tensor? found_inf, int[] ids=[]) -> ()",
    check=_check, fake=_fake, reference=_reference, triton_module="importance")
importance_ema_.__doc__ = """state[i] <- EMA step of signal s(grads[i], params[i]) (see cpift_fast.ops.importance);
scales: one float32 tensor per uint8 state tensor, in state order; ids: each tensor's random-stream id
(empty: its position)."""
