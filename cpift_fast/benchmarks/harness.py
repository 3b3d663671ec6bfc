"""Shared benchmark harness: timing, machine facts, tensor-size mixes, records, result files.

A benchmark module (``bench_<op>.py``) describes its measurements as cases: ``specs(size)`` lists
them cheaply (name, parameters, path names), ``build(spec, device)`` makes one :class:`Case` (the
inputs and one callable per path). :func:`run_op` times every path of every case, interleaved
(round robin, so that a change in machine load hits every path of a case alike), on CPU with
``torch.utils.benchmark`` (``Timer.blocked_autorange``) and on CUDA with
``triton.testing.do_bench``, and turns the samples into records: median, quartiles, min / max,
GB/s, % of the copy bandwidth measured in the same run, and the ratio to the case's baseline path.
Each op's result is written as ``<op>.json`` (the records), ``<op>.md`` (a table) and
``<op>.png`` (a chart) by :func:`write_result`.

``<op>.json`` (schema ``cpift-bench/1``)::

    {"schema": "cpift-bench/1", "op": "adamw", "size": "quick" | "full",
     "meta": {"date", "device", "device_type", "cpu", "cpu_capability", "cpift_cpu_capability", "cores",
              "cpu_threads", "load_average_1m" (at the end), "load_average_1m_start", "versions":
              {"cpift_fast", "torch", "triton", "numpy", "mergekit", "python"}, "timer", "size",
              "copy_gbps", "rounds", "min_run_time_s", "wall_s"
              (+ "cuda", "capability" on a GPU)},
     "records": [{"op", "case", "params": {...the case's parameters, "headline": bool},
                  "path", "role": fused | reference | anchor | floor | copy,
                  "median_s", "q1_s", "q3_s", "min_s", "max_s", "samples",
                  "bytes", "gbps", "pct_copy_bw", "baseline", "ratio" (median / the baseline
                  path's median in the same case), ...path facts ("backend", "peak_extra_bytes")}],
     "targets": [{"name", "value", "goal": ">= x" | "<= x", "met": bool}],
     "skipped": [{"path", "reason"}], "notes": [str, ...]}

The first record is the copy bandwidth (role ``copy``, ``dst.copy_(src)``, read + write bytes);
every other record's ``pct_copy_bw`` is relative to it. An op may add keys of its own at the top
level (select: ``stream``, facts about the streamed checkpoints).
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

SCHEMA = "cpift-bench/1"
SIZES = ("quick", "full")
ROLES = ("fused", "reference", "anchor", "floor", "copy")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# bench/results/ in a checkout (an editable install), else ./cpift-bench
RESULTS = (os.path.join(ROOT, "bench", "results") if os.path.isfile(os.path.join(ROOT, "pyproject.toml"))
           and os.path.isdir(os.path.join(ROOT, "bench")) else os.path.abspath("cpift-bench"))


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

@dataclass
class Budget:
    """How long each path of a case is timed: ``rounds`` round-robin rounds of at least
    ``min_run_time`` seconds each (a path slower than that gets one timed call per round)."""

    rounds: int
    min_run_time: float


BUDGETS = {"quick": Budget(rounds=2, min_run_time=0.05), "full": Budget(rounds=3, min_run_time=0.25)}


def sync(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timer_name(device: torch.device | str) -> str:
    """The timer used on `device`: triton's do_bench on CUDA (events, L2 flushed between calls),
    torch.utils.benchmark everywhere else."""
    return "triton.testing.do_bench" if torch.device(device).type == "cuda" else "torch.utils.benchmark"


def _samples_cpu(fn: Callable[[], object], min_run_time: float) -> list[float]:
    from torch.utils.benchmark import Timer

    # num_threads: Timer runs with one thread unless told otherwise
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def _samples_cuda(fn: Callable[[], object], min_run_time: float) -> list[float]:
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=max(1, int(250 * min_run_time)), rep=max(1, int(1000 * min_run_time)),
                  return_mode="all")
    return [t / 1e3 for t in ms]


def samples(fn: Callable[[], object], device: torch.device | str, min_run_time: float) -> list[float]:
    """Seconds per call of fn (each sample a call or the mean of a block of calls), after warm-up,
    timed with :func:`timer_name`'s timer for `device`."""
    if torch.device(device).type == "cuda":
        return _samples_cuda(fn, min_run_time)
    return _samples_cpu(fn, min_run_time)


@dataclass
class Stats:
    """Median, quartiles and range of a list of seconds-per-call samples."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no timing samples")
        v = sorted(values)
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
        return cls(statistics.median(v), q1, q3, v[0], v[-1], len(v))


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str,
                        budget: Budget, rounds: dict[str, int] | None = None) -> dict[str, Stats]:
    """Time every callable in `fns`, round robin over `budget.rounds` rounds (fewer for a name in
    `rounds`: a path too slow to time more than once or twice)."""
    rounds = rounds or {}
    got: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(budget.rounds):
        for name, fn in fns.items():
            if r < rounds.get(name, budget.rounds):
                got[name] += samples(fn, device, budget.min_run_time)
    return {name: Stats.of(v) for name, v in got.items()}


def copy_bandwidth(device: torch.device | str, nbytes: int, budget: Budget) -> tuple[Stats, float]:
    """This run's copy bandwidth: ``dst.copy_(src)`` of an `nbytes` buffer (read + write:
    2 * nbytes moved). Returns the timing and GB/s at its median."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    stats = measure_interleaved({"copy": lambda: dst.copy_(src)}, device, budget)["copy"]
    return stats, 2 * nbytes / stats.median / 1e9


# ---------------------------------------------------------------------------------------------
# cases and records
# ---------------------------------------------------------------------------------------------

@dataclass
class Path:
    """One way of doing a case's work.

    role: ``fused`` (cpift_fast's kernel), ``reference`` (cpift_fast's pure-PyTorch path),
    ``anchor`` (what users would otherwise run: torch, numpy, mergekit, ...), ``floor`` (a
    memory-traffic floor for the same bytes). nbytes: the bytes GB/s is computed from (stated per
    op in its module docstring). backend: CPIFT_BACKEND forced around every call (None: default).
    """

    fn: Callable[[], object]
    role: str
    nbytes: float
    backend: str | None = None
    rounds: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def call(self) -> Callable[[], object]:
        """fn, run with CPIFT_BACKEND set to `backend` (restored afterwards) when one is forced."""
        if self.backend is None:
            return self.fn
        fn, backend = self.fn, self.backend

        def forced():
            previous = os.environ.get("CPIFT_BACKEND")
            os.environ["CPIFT_BACKEND"] = backend
            try:
                return fn()
            finally:
                if previous is None:
                    os.environ.pop("CPIFT_BACKEND", None)
                else:
                    os.environ["CPIFT_BACKEND"] = previous
        return forced


@dataclass
class Case:
    """A configuration (inputs built) and its paths; ratios divide by the `baseline` path."""

    name: str
    params: dict
    paths: dict[str, Path]
    baseline: str

    def __post_init__(self):
        if self.baseline not in self.paths:
            raise ValueError(f"case {self.name!r}: baseline {self.baseline!r} is not one of its paths")


def record(op: str, case: Case, path_name: str, stats: Stats, copy_gbps: float, baseline: Stats) -> dict:
    """One JSON record: a path of a case, its timing (seconds), GB/s, % copy bandwidth, ratio."""
    path = case.paths[path_name]
    gbps = path.nbytes / stats.median / 1e9
    return {"op": op, "case": case.name, "params": case.params, "path": path_name, "role": path.role,
            "median_s": stats.median, "q1_s": stats.q1, "q3_s": stats.q3, "min_s": stats.min, "max_s": stats.max,
            "samples": stats.n, "bytes": path.nbytes, "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps,
            "baseline": case.baseline, "ratio": stats.median / baseline.median, **path.extra}


def copy_record(op: str, stats: Stats, nbytes: int, copy_gbps: float) -> dict:
    """The copy-bandwidth measurement as a record of its own (role ``copy``)."""
    return {"op": op, "case": "copy bandwidth", "params": {"bytes": nbytes}, "path": "dst.copy_(src)",
            "role": "copy", "median_s": stats.median, "q1_s": stats.q1, "q3_s": stats.q3, "min_s": stats.min,
            "max_s": stats.max, "samples": stats.n, "bytes": 2 * nbytes, "gbps": copy_gbps, "pct_copy_bw": 100.0,
            "baseline": "dst.copy_(src)", "ratio": 1.0}


@dataclass
class Result:
    """What one op's benchmark produced (the file format is in the module docstring)."""

    op: str
    size: str
    meta: dict
    records: list[dict]
    targets: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def find(self, case: str, path: str) -> dict:
        for r in self.records:
            if r["case"] == case and r["path"] == path:
                return r
        raise KeyError(f"{self.op}: no record for case {case!r}, path {path!r}")

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "op": self.op, "size": self.size, "meta": self.meta, "records": self.records,
                "targets": self.targets, "skipped": self.skipped, "notes": self.notes, **self.extra}


def target(name: str, value: float, goal: str) -> dict:
    """A target line: `goal` is ``">= X"`` or ``"<= X"``; met is computed, never typed."""
    op, _, bound = goal.partition(" ")
    if op not in (">=", "<="):
        raise ValueError(f"goal must start with '>= ' or '<= ', got {goal!r}")
    met = value >= float(bound) if op == ">=" else value <= float(bound)
    return {"name": name, "value": value, "goal": goal, "met": bool(met)}


def copy_bytes(size: str) -> int:
    """Buffer size of the copy-bandwidth measurement: well beyond the last-level cache."""
    return (128 if size == "quick" else 512) << 20


def run_op(op: str, specs: Iterable[dict], build: Callable[[dict, torch.device], Case], size: str,
           device: torch.device, progress: bool = True) -> Result:
    """Measure the copy bandwidth, then every case of `specs` (built one at a time, freed after),
    every path interleaved; returns the records (targets and notes are the op's to add)."""
    budget = BUDGETS[size]
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    nbytes = copy_bytes(size)
    copy_stats, copy_gbps = copy_bandwidth(device, nbytes, budget)
    records = [copy_record(op, copy_stats, nbytes, copy_gbps)]
    specs = list(specs)
    for i, spec in enumerate(specs):
        case = build(spec, device)
        if list(case.paths) != list(spec["paths"]):
            raise RuntimeError(f"{op}: case {case.name!r} built paths {list(case.paths)}, spec says {spec['paths']}")
        if progress:
            print(f"  {op} [{i + 1}/{len(specs)}] {case.name}", flush=True)
        stats = measure_interleaved({name: p.call() for name, p in case.paths.items()}, device, budget,
                                    {name: p.rounds for name, p in case.paths.items() if p.rounds})
        records += [record(op, case, name, stats[name], copy_gbps, stats[case.baseline]) for name in case.paths]
        del case
        gc.collect()  # torch's optimizers sit in reference cycles: free this case's state before the next build
    meta = machine_info(device) | {"timer": timer_name(device), "size": size, "copy_gbps": copy_gbps,
                                   "rounds": budget.rounds, "min_run_time_s": budget.min_run_time,
                                   "wall_s": time.perf_counter() - start, "load_average_1m_start": load_start}
    return Result(op=op, size=size, meta=meta, records=records)


# ---------------------------------------------------------------------------------------------
# machine facts
# ---------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Where and with what a result was measured: device, CPU capability (torch's kernels', and
    cpift_fast's C++ kernels' where loaded), threads, the load average now (other work on a shared
    machine), versions, date."""
    from .. import __version__, _ops

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "device_type": device.type,
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpift_cpu_capability": torch.ops.cpift_cpu.capability() if _ops.extension()[0] else None,
        "cores": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "versions": {"cpift_fast": __version__, "torch": torch.__version__, "triton": _version("triton"),
                     "numpy": _version("numpy"), "mergekit": _version("mergekit"),
                     "python": platform.python_version()},
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


# ---------------------------------------------------------------------------------------------
# tensor-size mixes
# ---------------------------------------------------------------------------------------------

def tensor_sizes(n: int, count: int, seed: int = 0) -> list[int]:
    """`count` sizes, log-uniform over ~3.5 decades (like a model's mix), summing to exactly n."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(count, generator=g) * 8)
    sizes = (weights / weights.sum() * n).floor().to(torch.int64).clamp_min(1)
    sizes[int(sizes.argmax())] += n - int(sizes.sum())
    return [int(s) for s in sizes]


# LLaMA-2-7B: hidden 4096, MLP 11008 (= 2.6875 x hidden), vocabulary 32000, 32 layers
LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "vocab": 32000, "layers": 32}


def llama_shapes(n: int, layers: int = LLAMA_7B["layers"]) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter shapes of a LLaMA-style model of about `n` elements (at most n): LLaMA-2-7B's
    proportions (MLP width 2.6875 x hidden, vocabulary 7.8125 x hidden, untied embedding and
    lm_head) with `layers` layers and the hidden size scaled down to fit, a multiple of 16. Per
    layer: q/k/v/o (hidden x hidden), gate/up (intermediate x hidden), down (hidden x
    intermediate), two RMSNorm weights (hidden); plus the embedding, the final norm and lm_head.
    So the mix is the real one: a few vocabulary-sized tensors, many mid-sized projections and
    hundreds of tiny norms."""
    def shapes(h: int) -> list[tuple[str, tuple[int, ...]]]:
        inter = 16 * max(1, round(h * LLAMA_7B["intermediate"] / LLAMA_7B["hidden"] / 16))
        vocab = 16 * max(1, round(h * LLAMA_7B["vocab"] / LLAMA_7B["hidden"] / 16))
        out = [("model.embed_tokens.weight", (vocab, h))]
        for i in range(layers):
            pre = f"model.layers.{i}"
            out += [(f"{pre}.input_layernorm.weight", (h,))]
            out += [(f"{pre}.self_attn.{p}_proj.weight", (h, h)) for p in "qkvo"]
            out += [(f"{pre}.post_attention_layernorm.weight", (h,))]
            out += [(f"{pre}.mlp.gate_proj.weight", (inter, h)), (f"{pre}.mlp.up_proj.weight", (inter, h)),
                    (f"{pre}.mlp.down_proj.weight", (h, inter))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]

    def total(h: int) -> int:
        return sum(math.prod(s) for _, s in shapes(h))

    if total(16) > n:
        raise ValueError(f"{n} elements is too few for a {layers}-layer LLaMA-style model (at least {total(16)})")
    h = 16
    while total(h + 16) <= n:
        h += 16
    return shapes(h)


def mix(kind: str, n: int, count: int) -> list[tuple[str, tuple[int, ...]]]:
    """Named shapes of a tensor mix: ``"llama"`` (:func:`llama_shapes` of ~n elements) or ``"log"``
    (`count` flat tensors of :func:`tensor_sizes`, exactly n elements)."""
    if kind == "llama":
        return llama_shapes(n)
    if kind == "log":
        return [(f"layers.{i}.w", (s,)) for i, s in enumerate(tensor_sizes(n, count))]
    raise ValueError(f"unknown tensor mix {kind!r} (llama, log)")


def count(n: int) -> str:
    """An element count for a case name: 4.19M, 100M, 1G."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def describe_mix(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> dict:
    """Elements, tensor count and the size range of a mix (for a case's params)."""
    sizes = [math.prod(s) for _, s in shapes]
    return {"elements": sum(sizes), "tensors": len(sizes), "smallest": min(sizes), "largest": max(sizes)}


# ---------------------------------------------------------------------------------------------
# result files
# ---------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_markdown(result: Result) -> str:
    """The op's table: one line per record (copy bandwidth first), then targets, skips, notes."""
    m = result.meta
    v = m["versions"]
    head = (f"{m['date']}; {m['device']} ({m['device_type']}, CPU capability: torch {m['cpu_capability']}, "
            f"cpift_fast {m.get('cpift_cpu_capability')}; {m['cpu_threads']} threads; load average "
            f"{m.get('load_average_1m_start', float('nan')):.1f} -> {m['load_average_1m']:.1f}); cpift_fast {v['cpift_fast']}, torch {v['torch']}, triton {v['triton']}; "
            f"--size {result.size}; timer {m['timer']}, {m['rounds']} interleaved rounds of >= "
            f"{m['min_run_time_s']} s per path; copy bandwidth {m['copy_gbps']:.1f} GB/s.")
    rows = []
    for r in result.records:
        rows.append({"case": r["case"], "path": r["path"], "role": r["role"], "median ms": 1e3 * r["median_s"],
                     "IQR ms": 1e3 * (r["q3_s"] - r["q1_s"]),
                     "min-max ms": f"{_fmt(1e3 * r['min_s'])}-{_fmt(1e3 * r['max_s'])}", "n": r["samples"],
                     "GB/s": r["gbps"], "% copy BW": r["pct_copy_bw"],
                     "time / baseline": f"{r['ratio']:.2f}x {r['baseline']}" if r["role"] != "copy" else ""})
    columns = ["case", "path", "role", "median ms", "IQR ms", "min-max ms", "n", "GB/s", "% copy BW",
               "time / baseline"]
    text = f"# {result.op}\n\n{head}\n\n{markdown_table(rows, columns)}\n"
    if result.targets:
        text += "\n" + markdown_table([{"target": t["name"], "measured": t["value"], "goal": t["goal"],
                                        "met": "met" if t["met"] else "**missed**"} for t in result.targets],
                                      ["target", "measured", "goal", "met"]) + "\n"
    for s in result.skipped:
        text += f"\nskipped {s['path']}: {s['reason']}\n"
    for note in result.notes:
        text += f"\n{note}\n"
    return text


def plot_result(result: Result, path: str) -> None:
    """Bar chart: median ms per path (log scale), min-max whiskers, one group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in result.records if r["role"] != "copy"]
    cases = list(dict.fromkeys(r["case"] for r in records))
    colors = {name: f"C{k % 10}" for k, name in enumerate(dict.fromkeys(r["path"] for r in records))}
    widest = max(sum(r["case"] == case for r in records) for case in cases)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.4 * len(cases) * widest + 3), 4.8))
    labelled = set()
    for i, case in enumerate(cases):
        mine = [r for r in records if r["case"] == case]
        width = 0.8 / len(mine)
        for j, r in enumerate(mine):
            ax.bar(i - 0.4 + width * (j + 0.5), 1e3 * r["median_s"], width, color=colors[r["path"]],
                   yerr=[[1e3 * (r["median_s"] - r["min_s"])], [1e3 * (r["max_s"] - r["median_s"])]], capsize=2,
                   label=None if r["path"] in labelled else r["path"])
            labelled.add(r["path"])
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median; whiskers min-max)")
    ax.set_xticks(range(len(cases)), ["\n".join(line for part in c.split(", ") for line in textwrap.wrap(part, 22))
                                      for c in cases], fontsize=7)
    m = result.meta
    ax.set_title(f"{result.op} ({result.size}), {m['device']}, {m['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_result(result: Result, out: str) -> list[str]:
    """<out>/<op>.json, .md and .png (each written to a temp file and renamed); returns the paths."""
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, result.op)
    _write_atomic(base + ".json", json.dumps(result.to_json(), indent=1) + "\n")
    _write_atomic(base + ".md", result_markdown(result))
    plot_result(result, base + ".png")
    return [base + ".json", base + ".md", base + ".png"]
