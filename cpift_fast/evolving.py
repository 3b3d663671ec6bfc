"""EPI's evolving isolation: per-task masks from the importance EMA, refreshed during training.

Every ``interval`` optimizer steps from ``warmup`` on (policy "evolving"; "static": see below;
"none": never) each task's mask ``M_t`` is recomputed as the exact top-``ratio`` of its
layer-normalized importance (:meth:`ImportanceTracker.select`). On a task-t step the frozen set is

    F_t = (∪_{s≠t} M_s) \\ M_t

— the other tasks' important elements are protected from t's updates, t's own stay trainable. The
F_t are computed once per refresh (ParamMasks), so a task switch is one ``optimizer.set_frozen``
that copies nothing (``copy=False``: the optimizer's words are views into F_t).
Task switches never reset moments (an element of M_t simply keeps t's moments between t's steps);
at a refresh, elements that leave some task's frozen set (``∪_t F_t,old \\ F_t,new``) get their
moments zeroed when the optimizer's ``reset_on_unfreeze`` is set, as MaskedAdamW does for any
element that becomes trainable.

"static" computes every task's mask once, after step ``warmup``. A task with no update by then has
zero importance and an empty mask; it gets its mask, once, at the first later point of the
evolving schedule (``warmup + k·interval``) by which it has had an update, and the masks of the
other tasks are never recomputed. So every task is protected once it has trained, and no mask that
exists is ever refreshed.

Each refresh appends one record per task to ``log``: ``protected`` |M_t|, ``kept`` |M_t,old ∩ M_t|,
``added`` |M_t \\ M_t,old|, ``released`` |M_t,old \\ M_t| (protected = kept + added, the previous
protected = kept + released), ``frozen`` |F_t|, ``jaccard_prev`` the Jaccard of M_t with the previous
mask (two empty masks: 0), ``jaccard_first`` the Jaccard with the task's first non-empty mask (None
while the task has had none) — the drift curve — and ``applied``: False when the refresh is
logged, set True by the next :meth:`before_step` (the refresh's masks are then in force); a refresh
after the last step of training keeps ``applied`` False (its masks were never used).

Sharded parameters (FSDP2): the masks are each rank's part of the global ones (see
:class:`ImportanceTracker`), and the logged counts and Jaccards are summed over the ranks, so every
rank logs the global figures.

Use it as a plain hook (:meth:`EvolvingIsolation.before_step` after backward, :meth:`after_step`
after ``optimizer.step()``) or in a ``transformers.Trainer`` through :func:`trainer_callback`. The
batches of one optimizer step must come from one task: :class:`TaskBatchSampler` yields such
batches, interleaved in proportion to each task's data size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .importance import ImportanceTracker
from .mask import ParamMask

POLICIES = ("evolving", "static", "none")


def count(mask: ParamMask, group=None) -> int:
    """Elements set in `mask`; with a process group, summed over the ranks' parts (sharded masks)."""
    n = mask.count()
    if group is None:
        return n
    import torch.distributed as dist

    total = torch.tensor([n], dtype=torch.int64, device=mask.device)
    dist.all_reduce(total, group=group)
    return int(total.item())


def jaccard(a: ParamMask, b: ParamMask, group=None) -> float:
    """|a ∩ b| / |a ∪ b|; 0 for two empty masks (over every rank's part with a process group)."""
    union = count(a | b, group)
    return count(a & b, group) / union if union else 0.0


class EvolvingIsolation:
    """Refreshes per-task masks from `tracker` and sets `optimizer`'s frozen set for the active task.

    optimizer: a MaskedAdamW over the tracker's parameters (named: the masks are matched by name).
    ratio: the fraction of all elements in each task's mask. interval, warmup: optimizer steps.
    """

    def __init__(self, optimizer, tracker: ImportanceTracker, ratio: float, interval: int, warmup: int = 0,
                 policy: str = "evolving"):
        if policy not in POLICIES:
            raise ValueError(f"EvolvingIsolation: policy must be one of {', '.join(map(repr, POLICIES))}, "
                             f"got {policy!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"EvolvingIsolation: ratio must be a number in [0, 1], got {ratio!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"EvolvingIsolation: interval must be an int >= 1, got {interval!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"EvolvingIsolation: warmup must be an int >= 0, got {warmup!r}")
        if not hasattr(optimizer, "set_frozen"):
            raise TypeError(f"EvolvingIsolation: optimizer must be a MaskedAdamW (it needs set_frozen), got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.tracker = tracker
        self.ratio = float(ratio)
        self.interval = interval
        self.warmup = warmup
        self.policy = policy
        self.step = 0  # optimizer steps taken
        self.masks: dict[str, ParamMask] | None = None
        self.first: dict[str, ParamMask] = {}  # each task's first non-empty mask
        self.frozen: dict[str, ParamMask] | None = None
        self.log: list[dict] = []
        self._applied: str | None = None  # the task whose frozen set the optimizer holds
        self._pending: list[dict] = []  # the last refresh's log records, until a step uses its masks
        self._sizes: dict[str, int] = {}  # |M_t| at the last refresh

    # ----- hook --------------------------------------------------------------------------------

    def before_step(self, task: str) -> None:
        """Call after backward, before ``optimizer.step()``, with the task of this step's batches:
        updates the task's importance EMA (unless the optimizer does it in its step: a MaskedAdamW
        constructed with ``importance=tracker``) and puts the task's frozen set in force."""
        self.tracker.set_task(task)
        for rec in self._pending:
            rec["applied"] = True
        self._pending = []
        if getattr(self.optimizer, "importance", None) is not self.tracker:
            self.tracker.update()
        if self.frozen is not None and self._applied != task:
            self._set_frozen(self.frozen[task], reset=False)
            self._applied = task

    def after_step(self) -> None:
        """Call after ``optimizer.step()``: counts the step and refreshes the masks when one is due."""
        self.step += 1
        if self.due():
            self.refresh()

    def due(self) -> bool:
        """Whether the masks are to be refreshed after this step (the policy's schedule)."""
        if self.policy == "none" or self.step < self.warmup:
            return False
        if self.masks is None:
            return True
        if (self.step - self.warmup) % self.interval:
            return False
        return self.policy == "evolving" or bool(self._late())

    def _late(self) -> list[str]:
        """static: the tasks whose mask is empty and that have had an update since (their mask is due)."""
        return [t for t in self.tracker.tasks if not self._sizes[t] and self.tracker.counts[t] > 0]

    def refresh(self) -> None:
        """Recompute every task's mask (static, after the first: only the empty masks of tasks that
        have had an update since) and frozen set, log the drift, reset released moments."""
        tasks = self.tracker.tasks
        if self.policy == "static" and self.masks is not None:
            new = dict(self.masks)
            new.update({t: self.tracker.select(t, self.ratio) for t in self._late()})
        else:
            new = {t: self.tracker.select(t, self.ratio) for t in tasks}
        group = self.tracker.group
        sizes = {t: count(new[t], group) for t in tasks}
        frozen = {}
        for t in tasks:
            others = ParamMask.zeros(new[t].layout, new[t].device)
            for s in tasks:
                if s != t:
                    others = others | new[s]
            frozen[t] = others - new[t]
        records = []
        for t in tasks:
            if t not in self.first and sizes[t]:
                self.first[t] = new[t]
            old = self.masks[t] if self.masks is not None else ParamMask.zeros(new[t].layout, new[t].device)
            records.append({"step": self.step, "task": t, "protected": sizes[t], "kept": count(old & new[t], group),
                            "added": count(new[t] - old, group), "released": count(old - new[t], group),
                            "frozen": count(frozen[t], group), "jaccard_prev": jaccard(old, new[t], group),
                            "jaccard_first": jaccard(self.first[t], new[t], group) if t in self.first else None,
                            "applied": False})
        self.log += records
        self._pending, self._sizes = records, sizes
        if self.frozen is not None and self.optimizer.reset_on_unfreeze:
            released = ParamMask.zeros(new[tasks[0]].layout, new[tasks[0]].device)
            for t in tasks:
                released = released | (self.frozen[t] - frozen[t])
            self._set_frozen(released, reset=False)
            self._set_frozen(None, reset=True)  # MaskedAdamW zeroes the moments of what it unfreezes
        self.masks, self.frozen, self._applied = new, frozen, None

    def _set_frozen(self, mask: ParamMask | None, reset: bool) -> None:
        saved, self.optimizer.reset_on_unfreeze = self.optimizer.reset_on_unfreeze, reset
        try:
            self.optimizer.set_frozen(mask, copy=False)  # masks made here are never modified: no copy
        finally:
            self.optimizer.reset_on_unfreeze = saved


def trainer_callback(isolation: EvolvingIsolation, task_of_step: Callable[[int], str]):
    """A ``transformers.TrainerCallback`` driving `isolation` in a Trainer whose optimizer is
    ``isolation.optimizer``. task_of_step(global_step) names the task of that optimizer step's
    batches (e.g. :meth:`TaskBatchSampler.task_of_step`)."""
    from transformers import TrainerCallback

    class EvolvingIsolationCallback(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            isolation.before_step(task_of_step(state.global_step))

        def on_optimizer_step(self, args, state, control, **kwargs):
            isolation.after_step()

    return EvolvingIsolationCallback()


class TaskBatchSampler(torch.utils.data.Sampler):
    """Batches of one task each, tasks interleaved in proportion to their data size (seeded).

    tasks: the task of each dataset example. Each epoch shuffles every task's examples, cuts them
    into batches of `batch_size` (a task's last batch may be short unless `drop_last`), groups
    `accumulation` consecutive batches of a task into one optimizer step (a task's leftover batches
    that do not fill a step are dropped), and orders the steps by the key (j + u_j) / n_t of task t's
    j-th of n_t steps, u_j uniform in [0, 1): every prefix of the epoch holds each task's steps in
    proportion to n_t (± 1). Epoch e uses seed + e; iteration advances the epoch (or ``set_epoch``).
    """

    def __init__(self, tasks: Sequence[str], batch_size: int, *, accumulation: int = 1, seed: int = 0,
                 drop_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TaskBatchSampler: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"TaskBatchSampler: accumulation must be an int >= 1, got {accumulation!r}")
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("TaskBatchSampler: tasks is empty (one task name per example needed)")
        self.batch_size, self.accumulation, self.seed, self.drop_last = batch_size, accumulation, seed, drop_last
        self.epoch = 0
        self.names = tuple(dict.fromkeys(self.tasks))
        self._steps = self.steps(0)  # the step count is the same every epoch
        if not self._steps:
            raise ValueError(f"TaskBatchSampler: no task has enough examples for one step of {accumulation} "
                             f"batch(es) of {batch_size}")
        self._cached = (0, self._steps)  # (epoch, its steps) last asked by task_of_step

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self, epoch: int) -> list[tuple[str, list[list[int]]]]:
        """(task, batches of dataset indices) of each optimizer step of `epoch`, in order."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        keyed = []
        for name in self.names:
            index = torch.tensor([i for i, t in enumerate(self.tasks) if t == name])
            index = index[torch.randperm(len(index), generator=gen)].tolist()
            batches = [index[a:a + self.batch_size] for a in range(0, len(index), self.batch_size)]
            if self.drop_last and len(batches[-1]) < self.batch_size:
                batches.pop()
            n = len(batches) // self.accumulation
            u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
            for j in range(n):
                keyed.append(((j + u[j]) / n, name, batches[j * self.accumulation:(j + 1) * self.accumulation]))
        keyed.sort(key=lambda x: x[0])
        return [(name, batches) for _, name, batches in keyed]

    def task_of_step(self, global_step: int) -> str:
        """The task of optimizer step `global_step` (counted from 0 over epochs 0, 1, ...)."""
        epoch, k = divmod(global_step, len(self._steps))
        if self._cached[0] != epoch:
            self._cached = (epoch, self.steps(epoch))
        return self._cached[1][k][0]

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        for _, batches in self.steps(epoch):
            yield from batches

    def __len__(self) -> int:
        return sum(len(batches) for _, batches in self._steps)


__all__ = ["EvolvingIsolation", "TaskBatchSampler", "jaccard", "trainer_callback", "POLICIES"]
