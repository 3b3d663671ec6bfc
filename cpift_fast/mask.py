"""ParamMask: one bit per element of a named set of tensors, bit-packed.

Storage: one contiguous int32 buffer ``words``. Tensor t owns words
``[offsets[t], offsets[t] + ceil(numel_t / 32))``; bit i of tensor t (flat, row-major) is bit
``i % 32`` of word ``offsets[t] + i // 32`` (little-endian within a word). Padding bits past the
end of a tensor are always zero, so ``count()`` is a plain popcount. A 10^9-element mask is 125 MB.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from . import ops

FORMAT = "cpift_fast.ParamMask"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class MaskLayout:
    """Names and shapes of the tensors a mask covers, in order; fixes every word offset."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        if len(self.names) != len(self.shapes):
            raise ValueError(f"MaskLayout: {len(self.names)} names but {len(self.shapes)} shapes")
        if len(set(self.names)) != len(self.names):
            seen = set()
            dup = next(n for n in self.names if n in seen or seen.add(n))
            raise ValueError(f"MaskLayout: tensor name {dup!r} appears twice")

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | torch.nn.Module):
        """Layout of a module's parameters, a {name: tensor} dict or (name, tensor) pairs."""
        items = named_tensors(tensors)
        return cls(tuple(n for n, _ in items), tuple(tuple(t.shape) for _, t in items))

    @cached_property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Word offset of each tensor, plus the total word count at the end (T + 1 entries)."""
        out = [0]
        for n in self.numels:
            out.append(out[-1] + (n + 31) // 32)
        return tuple(out)

    @cached_property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @property
    def num_words(self) -> int:
        return self.offsets[-1]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def offsets_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.offsets, dtype=torch.int64, device=device)

    def difference(self, other: MaskLayout, mine: str = "the first", theirs: str = "the second") -> str | None:
        """None if equal, else a sentence naming the first difference (`mine`/`theirs` label the two)."""
        for i, (a, b) in enumerate(zip(self.names, other.names)):
            if a != b:
                return f"tensor #{i} is {a!r} in {mine} but {b!r} in {theirs}"
            if self.shapes[i] != other.shapes[i]:
                return (f"tensor {a!r} has shape {list(self.shapes[i])} in {mine} but "
                        f"{list(other.shapes[i])} in {theirs}")
        if len(self.names) != len(other.names):
            longer = self if len(self.names) > len(other.names) else other
            name = longer.names[min(len(self.names), len(other.names))]
            return (f"{mine} has {len(self.names)} tensors, {theirs} {len(other.names)} "
                    f"(first extra: {name!r})")
        return None

    def check_same(self, other: MaskLayout, mine: str = "the first", theirs: str = "the second") -> None:
        diff = self.difference(other, mine, theirs)
        if diff is not None:
            raise ValueError(f"mask layouts differ: {diff}")

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "shapes": [list(s) for s in self.shapes]})

    @classmethod
    def from_json(cls, text: str) -> MaskLayout:
        data = json.loads(text)
        return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]))


def named_tensors(tensors) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from a module (its parameters), a mapping, or an iterable of pairs."""
    if isinstance(tensors, torch.nn.Module):
        return list(tensors.named_parameters())
    if isinstance(tensors, Mapping):
        return list(tensors.items())
    items = list(tensors)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"expected (name, tensor) pairs, a dict or an nn.Module; got an item {type(item).__name__}")
    return items


class ParamMask:
    """A boolean per element of a named set of tensors, stored at 1 bit per element.

    Combine masks with ``|`` (union), ``&`` (intersection), ``-`` (difference), ``~`` (complement
    within the layout); all require the same layout. ``count()``, ``to_bool()``, ``save()``/``load()``.
    """

    __hash__ = None  # mutable buffer, value equality

    def __init__(self, layout: MaskLayout, words: torch.Tensor):
        if words.dtype != torch.int32 or words.dim() != 1:
            raise ValueError(f"ParamMask words must be a 1-D int32 tensor, got {words.dtype} of shape {list(words.shape)}")
        if words.numel() != layout.num_words:
            raise ValueError(f"ParamMask words hold {words.numel()} words, the layout needs {layout.num_words}")
        self.layout = layout
        self.words = words.contiguous()

    # ----- construction ------------------------------------------------------------------------

    @classmethod
    def zeros(cls, layout: MaskLayout, device: torch.device | str = "cpu") -> ParamMask:
        return cls(layout, torch.zeros(layout.num_words, dtype=torch.int32, device=device))

    @classmethod
    def zeros_like(cls, tensors, device: torch.device | str | None = None) -> ParamMask:
        """Empty mask over a module's parameters, a {name: tensor} dict or (name, tensor) pairs."""
        items = named_tensors(tensors)
        if device is None:
            device = items[0][1].device if items else "cpu"
        return cls.zeros(MaskLayout.of(items), device=device)

    @classmethod
    def ones(cls, layout: MaskLayout, device: torch.device | str = "cpu") -> ParamMask:
        return ~cls.zeros(layout, device)

    @classmethod
    def from_bool(cls, bools: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  device: torch.device | str | None = None) -> ParamMask:
        """Pack {name: bool tensor} (any shape, any strides) in the given order."""
        items = named_tensors(bools)
        for name, t in items:
            if t.dtype != torch.bool:
                raise TypeError(f"ParamMask.from_bool: tensor {name!r} must be bool, got {t.dtype}")
        layout = MaskLayout.of(items)
        if device is None:
            device = items[0][1].device if items else "cpu"
        words = torch.empty(layout.num_words, dtype=torch.int32, device=device)
        for (name, t), start, end in zip(items, layout.offsets[:-1], layout.offsets[1:]):
            words[start:end] = ops.mask_pack(t.to(device).reshape(-1))
        return cls(layout, words)

    # ----- views -------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.layout.shapes

    @property
    def offsets(self) -> tuple[int, ...]:
        return self.layout.offsets

    @property
    def device(self) -> torch.device:
        return self.words.device

    def _index(self, name: str) -> int:
        try:
            return self.layout.index[name]
        except KeyError:
            raise KeyError(f"ParamMask has no tensor named {name!r} (it has {len(self.names)} tensors, "
                           f"e.g. {list(self.names[:3])})") from None

    def tensor_words(self, name: str) -> torch.Tensor:
        """The words of one tensor: a view into ``words`` (writes go through)."""
        i = self._index(name)
        return self.words[self.layout.offsets[i]:self.layout.offsets[i + 1]]

    def tensor_bits(self, name: str) -> torch.Tensor:
        """One tensor's bits as a bool tensor of its shape (a copy)."""
        i = self._index(name)
        return ops.mask_unpack(self.tensor_words(name), self.layout.numels[i]).view(self.layout.shapes[i])

    def to_bool(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor_bits(name) for name in self.names}

    def count_per_tensor(self) -> dict[str, int]:
        counts = ops.mask_popcount(self.words, self.layout.offsets_tensor(self.device)).tolist()
        return dict(zip(self.names, counts))

    def count(self) -> int:
        return int(ops.mask_popcount(self.words, torch.tensor([0, self.layout.num_words], device=self.device))[0])

    @property
    def numel(self) -> int:
        return self.layout.numel

    def to(self, device: torch.device | str) -> ParamMask:
        return ParamMask(self.layout, self.words.to(device))

    def clone(self) -> ParamMask:
        return ParamMask(self.layout, self.words.clone())

    # ----- set algebra -------------------------------------------------------------------------

    def _binary(self, other: ParamMask, op: int, symbol: str) -> ParamMask:
        if not isinstance(other, ParamMask):
            return NotImplemented
        self.layout.check_same(other.layout, f"the left operand of {symbol}", "the right one")
        if other.device != self.device:
            raise ValueError(f"ParamMask {symbol}: masks on {self.device} and {other.device}")
        return ParamMask(self.layout, ops.mask_binary(self.words, other.words, op))

    def __or__(self, other: ParamMask) -> ParamMask:
        return self._binary(other, ops.MASK_OR, "|")

    def __and__(self, other: ParamMask) -> ParamMask:
        return self._binary(other, ops.MASK_AND, "&")

    def __sub__(self, other: ParamMask) -> ParamMask:
        return self._binary(other, ops.MASK_ANDNOT, "-")

    def __xor__(self, other: ParamMask) -> ParamMask:
        return self._binary(other, ops.MASK_XOR, "^")

    def __invert__(self) -> ParamMask:
        return _full(self.layout, self.device) - self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamMask):
            return NotImplemented
        return self.layout == other.layout and torch.equal(self.words, other.words.to(self.device))

    def __repr__(self) -> str:
        return (f"ParamMask({self.count()}/{self.numel} set over {len(self.names)} tensors, "
                f"{self.words.numel() * 4} bytes, device={self.device})")

    # ----- across processes ---------------------------------------------------------------------

    def gather(self, group, dst: int | None = 0) -> ParamMask | None:
        """The union of every rank's mask in `group` (a torch.distributed process group; collective).

        Made for sharded selection (``core_region(..., group=, shard_by="tensor")``): each rank's mask
        has the full layout and bits only in the tensors it owns, so the union is the full mask.
        Every rank must hold the same layout (checked: a ValueError on every rank names the first
        difference). ``dst=0`` (default): the full mask on rank 0, None on the others; ``dst=None``:
        on every rank. The words travel as one bitwise-OR reduction (CPU int32; a CUDA mask is
        moved to the CPU for it and the result moved back). A CoreMask keeps its ``info``.
        """
        import torch.distributed as dist

        group = group if group is not None else dist.group.WORLD
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        layouts: list = [None] * world
        dist.all_gather_object(layouts, self.layout, group=group)
        for r, other in enumerate(layouts):
            diff = layouts[0].difference(other, "rank 0's mask", f"rank {r}'s mask")
            if diff is not None:
                raise ValueError(f"ParamMask.gather: mask layouts differ across ranks: {diff}")
        words = self.words.to("cpu", copy=True)
        if dst is None:
            dist.all_reduce(words, op=dist.ReduceOp.BOR, group=group)
        else:
            dist.reduce(words, dst=dist.get_global_rank(group, dst), op=dist.ReduceOp.BOR, group=group)
            if rank != dst:
                return None
        out = copy.copy(self)  # keeps the subclass and its attributes (CoreMask.info)
        out.words = words.to(self.device)
        return out

    # ----- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, group=None) -> None:
        """Write a safetensors file (words + layout in the metadata); atomic (temp + rename).

        With ``group`` (collective): the union of every rank's mask (``gather``) is written by rank 0
        alone, one file; every rank returns once the file is in place, or raises rank 0's error."""
        if group is not None:
            from .shard import on_rank0

            full = self.gather(group, dst=0)
            on_rank0(group, lambda: full.save(path))
            return
        from safetensors.torch import save_file

        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".mask", dir=directory)
        os.close(fd)
        try:
            save_file({"words": self.words.cpu()}, tmp,
                      metadata={"format": FORMAT, "version": FORMAT_VERSION, "layout": self.layout.to_json()})
            from .io import honour_umask

            honour_umask(tmp)  # mkstemp made it 0600
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, layout: MaskLayout | None = None,
             device: torch.device | str = "cpu") -> ParamMask:
        """Read a mask written by save(); with `layout`, a different stored layout is an error.
        Every defect of the file (truncated, not a mask, bad layout, word count, set padding bits)
        raises an error naming the file (and the tensor)."""
        from .io import SafetensorsFile

        path = os.fspath(path)
        with SafetensorsFile(path) as f:
            meta = f.metadata
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a ParamMask file (metadata format={meta.get('format')!r})")
            try:
                stored = MaskLayout.from_json(meta["layout"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"mask file {path}: invalid layout in the metadata ({exc})") from None
            if f.names != ["words"]:
                raise ValueError(f"mask file {path}: expected one tensor 'words', found {f.names}")
            words = f.read("words")
        if words.dtype != torch.int32 or words.dim() != 1 or words.numel() != stored.num_words:
            raise ValueError(f"mask file {path}: 'words' is {words.dtype} of shape {list(words.shape)}; its layout "
                             f"needs int32 of shape [{stored.num_words}]")
        tails = [(i, end - 1, numel % 32) for i, (numel, end) in enumerate(zip(stored.numels, stored.offsets[1:]))
                 if numel % 32]
        if tails:
            last = words[torch.tensor([w for _, w, _ in tails], dtype=torch.int64)]
            keep = torch.tensor([(1 << b) - 1 for _, _, b in tails], dtype=torch.int64).to(torch.int32)
            bad = (last & ~keep).nonzero().flatten()
            if bad.numel():
                i, _, bits = tails[int(bad[0])]
                raise ValueError(f"mask file {path}: tensor {stored.names[i]!r} ({stored.numels[i]} elements) has "
                                 f"bits set past its end (padding bits {bits}..31 of its last word); "
                                 f"the file is corrupt")
        if layout is not None:
            diff = layout.difference(stored, "the expected layout", "the file")
            if diff is not None:
                raise ValueError(f"mask file {path} does not match the expected layout: {diff}")
        return cls(stored, words.to(device))


def _full(layout: MaskLayout, device: torch.device) -> ParamMask:
    """Every element set, padding clear."""
    words = torch.full((layout.num_words,), -1, dtype=torch.int32, device=device)
    tails = [(end - 1, numel % 32) for numel, end in zip(layout.numels, layout.offsets[1:]) if numel % 32]
    if tails:
        index = torch.tensor([i for i, _ in tails], dtype=torch.int64)
        value = torch.tensor([(1 << bits) - 1 for _, bits in tails], dtype=torch.int32)
        words[index.to(device)] = value.to(device)
    return ParamMask(layout, words)
