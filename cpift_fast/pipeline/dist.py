"""Multi-process runs: ``torchrun --nproc_per_node N $(which cpift) run CFG`` or ``accelerate launch``.

Who does what (every process runs the same driver, in lock step):

- **Rank 0 alone touches the run directory's bookkeeping**: it takes the stage locks, decides
  whether a stage is finished (manifest, file check), removes dead temps, publishes stages
  (manifest + atomic rename, run.py) and writes the report. Its decision — reuse, compute, missing
  input, not this command's work — is broadcast, so every rank takes the same branch next.
- **Training stages run on every rank** (``collective`` stages: the tiny base's pretraining, the
  probes, the multi-stage SFTs, fusion's consolidation, the forgetting SFTs, EPI):
  ``transformers.Trainer`` wraps the model in DDP or FSDP2 (``distributed: ddp | fsdp``), each rank
  computes its share of every step's batch (train.py), and the trained model's full state dict is
  gathered to rank 0, which alone writes the checkpoint.
- **Every other stage runs on rank 0** (core selection, grouping, fusion, evaluation) while the
  other ranks wait for its outcome.
- **An error on any rank is raised on every rank** (``on_main``, ``together``), so no rank is left
  waiting in a collective for one that has given up.

Coordination (decisions, outcomes, barriers) goes through a gloo group with a long timeout: rank 0
may fuse or evaluate for hours while the others wait. Training uses the default group (NCCL on
GPUs, gloo on CPUs). The run directory must be on a file system every rank can read (training
ranks load their input checkpoint from it), as for the cluster fan-out.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .config import ConfigError

T = TypeVar("T")
WAIT = datetime.timedelta(days=7)  # how long a rank waits for rank 0's work (evaluation, fusion)


class RankError(RuntimeError):
    """An error raised on another rank (its type and message), raised here so that every rank stops."""


def _portable(exc: BaseException, rank: int) -> BaseException:
    """`exc` if it survives pickling (to be raised as is on the other ranks), else a RankError."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return copy
    except Exception:  # noqa: BLE001 - anything that does not round-trip is described instead
        pass
    return RankError(f"rank {rank}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, training strategy ("ddp" | "fsdp" when
    world > 1, else None) and the coordination group. ``Dist()`` is a single-process run, where
    every method below just calls the function it is given."""

    rank: int = 0
    world: int = 1
    strategy: str | None = None
    group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order (pickled)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 only; its result on every rank, or its error raised on every rank."""
        if not self.enabled:
            return fn()
        outcome, error = None, None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except BaseException as exc:  # re-raised below, after the others know
                error = exc
                outcome = ("error", _portable(exc, self.rank))
        outcome = self.broadcast(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]

    def together(self, fn: Callable[[], T]) -> T:
        """fn() on every rank (a collective piece of work); if it raised on any rank, every rank
        raises: its own error, or that of the lowest failing rank."""
        if not self.enabled:
            return fn()
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the others know
            error = exc
        errors = self.all_gather(None if error is None else _portable(error, self.rank))
        if error is not None:
            raise error
        for other in errors:
            if other is not None:
                raise other
        return result


SINGLE = Dist()
_CURRENT: Dist | None = None  # the multi-process Dist of this process, once set up


def launched_world_size() -> int:
    """The number of processes this one was launched with (torchrun / accelerate launch set
    WORLD_SIZE); 1 for a plain ``cpift run``."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def resolve_strategy(setting: str | None, world: int) -> str | None:
    """The training strategy of a run with `world` processes: the config's ``distributed`` (ddp
    when unset); None for one process. Accelerate settings the config cannot honour are errors."""
    if world <= 1:
        return None
    strategy = setting or "ddp"
    env = {k: os.environ.get(k, "").lower() for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                                                      "ACCELERATE_MIXED_PRECISION")}
    if env["ACCELERATE_USE_DEEPSPEED"] == "true":
        raise ConfigError("accelerate launch is configured for DeepSpeed; cpift trains with DDP or FSDP2 "
                          "(config key distributed: ddp | fsdp): launch without DeepSpeed")
    if env["ACCELERATE_USE_FSDP"] == "true" and strategy != "fsdp":
        raise ConfigError(f"accelerate launch is configured for FSDP but the config says distributed: {strategy}; "
                          f"set distributed: fsdp (or launch without FSDP)")
    if env["ACCELERATE_MIXED_PRECISION"] not in ("", "no"):
        raise ConfigError(f"accelerate launch asks for mixed precision {env['ACCELERATE_MIXED_PRECISION']}; cpift "
                          f"trains in the config's model.dtype (float32 | bfloat16 | float16): launch with "
                          f"--mixed_precision no and set model.dtype")
    return strategy


def setup(setting: str | None) -> Dist:
    """The Dist of this process: SINGLE for a plain run; under torchrun / accelerate launch, the
    default process group (set up once per process: NCCL + gloo with GPUs, else gloo) and a gloo
    coordination group with a long timeout. `setting`: the config's ``distributed``."""
    global _CURRENT
    world = launched_world_size()
    strategy = resolve_strategy(setting, world)
    if strategy is None:
        if setting is not None:
            print(f"cpift: note: distributed: {setting} applies to multi-process launches (torchrun, accelerate "
                  f"launch); this run has one process", file=sys.stderr, flush=True)
        return SINGLE
    if _CURRENT is not None:
        return Dist(_CURRENT.rank, _CURRENT.world, strategy, _CURRENT.group)
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError(f"launched with {world} processes, but this torch was built without torch.distributed")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cuda:nccl,cpu:gloo")
        else:
            dist.init_process_group("gloo")
        atexit.register(dist.destroy_process_group)
    group = dist.new_group(backend="gloo", timeout=WAIT)
    _CURRENT = Dist(dist.get_rank(), dist.get_world_size(), strategy, group)
    return _CURRENT
