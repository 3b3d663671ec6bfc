"""ImportanceTracker: a per-task, per-element importance EMA for EPI (evolving parameter isolation).

Per task t and element, ``I_t ← β·I_t + (1 − β)·s(g, θ)``, updated on task-t steps only, with g the
gradient and θ the parameter *before* the optimizer step (call :meth:`ImportanceTracker.update`
before ``optimizer.step()``). Signals: ``"grad_x_param"`` |g·θ| (default: first-order Taylor
estimate of the loss change from zeroing θ), ``"grad_sq"`` g² (diagonal Fisher), ``"grad_abs"`` |g|.

Readout: ``importance(task)`` gives I_t per tensor in fp32, divided by the tensor's mean importance
when ``normalize="layer"`` (so layers of different gradient scales compete fairly in a global
top-k; a tensor whose importance is all zero stays zero), optionally bias-corrected by 1/(1 − β^n)
(n: the task's update count; it cancels under layer normalization up to rounding).
``select(task, ratio)`` is the exact global top-``ratio`` of that readout, by the existing
selection kernels (``core_region`` of |I − 0|, streamed one tensor at a time); zero importance is
never selected.

State per element per task: float32 (4 bytes), bfloat16 (2 bytes, stochastic rounding), or "int8"
(1 byte + one float32 scale per 256 elements: ≈ 1.016 bytes), see cpift_fast/ops/importance.py
for the exact math and rounding. Stochastic rounding is seeded: the same seed, task order and
grads give the same state bits on every backend.

Sharded parameters (FSDP2 ``fully_shard``: DTensors): the state of each parameter is allocated for
this process's local shard only, so it is sharded with the parameters (per GPU: 1/world of it).
The layer normalization's tensor mean and the global top-k of ``select`` are all-reduced over the
shards' process group (``group``, default: the parameters' device mesh), so every rank gets the
exact global selection; ``importance`` and ``select`` return this rank's part (local shapes), which
``MaskedAdamW.set_frozen`` accepts as such. ``state_dict`` holds this rank's shards (save one per
rank). fp32 state then equals a 1-process run's slice bit for bit given the same grads; the bf16 /
8-bit random streams and 8-bit blocks are per shard, so those states are reproducible for a given
world size, not bit-equal to a 1-process run. Under DDP (plain replicated tensors) every rank
holds the whole state and computes the same EMA from the same all-reduced grads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from . import ops
from .io import TensorSource
from .mask import ParamMask, named_tensors
from .optim import _local, _shard_group
from .ops.importance import QBLOCK, SIGNALS, hash32, num_scales
from .select import core_region

_STATE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", "int8": "int8"}
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}
_M32 = 0xFFFFFFFF


class ImportanceTracker:
    """Importance EMA per task over named parameters.

    named_params: ``model.named_parameters()``, a module, or (name, tensor) pairs (the order is the
    mask layout's). tasks: task names. beta ∈ [0, 1). signal: "grad_x_param" | "grad_sq" |
    "grad_abs". state_dtype: torch.float32 | torch.bfloat16 | "int8". normalize: "layer" | "none".
    seed: the stochastic-rounding stream (unused with float32 state). group: the process group of
    sharded (DTensor) parameters' shards (default: their device mesh's; see the module doc).
    """

    def __init__(self, named_params, tasks: Iterable[str], beta: float = 0.99, signal: str = "grad_x_param",
                 state_dtype: torch.dtype | str = torch.float32, normalize: str = "layer", seed: int = 0,
                 group=None):
        self.params: list[tuple[str, torch.Tensor]] = named_tensors(named_params)
        self.tasks: tuple[str, ...] = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks) or \
                not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError(f"ImportanceTracker: tasks must be distinct non-empty names, got {list(self.tasks)}")
        if not self.params:
            raise ValueError("ImportanceTracker: named_params is empty")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"ImportanceTracker: beta must be a number in [0, 1), got {beta!r}")
        if signal not in SIGNALS:
            raise ValueError(f"ImportanceTracker: signal must be one of {', '.join(map(repr, SIGNALS))}, got {signal!r}")
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"ImportanceTracker: state_dtype must be torch.float32, torch.bfloat16 or 'int8', got "
                             f"{state_dtype!r}")
        if normalize not in ("layer", "none"):
            raise ValueError(f"ImportanceTracker: normalize must be 'layer' or 'none', got {normalize!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _M32:
            raise ValueError(f"ImportanceTracker: seed must be an int in [0, 2^32), got {seed!r}")
        for name, p in self.params:
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"ImportanceTracker: parameter {name!r} is {p.dtype}; float32, bfloat16 or float16 "
                                f"needed")
        self.beta = float(beta)
        self.signal = signal
        self.state_dtype = _STATE_DTYPES[state_dtype]
        self.normalize = normalize
        self.seed = seed
        self.active: str | None = None
        self._index = {id(p): k for k, (_, p) in enumerate(self.params)}  # parameter -> its position
        self.counts = dict.fromkeys(self.tasks, 0)  # updates per task (bias correction, random stream)
        self.group = group if group is not None else _shard_group([p for _, p in self.params])
        storage = _STORAGE[self.state_dtype]
        local = [_local(p) for _, p in self.params]
        self.state = {t: [torch.zeros(p.shape, dtype=storage, device=p.device) for p in local] for t in self.tasks}
        self.scales = {t: ([torch.zeros(num_scales(p.numel()), dtype=torch.float32, device=p.device) for p in local]
                           if self.state_dtype == "int8" else []) for t in self.tasks}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_index"]  # object ids: rebuilt for the copied parameters (deepcopy, pickle)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index = {id(p): k for k, (_, p) in enumerate(self.params)}

    # ----- update ------------------------------------------------------------------------------

    def set_task(self, task: str) -> None:
        """The task whose EMA the next :meth:`update` changes."""
        if task not in self.counts:
            raise ValueError(f"ImportanceTracker.set_task: unknown task {task!r}; tasks: {list(self.tasks)}")
        self.active = task

    def update(self, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """One EMA step of the active task from each parameter's ``.grad`` and current value (call it
        before the optimizer step). Parameters without a grad keep their EMA. Under a GradScaler
        whose scale is still in the grads, pass ``grad_scale`` (and ``found_inf``: a nonzero value
        leaves the state untouched; the update count still advances)."""
        self._active("update")
        live = [p for _, p in self.params if p.grad is not None]
        if live:
            state, scales, ids = self.ema_arguments(live)
            ops.importance_ema_(state, scales, [_local(p.grad) for p in live], [_local(p.detach()) for p in live],
                                self.beta, SIGNALS.index(self.signal), self.call_seed(), grad_scale, found_inf, ids)
        self.advance()

    # ----- the fused step's side (MaskedAdamW(importance=tracker)) ------------------------------

    def tracks(self, param: torch.Tensor) -> bool:
        """Whether `param` is one of the tracker's parameters (by identity)."""
        return id(param) in self._index

    def call_seed(self) -> int:
        """The random seed of the active task's next update: a hash of (seed, task, update count)."""
        task = self._active("call_seed")
        stream = (hash32(self.tasks.index(task) + 1) + self.counts[task]) & _M32  # (task, update) -> 32 bits
        return hash32(self.seed ^ hash32(stream))

    def ema_arguments(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """(state, scales, ids) of the active task for these parameters (each tracked), as the EMA ops
        take them: ids are the parameters' positions in the tracker, which key their random streams,
        so a fused optimizer step and :meth:`update` store the same bits."""
        task = self._active("ema_arguments")
        ids = [self._index[id(p)] for p in params]
        scales = [self.scales[task][k] for k in ids] if self.state_dtype == "int8" else []
        return [self.state[task][k] for k in ids], scales, ids

    def advance(self) -> None:
        """Count one update of the active task (after the EMA step, fused or not)."""
        self.counts[self._active("advance")] += 1

    def _active(self, where: str) -> str:
        if self.active is None:
            raise RuntimeError(f"ImportanceTracker.{where}: no active task; call set_task(name) first")
        return self.active

    # ----- readout -----------------------------------------------------------------------------

    def _task(self, task: str, where: str) -> str:
        if task not in self.counts:
            raise ValueError(f"ImportanceTracker.{where}: unknown task {task!r}; tasks: {list(self.tasks)}")
        return task

    def _raw(self, task: str, k: int) -> torch.Tensor:
        """Tensor k's EMA of `task`, dequantized to float32 (a new tensor)."""
        s = self.state[task][k]
        if self.state_dtype != "int8":
            return s.float()
        n = s.numel()
        pad = num_scales(n) * QBLOCK - n
        q = torch.nn.functional.pad(s.view(-1).float(), (0, pad)).view(-1, QBLOCK)
        return (q * self.scales[task][k][:, None]).view(-1)[:n].view(s.shape)

    def _means(self, task: str) -> list[float] | None:
        """Each tensor's mean raw importance over all its shards (None without layer normalization):
        one all-reduce of (sum, count) per call when the parameters are sharded."""
        if self.normalize != "layer":
            return None
        device = self.state[task][0].device
        totals = torch.zeros(len(self.params), 2, dtype=torch.float64, device=device)
        for k in range(len(self.params)):
            x = self._raw(task, k)
            totals[k, 0] = x.sum(dtype=torch.float64)
            totals[k, 1] = x.numel()
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(totals, group=self.group)
        return [s / n if n else 0.0 for s, n in totals.tolist()]

    def _readout(self, task: str, k: int, bias_correction: bool, means: list[float] | None) -> torch.Tensor:
        x = self._raw(task, k)
        if bias_correction and self.counts[task]:
            x = x / (1.0 - self.beta ** self.counts[task])
        if means is not None:
            mean = torch.tensor(means[k], dtype=torch.float32)
            if bias_correction and self.counts[task]:
                mean = mean / (1.0 - self.beta ** self.counts[task])
            x = x / mean.to(x.device) if mean > 0 else torch.zeros_like(x)
        return x

    def importance(self, task: str, bias_correction: bool = False) -> dict[str, torch.Tensor]:
        """{name: float32 importance of `task`} (layer-normalized when normalize="layer"); this rank's
        shards for sharded parameters."""
        self._task(task, "importance")
        means = self._means(task)
        return {name: self._readout(task, k, bias_correction, means) for k, (name, _) in enumerate(self.params)}

    def select(self, task: str, ratio: float) -> ParamMask:
        """The exact top-`ratio` elements of importance(task) over all tensors (a CoreMask: ``.info``
        says how many were selected; fewer than round(ratio·N) when fewer are nonzero). Sharded
        parameters: the global top-k over every rank's shards, returned as this rank's part."""
        self._task(task, "select")
        index = {name: k for k, (name, _) in enumerate(self.params)}
        names = [name for name, _ in self.params]
        state = self.state[task]
        shapes = {name: tuple(state[k].shape) for k, name in enumerate(names)}
        dtypes = dict.fromkeys(names, torch.float32)
        means = self._means(task)
        zeros = TensorSource(names, shapes, dtypes, lambda n: torch.zeros(shapes[n], device=state[index[n]].device),
                             "zero importance")
        source = TensorSource(names, shapes, dtypes, lambda n: self._readout(task, index[n], False, means),
                              f"importance of task {task!r}")
        with warnings.catch_warnings():  # fewer nonzero than k is normal early on: info.short_by says it
            warnings.filterwarnings("ignore", message="core_region: only", category=UserWarning)
            return core_region(zeros, source, ratio, progress=False, group=self.group)

    def state_bytes(self) -> int:
        """Bytes of EMA state over all tasks (state tensors plus 8-bit scales)."""
        return sum(t.numel() * t.element_size() for task in self.tasks
                   for t in self.state[task] + self.scales[task])

    # ----- state dict --------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"tasks": list(self.tasks), "beta": self.beta, "signal": self.signal, "state_dtype": self.state_dtype,
                "normalize": self.normalize, "seed": self.seed}

    def state_dict(self) -> dict:
        """Settings, update counts, active task and the state tensors (copies), by task and name."""
        return {**self._settings(), "active": self.active, "counts": dict(self.counts),
                "state": {t: {name: s.clone() for (name, _), s in zip(self.params, self.state[t])} for t in self.tasks},
                "scales": {t: {name: s.clone() for (name, _), s in zip(self.params, self.scales[t])}
                           for t in self.tasks}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved; settings, names, shapes and dtypes must match (the
        first difference is named)."""
        for key, value in self._settings().items():
            if state_dict.get(key) != value:
                raise ValueError(f"ImportanceTracker.load_state_dict: {key} is {state_dict.get(key)!r} in the state "
                                 f"dict, {value!r} here")
        for kind in ("state", "scales"):
            for t in self.tasks:
                saved = state_dict[kind][t]
                mine = dict(zip([n for n, _ in self.params], getattr(self, kind)[t]))
                if saved.keys() != mine.keys():
                    missing = sorted(set(mine) ^ set(saved))[0]
                    raise ValueError(f"ImportanceTracker.load_state_dict: {kind} of task {t!r}: tensor {missing!r} is "
                                     f"in one of the state dict and the tracker only")
                for name, s in saved.items():
                    if s.shape != mine[name].shape or s.dtype != mine[name].dtype:
                        raise ValueError(f"ImportanceTracker.load_state_dict: {kind} {name!r} of task {t!r} is "
                                         f"{s.dtype} {list(s.shape)}, expected {mine[name].dtype} "
                                         f"{list(mine[name].shape)}")
        for kind in ("state", "scales"):
            for t in self.tasks:
                for name, s in zip([n for n, _ in self.params], getattr(self, kind)[t]):
                    s.copy_(state_dict[kind][t][name])
        self.counts = {t: int(state_dict["counts"][t]) for t in self.tasks}
        self.active = state_dict["active"]


def bytes_per_element(state_dtype: torch.dtype | str) -> float:
    """EMA state bytes per element per task: 4 (float32), 2 (bfloat16), 1 + 4/256 (int8)."""
    return {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0 + 4.0 / QBLOCK}[_STATE_DTYPES[state_dtype]]


__all__ = ["ImportanceTracker", "bytes_per_element"]
