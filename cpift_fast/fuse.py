"""Fusion (CPI-FT stage 3): core transplant + per-tensor SLERP, streamed over checkpoints.

SLERP of one tensor pair (mergekit-compatible). With u, v the flattened tensors in fp32 (``space=
"weights"``: u = a, v = b; ``space="task_vector"``: u = a − base, v = b − base) and
``cos = u·v / (|u| |v|)``::

    t == 0                      -> a, exactly
    |u| <= eps or |v| <= eps    -> lerp  (1 − t)·a + t·b          (improvement over mergekit, which
                                                                   blends unnormalised vectors)
    |cos| > dot_threshold       -> lerp  (nearly collinear or anti-parallel, as mergekit)
    otherwise, θ = arccos(cos):    s0 = sin((1 − t)·θ) / sin θ,  s1 = sin(t·θ) / sin θ
                                   weights:      s0·a + s1·b
                                   task vectors: base + s0·(a − base) + s1·(b − base)

computed in fp32 and rounded to a's dtype (the backbone's). One fused reduction pass gives u·v,
|u|², |v|² (fp64 accumulation); the coefficients are scalar math; one fused elementwise pass
writes the blend (and, in ``fuse_models``, the core transplant).

More than one task model (the fold). The K task models are first folded into one, in the order
given, with ``t_i = 1 / (i + 1)`` (i = 0-based task index)::

    m = task_0;  for i = 1 .. K−1:  m = slerp(1 / (i + 1), m, task_i)     (fp32, same space)
    result = slerp(t, backbone, m)

In the lerp limit every task gets weight 1/K; SLERP is not associative, so with large angles the
result depends on the task order (reorder ``tasks`` to change it). K = 1 is plain
``slerp(t, backbone, task_0)``.

Core transplant. Where bit i of task k's core mask is set, element i of the result is task k's
value — a bit-exact copy when the task tensor has the backbone's dtype (otherwise it is cast to
the backbone dtype first, and ``stats["cast_cores"]`` lists those tensors). An element in several
cores is decided by ``overlap_rule``: ``"last"`` (the last such task in the given order — the
latest stage when tasks are listed in stage order), ``"first"``, or ``"mean"`` (fp32 mean of the
tasks' values, rounded to the backbone dtype; no longer a copy of any one task).

Streaming. Every input is read one tensor name at a time (backbone, base, each task), so memory
holds the tensors of a few names, not models. A reader thread (cpift_fast.readahead) fetches the
inputs of the next names while the kernels fuse the current run (maps them and starts their disk
reads), at most ``readahead`` bytes ahead; with ``out``, fused tensors go to the shards on a writer
thread (write-behind: the shard writes and their fsyncs overlap the next names' fusion), at most
``readahead`` bytes queued. Default 32 MiB each; 0: no threads, everything in the caller's thread.
The kernels take a run of consecutive names at a time (up to 2M backbone elements; a larger name
alone): one list-op call per pass over the run, so hundreds of small tensors share the threads.
Peak memory: the current run's tensors plus at most twice the budget (or, on either side, one
name's tensors larger than it).

Sharded (``group=``, a torch.distributed process group; with ``out``): every rank passes the same
inputs; each tensor name is fused by one rank (cpift_fast.shard.tensor_shares over the bytes read
per name), which alone reads that name's inputs and writes its fused tensor into the shared output
(cpift_fast.io.GroupShardedWriter: the shard layout is planned from the backbone's headers). The
output directory is byte for byte the 1-process one (same tensors, bits, shards, headers, index);
every rank returns the full ``stats`` (all-gathered, in backbone order). The output directory must
be on a file system every rank can write.

``t`` may be a number, a list of anchors interpolated linearly over the layer index (mergekit's
"gradient": anchor positions are evenly spaced over layers 0 .. L−1; tensors outside numbered
layers take the first anchor if their name marks an input embedding — ``embed``, ``wte``, ``wpe``
— and the last anchor otherwise: final norm, lm_head; as mergekit's pre/post weights), or a
dict of name filters ``{pattern: number or anchors}`` matched with ``re.search`` in insertion
order, where the key ``"default"`` (or ``"*"``) catches the rest. Every t must lie in [0, 1].
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from . import ops
from .io import GroupShardedWriter, ShardedWriter, TensorSource, honour_umask, open_tensors
from .mask import ParamMask
from .readahead import DEFAULT_BUDGET, ReadAhead, WriteBehind, check_budget, runs
from .shard import group_rank_world, on_rank0, tensor_shares

OVERLAP_RULES = {"last": 0, "first": 1, "mean": 2}
SPACES = ("weights", "task_vector")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_RUN_ELEMENTS = 1 << 21  # backbone elements per list-op call (a run of names; a larger tensor alone)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_EMBED_RE = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)")


# ---------------------------------------------------------------------------------------------
# one tensor pair
# ---------------------------------------------------------------------------------------------

def slerp_coefficients(t: float, stats: torch.Tensor | Sequence[float], *, task_vector: bool = False,
                       dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[float, float, float, dict]:
    """(c0, c1, c2, info) such that the blend is ``c0·a + c1·b + c2·base``.

    ``stats`` = (u·v, |u|², |v|²) from one reduction pass. ``info``: ``mode`` ("copy", "slerp",
    "lerp_collinear", "lerp_zero_norm"), ``angle_deg`` (NaN when a norm is ~0) and ``cos``.
    """
    dot, uu, vv = stats.tolist() if isinstance(stats, torch.Tensor) else map(float, stats)
    if not (math.isfinite(dot) and math.isfinite(uu) and math.isfinite(vv)):
        raise ValueError(f"non-finite values in the tensors (u·v={dot}, |u|²={uu}, |v|²={vv})")
    nu, nv = math.sqrt(uu), math.sqrt(vv)
    if nu <= eps or nv <= eps:
        cos = float("nan")
    else:
        cos = max(-1.0, min(1.0, dot / (nu * nv)))
    info = {"cos": cos, "angle_deg": math.degrees(math.acos(cos)) if cos == cos else float("nan")}
    if t == 0:
        return 1.0, 0.0, 0.0, {**info, "mode": "copy"}
    if cos != cos:
        return 1.0 - t, t, 0.0, {**info, "mode": "lerp_zero_norm"}
    if abs(cos) > dot_threshold:
        return 1.0 - t, t, 0.0, {**info, "mode": "lerp_collinear"}
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    s0 = math.sin(theta - theta * t) / sin_theta
    s1 = math.sin(theta * t) / sin_theta
    return s0, s1, (1.0 - s0 - s1) if task_vector else 0.0, {**info, "mode": "slerp"}


def _check_t(t: Any, where: str) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= float(t) <= 1.0):
        raise ValueError(f"t must be a number in [0, 1], got {t!r} ({where})")
    return float(t)


def _resolve_space(space: str | None, base) -> bool:
    if space is None:
        return base is not None
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if space == "task_vector" and base is None:
        raise ValueError("space='task_vector' needs base (the pre-trained weights θ0)")
    return space == "task_vector"


def _slerp_run(ts: Sequence[float], a: list[torch.Tensor], b: list[torch.Tensor], base: list[torch.Tensor | None],
               task_vector: bool, dot_threshold: float, eps: float, names: Sequence[str],
               cores: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None, rule: int = 0):
    """SLERP of T tensor pairs with one slerp_stats_list and one slerp_apply_list call (the C++
    kernels split all T over the threads) -> ([result t in a[t]'s dtype], [info t]).

    Pair t: ``slerp(ts[t], a[t], b[t])`` (task vectors against ``base[t]`` when ``task_vector``),
    plus the transplant of ``cores[t] = (values, words)``; ``names[t]`` names it in errors.
    """
    T = len(a)
    base = list(base) if task_vector else [None] * T
    cores = cores if cores is not None else [([], [])] * T
    need = [i for i in range(T) if ts[i] != 0]  # t == 0: 1·a + 0·a keeps every bit of a, signed zeros included
    rows = ops.slerp_stats_list([a[i] for i in need], [b[i] for i in need], [base[i] for i in need]).tolist() \
        if need else []
    stats = dict(zip(need, rows))
    coeffs, bs, bases, values, words, counts, infos = [], [], [], [], [], [], []
    for i in range(T):
        try:
            c0, c1, c2, info = slerp_coefficients(ts[i], stats.get(i, (0.0, 0.0, 0.0)), task_vector=task_vector,
                                                  dot_threshold=dot_threshold, eps=eps)
        except ValueError as exc:
            raise ValueError(f"slerp of {names[i]}: {exc}") from None
        coeffs += (c0, c1, c2)
        bs.append(b[i] if ts[i] != 0 else a[i])
        bases.append(base[i] if c2 != 0.0 else None)
        values += cores[i][0]
        words += cores[i][1]
        counts.append(len(cores[i][0]))
        infos.append(info)
    return ops.slerp_apply_list(a, bs, bases, coeffs, values, words, counts, rule), infos


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8,
          space: str | None = None, base: torch.Tensor | None = None, return_info: bool = False):
    """Spherical interpolation of two tensors of one shape (see the module doc for the exact math).

    Result: a's dtype and shape (contiguous); ``t = 0`` gives a exactly. With ``return_info``
    returns ``(result, info)`` where info holds ``mode``, ``angle_deg`` and ``cos``.
    """
    t = _check_t(t, "slerp")
    if a.shape != b.shape:
        raise ValueError(f"slerp: a has shape {list(a.shape)}, b has shape {list(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"slerp needs floating-point tensors, got {a.dtype} and {b.dtype}")
    task_vector = _resolve_space(space, base)
    if base is not None and base.shape != a.shape:
        raise ValueError(f"slerp: base has shape {list(base.shape)}, a has shape {list(a.shape)}")
    if b.device != a.device or (base is not None and base.device != a.device):
        raise ValueError("slerp: a, b and base must be on one device")
    (out,), (info,) = _slerp_run([t], [a], [b], [base], task_vector, dot_threshold, eps, ["tensor"])
    return (out, info) if return_info else out


# ---------------------------------------------------------------------------------------------
# t schedules
# ---------------------------------------------------------------------------------------------

def layer_index(name: str) -> int | None:
    """The layer number in a tensor name (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _interp(anchors: Sequence[float], frac: float) -> float:
    if len(anchors) == 1:
        return float(anchors[0])
    pos = frac * (len(anchors) - 1)
    lo = min(int(math.floor(pos)), len(anchors) - 2)
    w = pos - lo
    return float(anchors[lo]) * (1.0 - w) + float(anchors[lo + 1]) * w


class TSchedule:
    """Resolves t per tensor name from a number, per-layer anchors, or {name filter: value}."""

    def __init__(self, spec: Any, names: Sequence[str]):
        self.spec = spec
        self.rules: list[tuple[re.Pattern | None, Any]] = []
        if isinstance(spec, Mapping):
            if not spec:
                raise ValueError("t: an empty filter dict")
            for key, value in spec.items():
                pattern = None if key in ("default", "*") else re.compile(str(key))
                self.rules.append((pattern, self._check_value(value, f"t[{key!r}]")))
        else:
            self.rules.append((None, self._check_value(spec, "t")))
        layers = [i for i in map(layer_index, names) if i is not None]
        self.num_layers = max(layers) + 1 if layers else 0

    @staticmethod
    def _check_value(value: Any, where: str):
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"{where}: an empty anchor list")
            return [_check_t(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return _check_t(value, where)

    def __call__(self, name: str) -> float:
        for pattern, value in self.rules:
            if pattern is None or pattern.search(name):
                break
        else:
            raise ValueError(f"t: no filter matches tensor {name!r}; add a 'default' entry")
        if not isinstance(value, list):
            return value
        layer = layer_index(name)
        if layer is None:
            return value[0] if _EMBED_RE.search(name) else value[-1]
        return _interp(value, layer / (self.num_layers - 1) if self.num_layers > 1 else 0.0)


# ---------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------

def _named(items: Any, what: str) -> dict[str, Any]:
    if isinstance(items, Mapping):
        return {str(k): v for k, v in items.items()}
    if isinstance(items, (list, tuple)):
        return {f"task{i}": v for i, v in enumerate(items)}
    raise TypeError(f"{what} must be a dict {{name: ...}} or a list, got {type(items).__name__}")


def _load_core(core: Any, task: str) -> ParamMask:
    if isinstance(core, ParamMask):
        return core.to("cpu")
    if isinstance(core, (str, os.PathLike)):
        return ParamMask.load(core)
    raise TypeError(f"core of task {task!r} must be a ParamMask or a .mask path, got {type(core).__name__}")


# what a pipeline stage directory holds besides the model: records of that run, not of the fusion
RUN_RECORDS = frozenset({"manifest.json", "loss.json", "results.json", "source.json"})


def _copy_config_files(src: Any, out: str) -> list[str]:
    """Carry config / tokenizer files of a backbone directory (or a transformers model's config)."""
    copied = []
    if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
        for fname in sorted(os.listdir(src)):
            path = os.path.join(src, fname)
            if not os.path.isfile(path) or fname.endswith(".safetensors") or fname.endswith(".index.json") \
                    or fname.endswith((".bin", ".pt", ".pth", ".mask")) or fname in RUN_RECORDS:
                continue
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out)
            os.close(fd)
            shutil.copyfile(path, tmp)
            honour_umask(tmp)
            os.replace(tmp, os.path.join(out, fname))
            copied.append(fname)
    elif hasattr(src, "config") and hasattr(src.config, "to_json_string"):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out)
        with os.fdopen(fd, "w") as f:
            f.write(src.config.to_json_string())
        honour_umask(tmp)
        os.replace(tmp, os.path.join(out, "config.json"))
        copied.append("config.json")
    return copied


def fuse_models(backbone: Any, tasks: Mapping[str, Any] | Sequence[Any],
                cores: Mapping[str, Any] | Sequence[Any] | None,
                *, t: Any = 0.5, base: Any = None, overlap_rule: str = "last", out: str | os.PathLike | None = None,
                space: str | None = None, dot_threshold: float = 0.9995, eps: float = 1e-8,
                max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True,
                readahead: int | str = DEFAULT_BUDGET, group=None):
    """Fuse task models into a backbone: core transplant + SLERP of everything else.

    ``backbone``, each task and ``base`` may be an nn.Module, a {name: tensor} dict, a
    .safetensors file or a (sharded) checkpoint directory; they are read one tensor at a time.
    ``tasks``: {name: model} (order = fold order and "last"/"first" order) or a list;
    ``cores``: {task name: ParamMask or .mask path} with the same names (None: no transplant).
    ``space``: "weights" or "task_vector" (default: "task_vector" when ``base`` is given).
    ``readahead``: bytes of input tensors read ahead of the kernels, and of fused tensors queued
    for writing (int or '64MB'; 0: no reader or writer thread; see the module doc).
    ``group``: a process group whose ranks fuse and write one share of the tensors each (collective;
    needs ``out``; see the module doc).

    Returns ``(state_dict, stats)``, or with ``out=DIR`` ``(DIR, stats)`` after streaming the result
    to sharded safetensors + index in DIR (atomically; config/tokenizer files of a backbone
    directory are copied along). ``stats``: per-tensor t, angle, mode and transplanted counts, and
    totals (``modes``, ``transplanted``, ``overlapping``, ``elements``).
    """
    if overlap_rule not in OVERLAP_RULES:
        raise ValueError(f"overlap_rule must be one of {', '.join(OVERLAP_RULES)}, got {overlap_rule!r}")
    rule = OVERLAP_RULES[overlap_rule]
    task_vector = _resolve_space(space, base)
    readahead = check_budget(readahead, "fuse_models: readahead")
    if group is not None and out is None:
        raise ValueError("fuse_models: group= (sharded fusion) needs out=DIR: each rank writes its share of the "
                         "output shards")
    task_models = _named(tasks, "tasks")
    if not task_models:
        raise ValueError("fuse_models needs at least one task model")
    core_masks: dict[str, ParamMask] = {}
    if cores is not None:
        named_cores = _named(cores, "cores")
        if set(named_cores) != set(task_models):
            raise ValueError(f"cores are given for tasks {sorted(named_cores)} but the tasks are {sorted(task_models)}")
        core_masks = {k: _load_core(named_cores[k], k) for k in task_models}
        first = next(iter(core_masks))
        for k, m in core_masks.items():
            core_masks[first].layout.check_same(m.layout, f"core masks of {first!r} and {k!r}")

    bb = open_tensors(backbone, "backbone")
    srcs = {k: open_tensors(v, f"task {k!r}") for k, v in task_models.items()}
    base_src = open_tensors(base, "base") if base is not None else None
    names = list(bb.names)
    _check_sources(bb, srcs, base_src, core_masks)
    schedule = TSchedule(t, names)

    stats: dict[str, Any] = {"tensors": {}, "modes": {}, "transplanted": 0, "overlapping": 0, "elements": 0,
                             "cast_cores": [], "space": "task_vector" if task_vector else "weights",
                             "overlap_rule": overlap_rule, "tasks": list(task_models)}
    layout = next(iter(core_masks.values())).layout if core_masks else None
    result: dict[str, torch.Tensor] = {}
    inputs = _Inputs(bb, srcs, base_src if task_vector else None)
    metadata = {"producer": "cpift_fast.fuse_models"}
    mine = names
    if group is not None:
        rank, world = group_rank_world(group)
        mine = tensor_shares(names, [inputs.nbytes(n) for n in names], world)[rank]
        writer = GroupShardedWriter(out, [(n, bb.dtype(n), bb.shape(n)) for n in names], max_shard_size,
                                    metadata=metadata, overwrite=overwrite, group=group)
    else:
        writer = ShardedWriter(out, max_shard_size, metadata=metadata,
                               overwrite=overwrite) if out is not None else None

    from tqdm.auto import tqdm

    streamed = any(src.is_streamed for src in [bb, *srcs.values(), *([base_src] if base_src is not None else [])])
    bar = tqdm(total=sum(bb.numel(n) for n in mine), unit="el", unit_scale=True, desc="fuse", disable=not progress)
    ahead = behind = None
    try:
        if writer is not None:
            writer.__enter__()
            behind = WriteBehind(writer.add, lambda t: t.numel() * t.element_size(), readahead,
                                 describe=lambda n: f"fused tensor {n!r} to {writer.path}")
        ahead = ReadAhead(mine, inputs.prefetch, inputs.nbytes, readahead if streamed else 0, describe=inputs.describe)
        for run in runs(ahead, lambda item: item[1][0].numel(), _RUN_ELEMENTS):
            fused = _fuse_run(run, srcs, core_masks, layout, schedule, task_vector, rule, dot_threshold, eps, stats)
            for name, tensor in fused:
                if behind is not None:
                    behind.put(name, tensor)
                else:
                    result[name] = tensor
                bar.update(bb.numel(name))
        if writer is not None:
            behind.finish()
            done, writer = writer, None  # (a GroupShardedWriter's exit is collective: called once)
            done.__exit__(None, None, None)
    except BaseException as exc:
        if behind is not None:
            behind.close()  # the writer thread ends before the writer removes its temporary directory
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    finally:
        if ahead is not None:
            ahead.close()
        if behind is not None:
            behind.close()
        bar.close()
        for s in [bb, *srcs.values(), *([base_src] if base_src is not None else [])]:
            s.close()
    if group is not None:
        stats = _gathered_stats(stats, names, group)
    if out is not None:
        out = os.fspath(out)
        stats["copied_files"] = on_rank0(group, lambda: _copy_config_files(backbone, out))
        return out, stats
    return result, stats


def _gathered_stats(stats: dict, names: list[str], group) -> dict:
    """Every rank's per-tensor stats merged, and the totals recounted in backbone order (as one
    process counts them)."""
    import torch.distributed as dist

    _, world = group_rank_world(group)
    parts: list = [None] * world
    dist.all_gather_object(parts, (stats["tensors"], stats["cast_cores"]), group=group)
    entries = {n: e for tensors, _ in parts for n, e in tensors.items()}
    cast = {n for _, c in parts for n in c}
    out = {**stats, "tensors": {}, "modes": {}, "transplanted": 0, "overlapping": 0, "elements": 0,
           "cast_cores": [n for n in names if n in cast]}
    for name in names:
        entry = out["tensors"][name] = entries[name]
        out["elements"] += entry["numel"]
        for mode in [entry["mode"]] + [f"fold_{m}" for m in entry.get("fold_modes", [])]:
            out["modes"][mode] = out["modes"].get(mode, 0) + 1
        out["transplanted"] += entry.get("transplanted", 0)
        out["overlapping"] += entry.get("overlapping", 0)
    return out


def _check_sources(bb: TensorSource, srcs: dict[str, TensorSource], base: TensorSource | None,
                   cores: dict[str, ParamMask]) -> None:
    """Every tensor of the backbone must exist, with its shape, in every task (and base), and no
    task (or base) may hold a tensor the backbone lacks; floating tensors must have a dtype SLERP
    supports; every tensor a core covers must exist in the backbone with the core's shape."""
    others = list(srcs.items()) + ([("base", base)] if base is not None else [])
    for name in bb.names:
        shape = bb.shape(name)
        floating = bb.dtype(name).is_floating_point
        for k, src in [("backbone", bb)] + others:
            what = "base" if k == "base" and src is base else ("the backbone" if src is bb else f"task {k!r}")
            if name not in src:
                raise KeyError(f"{what} ({src.description}) has no tensor {name!r}, which the backbone has")
            if src.shape(name) != shape:
                raise ValueError(f"tensor {name!r} has shape {list(src.shape(name))} in {what}, "
                                 f"{list(shape)} in the backbone")
            if floating and src.dtype(name) not in _KERNEL_DTYPES:
                raise TypeError(f"tensor {name!r} is {src.dtype(name)} in {what} ({src.description}); SLERP "
                                f"supports float32, float16 and bfloat16 (cast the checkpoint first)")
    for k, src in others:
        if len(src) != len(bb):
            extra = next(n for n in src.names if n not in bb)
            what = "base" if k == "base" and src is base else f"task {k!r}"
            raise KeyError(f"{what} ({src.description}) has tensor {extra!r}, which the backbone "
                           f"({bb.description}) lacks")
    if cores:
        layout = next(iter(cores.values())).layout
        for name, shape in zip(layout.names, layout.shapes):
            if name not in bb:
                raise KeyError(f"the core masks cover tensor {name!r}, which the backbone ({bb.description}) lacks")
            if tuple(bb.shape(name)) != tuple(shape):
                raise ValueError(f"the core masks give tensor {name!r} shape {list(shape)}, the backbone has "
                                 f"{list(bb.shape(name))}")


class _Inputs:
    """The input tensors of one name: (backbone, base or None, [task tensors]); for a non-float
    backbone tensor only the backbone's (it is copied)."""

    def __init__(self, bb: TensorSource, srcs: dict[str, TensorSource], base: TensorSource | None):
        self.bb, self.srcs, self.base = bb, srcs, base

    def _sources(self, name: str) -> list[TensorSource]:
        if not self.bb.dtype(name).is_floating_point:
            return [self.bb]
        return [self.bb, *([self.base] if self.base is not None else []), *self.srcs.values()]

    def prefetch(self, name: str):
        """The inputs of `name`, their file reads started (TensorSource.prefetch)."""
        a = self.bb.prefetch(name)
        if not a.is_floating_point():
            return a, None, []
        base = self.base.prefetch(name) if self.base is not None else None
        return a, base, [src.prefetch(name) for src in self.srcs.values()]

    def nbytes(self, name: str) -> int:
        return sum(src.nbytes(name) for src in self._sources(name))

    def describe(self, name: str) -> str:
        return f"tensor {name!r} of " + ", ".join(src.description for src in self._sources(name))


def _fuse_run(run, srcs, core_masks, layout, schedule, task_vector, rule, dot_threshold, eps, stats):
    """Fuse a run of names ``[(name, (a, base, [task tensors]))]``: each fold step and the final blend
    is one list-op call over the run's float tensors (non-float tensors are copied). Records each
    name's entry in ``stats`` in run order; -> [(name, fused tensor)] in run order."""
    floats = [(name, a, base, models) for name, (a, base, models) in run if a.is_floating_point()]
    names = [f[0] for f in floats]
    bases = [f[2] for f in floats]
    m = [f[3][0] for f in floats]
    fold_modes: list[list[str]] = [[] for _ in floats]
    for i in range(1, len(srcs)):
        m = [x.float() if x.dtype != torch.float32 else x for x in m]
        m, infos = _slerp_run([1.0 / (i + 1)] * len(floats), m, [f[3][i] for f in floats], bases, task_vector,
                              dot_threshold, eps, names)
        for modes, info in zip(fold_modes, infos):
            modes.append(info["mode"])
    cores = []
    for name, a, _, models in floats:
        values, words = [], []
        if layout is not None and name in layout.index:
            for k, v in zip(srcs, models):
                if v.dtype != a.dtype:
                    if name not in stats["cast_cores"]:
                        stats["cast_cores"].append(name)
                    v = v.to(a.dtype)
                values.append(v)
                words.append(core_masks[k].tensor_words(name))
        cores.append((values, words))
    fused, infos = _slerp_run([schedule(n) for n in names], [f[1] for f in floats], m, bases, task_vector,
                              dot_threshold, eps, names, cores, rule)
    done = dict(zip(names, zip(fused, infos, fold_modes, cores)))
    out = []
    for name, (a, _, _) in run:
        entry: dict[str, Any] = {"t": schedule(name), "numel": a.numel()}
        stats["elements"] += a.numel()
        stats["tensors"][name] = entry
        if name not in done:
            entry["mode"] = "copy_non_float"
            stats["modes"]["copy_non_float"] = stats["modes"].get("copy_non_float", 0) + 1
            out.append((name, a.clone()))
            continue
        tensor, info, folds, (_, words) = done[name]
        entry.update(mode=info["mode"], angle_deg=info["angle_deg"], fold_modes=folds)
        for mode in [info["mode"]] + [f"fold_{x}" for x in folds]:
            stats["modes"][mode] = stats["modes"].get(mode, 0) + 1
        if words:
            seen = torch.zeros_like(words[0])
            multi = torch.zeros_like(words[0])
            for w in words:
                multi |= seen & w
                seen |= w
            offs = torch.tensor([0, seen.numel()], dtype=torch.int64)
            entry["transplanted"] = int(ops.mask_popcount(seen, offs)[0])
            entry["overlapping"] = int(ops.mask_popcount(multi, offs)[0])
            stats["transplanted"] += entry["transplanted"]
            stats["overlapping"] += entry["overlapping"]
        out.append((name, tensor))
    return out


def plot_fusion(stats: dict, path: str | os.PathLike) -> str:
    """Save a per-tensor chart of a ``fuse_models`` run: the SLERP angle (marker = mode) and the
    share of each tensor's elements transplanted from task cores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats["tensors"])
    entries = [stats["tensors"][n] for n in names]
    x = range(len(names))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.12 * len(names) + 3), 6), sharex=True)
    markers = {"slerp": "o", "lerp_collinear": "^", "lerp_zero_norm": "x", "copy": "s", "copy_non_float": "."}
    for mode, marker in markers.items():
        idx = [i for i, e in enumerate(entries) if e.get("mode") == mode]
        if idx:
            ax1.scatter(idx, [entries[i].get("angle_deg", float("nan")) for i in idx], marker=marker, s=14,
                        label=f"{mode} ({len(idx)})")
    ax1.set_ylabel(f"angle (deg, {stats.get('space', 'weights')})")
    ax1.legend(fontsize=7, loc="best")
    ax1.set_title(f"fusion of {len(stats.get('tasks', []))} task(s): {len(names)} tensors")
    ax2.bar(list(x), [100.0 * e.get("transplanted", 0) / max(1, e["numel"]) for e in entries], color="tab:red")
    ax2.set_ylabel("transplanted (% of tensor)")
    ax2.set_xlabel("tensor (backbone order)")
    if len(names) <= 40:
        ax2.set_xticks(list(x), names, rotation=80, fontsize=6)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
