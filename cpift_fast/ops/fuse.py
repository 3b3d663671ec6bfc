"""Fusion ops: the per-tensor SLERP reduction (u·v, |u|², |v|²) and the blend + core transplant pass.

Backends: C++ (csrc/fuse.cpp), Triton (kernels/fuse.py), the reference below.
"""

from __future__ import annotations

import torch

from .._ops import Op
from .mask import mask_unpack as _unpack_op

_unpack_reference = _unpack_op.reference


def check_slerp_args(op: str, a, b, base, values=(), words=(), rule: int = 0) -> None:
    """Validate slerp_stats / slerp_apply arguments (shared by every backend's Python side)."""
    for name, t in (("a", a), ("b", b), ("base", base)):
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    n = a.numel()
    if b.numel() != n:
        raise ValueError(f"{op}: a has {n} elements (shape {list(a.shape)}), b has {b.numel()} "
                         f"(shape {list(b.shape)})")
    if base is not None and base.numel() != n:
        raise ValueError(f"{op}: base has {base.numel()} elements, a has {n}")
    if rule not in (0, 1, 2):
        raise ValueError(f"{op}: rule must be 0 (last), 1 (first) or 2 (mean); got {rule}")
    if len(values) != len(words):
        raise ValueError(f"{op}: {len(values)} value tensors but {len(words)} word buffers")
    for k, (v, w) in enumerate(zip(values, words)):
        if v.dtype != a.dtype:
            raise ValueError(f"{op}: values[{k}] has dtype {v.dtype}, a has {a.dtype} "
                             "(a transplant copies bits: cast first)")
        if v.numel() != n:
            raise ValueError(f"{op}: values[{k}] has {v.numel()} elements, a has {n}")
        if w.dtype != torch.int32 or w.numel() != (n + 31) // 32:
            raise ValueError(f"{op}: words[{k}] must be {(n + 31) // 32} int32 words, got {w.numel()} {w.dtype}")


def _stats_reference(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """float64[3] = (Σ u·v, Σ u², Σ v²) with u = a − base, v = b − base (base None: u = a, v = b).

    u, v in fp32 (inputs widened); products and sums in fp64 (a product of two fp32 values is exact).
    """
    u = a.reshape(-1).float()
    v = b.reshape(-1).float()
    if base is not None:
        u = u - base.reshape(-1).float()
        v = v - base.reshape(-1).float()
    u, v = u.double(), v.double()
    return torch.stack([(u * v).sum(), (u * u).sum(), (v * v).sum()])


def _apply_reference(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None, c0: float, c1: float, c2: float,
                values: list[torch.Tensor], words: list[torch.Tensor], rule: int) -> torch.Tensor:
    """Blend ``c0·a + c1·b + c2·base`` (fp32, cast to a's dtype, a's shape) plus core transplant.

    Element i of the result is replaced by ``values[k][i]`` where bit i of ``words[k]`` is set;
    where several cores hold i, ``rule`` decides: 0 = the last such k, 1 = the first, 2 = the fp32
    mean of their values. ``values[k]`` must have a's dtype, so a transplant is a bit-exact copy.
    """
    n = a.numel()
    out = c0 * a.reshape(-1).float() + c1 * b.reshape(-1).float()
    if base is not None:
        out = out + c2 * base.reshape(-1).float()
    out = out.to(a.dtype)
    if not values:
        return out.view(a.shape)
    bits = [_unpack_reference(w.reshape(-1), n) for w in words]
    if rule == 2:
        total = torch.zeros(n, dtype=torch.float32, device=a.device)
        count = torch.zeros(n, dtype=torch.int32, device=a.device)
        for v, m in zip(values, bits):
            total += torch.where(m, v.reshape(-1).float(), 0.0)
            count += m.to(torch.int32)
        hit = count > 0
        out = torch.where(hit, (total / count.clamp(min=1)).to(a.dtype), out)
    else:
        order = list(zip(values, bits)) if rule == 0 else list(zip(values, bits))[::-1]
        for v, m in order:
            out = torch.where(m, v.reshape(-1), out)
    return out.view(a.shape)


def _check_stats(a, b, base):
    check_slerp_args("slerp_stats", a, b, base)


def _check_apply(a, b, base, c0, c1, c2, values, words, rule):
    check_slerp_args("slerp_apply", a, b, base, values, words, rule)


def _stats_fake(a, b, base):
    return a.new_empty((3,), dtype=torch.float64)


def _apply_fake(a, b, base, c0, c1, c2, values, words, rule):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


slerp_stats = Op("slerp_stats(Tensor a, Tensor b, Tensor? base) -> Tensor", check=_check_stats, fake=_stats_fake,
                 reference=_stats_reference, triton_module="fuse")

slerp_apply = Op("slerp_apply(Tensor a, Tensor b, Tensor? base, float c0, float c1, float c2, Tensor[] values, "
                 "Tensor[] words, int rule) -> Tensor", check=_check_apply, fake=_apply_fake,
                 reference=_apply_reference, triton_module="fuse")
