"""Supervised fine-tuning through ``transformers.Trainer`` with MaskedAdamW plugged in.

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
          seed: int = 0, desc: str = "train", progress: bool = True) -> dict:
    """Fine-tune `model` in place on `examples`; return {"steps", "loss": [[step, loss], ...], "frozen"}.

    Raises FrozenDriftError if a frozen element changed (the run-time freeze check).
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments, get_cosine_schedule_with_warmup
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if not examples:
        raise ValueError(f"{desc}: no training examples")
    steps = num_steps(len(examples), spec)
    # on the training device before the optimizer sees the parameters (its mask words live there too)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    guard = FreezeGuard(model, frozen, what=desc)
    opt = MaskedAdamW(list(model.named_parameters()), lr=spec.lr, betas=spec.betas, eps=spec.eps,
                      weight_decay=spec.weight_decay, frozen=frozen)
    # ceil(ratio * steps) warm-up steps, as transformers counts them, but never all of them: the first
    # step's lr is 0 during warm-up, so a one-step stage would otherwise not train at all
    warmup = min(math.ceil(spec.warmup_ratio * steps), steps - 1)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    log: list[list[float]] = []

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

    named = list(model.named_parameters())

    class _ClipTrainable(TrainerCallback):
        """Clips by the norm of the trainable gradients (the Trainer's own clipping is off)."""

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if spec.max_grad_norm > 0:
                clip_trainable_grads_(named, frozen, spec.max_grad_norm)

    with tempfile.TemporaryDirectory(prefix="cpift-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.lr, max_grad_norm=0.0, logging_steps=max(1, steps // 25),
            save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, log_level="error", dataloader_num_workers=0, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=SFTDataset(examples, tok, spec.max_len, spec.chat_template),
                          data_collator=Collator(tok.pad_token_id), optimizers=(opt, sched),
                          callbacks=[_Log(), _ClipTrainable()])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
    model.eval()
    checked = guard.check(model)
    if progress:
        last = f", final loss {log[-1][1]:.3f}" if log else ""
        print(f"    {desc}: {steps} steps on {len(examples)} examples{last}; freeze check: "
              f"{checked} frozen elements bit-identical", flush=True)
    return {"steps": steps, "loss": log, "frozen_checked": checked}
