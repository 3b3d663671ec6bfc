"""The run-time freeze check: frozen elements must be bit-identical to their values when frozen.

``FreezeGuard(model, mask)`` records, for every parameter, the values of the elements the mask
marks as frozen (a copy of only those elements). ``check()`` compares them bit for bit (the raw
bytes, so -0.0 vs 0.0 and NaN payloads count as changes) and raises ``FrozenDriftError`` naming
the tensor, the number of drifted elements and the first one. The pipeline calls it after every
training stage; it is a property of the run, not only of the tests.
"""

from __future__ import annotations

import torch

from ..mask import ParamMask

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class FrozenDriftError(RuntimeError):
    """A frozen parameter element changed during training."""


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()])


class FreezeGuard:
    """Snapshot of the frozen elements of `model` under `mask` (None or empty: nothing to check)."""

    def __init__(self, model: torch.nn.Module, mask: ParamMask | None, what: str = "stage"):
        self.what = what
        self.mask = mask
        self.snapshot: dict[str, torch.Tensor] = {}  # name -> raw bits of its frozen elements
        if mask is None or mask.count() == 0:
            return
        params = dict(model.named_parameters())
        counts = mask.count_per_tensor()
        missing = [n for n in mask.names if n not in params and counts[n]]
        if missing:
            raise ValueError(f"{what}: frozen mask names tensor {missing[0]!r}, which the model does not have")
        for name in mask.names:
            if name not in params:
                continue  # a checkpoint tensor that is not a parameter, with nothing frozen in it
            if counts[name]:  # kept on the CPU: the trainer may move the model to another device
                p = params[name].detach()
                self.snapshot[name] = _bits(p[mask.tensor_bits(name).to(p.device)]).cpu().clone()

    @property
    def frozen_count(self) -> int:
        return sum(int(v.numel()) for v in self.snapshot.values())

    def check(self, model: torch.nn.Module) -> int:
        """Raise FrozenDriftError if any frozen element differs; return how many were checked."""
        params = dict(model.named_parameters())
        for name, saved in self.snapshot.items():
            p = params[name].detach()
            bits = self.mask.tensor_bits(name)  # unpacked one tensor at a time: 1 bit/element at rest
            now = _bits(p[bits.to(p.device)]).cpu()
            if not torch.equal(now, saved):
                bad = (now != saved).nonzero().flatten()
                flat = bits.flatten().nonzero().flatten()[bad[0]].item()
                old = saved[bad[0]].view(p.dtype).item()
                new = now[bad[0]].view(p.dtype).item()
                raise FrozenDriftError(
                    f"{self.what}: {bad.numel()} frozen element(s) of {name!r} changed during training "
                    f"(first: flat index {flat}, {old!r} -> {new!r})")
        return self.frozen_count
