"""Which rank owns which tensor: the split of a checkpoint's tensors over the ranks of a process group.

Sharded selection (cpift_fast.select, ``shard_by="tensor"``) and sharded fusion (cpift_fast.fuse,
``group=``) give every tensor to exactly one rank; that rank alone reads it, computes on it and
writes its result. The split is ``tensor_shares``:

Contract. ``tensor_shares(names, sizes, world)`` returns ``world`` lists (rank 0's first); every
name is in exactly one list, and each list keeps the order of ``names`` (so a rank streams its
tensors in checkpoint order). The split is greedy "largest first" (LPT): tensors are taken by
size, largest first — equal sizes in the order of ``names`` (a stable sort) — and each goes to the
rank with the smallest total so far (the lowest rank among equals). It depends only on
(names, sizes, world), never on timing or the process, so every rank computes the same split from
the checkpoint headers without communicating. Balance: the largest total exceeds the ideal
``sum(sizes) / world`` by at most the largest single size (the greedy bound: the rank that received
the last tensor of the heaviest rank had the smallest total, at most the ideal, before it), and for LPT it is at most
4/3 − 1/(3·world) times the optimum. ``sizes`` are any non-negative integers: bytes read (what
selection and fusion use) or elements. A rank may own nothing when there are fewer tensors than
ranks. Bad input raises ``ShardError`` naming the value.
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Sequence


class ShardError(ValueError):
    """Bad input to the tensor split (world size, names, sizes); the message names the value."""


def tensor_shares(names: Sequence[str], sizes: Sequence[int], world: int) -> list[list[str]]:
    """The tensors of each rank: ``world`` lists of names, balanced by `sizes` (see the module doc)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ShardError(f"tensor_shares: world must be an integer >= 1 (the number of ranks), got {world!r}")
    names, sizes = list(names), list(sizes)
    if len(names) != len(sizes):
        raise ShardError(f"tensor_shares: {len(names)} names but {len(sizes)} sizes")
    seen: set[str] = set()
    for name, size in zip(names, sizes):
        if not isinstance(name, str):
            raise ShardError(f"tensor_shares: tensor names must be strings, got {name!r}")
        if name in seen:
            raise ShardError(f"tensor_shares: tensor {name!r} appears twice")
        seen.add(name)
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ShardError(f"tensor_shares: tensor {name!r} has size {size!r}; sizes must be integers >= 0")
    sizes = [int(size) for size in sizes]  # numpy integers too
    owner = [0] * len(names)
    loads = [(0, r) for r in range(world)]  # (total so far, rank): the heap's top is the lightest, lowest rank
    for i in sorted(range(len(names)), key=lambda i: -sizes[i]):  # stable: equal sizes in name order
        total, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (total + sizes[i], rank))
    shares: list[list[str]] = [[] for _ in range(world)]
    for i, name in enumerate(names):
        shares[owner[i]].append(name)
    return shares


def owners(shares: Sequence[Sequence[str]]) -> dict[str, int]:
    """{name: rank} of a split returned by ``tensor_shares``."""
    return {name: rank for rank, share in enumerate(shares) for name in share}


def group_rank_world(group) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (a torch.distributed process group); (0, 1)
    for None."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def on_rank0(group, fn):
    """fn() on rank 0 of `group` only (collective): its result on every rank, or its error raised on
    every rank (as is on rank 0; as an OSError naming it elsewhere). With group None: fn()."""
    if group is None:
        return fn()
    import torch.distributed as dist

    rank, _ = group_rank_world(group)
    outcome, error = None, None
    if rank == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # raised below, after the others know
            error = exc
            outcome = ("error", f"{type(exc).__name__}: {exc}")
    box = [outcome]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    if error is not None:
        raise error
    if box[0][0] == "error":
        raise OSError(f"rank 0 failed: {box[0][1]}")
    return box[0][1]
