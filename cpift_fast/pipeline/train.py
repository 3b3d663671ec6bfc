"""Supervised fine-tuning through ``transformers.Trainer`` with MaskedAdamW plugged in.

EPI (``epi=EpiSpec(...)``, docs/epi.md): multi-task SFT with task-homogeneous batches
(``TaskBatchSampler``), an ``ImportanceTracker`` updated by MaskedAdamW(importance=tracker) in each
step, and ``EvolvingIsolation`` switching the frozen set per step's task and refreshing the masks.
The budget is the same ``epochs``, counted in task-homogeneous batches (Σ_t ceil(n_t / batch_size)
per epoch). Every step's frozen set is checked bit for bit by a FreezeGuard taken before the step
and checked after it (the frozen set changes with the task, so one guard per stage cannot hold).

Steps, micro-batches, processes: a step's examples (its global batch of ``batch_size``) come from
a seeded shuffle per epoch (data.shuffled_batches; the EPI sampler's batches under EPI) and do not
depend on the number of processes. Each step's batch is cut into ``parts = batch_size /
micro_batch_size`` micro-batches (null micro_batch_size: one per process); each process computes
parts / world of them, accumulating gradients, and the Trainer reduces them over the processes
(``dist.strategy``): DDP (accelerate wraps the model), or transformers' own FSDP2 — the model is
sharded as it is loaded (``from_pretrained(distributed_config=DistributedConfig(fsdp_size=world))``,
model.py: each rank reads only its shards), and the Trainer defers the reduce-scatter to a step's
last micro-batch. The loss is normalized by the step's response tokens over all
micro-batches of all processes (the Trainer's ``num_items_in_batch``, ``average_tokens_across_devices``).
Bit for bit: a 2-process run equals a 1-process run with two micro-batches per step (both add the
same two micro-batch gradients, g₁ + g₂, and the rest of a step is elementwise or computed on the
full tensors); with more parts or processes the sums' order differs (equal up to rounding).

Under FSDP2 the clipping norm is computed from full gradients, gathered one tensor at a time, so it
equals the 1-process norm bit for bit (an all-reduce of per-shard sums would round differently):
one extra all-gather of the gradients per step, one tensor at a time. The trained model is written
to ``out`` when given, by rank 0 alone (FSDP2: ``save_pretrained`` on every rank gathers the full
state dict to rank 0's CPU).

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

import itertools
import math
import tempfile
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import ops
from ..evolving import EvolvingIsolation, TaskBatchSampler
from ..importance import ImportanceTracker
from ..mask import ParamMask
from ..optim import MaskedAdamW, masked_grad_norm
from .data import Collator, KeyedDataset, RankBatches, SFTDataset, shuffled_batches
from .dist import SINGLE, Dist
from .freeze import FreezeGuard, is_dtensor, named_parameters
from .model import save_checkpoint
from .tasks import Example


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings shared by every fine-tune of a run (the budget is in epochs)."""

    epochs: float = 1.0
    batch_size: int = 32             # examples per optimizer step, over all processes
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_len: int = 64
    chat_template: str = "auto"      # data.render: "auto" (the tokenizer's, if any) or "never"
    micro_batch_size: int | None = None  # examples per forward/backward on one process (None: batch / processes)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass

    def parts(self, world: int) -> int:
        """Micro-batches per step; ValueError if the batch cannot be shared that way by `world` processes."""
        micro = self.micro_batch_size or self.batch_size // world
        if micro < 1 or self.batch_size % (micro * world):
            given = f"train.micro_batch_size = {self.micro_batch_size}" if self.micro_batch_size else \
                "one micro-batch per process"
            raise ValueError(f"train.batch_size = {self.batch_size} cannot be shared by {world} process(es) with "
                             f"{given}: batch_size must be a multiple of micro_batch_size × processes")
        return self.batch_size // micro


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


def _full_words(frozen: ParamMask, name: str, p: torch.Tensor, device) -> torch.Tensor:
    """The frozen words of the whole tensor `name`: the mask's own, or — for a sharded mask (this
    rank's part of sharded parameter p, as EPI's under FSDP2) — every rank's part gathered."""
    words = frozen.tensor_words(name).to(device)
    if tuple(frozen.layout.shapes[frozen.layout.index[name]]) == tuple(p.shape):
        return words
    from torch.distributed.tensor import DTensor

    local = ops.mask_unpack(words, p.to_local().numel()).view(p.to_local().shape).to(torch.uint8)
    full = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
    return ops.mask_pack(full.reshape(-1).bool())


def trainable_grad_norm(named: list, frozen: ParamMask | None) -> torch.Tensor:
    """‖trainable grads‖ (masked_grad_norm). With sharded (FSDP2) grads each tensor's full gradient
    is gathered in turn and reduced as in one process, so the norm is the same bit for bit."""
    if not any(p.grad is not None and is_dtensor(p.grad) for _, p in named):
        return masked_grad_norm(named, frozen)
    per_tensor = []
    for name, p in named:
        if p.grad is None:
            continue
        grad = p.grad.full_tensor()
        words = [_full_words(frozen, name, p, grad.device)] if frozen is not None else []
        per_tensor.append(ops.masked_grad_sq_norm([grad], words)[0])
        del grad
    return torch.stack(per_tensor).sum().sqrt() if per_tensor else torch.zeros((), dtype=torch.float32)


def clip_trainable_grads_(named: list, frozen: ParamMask | None, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (‖trainable grads‖ + 1e-6)); return that norm."""
    norm = float(trainable_grad_norm(named, frozen))
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for _, p in named:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def train(model, tok, examples: list[Example], spec: TrainSpec, *, frozen: ParamMask | None = None,
          seed: int = 0, desc: str = "train", progress: bool = True, epi: EpiSpec | None = None,
          tasks: list[str] | None = None, dist: Dist = SINGLE, out: str | None = None) -> dict:
    """Fine-tune `model` on `examples`; return {"steps", "loss": [[step, loss], ...],
    "frozen_checked", "frozen_checked_per_rank"} (frozen elements verified bit-identical on every
    rank: each rank checks what it holds, its replica (DDP) or its shards (FSDP2);
    "frozen_checked" counts the distinct elements checked, with EPI summed over the steps).

    `out`: write the trained model and `tok` there (save_pretrained; rank 0 writes). In one
    process `model` is trained in place; in a multi-process run (`dist`) it is wrapped or sharded
    in place and only `out` holds the result. Every rank must call train with the same arguments.

    epi: train by EPI (module doc) instead of freezing `frozen` (which must then be None); `tasks`
    names the task of each example; the result adds "drift" (EvolvingIsolation's log) and
    "state_bytes" (the importance state: of the whole model, over every rank's shards under FSDP2)
    and "state_bytes_per_rank". Raises ValueError before training when epi.warmup leaves
    no step after the first mask or the batch cannot be shared by the processes, FrozenDriftError
    (on every rank) if a frozen element changed on any rank.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments, get_cosine_schedule_with_warmup
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if not examples:
        raise ValueError(f"{desc}: no training examples")
    if dist.strategy == "fsdp" and not getattr(model, "is_distributed_loading_by_transformers", False):
        raise ValueError(f"{desc}: distributed: fsdp trains a model sharded as it is loaded "
                         f"(model.load_checkpoint(..., fsdp_size=world)), got an unsharded {type(model).__name__}")
    try:
        parts = spec.parts(dist.world)
    except ValueError as exc:
        raise ValueError(f"{desc}: {exc}") from None
    sampler = None
    if epi is None:
        steps = num_steps(len(examples), spec)
        batches = shuffled_batches(len(examples), spec.batch_size, steps, seed)
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
        epochs = (batch for e in itertools.count() for _, step in sampler.steps(e) for batch in step)
        batches = list(itertools.islice(epochs, steps))
    # ceil(ratio * steps) warm-up steps, as transformers counts them, but never all of them: the first
    # step's lr is 0 during warm-up, so a one-step stage would otherwise not train at all
    warmup = min(math.ceil(spec.warmup_ratio * steps), steps - 1)
    show = progress and dist.is_main
    rank = f" (rank {dist.rank})" if dist.enabled else ""  # in freeze-check errors
    log: list[list[float]] = []
    step_checked: list[int] = []  # EPI: frozen elements verified after each step
    held: dict = {}  # what exists once the Trainer has placed / wrapped the model (on_train_begin)

    def make_optimizer(module):
        named = named_parameters(module)
        tracker = None
        if epi is not None:
            tracker = ImportanceTracker(named, sampler.names, beta=epi.beta, signal=epi.signal,
                                        state_dtype=STATE_DTYPES[epi.state_dtype], normalize=epi.normalize,
                                        seed=seed)
        opt = MaskedAdamW(named, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay,
                          frozen=frozen, importance=tracker)
        held.update(opt=opt, tracker=tracker)
        if epi is not None:
            held["isolation"] = EvolvingIsolation(opt, tracker, epi.ratio, epi.interval, epi.warmup, epi.policy)
        return opt

    class _Trainer(Trainer):
        """MaskedAdamW over the model as the Trainer prepared it, the cosine schedule, this run's
        micro-batches (RankBatches), and each step's loss summed over micro-batches and processes."""

        step_loss = None

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = make_optimizer(model if model is not None else self.model)
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = get_cosine_schedule_with_warmup(optimizer or self.optimizer, warmup, steps)
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(KeyedDataset(self.train_dataset), collate_fn=self.data_collator,
                                               batch_sampler=RankBatches(batches, parts, dist.rank, dist.world),
                                               num_workers=0)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_loss = loss if self.step_loss is None else self.step_loss + loss
            return loss

    class _Setup(TrainerCallback):
        """Once the Trainer has placed the model: the parameters as the optimizer steps them and the
        freeze check's snapshot (of what this rank holds)."""

        def on_train_begin(self, args, state, control, model=None, **kw):
            held["named"] = named_parameters(model)
            held["guard"] = FreezeGuard(held["named"], frozen, what=desc + rank)

    class _Log(TrainerCallback):
        """The loss curve (mean step loss over each logging window) and one progress bar."""

        bar = None
        window = None  # summed step losses since the last record, and their count
        every = max(1, steps // 25)

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=steps, desc=desc, disable=not show, leave=False, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            loss, trainer.step_loss = trainer.step_loss.float(), None
            if dist.enabled:  # each process's loss is scaled by the world size (the gradients are averaged)
                torch.distributed.all_reduce(loss)
                loss = loss / dist.world
            self.window = (loss, 1) if self.window is None else (self.window[0] + loss, self.window[1] + 1)
            if state.global_step % self.every == 0:
                log.append([int(state.global_step), self.window[0].item() / self.window[1]])
                self.bar.set_postfix(loss=f"{log[-1][1]:.3f}")
                self.window = None
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    class _ClipTrainable(TrainerCallback):
        """Clips by the norm of the gradients trainable in this step (the Trainer's own clipping is
        off); with EPI it runs after the isolation callback has put the step's frozen set in force."""

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if spec.max_grad_norm > 0:  # EPI: the step's frozen set; otherwise the stage's mask
                mask = held["opt"].frozen_mask() if epi is not None else frozen
                clip_trainable_grads_(held["named"], mask, spec.max_grad_norm)

    class _StepGuard(TrainerCallback):
        """EPI: the frozen set in force for a step is bit-identical after it (FreezeGuard per step)."""

        guard = None

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.guard = FreezeGuard(held["named"], held["opt"].frozen_mask(),
                                     what=f"{desc} step {state.global_step + 1}{rank}")

        def on_optimizer_step(self, args, state, control, **kw):
            step_checked.append(self.guard.check(held["named"]))

    class _Isolation(TrainerCallback):
        """EPI: the step's task's frozen set before the step, the masks' refresh after it."""

        def on_pre_optimizer_step(self, args, state, control, **kw):
            held["isolation"].before_step(sampler.task_of_step(state.global_step))

        def on_optimizer_step(self, args, state, control, **kw):
            held["isolation"].after_step()

    # callbacks run in list order: setup → isolation (task's frozen set) → clipping → step guard → log
    callbacks = [_Setup()] + ([_Isolation()] if epi is not None else []) + [_ClipTrainable()] \
        + ([_StepGuard()] if epi is not None else []) + [_Log()]
    extra = {}
    if spec.gradient_checkpointing:  # the model's own (transformers renamed the argument in v5)
        ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
            else "gradient_checkpointing"
        extra[ckpt] = True
    if dist.strategy == "ddp":
        extra["ddp_find_unused_parameters"] = False  # every parameter is used
    with tempfile.TemporaryDirectory(prefix="cpift-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=spec.batch_size // parts,
            gradient_accumulation_steps=parts // dist.world, learning_rate=spec.lr, max_grad_norm=0.0,
            logging_strategy="no", save_strategy="no", report_to=[], seed=seed, data_seed=seed,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True, log_level="error", dataloader_num_workers=0,
            remove_unused_columns=False, average_tokens_across_devices=True, **extra,
        )
        trainer = _Trainer(model=model, args=args, train_dataset=SFTDataset(examples, tok, spec.max_len,
                                                                             spec.chat_template),
                           data_collator=Collator(tok.pad_token_id), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
        model = trainer.model
    model.eval()
    checked = dist.together(lambda: held["guard"].check(held["named"]) + sum(step_checked))
    per_rank = dist.all_gather(checked)
    total = sum(per_rank) if dist.strategy == "fsdp" else checked
    if out is not None:
        _save(model, tok, out, dist)
    if show:
        last = f", final loss {log[-1][1]:.3f}" if log else ""
        print(f"    {desc}: {steps} steps on {len(examples)} examples{last}; freeze check: "
              f"{total} frozen elements bit-identical", flush=True)
    result = {"steps": steps, "loss": log, "frozen_checked": total, "frozen_checked_per_rank": per_rank}
    if epi is not None:
        result["drift"] = held["isolation"].log
        per_rank = dist.all_gather(held["tracker"].state_bytes())  # FSDP2: each rank holds its shards' state
        result["state_bytes"] = sum(per_rank) if dist.strategy == "fsdp" else per_rank[0]
        result["state_bytes_per_rank"] = per_rank
    return result


def _save(model, tok, out: str, dist: Dist) -> None:
    """The trained model and tokenizer in `out`, written by rank 0 alone. A model sharded at load
    time is saved by every rank (transformers gathers its full state dict to rank 0's CPU)."""
    if dist.strategy == "fsdp":
        dist.together(lambda: save_checkpoint(model, tok, out, main=dist.is_main))
    else:
        dist.on_main(lambda: save_checkpoint(model, tok, out))
