"""Masked AdamW: one AdamW step of every element whose frozen bit is clear, the same step fused with
the importance EMA (EPI), and the masked grad norm.

``masked_adamw_ema_`` = ``importance_ema_`` (cpift_fast/ops/importance.py: the EMA of every element,
frozen ones included, from the grads and the params *before* the step) followed by
``masked_adamw_``, in one pass that reads g and θ once; the stored bits equal the two ops called in
that order with ``ids`` = ``ema_ids`` (the EMA's random streams are keyed by tensor id, not by
position, so the fused call and a separate update give the same bits). The EMA sees the grads
divided by GradScaler's scale; ``maximize`` does not change it (every signal is even in g).

Backends: C++ (csrc/adamw.cpp) on CPU, Triton (cpift_fast/kernels/adamw.py) on CUDA, the reference below
(torch's foreach AdamW, then the frozen elements restored: what a user would write; the EMA's
reference before it) elsewhere.
"""

from __future__ import annotations

import torch

from .._ops import Op
from . import importance as _importance
from .mask import mask_unpack as _unpack_op

mask_unpack = _unpack_op.reference


def _check_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, amsgrad, grad_scale,
                 found_inf, op="masked_adamw_"):
    """Raise a ValueError/TypeError naming the first bad argument of masked_adamw_ (or `op`: shapes,
    dtypes and devices only: no value is read, so the check costs no host sync and compiles without
    a break)."""
    T = len(params)
    if not isinstance(steps, torch.Tensor) or steps.dim() != 1 or steps.dtype != torch.float32:
        raise TypeError(f"{op}: steps must be a 1-D float32 tensor (the step being taken, >= 1, per "
                        f"param), got {type(steps).__name__ if not isinstance(steps, torch.Tensor) else steps.dtype}"
                        f"{'' if not isinstance(steps, torch.Tensor) else ' of shape ' + str(list(steps.shape))}")
    if not isinstance(lr, torch.Tensor) or lr.numel() != 1 or not lr.dtype.is_floating_point:
        raise TypeError(f"{op}: lr must be a floating-point tensor holding one value, got "
                        f"{lr.dtype if isinstance(lr, torch.Tensor) else type(lr).__name__}")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and t.numel() != 1:
            raise ValueError(f"{op}: {name} must hold one value, got shape {list(t.shape)}")
    lengths = (len(grads), len(exp_avgs), len(exp_avg_sqs), steps.numel())
    if any(n != T for n in lengths):
        raise ValueError(f"{op}: params, grads, exp_avgs, exp_avg_sqs and steps must have the same "
                         f"length ({T}, {', '.join(map(str, lengths))})")
    if amsgrad and len(max_exp_avg_sqs) != T:
        raise ValueError(f"{op}: amsgrad needs one max_exp_avg_sq per param, got {len(max_exp_avg_sqs)}")
    if frozen and len(frozen) != T:
        raise ValueError(f"{op}: frozen must be empty (nothing frozen) or hold one word tensor per "
                         f"param, got {len(frozen)} for {T} params")
    for i, p in enumerate(params):
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{op}: params[{i}] must be float32, bfloat16 or float16, got {p.dtype}")
        if grads[i].dtype != p.dtype or grads[i].shape != p.shape:
            raise TypeError(f"{op}: grads[{i}] is {grads[i].dtype} of shape {list(grads[i].shape)}, "
                            f"params[{i}] is {p.dtype} of shape {list(p.shape)}")
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] must be contiguous")
        state = [("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])]
        state += [("max_exp_avg_sqs", max_exp_avg_sqs[i])] if amsgrad else []
        for name, s in state:
            if s.numel() != p.numel() or not s.is_contiguous() or s.dtype not in (p.dtype, torch.float32) \
                    or s.dtype != exp_avgs[i].dtype:
                raise ValueError(f"{op}: {name}[{i}] must be contiguous with {p.numel()} elements of "
                                 f"float32 or {p.dtype} (as exp_avgs); got {s.dtype}, {s.numel()} elements")
        if frozen and (frozen[i].dtype != torch.int32 or frozen[i].numel() * 32 < p.numel()):
            raise ValueError(f"{op}: frozen[{i}] must be int32 words covering {p.numel()} elements, got "
                             f"{frozen[i].numel()} {frozen[i].dtype} words")
        if p.device != params[0].device:
            raise ValueError(f"{op}: params[{i}] is on {p.device}, params[0] on {params[0].device}: one "
                             f"call steps tensors of one device")
    if params and steps.device != params[0].device:
        raise ValueError(f"{op}: steps is on {steps.device}, the params on {params[0].device}")


def _adamw_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2,
                     weight_decay, eps, amsgrad, maximize, grad_scale, found_inf):
    """What a user would write: torch's foreach AdamW on the tensors, then restore the frozen
    elements (param and moments) from a copy taken before the step.

    Math in the param dtype (torch's foreach path); tensors whose state is float32 while the param
    is bf16/fp16 (state_dtype=float32) are stepped on float32 copies of param and grad, then the
    param is rounded back once. `steps[i]` is the step being taken (>= 1). A nonzero found_inf
    (GradScaler) skips the step.
    """
    from torch.optim.adam import adam

    if found_inf is not None and float(found_inf) != 0.0:
        return
    steps = [float(s) for s in steps.cpu()]
    lr = float(lr)
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


def _grad_sq_norm_reference(grads, frozen):
    """Per-tensor sum of squares (float32) of the gradient elements that are not frozen."""
    out = torch.zeros(len(grads), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for i, g in enumerate(grads):
        if g.numel():
            x = g.float()
            if frozen:
                x = torch.where(mask_unpack(frozen[i], g.numel()).view(g.shape), 0.0, x)
            out[i] = x.square().sum()
    return out


def _check_adamw_call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2,
                      weight_decay, eps, amsgrad, maximize, grad_scale, found_inf=None):
    _check_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, amsgrad, grad_scale,
                 found_inf)


def _adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2,
                weight_decay, eps, amsgrad, maximize, grad_scale, found_inf):
    return None


masked_adamw_ = Op(
    "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor[] frozen, Tensor steps, Tensor lr, float beta1, float beta2, "
    "float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()",
    check=_check_adamw_call, fake=_adamw_fake, reference=_adamw_reference, triton_module="adamw")


def _check_adamw_ema_call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2,
                          weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, ema_state, ema_scales, ema_beta,
                          ema_signal, ema_seed, ema_ids):
    _check_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, amsgrad, grad_scale,
                 found_inf, op="masked_adamw_ema_")
    _importance._check(ema_state, ema_scales, grads, params, ema_beta, ema_signal, ema_seed, grad_scale, found_inf,
                       ema_ids, op="masked_adamw_ema_", prefix="ema_")


def _adamw_ema_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2,
                         weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, ema_state, ema_scales, ema_beta,
                         ema_signal, ema_seed, ema_ids):
    """The two references in the fused op's order: the EMA (params before the step), then AdamW."""
    _importance._reference(ema_state, ema_scales, grads, params, ema_beta, ema_signal, ema_seed, grad_scale,
                           found_inf, ema_ids)
    _adamw_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2,
                     weight_decay, eps, amsgrad, maximize, grad_scale, found_inf)


def _adamw_ema_fake(*args):
    return None


masked_adamw_ema_ = Op(
    "masked_adamw_ema_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor[] frozen, Tensor steps, Tensor lr, float beta1, float beta2, "
    "float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
    "Tensor(e!)[] ema_state, Tensor(f!)[] ema_scales, float ema_beta, int ema_signal, int ema_seed, "
    "int[] ema_ids) -> ()",
    check=_check_adamw_ema_call, fake=_adamw_ema_fake, reference=_adamw_ema_reference, triton_module="adamw")
masked_adamw_ema_.__doc__ = """masked_adamw_ with the importance EMA of (ema_state, ema_scales) fused into the same pass
(see cpift_fast.ops.adamw): the EMA arguments are importance_ema_'s (beta, signal, seed, ids)."""


def _check_grad_sq_norm(grads, frozen):
    if not grads:
        raise ValueError("masked_grad_sq_norm: grads is empty")
    if frozen and len(frozen) != len(grads):
        raise ValueError(f"masked_grad_sq_norm: frozen must be empty or hold one word tensor per grad, got "
                         f"{len(frozen)} for {len(grads)} grads")
    for i, g in enumerate(grads):
        if g.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"masked_grad_sq_norm: grads[{i}] must be float32, bfloat16 or float16, got {g.dtype}")
        if frozen and (frozen[i].dtype != torch.int32 or frozen[i].numel() * 32 < g.numel()):
            raise ValueError(f"masked_grad_sq_norm: frozen[{i}] must be int32 words covering {g.numel()} elements, "
                             f"got {frozen[i].numel()} {frozen[i].dtype} words")


def _grad_sq_norm_fake(grads, frozen):
    return grads[0].new_empty((len(grads),), dtype=torch.float32)


masked_grad_sq_norm = Op("masked_grad_sq_norm(Tensor[] grads, Tensor[] frozen) -> Tensor",
                         check=_check_grad_sq_norm, fake=_grad_sq_norm_fake, reference=_grad_sq_norm_reference,
                         triton_module="adamw")
