"""Shared benchmark harness: timing medians, machine facts, mixed tensor sizes, result files.

Every benchmark compares, in one run, the fused path with the pure-PyTorch path and outside
anchors, and writes bench/results/<name>.json (+ .md table) with the machine and versions.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# bench/results/ in a checkout (an editable install), else ./cpift-bench
RESULTS = (os.path.join(ROOT, "bench", "results") if os.path.isfile(os.path.join(ROOT, "pyproject.toml"))
           and os.path.isdir(os.path.join(ROOT, "bench")) else os.path.abspath("cpift-bench"))


def sync(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
            device: torch.device | str = "cpu") -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Where and with what a result was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": name,
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def tensor_sizes(n: int, count: int, seed: int = 0) -> list[int]:
    """`count` sizes, log-uniform over ~3.5 decades (like a model's mix), summing to exactly n."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(count, generator=g) * 8)
    sizes = (weights / weights.sum() * n).floor().to(torch.int64).clamp_min(1)
    sizes[int(sizes.argmax())] += n - int(sizes.sum())
    return [int(s) for s in sizes]


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict], columns: Sequence[str], meta: dict, notes: str = "") -> str:
    """bench/results/<name>.json and <name>.md, each written to a temp file and renamed."""
    os.makedirs(RESULTS, exist_ok=True)
    table = markdown_table(rows, columns)
    header = ", ".join(f"{k}: {v}" for k, v in meta.items() if v is not None)
    md = f"# {name}\n\n{header}\n\n{table}\n" + (f"\n{notes}\n" if notes else "")
    for suffix, text in ((".json", json.dumps({"meta": meta, "rows": list(rows), "notes": notes}, indent=1)),
                         (".md", md)):
        path = os.path.join(RESULTS, name + suffix)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(md)
    return table
