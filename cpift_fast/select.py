"""Core-region selection: the top fraction of elements by |tuned − base|, exact, streamed.

Math. For every element, key = bits(|fp32(tuned) − fp32(base)|) as an unsigned 32-bit integer
(bf16/fp16/fp64 and integer inputs are converted to fp32 first, and the difference is taken in
fp32). Non-negative floats order like their bit patterns, so the top-k by |diff| is the top-k by
key, found by radix select without ever concatenating the diffs:

1. one pass builds the histogram of key >> 16 (32768 bins) over all tensors of a group and finds
   the boundary bucket b that holds the k-th largest key;
2. a second pass histograms key & 0xffff for keys in bucket b: this gives the exact threshold key T
   and how many elements with key == T must be taken;
3. a last pass writes the mask bits: key > T, plus the first elements with key == T in
   (tensor order, flat index) order until exactly k are selected.

A tensor whose largest key lies below bucket b (known from pass 1) is not read again. Every
pass hands runs of consecutive pairs (up to 2M elements; a larger pair alone) to one list-op call, which splits them over the threads as one work list: hundreds of small
tensors cost one parallel pass, not one fixed cost (and one thread) each. Working memory: the
histograms (0.25 + 0.5 MB), one run of pairs and one tensor's mask words, besides the N/8-byte result.

mode="approx" stops after pass 1: the threshold is a bucket edge (whichever edge of bucket b gives
a count closer to k), the mask then holds k ± hist[b] elements; `info.error_bound` is hist[b] and
`info.selected` the exact count.

Contract. k = floor(fraction · N + 1/2) — round half *up*, with fraction taken as the decimal its
repr shows (0.01 · 50 → 1, where Python's banker's round would give 0). Elements with a zero diff
are never selected, so a mask holds fewer than k elements when fewer than k differ
(``info.short_by``, and a warning). NaN/Inf diffs raise naming the tensor; fraction outside
[0, 1] raises; base and tuned must hold the same names, shapes and dtypes (the first mismatch is
named). The result is deterministic and independent of the backend and thread count.

Tensor order (which decides ties and the mask layout): the order of `base` — a module's
``named_parameters()`` (tied weights once, under their first name, as an optimizer sees them),
a dict's insertion order, or the natural name order of a checkpoint (see cpift_fast.io). When
`base` is a checkpoint and `tuned` a module, the module's order is used, so a mask over a model
always matches its ``named_parameters()`` and plugs into MaskedAdamW.

Scope: "global" ranks over all tensors; "per_tensor" takes the top fraction of each tensor;
"per_layer" groups tensors by the first capture group of `layer_pattern` (tensors that do not
match form one group, "other").

Streaming: checkpoint files are read one tensor pair at a time, per pass (the page cache serves
passes 2 and 3 when it can hold the checkpoints), through private maps of each tensor's bytes
(cpift_fast.io). A reader thread runs ahead of the kernels (cpift_fast.readahead): it maps the next
pairs and starts their disk reads (POSIX_FADV_WILLNEED), and converts dtypes the kernels lack to
fp32, while the kernels work on the current pair; at most ``readahead`` bytes of pairs are fetched
and not yet handed to the kernels (default 32 MiB; 0: no thread, pairs are read as the kernels
touch them). Peak memory: the pair being processed, the pages of the pairs fetched ahead, the
N/8-byte mask and the histograms. A shape/name mismatch is found from the headers before any data
is read.

Distributed: with ``group=process_group`` histograms and tie counts are all-reduced, so every rank
gets the exact global threshold and its part of the global mask; ``shard_by`` says what a rank holds:

- ``"slice"`` (default): every rank passes its local slices of every tensor (same names on every
  rank; a name's global flat order is rank 0's slice, then rank 1's, ...), e.g. FSDP shards. The
  result is this rank's slices' bits.
- ``"tensor"``: every rank passes the *same* whole checkpoint (headers identical on every rank,
  checked) and reads only its share of the tensors: ``tensor_shares(names, [bytes of the base
  tensor + bytes of the tuned tensor], world)[rank]`` (cpift_fast.shard); no other tensor of it is
  read, mapped or fetched. The result has the full layout with
  this rank's tensors' bits set and every other tensor's words zero; ``ParamMask.gather(group)``
  (or ``save(path, group=)``) assembles the full mask, which equals the 1-process mask bit for bit
  (ties are taken in (tensor order, flat index) order across ranks: all-gathered tie counts).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import torch

from . import ops
from .io import TensorSource, open_tensors
from .mask import MaskLayout, ParamMask
from .readahead import DEFAULT_BUDGET, ReadAhead, check_budget, runs
from .shard import group_rank_world, tensor_shares

log = logging.getLogger(__name__)

DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)"
_NONFINITE_BIN = 0x7F80  # level-0 bins >= this hold Inf/NaN keys
_ALL = 2**63 - 1         # tie budget meaning "every tie"
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHARD_BY = ("slice", "tensor")
_BATCH_ELEMENTS = 1 << 21  # elements per kernel call (a run of pairs: 8 MB of bf16 pairs; a larger pair alone)


@dataclass
class GroupSelection:
    """What was selected inside one group of tensors (the whole model for scope="global")."""

    name: str
    numel: int
    k: int
    selected: int
    nonzero: int
    threshold: float | None  # |diff| at the threshold key (None when nothing was selected)
    error_bound: int = 0     # approx mode: the boundary bucket's size


@dataclass
class SelectionInfo:
    mode: str
    scope: str
    fraction: float
    numel: int
    k: int
    selected: int
    nonzero: int
    seconds: float
    groups: list[GroupSelection] = field(default_factory=list)

    @property
    def short_by(self) -> int:
        """How many fewer than k were selected because too few elements changed (exact mode)."""
        return sum(max(0, g.k - g.nonzero) for g in self.groups)

    @property
    def error_bound(self) -> int:
        """approx mode: |selected − k| is at most this (0 in exact mode)."""
        return sum(g.error_bound for g in self.groups)

    @property
    def threshold(self) -> float | None:
        """The global threshold |diff| (scope="global"; None otherwise or when nothing was selected)."""
        return self.groups[0].threshold if self.scope == "global" and self.groups else None


class CoreMask(ParamMask):
    """A ParamMask returned by core_region, with `info` (a SelectionInfo) describing the selection."""

    def __init__(self, layout: MaskLayout, words: torch.Tensor, info: SelectionInfo):
        super().__init__(layout, words)
        self.info = info


def round_half_up(fraction: float, n: int) -> int:
    """floor(fraction · n + 1/2), with fraction read as the decimal its repr shows."""
    return int((Decimal(repr(float(fraction))) * n + Decimal("0.5")).to_integral_value(rounding="ROUND_FLOOR"))


def _key_to_float(key: int) -> float:
    return torch.tensor([key], dtype=torch.int32).view(torch.float32).item()


def _boundary(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin b holding the k-th largest key (1 <= k <= hist.sum()) and the count in bins above b."""
    h = hist.numpy()
    from_top = np.cumsum(h[::-1])
    j = int(np.searchsorted(from_top, k, side="left"))
    b = h.size - 1 - j
    return b, int(from_top[j]) - int(h[b])


def _order(base: TensorSource, tuned: TensorSource, tuned_leads: bool) -> tuple[str, ...]:
    """The canonical tensor order (base's, or tuned's when `tuned_leads`); raises on the first mismatch."""
    sides = {"base": base, "tuned": tuned}
    lead, other = ("tuned", "base") if tuned_leads else ("base", "tuned")
    for name in sides[lead].names:
        if name not in sides[other]:
            raise ValueError(f"core_region: tensor {name!r} is in {lead} ({sides[lead].description}) but not in "
                             f"{other} ({sides[other].description})")
    if len(sides[other]) != len(sides[lead]):
        extra = next(n for n in sides[other].names if n not in sides[lead])
        raise ValueError(f"core_region: tensor {extra!r} is in {other} ({sides[other].description}) but not in "
                         f"{lead} ({sides[lead].description})")
    for name in sides[lead].names:
        if base.shape(name) != tuned.shape(name):
            raise ValueError(f"core_region: tensor {name!r} has shape {list(base.shape(name))} in base but "
                             f"{list(tuned.shape(name))} in tuned")
        if base.dtype(name) != tuned.dtype(name):
            raise ValueError(f"core_region: tensor {name!r} is {base.dtype(name)} in base but {tuned.dtype(name)} in tuned")
        if base.dtype(name).is_complex:
            raise TypeError(f"core_region: tensor {name!r} is {base.dtype(name)}; complex tensors are not supported "
                            f"(select on torch.view_as_real of them to rank real and imaginary parts)")
    return sides[lead].names


def _groups(names: tuple[str, ...], scope: str, layer_pattern: str) -> list[tuple[str, list[int]]]:
    if scope == "global":
        return [("global", list(range(len(names))))]
    if scope == "per_tensor":
        return [(n, [i]) for i, n in enumerate(names)]
    pattern = re.compile(layer_pattern)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        m = pattern.search(name)
        key = (m.group(1) if m.groups() else m.group(0)) if m else "other"
        groups.setdefault(key, []).append(i)
    return list(groups.items())


class _Pairs:
    """Fetches (base, tuned) pairs as fp32/fp16/bf16 tensors on `device`; caches one pair; streams
    runs of pairs, read ahead within `readahead` bytes when a side is read from files."""

    def __init__(self, base: TensorSource, tuned: TensorSource, device: torch.device, readahead: int):
        self.base, self.tuned, self.device = base, tuned, device
        self.readahead = readahead if (base.is_streamed or tuned.is_streamed) else 0
        self._cached: tuple[str, torch.Tensor, torch.Tensor] | None = None
        # Pairs the caller holds in memory, used as they are (kernel dtype, on `device`): the caller's
        # own tensors, no copies, so they are kept for the later passes at no memory cost.
        self._as_given: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._in_memory = not (base.is_streamed or tuned.is_streamed)

    def _read(self, name: str, ahead: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair on the CPU (or where the sources hold it) in a kernel dtype; `ahead`: start the
        reads of mapped bytes now (TensorSource.prefetch)."""
        if ahead:
            a, b = self.base.prefetch(name), self.tuned.prefetch(name)
        else:
            a, b = self.base.get(name), self.tuned.get(name)
        if a.dtype not in _FAST_DTYPES:
            a, b = a.to(torch.float32), b.to(torch.float32)
        return a, b

    def nbytes(self, name: str) -> int:
        """Bytes _read(name) brings in: both tensors, plus their fp32 copies when converted."""
        extra = 0 if self.base.dtype(name) in _FAST_DTYPES else 2 * 4 * self.base.numel(name)
        return self.base.nbytes(name) + self.tuned.nbytes(name) + extra

    def get(self, name: str, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._as_given.get(name)
        if pair is not None:
            return pair
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1], self._cached[2]
        self._cached = None
        a, b = self._read(name)
        pair = a.to(self.device), b.to(self.device)
        if self._in_memory and pair[0] is a and pair[1] is b and self.base.dtype(name) in _FAST_DTYPES:
            self._as_given[name] = pair  # the caller's own tensors: neither converted nor moved
        elif keep:
            self._cached = (name, *pair)
        return pair

    def hold(self, name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep this pair (on `device`) for the next get(name)."""
        a, b = a.to(self.device), b.to(self.device)
        self._cached = (name, a, b)
        return a, b

    def stream(self, names: list[str], keep: bool = False) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, base, tuned) for `names` in order, as get(name, keep) gives them; pairs from files
        are fetched ahead on a reader thread (cpift_fast.readahead), at most `readahead` bytes ahead."""
        if not self.readahead or len(names) < 2:
            for name in names:
                yield name, *self.get(name, keep)
            return
        with ReadAhead(names, lambda n: self._read(n, ahead=True), self.nbytes, self.readahead,
                       describe=self.describe) as ahead:
            for name, (a, b) in ahead:
                yield name, a.to(self.device), b.to(self.device)

    def describe(self, name: str) -> str:
        return f"tensor {name!r} of base ({self.base.description}) and tuned ({self.tuned.description})"


def _batches(pairs: Iterator[tuple[str, torch.Tensor, torch.Tensor]]) -> Iterator[list]:
    """Runs of consecutive (name, base, tuned) pairs, up to _BATCH_ELEMENTS elements each."""
    return runs(pairs, lambda pair: pair[1].numel(), _BATCH_ELEMENTS)


def _store(words: torch.Tensor, pieces: list[tuple[int, int]], w: torch.Tensor) -> None:
    """Copies select_mask's words `w` into `words`: `pieces` holds (offset in `words`, word count) per
    tensor of the call, in the order of `w`. Tensors adjacent in `words` are copied as one slice; on
    CPU through numpy (a plain memcpy: a torch copy of a large slice would open a parallel region)."""
    cpu = words.device.type == "cpu" and w.device.type == "cpu"
    dst, src = (words.numpy(), w.numpy()) if cpu else (words, w.to(words.device))
    start = 0
    run_offset, run_words = None, 0
    for offset, nwords in [*pieces, (None, 0)]:
        if run_offset is not None and offset == run_offset + run_words:
            run_words += nwords
            continue
        if run_offset is not None:
            dst[run_offset:run_offset + run_words] = src[start:start + run_words]
            start += run_words
        run_offset, run_words = offset, nwords


def _count_per_tensor(words: torch.Tensor, layout: MaskLayout) -> torch.Tensor:
    """Bits set per tensor (int64[T])."""
    return ops.mask_popcount(words, layout.offsets_tensor(words.device)).cpu()


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


def core_region(base: Any, tuned: Any, fraction: float = 0.01, *, mode: str = "exact", scope: str = "global",
                layer_pattern: str = DEFAULT_LAYER_PATTERN, group=None, shard_by: str = "slice",
                progress: bool = True, device: torch.device | str | None = None,
                readahead: int | str = DEFAULT_BUDGET) -> CoreMask:
    """The elements with the largest |tuned − base|: exactly round_half_up(fraction · N) of them.

    base, tuned: an nn.Module, a {name: tensor} dict, (name, tensor) pairs, a .safetensors file or a
    checkpoint directory (streamed). mode: "exact" | "approx". scope: "global" | "per_tensor" |
    "per_layer". group: a torch.distributed process group; shard_by: "slice" (each rank passes its
    slices of every tensor) or "tensor" (each rank passes the whole checkpoint and reads only its
    share of the tensors; gather the result with ParamMask.gather) — see the module doc.
    progress: a tqdm bar over tensors. device: where the kernels run (default: base's first tensor's
    device; checkpoints: CPU). readahead: bytes of checkpoint data read ahead of the kernels (int or
    '64MB'; 0: no reader thread). Returns a CoreMask (a ParamMask with `.info`); see the module doc
    for the full contract.
    """
    start = time.perf_counter()
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"core_region: fraction must be a number in [0, 1], got {fraction!r}")
    if mode not in ("exact", "approx"):
        raise ValueError(f"core_region: mode must be 'exact' or 'approx', got {mode!r}")
    if scope not in ("global", "per_tensor", "per_layer"):
        raise ValueError(f"core_region: scope must be 'global', 'per_tensor' or 'per_layer', got {scope!r}")
    if shard_by not in SHARD_BY:
        raise ValueError(f"core_region: shard_by must be 'slice' or 'tensor', got {shard_by!r}")
    readahead = check_budget(readahead, "core_region: readahead")
    src_b, src_t = open_tensors(base, "base"), open_tensors(tuned, "tuned")
    try:
        tuned_leads = isinstance(tuned, torch.nn.Module) and not isinstance(base, torch.nn.Module)
        names = _order(src_b, src_t, tuned_leads)
        layout = MaskLayout(names, tuple(src_b.shape(n) for n in names))
        owned = None  # the names this rank reads (None: all)
        if group is not None and shard_by == "tensor":
            _check_same_layout(layout, src_b, group)
            rank, world = group_rank_world(group)
            owned = set(tensor_shares(names, [src_b.nbytes(n) + src_t.nbytes(n) for n in names], world)[rank])
        if device is None:
            first = next((n for n in names if owned is None or n in owned), None)
            in_memory = first is not None and not src_b.is_streamed
            device = src_b.get(first).device if in_memory else torch.device("cpu")
        device = torch.device(device)
        words = torch.zeros(layout.num_words, dtype=torch.int32, device=device)
        pairs = _Pairs(src_b, src_t, device, readahead)
        passes = 3 if mode == "exact" else 2
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names) * passes, desc="core region", unit="tensor", disable=not progress, leave=False)
        groups = []
        members_of = _groups(names, scope, layer_pattern)
        try:
            if scope == "per_tensor" and owned is None:  # one pair per group, held across its passes: read ahead
                for (gname, (i,)), (name, a, b) in zip(members_of, pairs.stream(list(names))):
                    pairs.hold(name, a, b)
                    groups.append(_select_group(gname, [name], [layout.offsets[i]], pairs, words, fraction, mode,
                                                group, bar))
            else:
                for gname, members in members_of:
                    groups.append(_select_group(gname, [names[i] for i in members],
                                                [layout.offsets[i] for i in members], pairs, words, fraction, mode,
                                                group, bar, owned))
        finally:
            bar.close()
    finally:
        src_b.close()
        src_t.close()
    per_tensor = _count_per_tensor(words, layout)
    selected = torch.tensor([int(per_tensor[members].sum()) if members else 0 for _, members in members_of])
    _all_reduce(selected, group)
    for g, count in zip(groups, selected.tolist()):
        g.selected = count
    info = SelectionInfo(mode=mode, scope=scope, fraction=float(fraction), numel=sum(g.numel for g in groups),
                         k=sum(g.k for g in groups), selected=sum(g.selected for g in groups),
                         nonzero=sum(g.nonzero for g in groups), seconds=time.perf_counter() - start, groups=groups)
    if mode == "exact" and info.short_by:
        msg = (f"core_region: only {info.nonzero} of {info.numel} elements changed; the mask holds "
               f"{info.selected} < k = {info.k} elements (zero diffs are never selected)")
        warnings.warn(msg, stacklevel=2)
    log.info("core_region %s/%s: k=%d selected=%d in %.2fs", mode, scope, info.k, info.selected, info.seconds)
    return CoreMask(layout, words, info)


def _check_same_layout(layout: MaskLayout, src: TensorSource, group) -> None:
    """shard_by="tensor": every rank must see the same checkpoint (names, shapes, dtypes)."""
    import hashlib

    import torch.distributed as dist

    text = layout.to_json() + "|" + ",".join(str(src.dtype(n)) for n in layout.names)
    mine = hashlib.sha256(text.encode()).hexdigest()
    rank, world = group_rank_world(group)
    seen: list = [None] * world
    dist.all_gather_object(seen, mine, group=group)
    other = next((r for r, h in enumerate(seen) if h != seen[0]), None)
    if other is not None:
        raise ValueError(f"core_region(shard_by='tensor'): rank {other} sees other tensors (names, shapes or dtypes) "
                         f"than rank 0 in {src.description}: every rank must pass the same whole checkpoint "
                         f"(use shard_by='slice' for per-rank slices)")


def _select_group(gname: str, names: list[str], offsets: list[int], pairs: _Pairs, words: torch.Tensor,
                  fraction: float, mode: str, group, bar, owned: set[str] | None = None) -> GroupSelection:
    """One group's exact (or approx) top-k. `owned`: shard_by="tensor", the names this rank reads
    (the others count in N but are read by their owners); None: every name (slices under a group)."""
    numel = sum(pairs.base.numel(n) for n in names)
    if group is not None and owned is None:
        numel = int(_all_reduce(torch.tensor([numel], dtype=torch.int64), group).item())
    all_names, all_offsets = names, offsets  # tie counts are exchanged over every name of the group
    if owned is not None:
        keep = [i for i, n in enumerate(names) if n in owned]
        bar.update((3 if mode == "exact" else 2) * (len(names) - len(keep)))  # the other ranks' tensors
        names, offsets = [names[i] for i in keep], [offsets[i] for i in keep]
    single = len(names) == 1  # keep the one pair in memory across the passes
    k = round_half_up(fraction, numel)

    # pass 1: histogram of key >> 16, and the Inf/NaN check
    bar.set_description("core region: histogram")
    # Histograms are summed in numpy: tiny single-threaded adds, no intra-op thread wake-ups.
    hist = np.zeros(ops.SELECT_BINS[0], dtype=np.int64)
    bad: tuple[str, int] | None = None
    top_bin = []  # highest nonempty level-0 bin of each tensor: tensors below the threshold are skipped later
    for batch in _batches(pairs.stream(names, keep=single)):
        h, tops = ops.select_histogram([a for _, a, _ in batch], [b for _, _, b in batch], 0, 0)
        hist += h.cpu().numpy()
        tops = tops.tolist()
        top_bin += tops
        for (name, a, b), top in zip(batch, tops):
            if top >= _NONFINITE_BIN and bad is None:  # count them, to name the tensor and the count
                bad = (name, int(ops.select_histogram([a], [b], 0, 0)[0][_NONFINITE_BIN:].sum()))
        bar.update(len(batch))
    hist = torch.from_numpy(hist)
    if group is not None:
        _all_reduce(hist, group)
        flag = _all_reduce(torch.tensor([1 if bad else 0]), group)
        if flag.item() and bad is None:
            raise ValueError("core_region: a diff on another rank is Inf/NaN (that rank names the tensor)")
    if bad is not None:
        raise ValueError(f"core_region: |tuned − base| of tensor {bad[0]!r} has {bad[1]} Inf/NaN elements")
    nonzero = int(hist.sum())

    error_bound = 0
    refined = False
    if k == 0 or nonzero == 0:
        threshold, budget = None, 0
    elif k >= nonzero:
        threshold, budget = 1, _ALL  # every nonzero diff
    else:
        b0, above = _boundary(hist, k)
        if mode == "approx":
            error_bound = int(hist[b0])
            with_bucket = above + error_bound
            threshold = max(1, b0 << 16) if with_bucket - k <= k - above else (b0 + 1) << 16
            budget = _ALL
        else:
            bar.set_description("core region: refine")
            hist1 = np.zeros(ops.SELECT_BINS[1], dtype=np.int64)
            reach = [name for name, top in zip(names, top_bin) if top >= b0]
            for batch in _batches(pairs.stream(reach, keep=single)):
                hist1 += ops.select_histogram([a for _, a, _ in batch], [b for _, _, b in batch], 1, b0)[0].cpu().numpy()
                bar.update(len(batch))
            bar.update(len(names) - len(reach))
            hist1 = _all_reduce(torch.from_numpy(hist1), group)
            refined = True
            b1, above1 = _boundary(hist1, k - above)
            threshold, budget = (b0 << 16) | b1, k - above - above1
    if mode == "exact" and not refined:
        bar.update(len(names))  # no refine pass

    # last pass: mask bits
    bar.set_description("core region: mask")
    if threshold is not None:
        distributed_ties = group is not None and budget != _ALL
        offset_of = dict(zip(names, offsets))
        ties = dict.fromkeys(names, 0)
        left = budget
        reach = [name for name, top in zip(names, top_bin) if top >= threshold >> 16]  # else the words stay zero
        for batch in _batches(pairs.stream(reach, keep=single)):
            w, n_eq = ops.select_mask([a for _, a, _ in batch], [b for _, _, b in batch], threshold,
                                      0 if distributed_ties else left)
            _store(words, [(offset_of[name], (a.numel() + 31) // 32) for name, a, _ in batch], w)
            for (name, _, _), eq in zip(batch, n_eq.tolist()):
                ties[name] = eq
                left -= min(left, eq)
            bar.update(len(batch))
        bar.update(len(names) - len(reach))
        counts = [ties.get(name, 0) for name in all_names]  # 0 for the other ranks' tensors
        if distributed_ties:
            _distribute_ties(all_names, all_offsets, pairs, words, threshold, budget, counts, group)
    else:
        bar.update(len(names))
    return GroupSelection(name=gname, numel=numel, k=k, selected=0, nonzero=nonzero,  # selected: set by the caller
                          threshold=_key_to_float(threshold) if threshold is not None else None,
                          error_bound=error_bound)


def _distribute_ties(names, offsets, pairs: _Pairs, words, threshold, budget, counts, group) -> None:
    """Give the tie budget out in (tensor, rank, flat index) order and rewrite the tensors that take ties."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = torch.tensor(counts, dtype=torch.int64)
    table = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(table, local, group=group)
    per_rank = torch.stack(table)  # [world, tensors]
    left = budget
    for t, (name, off) in enumerate(zip(names, offsets)):
        for r in range(world):
            take = min(left, int(per_rank[r, t]))
            left -= take
            if r == rank and take:
                a, b = pairs.get(name)
                w, _ = ops.select_mask([a], [b], threshold, take)
                _store(words, [(off, w.numel())], w)


# ---------------------------------------------------------------------------------------------
# where the core lies: per-layer breakdown and plot (used by `cpift core`)
# ---------------------------------------------------------------------------------------------

def layer_breakdown(mask: ParamMask, layer_pattern: str = DEFAULT_LAYER_PATTERN) -> list[tuple[str, int, int]]:
    """(layer, elements, core elements) per layer in mask order; unmatched tensors form "other"."""
    pattern = re.compile(layer_pattern)
    rows: dict[str, list[int]] = {}
    for name, numel, count in zip(mask.names, mask.layout.numels, mask.count_per_tensor().values()):
        m = pattern.search(name)
        layer = (m.group(1) if m.groups() else m.group(0)) if m else "other"
        row = rows.setdefault(layer, [0, 0])
        row[0] += numel
        row[1] += count
    return [(layer, n, c) for layer, (n, c) in rows.items()]


def plot_core_share(rows: list[tuple[str, int, int]], path: str, title: str = "core region per layer") -> None:
    """Bar chart: share of the core in each layer, and each layer's core density; saved atomically."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = sum(c for _, _, c in rows) or 1
    labels = [layer for layer, _, _ in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [100 * c / total for _, _, c in rows], color="tab:blue", label="share of the core (%)")
    ax2 = ax.twinx()
    ax2.plot(range(len(rows)), [100 * c / n if n else 0 for _, n, c in rows], "o-", color="tab:red",
             label="layer density (%)")
    ax.set_xticks(range(len(rows)), labels, rotation=90 if len(rows) > 20 else 0)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the core (%)")
    ax2.set_ylabel("core elements / layer elements (%)")
    ax.set_title(title)
    fig.legend(loc="upper right")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
