"""MaskedAdamW: torch's AdamW with a 1-bit-per-element frozen mask applied inside the fused step.

Frozen elements are bit-exact: their parameter, exp_avg, exp_avg_sq and max_exp_avg_sq never change
(no weight decay, no momentum drift). Every other element follows ``torch.optim.AdamW``::

    p ← p·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²  (amsgrad: v ← max(v̂, v))
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)

with t the parameter tensor's step count (one count per tensor, as in torch). With nothing frozen the
result equals torch's AdamW. ``masked_grad_norm`` gives the L2 norm of the trainable gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from . import ops
from .mask import MaskLayout, ParamMask
from .ops.importance import SIGNALS

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = None

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _is_dtensor(t: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _subset(args: tuple, index: list[int]) -> tuple:
    """masked_adamw_'s arguments restricted to the tensors at `index` (per-tensor lists and steps;
    an empty list — no amsgrad, no mask — stays empty)."""
    lists = tuple([ts[k] for k in index] if ts else [] for ts in args[:6])
    steps = args[6][torch.tensor(index, device=args[6].device)]
    return (*lists, steps, *args[7:])


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard, else the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_group(params: list[torch.Tensor]):
    """The process group over which DTensor parameters are sharded (their 1-D device mesh's), or None
    when no parameter is a DTensor."""
    for p in params:
        if _is_dtensor(p):
            mesh = p.device_mesh
            if mesh.ndim != 1:
                raise ValueError(f"sharded parameters on a {mesh.ndim}-D device mesh: pass group= explicitly")
            return mesh.get_group()
    return None


def _localize(words: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Mask words of the full tensor -> words of this process's shard of `param` (a DTensor).

    The shard's block of the global index space is cut out of the unpacked bits and packed again,
    so each shard's words start on a word boundary whatever its offset.
    """
    if not _is_dtensor(param):
        return words
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    bits = ops.mask_unpack(words, param.numel()).view(param.shape)
    for dim, (start, length) in enumerate(zip(offset, local_shape)):
        bits = bits.narrow(dim, start, length)
    local = param.to_local()
    if bits.numel() != local.numel():
        raise ValueError(f"cannot localize the mask: the shard holds {local.numel()} elements, its block of the "
                         f"global shape {list(param.shape)} has {bits.numel()}")
    return ops.mask_pack(bits.reshape(-1).to(local.device))


# words already packed / copied to a device, per source tensor (a ParamMask's words or a dict mask's
# bool tensor): {(what, device): (source version, words)}; entries go when the source tensor does
_WORDS_CACHE: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _cached(source: torch.Tensor, key: tuple, make) -> torch.Tensor:
    """make() once per (source tensor, key) until the source is modified in place (its version)."""
    entries = _WORDS_CACHE.setdefault(source, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == source._version:
        return hit[1]
    words = make()
    entries[key] = (source._version, words)
    return words


def _frozen_words(named: list[tuple[str | None, torch.Tensor]],
                  frozen: ParamMask | Mapping[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor frozen words (local to each shard, on the tensor's device) for `named` tensors.

    Cached per mask tensor and device: a mask used again (masked_grad_norm every step) is neither
    packed nor copied host-to-device again unless it was modified. The result is read-only."""
    out = []
    if isinstance(frozen, ParamMask):
        for name, p in named:
            if name is None:
                raise ValueError("a ParamMask is matched to parameters by name: pass model.named_parameters() "
                                 "(or named param groups) instead of bare tensors, or a {param: bool} dict")
            if name not in frozen.layout.index:
                raise ValueError(f"frozen mask has no tensor named {name!r} (it covers {len(frozen.names)} tensors, "
                                 f"e.g. {list(frozen.names[:3])}): the mask was built for other parameters")
            shape = frozen.layout.shapes[frozen.layout.index[name]]
            local = shape != tuple(p.shape) and _is_dtensor(p) and shape == tuple(_local(p).shape)
            if shape != tuple(p.shape) and not local:
                raise ValueError(f"frozen mask tensor {name!r} has shape {list(shape)}, the parameter has shape "
                                 f"{list(p.shape)}" + (f" (local shard {list(_local(p).shape)})" if _is_dtensor(p)
                                                       else ""))
            device = _local(p).device
            key = ("param_mask", name, device, _is_dtensor(p) and not local)
            out.append(_cached(frozen.words, key, lambda: frozen.tensor_words(name).to(device) if local
                               else _localize(frozen.tensor_words(name).to(device), p)))
        return out
    if isinstance(frozen, Mapping):
        given = {id(key): bits for key, bits in frozen.items()}
        known = {id(p) for _, p in named}
        for key in frozen:
            if id(key) not in known:
                raise ValueError(f"frozen dict has a key of shape {list(key.shape)} that is not one of the "
                                 f"parameters here")
        for name, p in named:
            bits = given.get(id(p))
            label = repr(name) if name is not None else f"of shape {list(p.shape)}"
            if bits is None:
                out.append(torch.zeros((_local(p).numel() + 31) // 32, dtype=torch.int32, device=_local(p).device))
                continue
            if not isinstance(bits, torch.Tensor) or bits.dtype != torch.bool:
                raise TypeError(f"frozen dict value for parameter {label} must be a bool tensor, got "
                                f"{getattr(bits, 'dtype', type(bits).__name__)}")
            if tuple(bits.shape) != tuple(p.shape):
                raise ValueError(f"frozen dict value for parameter {label} has shape {list(bits.shape)}, the "
                                 f"parameter has shape {list(p.shape)}")
            device = _local(p).device

            def pack(bits=bits, p=p, device=device):
                words = ops.mask_pack(_local(bits).reshape(-1).to(device))
                return words if _is_dtensor(bits) else _localize(words, p)

            out.append(_cached(_local(bits), ("bits", device, _is_dtensor(p)), pack))
        return out
    raise TypeError(f"frozen must be a ParamMask, a {{parameter: bool tensor}} dict or None; got "
                    f"{type(frozen).__name__}")


_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")  # anywhere in a name


def _clean_name(name: str) -> str:
    """A parameter name without what wrappers add: DDP's leading ``module.``, and torch.compile's,
    FSDP1's and activation checkpointing's module levels."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    return ".".join(parts[1:] if parts[0] == "module" and len(parts) > 1 else parts)


def _name_through(params, model: torch.nn.Module) -> list[dict]:
    """Param groups whose bare tensors are replaced by (name, tensor) pairs named by `model`."""
    names = {id(p): _clean_name(n) for n, p in model.named_parameters(remove_duplicate=False)}
    groups = list(params)
    if not groups:
        return groups
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for g in groups:
        named = []
        for p in g["params"]:
            if isinstance(p, tuple):
                named.append(p)
            elif id(p) in names:
                named.append((names[id(p)], p))
            else:
                raise ValueError(f"names_from: a parameter of shape {list(p.shape)} is not a parameter of the "
                                 f"given {type(model).__name__}")
        out.append({**g, "params": named})
    return out


class MaskedAdamW(torch.optim.Optimizer):
    """Drop-in ``torch.optim.AdamW`` that never touches frozen elements.

    ``frozen``: a :class:`ParamMask` matched to parameters by name (``params`` must then be named:
    ``model.named_parameters()`` or groups of (name, param) pairs; a missing name or another shape is
    an error; for a sharded (DTensor) parameter the mask's tensor has either the full shape — cut to
    this rank's shard — or the local shard's shape — this rank's part, as
    ``ImportanceTracker.select`` returns it), or ``{parameter: bool tensor}`` (True = frozen). ``set_frozen`` changes it between
    steps; with ``reset_on_unfreeze`` the moments of elements that become trainable are zeroed.
    ``state_dtype=torch.float32`` keeps fp32 moments for bf16/fp16 params (default: param dtype).
    ``names_from=model`` names bare parameters through ``model.named_parameters()`` (identity), for
    callers that pass unnamed groups, e.g. ``transformers.Trainer(optimizer_cls_and_kwargs=
    (MaskedAdamW, {"frozen": mask, "names_from": model}))``; wrapper prefixes (DDP's ``module.``,
    ``torch.compile``'s ``_orig_mod.``) are removed from those names.
    ``importance=tracker`` (a :class:`cpift_fast.importance.ImportanceTracker` over these parameters)
    updates the tracker's active task's importance EMA in the step's own pass (the fused op
    ``masked_adamw_ema_``: g and θ read once), from the grads and the parameters before the update
    (GradScaler's scale and inf-skip applied to it too); the bits equal ``tracker.update()`` followed
    by a plain step. Parameters the tracker does not hold are stepped without an EMA.

    Every keyword of ``torch.optim.AdamW`` is accepted. ``lr`` may be a float or a one-element tensor
    (a tensor lr changed by a scheduler recompiles nothing under ``torch.compile``). ``foreach`` and
    ``fused``: whatever their value, the step is one fused kernel per (device, dtype) bucket — the
    same math as torch's fused AdamW (see csrc/adamw.cpp). ``capturable``: always honoured — step
    counts live on the parameter's device as float32 tensors (as in torch's fused and capturable
    modes) and the step reads no value back to the host, so it can be captured in a CUDA graph.
    ``differentiable=True`` is refused (ValueError): the fused in-place step has no autograd.
    ``decoupled_weight_decay`` (torch.optim.Adam's switch) must be True: this is AdamW.

    Works with LR schedulers, GradScaler (unscaling and the inf-skip happen in the step, on the
    device: no sync), DDP, and FSDP2/DTensor params (each process steps its local shard with the
    mask cut to it). ``copy.deepcopy`` and pickle keep the whole optimizer: mask and settings.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = True,
                 frozen: ParamMask | Mapping[torch.Tensor, torch.Tensor] | None = None,
                 reset_on_unfreeze: bool = True, state_dtype: torch.dtype | None = None,
                 names_from: torch.nn.Module | None = None, importance=None):
        if differentiable:
            raise ValueError("MaskedAdamW does not support differentiable=True: its step is a fused in-place kernel "
                             "without autograd (use torch.optim.AdamW(differentiable=True) to differentiate through "
                             "the step)")
        if not decoupled_weight_decay:
            raise ValueError("MaskedAdamW is AdamW: weight decay is always decoupled (decoupled_weight_decay=False "
                             "is torch.optim.Adam's L2 penalty, which MaskedAdamW does not implement)")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr as a tensor must hold one value, got shape {list(lr.shape)}")
        if not float(lr) >= 0.0:
            raise ValueError(f"Invalid learning rate: {float(lr)}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if state_dtype not in (None, torch.float32):
            raise ValueError(f"state_dtype must be None (the param dtype) or torch.float32, got {state_dtype}")
        if importance is not None and not callable(getattr(importance, "update", None)):
            raise TypeError(f"importance must be an ImportanceTracker (or None), got {type(importance).__name__}")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=False, fused=fused)
        self._frozen: ParamMask | None = None  # the ParamMask in force (None: a dict mask, or nothing)
        self._words: dict[torch.Tensor, torch.Tensor] = {}  # param -> frozen words of its local tensor
        self.reset_on_unfreeze = reset_on_unfreeze
        self.state_dtype = state_dtype
        self.importance = importance
        if names_from is not None:
            params = _name_through(params, names_from)
        super().__init__(params, defaults)
        if frozen is not None:
            self.set_frozen(frozen)

    def __getstate__(self) -> dict:
        """torch's optimizer state plus the mask and MaskedAdamW's own settings (deepcopy, pickle)."""
        state = super().__getstate__()
        state.update(_frozen=self._frozen, _words=self._words, reset_on_unfreeze=self.reset_on_unfreeze,
                     state_dtype=self.state_dtype, importance=self.importance)
        return state

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict calls this with only "state" and "param_groups": keep what is set
        super().__setstate__(state)
        for key, default in (("_frozen", None), ("_words", {}), ("reset_on_unfreeze", True), ("state_dtype", None),
                             ("importance", None)):
            if not hasattr(self, key):
                setattr(self, key, default)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group; a ParamMask in force is matched to the new parameters too."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name, p in zip(group.get("param_names", [None] * len(group["params"])), group["params"]):
            label = repr(name) if name is not None else f"of shape {list(p.shape)}"
            if p.dtype not in _DTYPES:
                raise TypeError(f"MaskedAdamW: parameter {label} is {p.dtype}; float32, bfloat16 or float16 needed")
            if not _local(p).is_contiguous():
                raise ValueError(f"MaskedAdamW: parameter {label} is not contiguous (strides {_local(p).stride()})")
        if getattr(self, "_frozen", None) is not None:
            self.set_frozen(self._frozen)

    # ----- mask --------------------------------------------------------------------------------

    def _named_params(self) -> list[tuple[str | None, torch.Tensor]]:
        out = []
        for group in self.param_groups:
            names = group.get("param_names", [None] * len(group["params"]))
            out.extend(zip(names, group["params"]))
        return out

    def set_frozen(self, frozen: ParamMask | Mapping[torch.Tensor, torch.Tensor] | None, *, copy: bool = True) -> None:
        """Freeze exactly the elements set in `frozen` from the next step on (None: nothing frozen).

        A ParamMask is copied (the optimizer's words are views into its copy), so later edits by the
        caller stay out; ``copy=False`` uses the mask's words in place — no N/8-byte copy, for callers
        that switch between masks they never modify (EPI's per-task frozen sets)."""
        named = self._named_params()
        if isinstance(frozen, ParamMask) and copy:
            frozen = frozen.clone()
        words = _frozen_words(named, frozen) if frozen is not None else None
        if self.reset_on_unfreeze:
            for k, (_, p) in enumerate(named):
                old = self._words.get(p)
                state = self.state.get(p)
                if old is None or not state:
                    continue
                released = old if words is None else ops.mask_binary(old, words[k], ops.MASK_ANDNOT)
                if not bool(released.any()):
                    continue
                bits = ops.mask_unpack(released, _local(p).numel())
                for key in _MOMENTS:
                    if key in state:
                        _local(state[key]).view(-1).masked_fill_(bits.to(_local(state[key]).device), 0)
        self._frozen = frozen if isinstance(frozen, ParamMask) else None
        self._words = {} if words is None else {p: w for (_, p), w in zip(named, words)}

    def frozen_mask(self) -> ParamMask | dict | None:
        """The mask in force: the ParamMask last given (a copy), for a dict mask {param: bool tensor}
        (of the local shard for DTensor params), or None when nothing is frozen."""
        if self._frozen is not None or not self._words:
            return self._frozen
        return {p: ops.mask_unpack(self._words[p], _local(p).numel()).view(_local(p).shape)
                for _, p in self._named_params() if p in self._words}

    # ----- step --------------------------------------------------------------------------------

    def _state_for(self, p: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:
            dtype = self.state_dtype or p.dtype
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"], memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every trainable element. Under GradScaler the grads are unscaled inside
        the step and a step with inf/NaN grads changes nothing (step counts included), decided on
        the device. Step counts and lr reach the kernel as tensors: no host sync, and a compiled step
        does not recompile when they change."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        tracker = self.importance
        ema_seed = tracker.call_seed() if tracker is not None else None  # raises without an active task
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            amsgrad = group["amsgrad"]
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, words, step_counts = [], [], [], [], [], [], []
            stepped = []  # the parameters (not their local shards) in `params` order
            for p in group["params"]:
                if p.grad is None:
                    continue
                stepped.append(p)
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                state = self._state_for(p, amsgrad)
                step_counts.append(state["step"])
                params.append(_local(p))
                grads.append(_local(p.grad))
                exp_avgs.append(_local(state["exp_avg"]))
                exp_avg_sqs.append(_local(state["exp_avg_sq"]))
                if amsgrad:
                    max_exp_avg_sqs.append(_local(state["max_exp_avg_sq"]))
                words.append(self._words.get(p))
            if not params:
                continue
            device = params[0].device
            torch._foreach_add_(step_counts, 1.0)
            steps = torch.stack(step_counts).to(device=device, dtype=torch.float32)
            lr = group["lr"]
            lr = lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float64, device=device)
            if all(w is None for w in words):
                words = []
            else:
                words = [w if w is not None else torch.zeros((t.numel() + 31) // 32, dtype=torch.int32,
                                                             device=t.device) for w, t in zip(words, params)]
            args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, words, steps, lr, float(beta1), float(beta2),
                    float(group["weight_decay"]), float(group["eps"]), bool(amsgrad), bool(group["maximize"]),
                    grad_scale, found_inf)
            tracked = [k for k, p in enumerate(stepped) if tracker.tracks(p)] if tracker is not None else []
            if tracked:
                rest = [k for k in range(len(stepped)) if k not in set(tracked)]
                state, scales, ids = tracker.ema_arguments([stepped[k] for k in tracked])
                ema = (state, scales, tracker.beta, SIGNALS.index(tracker.signal), ema_seed, ids)
                ops.masked_adamw_ema_(*_subset(args, tracked), *ema)
                if rest:
                    ops.masked_adamw_(*_subset(args, rest))
            else:
                ops.masked_adamw_(*args)
            if found_inf is not None:  # a skipped step does not count (as torch's fused AdamW)
                torch._foreach_sub_(step_counts, [found_inf.to(s.device, torch.float32) for s in step_counts])
        if tracker is not None:
            tracker.advance()
        return loss

    # ----- state dict --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's optimizer state dict plus ``"frozen"``: the bit-packed mask (layout + words for a
        ParamMask, per-parameter local words for a dict mask) or None."""
        sd = super().state_dict()
        if self._frozen is not None:
            sd["frozen"] = {"kind": "param_mask", "layout": self._frozen.layout.to_json(),
                            "words": self._frozen.words.clone()}
        elif self._words:
            params = [p for _, p in self._named_params()]
            sd["frozen"] = {"kind": "per_param", "words": {i: self._words[p].clone() for i, p in enumerate(params)
                                                           if p in self._words}}
        else:
            sd["frozen"] = None
        return sd

    def load_state_dict(self, state_dict: dict, *, use_saved_mask: bool = False) -> None:
        """Load torch's part, then put back what torch's loader would change: moments keep their
        saved dtype (fp32 moments of bf16 params stay fp32), step counts live on the param's device.

        The mask: a state dict without one (e.g. from ``torch.optim.AdamW``) keeps the mask in force.
        One with a mask loads it bit for bit when no mask is in force; when both exist the mask in
        force (from the constructor or ``set_frozen``) wins, with a warning if they differ, unless
        ``use_saved_mask=True``."""
        state_dict = dict(state_dict)
        frozen = state_dict.pop("frozen", None)
        saved = {k: {key: v for key, v in s.items() if key in _MOMENTS} for k, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for _, p in self._named_params()]
        for k, moments in saved.items():
            p = params[k]
            dtype = self.state_dtype or p.dtype
            for key, value in moments.items():
                self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
        for p in params:
            state = self.state.get(p)
            if state and "step" in state:
                step = state["step"]
                step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
                state["step"] = step.to(device=_local(p).device, dtype=torch.float32).reshape(())
        if frozen is None:
            return  # nothing saved: the mask in force stays
        mask, words = self._saved_mask(frozen, params)
        if self._frozen is not None or self._words:
            if use_saved_mask:
                pass
            else:
                if not self._same_words(words):
                    warnings.warn("MaskedAdamW.load_state_dict: the saved frozen mask differs from the one in force "
                                  "(given to the constructor or set_frozen); keeping the one in force. Pass "
                                  "use_saved_mask=True to load the saved one.", stacklevel=2)
                return
        reset, self.reset_on_unfreeze = self.reset_on_unfreeze, False
        try:
            if mask is not None:
                self._words = {}
                self.set_frozen(mask)
            else:
                self._frozen = None
                self._words = words
        finally:
            self.reset_on_unfreeze = reset

    def _saved_mask(self, frozen: dict, params: list[torch.Tensor]) -> tuple[ParamMask | None, dict]:
        """(ParamMask or None, {param: local words}) of a saved ``"frozen"`` entry."""
        if frozen["kind"] == "param_mask":
            mask = ParamMask(MaskLayout.from_json(frozen["layout"]), frozen["words"])
            return mask, dict(zip(params, _frozen_words(self._named_params(), mask)))
        words = {}
        for k, w in frozen["words"].items():
            if int(k) >= len(params):
                raise ValueError(f"saved frozen words name parameter #{k}; the optimizer has {len(params)}")
            p = params[int(k)]
            local = _local(p)
            if w.numel() != (local.numel() + 31) // 32:
                raise ValueError(f"saved frozen words of parameter #{k} hold {w.numel()} words, the "
                                 f"parameter (local shard) needs {(local.numel() + 31) // 32}")
            words[p] = w.to(local.device, copy=True)
        return None, words

    def _same_words(self, words: dict) -> bool:
        """Whether `words` ({param: words}) freezes exactly what the mask in force freezes."""
        for _, p in self._named_params():
            a, b = self._words.get(p), words.get(p)
            if a is None and b is None:
                continue
            if a is None or b is None:
                if bool((a if a is not None else b).any()):
                    return False
                continue
            if not torch.equal(a, b.to(a.device)):
                return False
        return True


def masked_grad_norm(params, frozen: ParamMask | Mapping[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """L2 norm (float32 scalar) of the gradients of the trainable elements, in one fused pass.

    sqrt(Σ_t Σ_{i not frozen} g_t[i]²). `params`: tensors, (name, tensor) pairs or a module
    (names are needed with a ParamMask); parameters without a grad are skipped. For DTensor
    (FSDP2) grads the local sums are all-reduced over each tensor's device mesh.
    """
    if isinstance(params, torch.nn.Module):
        items = list(params.named_parameters())
    else:
        params = params if isinstance(params, Iterable) else [params]
        items = [(x if isinstance(x, tuple) else (None, x)) for x in params]
    items = [(n, p) for n, p in items if p.grad is not None]
    if not items:
        return torch.zeros((), dtype=torch.float32)
    words = _frozen_words(items, frozen) if frozen is not None else []
    grads = [_local(p.grad) for _, p in items]
    per_tensor = ops.masked_grad_sq_norm(grads, words)
    sharded = [k for k, (_, p) in enumerate(items)
               if _is_dtensor(p.grad) and any(pl.is_shard() for pl in p.grad.placements)]
    if sharded:
        import torch.distributed as dist

        local = per_tensor[sharded].sum()
        rest = per_tensor.sum() - local
        mesh = items[sharded[0]][1].grad.device_mesh
        if mesh.ndim != 1 or any(items[k][1].grad.device_mesh != mesh for k in sharded):
            raise NotImplementedError("masked_grad_norm supports sharded grads on one 1-D device mesh")
        dist.all_reduce(local, group=mesh.get_group())
        return torch.sqrt(local + rest)
    return per_tensor.sum().sqrt()


__all__ = ["MaskedAdamW", "masked_grad_norm"]
