"""Fusion ops: the per-tensor SLERP reduction (u·v, |u|², |v|²) and the blend + core transplant pass,
each for one tensor (slerp_stats, slerp_apply) or a list of tensors in one call (slerp_stats_list,
slerp_apply_list: the C++ kernel splits one work list of chunks of every tensor over the threads;
tensor t's result is the single op's on tensor t, bit for bit, on every backend).

Backends: C++ (csrc/fuse.cpp), Triton (cpift_fast/kernels/fuse.py), the reference below.
"""

from __future__ import annotations

import torch

from .._ops import Op
from .mask import mask_unpack as _unpack_op

_unpack_reference = _unpack_op.reference


def check_slerp_args(op: str, a, b, base, values=(), words=(), rule: int = 0, index: int | None = None,
                     first: int = 0) -> None:
    """Validate slerp_stats / slerp_apply arguments (shared by every backend's Python side).

    ``index``: the tensor's position in a list op's lists (messages then name ``a[index]``);
    ``first``: the position of ``values[0]`` / ``words[0]`` in the list op's flat core lists.
    """
    ix = "" if index is None else f"[{index}]"
    of = "" if index is None else f" (a core of a{ix})"
    for name, t in (("a", a), ("b", b), ("base", base)):
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{op}: {name}{ix} must be float32, float16 or bfloat16, got {t.dtype}")
    n = a.numel()
    if b.numel() != n:
        raise ValueError(f"{op}: a{ix} has {n} elements (shape {list(a.shape)}), b{ix} has {b.numel()} "
                         f"(shape {list(b.shape)})")
    if base is not None and base.numel() != n:
        raise ValueError(f"{op}: base{ix} has {base.numel()} elements (shape {list(base.shape)}), a{ix} has {n} "
                         f"(shape {list(a.shape)})")
    if rule not in (0, 1, 2):
        raise ValueError(f"{op}: rule must be 0 (last), 1 (first) or 2 (mean); got {rule}")
    if len(values) != len(words):
        raise ValueError(f"{op}: {len(values)} value tensors but {len(words)} word buffers")
    for k, (v, w) in enumerate(zip(values, words), start=first):
        if v.dtype != a.dtype:
            raise ValueError(f"{op}: values[{k}]{of} has dtype {v.dtype}, a{ix} has {a.dtype} "
                             "(a transplant copies bits: cast first)")
        if v.numel() != n:
            raise ValueError(f"{op}: values[{k}]{of} has {v.numel()} elements, a{ix} has {n}")
        if w.dtype != torch.int32 or w.numel() != (n + 31) // 32:
            raise ValueError(f"{op}: words[{k}]{of} must be {(n + 31) // 32} int32 words, got {w.numel()} {w.dtype}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _looks_valid(a, b, base, values=(), words=()) -> bool:
    """A fast test of what check_slerp_args checks (a list op checks every tensor; only a tensor
    that fails here goes through check_slerp_args, for its message)."""
    n = a.numel()
    if not (a.dtype in _FLOATS and b.dtype in _FLOATS and b.numel() == n
            and (base is None or (base.dtype in _FLOATS and base.numel() == n))):
        return False
    if not values:
        return True
    nw = (n + 31) // 32
    return all(v.dtype == a.dtype and v.numel() == n and w.dtype == torch.int32 and w.numel() == nw
               for v, w in zip(values, words))


def _check_list_lengths(op: str, a, b, base) -> None:
    if not len(a) == len(b) == len(base):
        raise ValueError(f"{op}: {len(a)} a tensors, {len(b)} b, {len(base)} base (one each per tensor; None for "
                         "no base)")
    devices = {t.device for t in (*a, *b, *(x for x in base if x is not None))}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def core_slices(counts) -> list[slice]:
    """Tensor t's cores in a slerp_apply_list call: ``values[s]``, ``words[s]`` for ``s = core_slices(counts)[t]``."""
    out, start = [], 0
    for c in counts:
        out.append(slice(start, start + c))
        start += c
    return out


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


def _check_stats_list(a, b, base):
    _check_list_lengths("slerp_stats_list", a, b, base)
    for t, (x, y, z) in enumerate(zip(a, b, base)):
        if not _looks_valid(x, y, z):
            check_slerp_args("slerp_stats_list", x, y, z, index=t)


def _check_apply_list(a, b, base, coeffs, values, words, counts, rule):
    op = "slerp_apply_list"
    _check_list_lengths(op, a, b, base)
    if len(coeffs) != 3 * len(a):
        raise ValueError(f"{op}: coeffs has {len(coeffs)} values, {len(a)} tensors need {3 * len(a)} "
                         "(c0, c1, c2 per tensor)")
    if len(counts) != len(a):
        raise ValueError(f"{op}: counts has {len(counts)} entries, one per tensor ({len(a)}) needed")
    for t, c in enumerate(counts):
        if c < 0:
            raise ValueError(f"{op}: counts[{t}] is {c} (cores of a[{t}]: must be >= 0)")
    if sum(counts) != len(values):
        raise ValueError(f"{op}: counts sum to {sum(counts)} cores but {len(values)} value tensors are given")
    if len(values) != len(words):
        raise ValueError(f"{op}: {len(values)} value tensors but {len(words)} word buffers")
    if rule not in (0, 1, 2):
        raise ValueError(f"{op}: rule must be 0 (last), 1 (first) or 2 (mean); got {rule}")
    for t, (x, y, z, s) in enumerate(zip(a, b, base, core_slices(counts))):
        if not _looks_valid(x, y, z, values[s], words[s]):
            check_slerp_args(op, x, y, z, values[s], words[s], rule, index=t, first=s.start)


def _stats_list_reference(a, b, base):
    device = a[0].device if len(a) else torch.device("cpu")
    rows = [_stats_reference(x, y, z) for x, y, z in zip(a, b, base)]
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64, device=device)


def _apply_list_reference(a, b, base, coeffs, values, words, counts, rule):
    return [_apply_reference(x, y, z, *coeffs[3 * t:3 * t + 3], list(values[s]), list(words[s]), rule)
            for t, (x, y, z, s) in enumerate(zip(a, b, base, core_slices(counts)))]


def _stats_list_fake(a, b, base):
    like = a[0] if len(a) else torch.empty(0)
    return like.new_empty((len(a), 3), dtype=torch.float64)


def _apply_list_fake(a, b, base, coeffs, values, words, counts, rule):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in a]


slerp_stats = Op("slerp_stats(Tensor a, Tensor b, Tensor? base) -> Tensor", check=_check_stats, fake=_stats_fake,
                 reference=_stats_reference, triton_module="fuse")

slerp_apply = Op("slerp_apply(Tensor a, Tensor b, Tensor? base, float c0, float c1, float c2, Tensor[] values, "
                 "Tensor[] words, int rule) -> Tensor", check=_check_apply, fake=_apply_fake,
                 reference=_apply_reference, triton_module="fuse")

slerp_stats_list = Op("slerp_stats_list(Tensor[] a, Tensor[] b, Tensor?[] base) -> Tensor", check=_check_stats_list,
                      fake=_stats_list_fake, reference=_stats_list_reference, triton_module="fuse")
slerp_stats_list.__doc__ = """float64 [T, 3]: row t = slerp_stats(a[t], b[t], base[t]) = (Σ u·v, Σ u², Σ v²) of
tensor t, the same bits as the single op on every backend. ``base``: one entry per tensor, None
for none. One call for T tensors: the C++ kernel splits one work list of fixed-size chunks of every
tensor over the threads; each chunk's sums are formed alone, then added in chunk order, so a
tensor's row does not depend on the thread count or on the other tensors of the list."""

slerp_apply_list = Op("slerp_apply_list(Tensor[] a, Tensor[] b, Tensor?[] base, float[] coeffs, Tensor[] values, "
                      "Tensor[] words, int[] counts, int rule) -> Tensor[]", check=_check_apply_list,
                      fake=_apply_list_fake, reference=_apply_list_reference, triton_module="fuse")
slerp_apply_list.__doc__ = """[out_t]: out_t = slerp_apply(a[t], b[t], base[t], c0, c1, c2, values[s], words[s], rule),
the same bits as the single op on every backend, with ``(c0, c1, c2) = coeffs[3t:3t+3]`` and
``s = core_slices(counts)[t]``: the cores (value tensor + mask words) of all tensors are flattened
into ``values`` / ``words`` in tensor order, ``counts[t]`` of them belonging to tensor t (0: no
transplant). ``base[t]`` None: no base term. One ``rule`` (0 last, 1 first, 2 mean) for the call.
One call for T tensors: the C++ kernel splits one work list of chunks of every tensor over the threads."""
