"""Supervised fine-tuning through ``transformers.Trainer`` with MaskedAdamW plugged in.

EPI (``epi=EpiSpec(...)``, docs/epi.md): multi-task SFT with task-homogeneous batches
(``TaskBatchSampler``), an ``ImportanceTracker`` updated by MaskedAdamW(importance=tracker) in each
step, and ``EvolvingIsolation`` switching the frozen set per step's task and refreshing the masks.
The budget is the same ``epochs``, counted in task-homogeneous batches (Σ_t ceil(n_t / batch_size)
per epoch). Every step's frozen set is checked bit for bit by a FreezeGuard taken before the step
and checked after it (the frozen set changes with the task, so one guard per stage cannot hold).

Schedule: cosine decay with linear warm-up over the first ``warmup_ratio`` (3%) of the steps
(rounded up, at most all steps but one; ``get_cosine_schedule_with_warmup``). Loss on response
tokens only (see data.py). Elements marked in ``frozen`` are never changed by the optimizer
(MaskedAdamW: no update, no weight decay, no moment drift), and ``FreezeGuard`` verifies that bit
for bit after training. Gradient clipping uses the norm of the *trainable* gradients
(``masked_grad_norm``), so frozen elements' gradients do not shrink the updates of the others:
g ← g · min(1, max_norm / (‖g_trainable‖ + 1e-6)), as ``clip_grad_norm_`` but over the trainable
elements.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..evolving import EvolvingIsolation, TaskBatchSampler, trainer_callback
from ..importance import ImportanceTracker
from ..mask import ParamMask
from ..optim import MaskedAdamW, masked_grad_norm
from .data import Collator, SFTDataset
from .freeze import FreezeGuard
from .tasks import Example


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings shared by every fine-tune of a run (the budget is in epochs)."""

    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_len: int = 64
    chat_template: str = "auto"      # data.render: "auto" (the tokenizer's, if any) or "never"


@dataclass(frozen=True)
class EpiSpec:
    """EPI settings of one training run (config section ``epi``; the policy comes from the method)."""

    policy: str                      # "evolving" (method epi) | "static" (method epi_static)
    ratio: float = 0.01
    interval: int = 100
    warmup: int = 100
    beta: float = 0.99
    signal: str = "grad_x_param"
    state_dtype: str = "float32"     # "float32" | "bfloat16" | "int8"
    normalize: str = "layer"


STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}


def num_steps(n_examples: int, spec: TrainSpec) -> int:
    return max(1, math.ceil(spec.epochs * math.ceil(n_examples / spec.batch_size)))


def clip_trainable_grads_(named: list, frozen: ParamMask | None, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (‖trainable grads‖ + 1e-6)); return that norm."""
    norm = float(masked_grad_norm(named, frozen))
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for _, p in named:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def train(model, tok, examples: list[Example], spec: TrainSpec, *, frozen: ParamMask | None = None,
          seed: int = 0, desc: str = "train", progress: bool = True, epi: EpiSpec | None = None,
          tasks: list[str] | None = None) -> dict:
    """Fine-tune `model` in place on `examples`; return {"steps", "loss": [[step, loss], ...],
    "frozen_checked"} (frozen elements verified bit-identical; with EPI summed over the steps).

    epi: train by EPI (module doc) instead of freezing `frozen` (which must then be None); `tasks`
    names the task of each example; the result adds "drift" (EvolvingIsolation's log) and
    "state_bytes" (the importance state). Raises ValueError before training when epi.warmup leaves
    no step after the first mask, FrozenDriftError if a frozen element changed.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments, get_cosine_schedule_with_warmup
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if not examples:
        raise ValueError(f"{desc}: no training examples")
    sampler = None
    if epi is None:
        steps = num_steps(len(examples), spec)
    else:
        if frozen is not None:
            raise ValueError(f"{desc}: EPI chooses its own frozen sets; frozen must be None")
        if tasks is None or len(tasks) != len(examples):
            raise ValueError(f"{desc}: EPI needs the task of every example ({len(examples)} examples, "
                             f"{'no' if tasks is None else len(tasks)} task names)")
        sampler = TaskBatchSampler(tasks, spec.batch_size, seed=seed)
        steps = max(1, math.ceil(spec.epochs * len(sampler)))
        if epi.warmup >= steps:
            raise ValueError(f"{desc}: epi.warmup = {epi.warmup} must be below the stage's {steps} optimizer steps: "
                             f"no mask would ever be in force")
    # on the training device before the optimizer sees the parameters (its mask words live there too)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    guard = FreezeGuard(model, frozen, what=desc)
    named = list(model.named_parameters())
    tracker = isolation = None
    if epi is not None:
        tracker = ImportanceTracker(named, sampler.names, beta=epi.beta, signal=epi.signal,
                                    state_dtype=STATE_DTYPES[epi.state_dtype], normalize=epi.normalize, seed=seed)
    opt = MaskedAdamW(named, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay,
                      frozen=frozen, importance=tracker)
    if epi is not None:
        isolation = EvolvingIsolation(opt, tracker, epi.ratio, epi.interval, epi.warmup, epi.policy)
    # ceil(ratio * steps) warm-up steps, as transformers counts them, but never all of them: the first
    # step's lr is 0 during warm-up, so a one-step stage would otherwise not train at all
    warmup = min(math.ceil(spec.warmup_ratio * steps), steps - 1)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    log: list[list[float]] = []
    step_checked: list[int] = []  # EPI: frozen elements verified after each step

    class _Log(TrainerCallback):
        """Collects the loss curve and draws one progress bar (loss in the postfix)."""

        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.append([int(state.global_step), float(logs["loss"])])
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    class _ClipTrainable(TrainerCallback):
        """Clips by the norm of the gradients trainable in this step (the Trainer's own clipping is
        off); with EPI it runs after the isolation callback has put the step's frozen set in force."""

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if spec.max_grad_norm > 0:  # EPI: the step's frozen set; otherwise the stage's mask
                clip_trainable_grads_(named, opt.frozen_mask() if epi is not None else frozen, spec.max_grad_norm)

    class _StepGuard(TrainerCallback):
        """EPI: the frozen set in force for a step is bit-identical after it (FreezeGuard per step)."""

        guard = None

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.guard = FreezeGuard(model, opt.frozen_mask(), what=f"{desc} step {state.global_step + 1}")

        def on_optimizer_step(self, args, state, control, **kw):
            step_checked.append(self.guard.check(model))

    class _TaskBatches(Trainer):
        """EPI: batches from the task-homogeneous sampler instead of the Trainer's shuffled ones."""

        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_sampler=sampler,
                                               collate_fn=self.data_collator, num_workers=0)

    # callbacks run in list order: isolation (task's frozen set) → clipping → step guard
    callbacks = [_Log()] + ([trainer_callback(isolation, sampler.task_of_step)] if epi is not None else []) \
        + [_ClipTrainable()] + ([_StepGuard()] if epi is not None else [])
    with tempfile.TemporaryDirectory(prefix="cpift-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.lr, max_grad_norm=0.0, logging_steps=max(1, steps // 25),
            save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, log_level="error", dataloader_num_workers=0, remove_unused_columns=False,
        )
        trainer = (Trainer if epi is None else _TaskBatches)(
            model=model, args=args, train_dataset=SFTDataset(examples, tok, spec.max_len, spec.chat_template),
            data_collator=Collator(tok.pad_token_id), optimizers=(opt, sched), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
    model.eval()
    checked = guard.check(model) + sum(step_checked)
    if progress:
        last = f", final loss {log[-1][1]:.3f}" if log else ""
        print(f"    {desc}: {steps} steps on {len(examples)} examples{last}; freeze check: "
              f"{checked} frozen elements bit-identical", flush=True)
    result = {"steps": steps, "loss": log, "frozen_checked": checked}
    if epi is not None:
        result["drift"] = isolation.log
        result["state_bytes"] = tracker.state_bytes()
    return result
