"""Pure-PyTorch implementation of every cpift op.

Three roles: the fallback on any device, the oracle the tests compare the fused kernels with, and
the "pure-PyTorch path" every benchmark measures against. Signatures match `torch.ops.cpift.*`
and `cpift_fast.kernels.*` exactly; clarity beats speed here.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# masks: bit i of a segment is bit (i % 32) of word offset + i // 32
# ---------------------------------------------------------------------------------------------


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=device), torch.arange(32, device=device))


def _to_int32_wrapping(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def mask_pack(bits: torch.Tensor) -> torch.Tensor:
    flat = bits.reshape(-1).to(torch.int64)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % 32)).view(-1, 32)
    return _to_int32_wrapping((padded * _bit_values(bits.device)).sum(dim=1))


def mask_unpack(words: torch.Tensor, numel: int) -> torch.Tensor:
    w = words[: (numel + 31) // 32].to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(1) >> torch.arange(32, device=words.device)) & 1
    return bits.view(-1)[:numel].to(torch.bool)


def _popcount_words(words: torch.Tensor) -> torch.Tensor:
    """Bits set per word (SWAR on int64 lanes)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return ((w * 0x01010101) & 0xFFFFFFFF) >> 24


def mask_popcount(words: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    per_word = _popcount_words(words)
    bounds = offsets.tolist()
    counts = [per_word[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=words.device)
    return torch.stack(counts).to(torch.int64)


def mask_binary(a: torch.Tensor, b: torch.Tensor, op: int) -> torch.Tensor:
    if op == 0:
        return a & b
    if op == 1:
        return a | b
    if op == 2:
        return a & ~b
    if op == 3:
        return a ^ b
    raise ValueError(f"mask_binary: op must be 0 (and), 1 (or), 2 (andnot), 3 (xor); got {op}")


# ---------------------------------------------------------------------------------------------
# masked AdamW (issue 3)
# ---------------------------------------------------------------------------------------------


def check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, amsgrad):
    """Raise a ValueError/TypeError naming the first bad argument of masked_adamw_."""
    T = len(params)
    lengths = (len(grads), len(exp_avgs), len(exp_avg_sqs), len(steps))
    if any(n != T for n in lengths):
        raise ValueError(f"masked_adamw_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same "
                         f"length ({T}, {', '.join(map(str, lengths))})")
    if amsgrad and len(max_exp_avg_sqs) != T:
        raise ValueError(f"masked_adamw_: amsgrad needs one max_exp_avg_sq per param, got {len(max_exp_avg_sqs)}")
    if frozen and len(frozen) != T:
        raise ValueError(f"masked_adamw_: frozen must be empty (nothing frozen) or hold one word tensor per "
                         f"param, got {len(frozen)} for {T} params")
    for i, p in enumerate(params):
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"masked_adamw_: params[{i}] must be float32, bfloat16 or float16, got {p.dtype}")
        if grads[i].dtype != p.dtype or grads[i].shape != p.shape:
            raise TypeError(f"masked_adamw_: grads[{i}] is {grads[i].dtype} of shape {list(grads[i].shape)}, "
                            f"params[{i}] is {p.dtype} of shape {list(p.shape)}")
        if not p.is_contiguous():
            raise ValueError(f"masked_adamw_: params[{i}] must be contiguous")
        state = [("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])]
        state += [("max_exp_avg_sqs", max_exp_avg_sqs[i])] if amsgrad else []
        for name, s in state:
            if s.numel() != p.numel() or not s.is_contiguous() or s.dtype not in (p.dtype, torch.float32) \
                    or s.dtype != exp_avgs[i].dtype:
                raise ValueError(f"masked_adamw_: {name}[{i}] must be contiguous with {p.numel()} elements of "
                                 f"float32 or {p.dtype} (as exp_avgs); got {s.dtype}, {s.numel()} elements")
        if frozen and (frozen[i].dtype != torch.int32 or frozen[i].numel() * 32 < p.numel()):
            raise ValueError(f"masked_adamw_: frozen[{i}] must be int32 words covering {p.numel()} elements, got "
                             f"{frozen[i].numel()} {frozen[i].dtype} words")
        if p.numel() and steps[i] < 1:
            raise ValueError(f"masked_adamw_: steps[{i}] must be >= 1 (the step being taken), got {steps[i]}")


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2,
                  weight_decay, eps, amsgrad, maximize, grad_scale):
    """What a user would write: torch's foreach AdamW on the tensors, then restore the frozen
    elements (param and moments) from a copy taken before the step.

    Math in the param dtype (torch's foreach path); tensors whose state is float32 while the param
    is bf16/fp16 (state_dtype=float32) are stepped on float32 copies of param and grad, then the
    param is rounded back once. `steps[i]` is the step being taken (>= 1).
    """
    from torch.optim.adam import adam

    check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, amsgrad)
    live = [i for i, p in enumerate(params) if p.numel()]
    if not live:
        return
    bits = [mask_unpack(frozen[i], params[i].numel()).view(params[i].shape) for i in live] if frozen else None
    moments = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    targets = [[params[i] for i in live]] + [[m[i] for i in live] for m in moments]
    saved = [[t.clone() for t in ts] for ts in targets] if frozen else None

    work_p, work_g = [], []
    for i in live:
        p, g = params[i], grads[i]
        if grad_scale is not None:
            g = g * grad_scale.to(device=g.device, dtype=torch.float32).reciprocal()
        if exp_avgs[i].dtype != p.dtype:  # float32 state for a low-precision param: step a float32 copy
            p, g = p.float(), g.float()
        work_p.append(p)
        work_g.append(g.to(p.dtype))
    adam(work_p, work_g, [exp_avgs[i] for i in live], [exp_avg_sqs[i] for i in live],
         [max_exp_avg_sqs[i] for i in live] if amsgrad else [],
         [torch.tensor(float(steps[i]) - 1.0) for i in live], foreach=True, decoupled_weight_decay=True,
         amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize)
    for k, i in enumerate(live):
        if work_p[k] is not params[i]:
            params[i].copy_(work_p[k])
    if frozen:
        for ts, olds in zip(targets, saved):
            for k, (t, old) in enumerate(zip(ts, olds)):
                t.copy_(torch.where(bits[k], old, t))


def masked_grad_sq_norm(grads, frozen):
    """Per-tensor sum of squares (float32) of the gradient elements that are not frozen."""
    out = torch.zeros(len(grads), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for i, g in enumerate(grads):
        if g.numel():
            x = g.float()
            if frozen:
                x = torch.where(mask_unpack(frozen[i], g.numel()).view(g.shape), 0.0, x)
            out[i] = x.square().sum()
    return out


# ---------------------------------------------------------------------------------------------
# core selection (issue 4)
# ---------------------------------------------------------------------------------------------


def _select_keys(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """int32 keys: the bits of |fp32(base) − fp32(tuned)| (non-negative floats order like their bits)."""
    diff = base.reshape(-1).to(torch.float32) - tuned.reshape(-1).to(torch.float32)
    return diff.view(torch.int32) & 0x7FFFFFFF


def select_histogram(base: torch.Tensor, tuned: torch.Tensor, level: int, prefix: int) -> torch.Tensor:
    key = _select_keys(base, tuned)
    key = key[key != 0]
    if level == 0:
        return torch.bincount(key >> 16, minlength=1 << 15).to(torch.int64)
    if level != 1:
        raise ValueError(f"select_histogram: level must be 0 or 1, got {level}")
    key = key[(key >> 16) == prefix]
    return torch.bincount(key & 0xFFFF, minlength=1 << 16).to(torch.int64)


def select_mask(base: torch.Tensor, tuned: torch.Tensor, threshold: int, tie_budget: int):
    key = _select_keys(base, tuned)
    eq = key == threshold
    keep_tie = eq & (torch.cumsum(eq, 0) <= tie_budget)
    return mask_pack((key > threshold) | keep_tie), eq.sum().to(torch.int64)


def core_region_topk(base: list[tuple[str, torch.Tensor]], tuned: list[tuple[str, torch.Tensor]],
                     k: int) -> dict[str, torch.Tensor]:
    """The path users write today: concatenate every |base − tuned| (fp32) and `torch.topk` it.

    Same semantics as cpift_fast.core_region (zero diffs never selected; ties at the threshold go
    to the earliest (tensor, flat index)), but it materializes the whole diff: 4 bytes per element,
    and `topk`/`sort` on one dimension are limited to < 2^31 elements. {name: bool tensor}.
    """
    diff = torch.cat([(b.reshape(-1).float() - t.reshape(-1).float()).abs() for (_, b), (_, t) in zip(base, tuned)])
    if diff.numel() >= 2**31:
        raise ValueError(f"core_region_topk: {diff.numel()} elements; torch.topk needs < 2^31")
    k = min(k, int((diff > 0).sum()))
    bits = torch.zeros_like(diff, dtype=torch.bool)
    if k > 0:
        threshold = torch.topk(diff, k, sorted=False).values.min()
        eq = diff == threshold
        bits = (diff > threshold) | (eq & (torch.cumsum(eq, 0) <= k - int((diff > threshold).sum())))
    out, start = {}, 0
    for name, b in base:
        out[name] = bits[start:start + b.numel()].view(b.shape)
        start += b.numel()
    return out


# ---------------------------------------------------------------------------------------------
# overlap and fusion (issue 5)
# ---------------------------------------------------------------------------------------------

def overlap_counts(masks: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise intersection counts of T word buffers of equal length -> int64[T, T].

    ``out[i, j] = popcount(masks[i] & masks[j])``; the diagonal holds each mask's count. Unions
    follow exactly as ``out[i, i] + out[j, j] - out[i, j]``. Reference: bool tensors, T² passes.
    """
    T = len(masks)
    if T and any(m.numel() != masks[0].numel() for m in masks):
        raise ValueError(f"overlap_counts: masks have different word counts {[m.numel() for m in masks]}")
    device = masks[0].device if T else torch.device("cpu")
    bools = [mask_unpack(m.reshape(-1), 32 * m.numel()) for m in masks]
    out = torch.zeros(T, T, dtype=torch.int64, device=device)
    for i in range(T):
        for j in range(i, T):
            out[i, j] = out[j, i] = (bools[i] & bools[j]).sum()
    return out


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


def slerp_stats(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """float64[3] = (Σ u·v, Σ u², Σ v²) with u = a − base, v = b − base (base None: u = a, v = b).

    u, v in fp32 (inputs widened); products and sums in fp64 (a product of two fp32 values is exact).
    """
    check_slerp_args("slerp_stats", a, b, base)
    u = a.reshape(-1).float()
    v = b.reshape(-1).float()
    if base is not None:
        u = u - base.reshape(-1).float()
        v = v - base.reshape(-1).float()
    u, v = u.double(), v.double()
    return torch.stack([(u * v).sum(), (u * u).sum(), (v * v).sum()])


def slerp_apply(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None, c0: float, c1: float, c2: float,
                values: list[torch.Tensor], words: list[torch.Tensor], rule: int) -> torch.Tensor:
    """Blend ``c0·a + c1·b + c2·base`` (fp32, cast to a's dtype, a's shape) plus core transplant.

    Element i of the result is replaced by ``values[k][i]`` where bit i of ``words[k]`` is set;
    where several cores hold i, ``rule`` decides: 0 = the last such k, 1 = the first, 2 = the fp32
    mean of their values. ``values[k]`` must have a's dtype, so a transplant is a bit-exact copy.
    """
    check_slerp_args("slerp_apply", a, b, base, values, words, rule)
    n = a.numel()
    out = c0 * a.reshape(-1).float() + c1 * b.reshape(-1).float()
    if base is not None:
        out = out + c2 * base.reshape(-1).float()
    out = out.to(a.dtype)
    if not values:
        return out.view(a.shape)
    bits = [mask_unpack(w.reshape(-1), n) for w in words]
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
