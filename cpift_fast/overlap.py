"""Overlap of task core regions, task grouping, and stage ordering (CPI-FT stage 2).

Math. For masks A, B over one layout: ``J(A, B) = |A ∩ B| / |A ∪ B|``; ``J(∅, ∅) = 0`` by
definition (two empty cores share nothing, so empty tasks never join a group through each other).
``overlap_counts`` reads every word of every mask once and forms popcount(a & b) for all pairs;
unions follow exactly from ``|A ∪ B| = |A| + |B| − |A ∩ B|``.

Grouping (paper): tasks are the nodes of a graph with an edge i–j where ``J[i, j] ≥ tau`` (i ≠ j);
groups are its connected components (union-find). Order is deterministic: members keep their
input order, groups are ordered by their first member. ``tau = 0`` puts every task in one group;
``tau = 1`` joins only tasks with identical non-empty cores.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence

import torch

from . import ops
from .mask import ParamMask

STRATEGIES = ("random", "size", "min_frozen")


def _check_masks(masks: Sequence[ParamMask]) -> list[ParamMask]:
    masks = list(masks)
    if not masks:
        raise ValueError("need at least one mask")
    for i, m in enumerate(masks):
        if not isinstance(m, ParamMask):
            raise TypeError(f"mask #{i} is a {type(m).__name__}, not a ParamMask")
        masks[0].layout.check_same(m.layout, f"mask #0 and mask #{i}")
        if m.device != masks[0].device:
            raise ValueError(f"mask #0 is on {masks[0].device}, mask #{i} on {m.device}")
    return masks


def overlap_counts(masks: Sequence[ParamMask]) -> tuple[torch.Tensor, torch.Tensor]:
    """(intersection, union) element counts for all pairs of T masks of one layout: int64[T, T] each.

    One pass over the mask words (fused kernel); the diagonal holds each mask's own count.
    """
    masks = _check_masks(masks)
    inter = ops.overlap_counts([m.words for m in masks]).cpu()
    count = inter.diagonal()
    union = count[:, None] + count[None, :] - inter
    return inter, union


def jaccard_matrix(masks: Sequence[ParamMask]) -> torch.Tensor:
    """float64[T, T]: ``|A ∩ B| / |A ∪ B|``, 0 where both masks are empty (the diagonal too)."""
    inter, union = overlap_counts(masks)
    return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), 0.0)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def group_tasks(jaccard: torch.Tensor, tau: float = 0.1, names: Sequence[str] | None = None) -> list[list[str]]:
    """Connected components of the graph ``J[i, j] ≥ tau`` (i ≠ j), as lists of task names.

    ``names`` defaults to "0", "1", ...; members keep input order, groups are ordered by their
    first member. ``jaccard`` must be square, symmetric and free of NaN.
    """
    J = torch.as_tensor(jaccard).detach().double().cpu()
    if J.dim() != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"jaccard must be a square matrix, got shape {list(J.shape)}")
    if torch.isnan(J).any():
        raise ValueError("jaccard holds NaN")
    if not torch.equal(J, J.T):
        raise ValueError("jaccard must be symmetric")
    if not (isinstance(tau, (int, float)) and 0.0 <= tau <= 1.0):
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
    T = J.shape[0]
    names = [str(i) for i in range(T)] if names is None else [str(n) for n in names]
    if len(names) != T:
        raise ValueError(f"{len(names)} names for a {T}x{T} jaccard matrix")
    if len(set(names)) != T:
        raise ValueError(f"task names must be unique, got {names}")
    uf = _UnionFind(T)
    for i, j in (J >= tau).nonzero().tolist():
        if i < j:
            uf.union(i, j)
    groups: dict[int, list[str]] = {}
    for i in range(T):
        groups.setdefault(uf.find(i), []).append(names[i])
    return list(groups.values())


def order_stages(groups: Sequence[Sequence[str]], strategy: str = "random", seed: int = 0,
                 masks: dict[str, ParamMask] | None = None) -> list[list[str]]:
    """Order of the multi-stage SFT over task groups.

    - ``"random"``: the paper's choice, a permutation drawn with ``random.Random(seed)``.
    - ``"size"``: larger groups (more tasks; ties: larger core union, then input order) first, so
      the tasks that share most parameters are trained before anything is frozen.
    - ``"min_frozen"``: greedy — at each stage pick the group whose core union is smallest, so the
      set frozen before later stages grows as slowly as possible (ties: input order). Needs
      ``masks`` {task name: ParamMask}.
    """
    groups = [list(g) for g in groups]
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "random":
        order = list(range(len(groups)))
        random.Random(seed).shuffle(order)
        return [groups[i] for i in order]
    unions = None
    if masks is not None or strategy == "min_frozen":
        if masks is None:
            raise ValueError("strategy 'min_frozen' needs masks={task name: ParamMask}")
        missing = [n for g in groups for n in g if n not in masks]
        if missing:
            raise KeyError(f"no mask for task {missing[0]!r}")
        unions = [_union([masks[n] for n in g]).count() if g else 0 for g in groups]
    if strategy == "size":
        key = (lambda i: (-len(groups[i]), -(unions[i] if unions else 0), i))
        return [groups[i] for i in sorted(range(len(groups)), key=key)]
    return [groups[i] for i in sorted(range(len(groups)), key=lambda i: (unions[i], i))]


def _union(masks: list[ParamMask]) -> ParamMask:
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def plot_overlap(jaccard: torch.Tensor, names: Sequence[str], groups: Sequence[Sequence[str]] | None,
                 path: str | os.PathLike, tau: float | None = None) -> str:
    """Save a Jaccard heatmap (tasks reordered group by group, each group outlined) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    J = torch.as_tensor(jaccard).double().cpu()
    names = [str(n) for n in names]
    groups = [list(g) for g in groups] if groups else [[n] for n in names]
    order = [names.index(n) for g in groups for n in g]
    Jo = J[order][:, order].numpy()
    T = len(order)
    size = max(4.0, 0.5 * T + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    off = Jo[~torch.eye(T, dtype=torch.bool).numpy()] if T > 1 else Jo.reshape(-1)
    vmax = float(off.max()) if off.size and off.max() > 0 else 1.0  # the diagonal (1) saturates
    im = ax.imshow(Jo, vmin=0.0, vmax=vmax, cmap="viridis")
    fig.colorbar(im, ax=ax, label="Jaccard |A∩B| / |A∪B| (diagonal saturates)")
    ax.set_xticks(range(T), [names[i] for i in order], rotation=60, ha="right")
    ax.set_yticks(range(T), [names[i] for i in order])
    if T <= 16:
        for r in range(T):
            for c in range(T):
                ax.text(c, r, f"{Jo[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if Jo[r, c] < 0.5 * vmax else "black")
    start = 0
    for g in groups:
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), len(g), len(g), fill=False, edgecolor="red", lw=2))
        start += len(g)
    title = f"core overlap: {len(groups)} group(s)"
    ax.set_title(title + (f" at tau = {tau:g}" if tau is not None else ""))
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_matrix(jaccard: torch.Tensor, names: Sequence[str]) -> str:
    """The matrix as an aligned text table (what `cpift overlap` prints)."""
    names = [str(n) for n in names]
    width = max([6] + [len(n) for n in names])
    lines = [" " * width + " " + " ".join(f"{n[:width]:>{width}}" for n in names)]
    for n, row in zip(names, torch.as_tensor(jaccard).double().tolist()):
        lines.append(f"{n:>{width}} " + " ".join(f"{v:>{width}.4f}" if not math.isnan(v) else f"{'nan':>{width}}"
                                                 for v in row))
    return "\n".join(lines)
