"""The run-time freeze check: frozen elements must be bit-identical to their values when frozen.

``FreezeGuard(model, mask)`` records, for every parameter, the values of the elements the mask
marks as frozen (a copy of only those elements). ``check()`` compares them bit for bit (the raw
bytes, so -0.0 vs 0.0 and NaN payloads count as changes) and raises ``FrozenDriftError`` naming
the tensor, the number of drifted elements and the first one. The pipeline calls it after every
training stage; it is a property of the run, not only of the tests.

Under FSDP2 (DTensor parameters) each process snapshots and checks the elements of its own
shards (``local_view``); under DDP each process checks its whole replica.
"""

from __future__ import annotations

import torch

from ..mask import ParamMask

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class FrozenDriftError(RuntimeError):
    """A frozen parameter element changed during training."""


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()])


# module levels that wrappers insert into parameter names (activation checkpointing's, torch.compile's)
_WRAPPER_LEVELS = ("_checkpoint_wrapped_module", "_orig_mod")


def named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """model.named_parameters() under the names of the unwrapped model (the checkpoint's names):
    without the module levels activation checkpointing and torch.compile insert."""
    return [(".".join(part for part in name.split(".") if part not in _WRAPPER_LEVELS), p)
            for name, p in model.named_parameters()]


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (an FSDP2-sharded parameter or gradient)."""
    return type(t).__name__ == "DTensor"


def local_view(p: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what this process holds of parameter `p`, the part of `bits` that falls in it): a DTensor's
    local shard and its block of `bits` — bits of p's full shape, or already of the shard's shape
    (a sharded mask: EPI's under FSDP2, as MaskedAdamW accepts it) — else p and bits."""
    if not is_dtensor(p):
        return p.detach(), bits
    local = p.to_local().detach()
    if tuple(bits.shape) != tuple(p.shape) and tuple(bits.shape) == tuple(local.shape):
        return local, bits
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    for dim, (start, length) in enumerate(zip(offset, shape)):
        bits = bits.narrow(dim, start, length)
    return local, bits


def _params(model) -> dict[str, torch.Tensor]:
    return dict(named_parameters(model) if isinstance(model, torch.nn.Module) else model)


class FreezeGuard:
    """Snapshot of the frozen elements of `model` (a module, or (name, parameter) pairs) under
    `mask` (None or empty: nothing to check)."""

    def __init__(self, model, mask: ParamMask | None, what: str = "stage"):
        self.what = what
        self.mask = mask
        self.snapshot: dict[str, torch.Tensor] = {}  # name -> raw bits of its frozen elements (held here)
        if mask is None or mask.count() == 0:
            return
        params = _params(model)
        counts = mask.count_per_tensor()
        missing = [n for n in mask.names if n not in params and counts[n]]
        if missing:
            raise ValueError(f"{what}: frozen mask names tensor {missing[0]!r}, which the model does not have")
        for name in mask.names:
            if name not in params:
                continue  # a checkpoint tensor that is not a parameter, with nothing frozen in it
            if counts[name]:  # kept on the CPU: the trainer may move the model to another device
                p, bits = local_view(params[name], mask.tensor_bits(name))
                self.snapshot[name] = _bits(p[bits.to(p.device)]).cpu().clone()

    @property
    def frozen_count(self) -> int:
        return sum(int(v.numel()) for v in self.snapshot.values())

    def check(self, model) -> int:
        """Raise FrozenDriftError if any frozen element differs; return how many were checked."""
        params = _params(model)
        for name, saved in self.snapshot.items():
            # unpacked one tensor at a time: 1 bit/element at rest
            p, bits = local_view(params[name], self.mask.tensor_bits(name))
            now = _bits(p[bits.to(p.device)]).cpu()
            if not torch.equal(now, saved):
                bad = (now != saved).nonzero().flatten()
                flat = bits.flatten().nonzero().flatten()[bad[0]].item()
                old = saved[bad[0]].view(p.dtype).item()
                new = now[bad[0]].view(p.dtype).item()
                shard = " of this process's shard" if is_dtensor(params[name]) else ""
                raise FrozenDriftError(
                    f"{self.what}: {bad.numel()} frozen element(s) of {name!r} changed during training "
                    f"(first: flat index {flat}{shard}, {old!r} -> {new!r})")
        return self.frozen_count
