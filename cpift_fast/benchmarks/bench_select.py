"""Benchmark: core-region selection (exact global top-k of |tuned − base|).

In memory, fraction 1 %: N elements in T tensors (log-uniform mix, bf16 and fp32), the tensor
shapes of a LLaMA-style model (bf16), and 100 tensors of 200k elements (bf16; tensors below the
parallel threshold). Paths:
  exact      cpift_fast.core_region (3 passes: histogram, refine, mask)
  approx     core_region(mode="approx") (2 passes)
  topk       the pure-PyTorch path: concatenate |diff| and torch.topk
             (cpift_fast.ops.select.core_region_topk: the same k and tie rule as exact)
  kthvalue   concatenate |diff|, torch.kthvalue for the threshold, compare (no tie handling)
(core_region under CPIFT_BACKEND=torch is not timed: its histogram reference is written to be
read, ~25x slower than concat + topk, ~20 minutes per call at the full size.)
GB/s: input bytes (both tensors) / time. Peak extra memory: one process (``--probe``) builds the
cases one after the other and runs each path once after a warm-up, with the RSS high-water mark
reset through /proc/self/clear_refs before each and glibc's mmap threshold fixed at 64 KiB (every
larger block is its own mapping, returned at free, so the RSS follows the live memory from path
to path); it includes the N/8-byte result mask. On CUDA: torch.cuda.max_memory_allocated.

Streamed: two sharded bf16 checkpoint directories of G GB each; core_region over the directories
(with its default read-ahead, and with readahead=0: no reader thread) vs a plain read of every
byte of both, with the page cache evicted before each call (posix_fadvise DONTNEED: the disk is
the limit) and warm.

Targets: exact >= 5x concat + topk (every in-memory case), peak extra <= 64 MB, approx >= 1.5x
exact, streamed <= 1.5x the plain read warm and <= 1.1x cold.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from .harness import BUDGETS, Case, Path, Stats, count, describe_mix, mix, record, run_op, target, tensor_sizes

PATHS = ("exact", "approx", "concat + topk", "concat + kthvalue")
SIZES = {"quick": {"n": 2_000_000, "tensors": 20, "uniform": (20, 100_000), "stream_gb": 0.05},
         "full": {"n": 100_000_000, "tensors": 200, "uniform": (100, 200_000), "stream_gb": 2.0}}
FRACTION = 0.01


def make_pair(size, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fine-tuning-like pair: weights ~ N(0, 0.02), dense small updates ~ N(0, 2e-4)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g) * 0.02
    tuned = base + torch.randn(size, generator=g) * 2e-4
    return base.to(dtype), tuned.to(dtype)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); returns the current RSS in bytes.

    Without the reset, the peak of building the inputs would hide the method's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    try:
        return _status_kb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# in memory
# ---------------------------------------------------------------------------------------------

def specs(size: str) -> list[dict]:
    s = SIZES[size]
    many, each = s["uniform"]
    return [{"case": f"{dtype}, {count(s['n'])} elements in {s['tensors']} tensors", "dtype": dtype, "mix": "log",
             "n": s["n"], "tensors": s["tensors"], "headline": True, "paths": PATHS}
            for dtype in ("bfloat16", "float32")] + [
        {"case": f"bfloat16, LLaMA shapes, {count(s['n'])} elements", "dtype": "bfloat16", "mix": "llama",
         "n": s["n"], "tensors": None, "headline": True, "paths": PATHS},
        {"case": f"bfloat16, {many} tensors of {count(each)}", "dtype": "bfloat16", "mix": "uniform",
         "n": many * each, "tensors": many, "headline": True, "paths": PATHS}]


def _shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    if spec["mix"] == "uniform":
        return [(f"layers.{i}.w", (spec["n"] // spec["tensors"],)) for i in range(spec["tensors"])]
    return mix(spec["mix"], spec["n"], spec["tensors"])


def build(spec: dict, device: torch.device) -> Case:
    from cpift_fast import core_region
    from cpift_fast.ops.select import core_region_topk
    from cpift_fast.select import round_half_up

    dtype = getattr(torch, spec["dtype"])
    shapes = _shapes(spec)
    base, tuned = {}, {}
    for i, (name, shape) in enumerate(shapes):
        b, t = make_pair(shape, dtype, i)
        base[name], tuned[name] = b.to(device), t.to(device)
    n = sum(t.numel() for t in base.values())
    k = round_half_up(FRACTION, n)

    def exact():
        return core_region(base, tuned, FRACTION, progress=False).count()

    def approx():
        return core_region(base, tuned, FRACTION, mode="approx", progress=False).count()

    def topk():
        bits = core_region_topk(list(base.items()), list(tuned.items()), k)
        return sum(int(b.sum()) for b in bits.values())

    def kthvalue():
        diff = torch.cat([(tuned[n].reshape(-1).float() - base[n].reshape(-1).float()).abs() for n in base])
        threshold = torch.kthvalue(diff, diff.numel() - k + 1).values
        bits = diff >= threshold
        return int(bits.sum())

    nbytes = 2 * n * dtype.itemsize
    slow = {"rounds": 2}  # seconds per call at full size: two rounds give min and max
    params = {k: v for k, v in spec.items() if k not in ("case", "paths")} | describe_mix(shapes) | {"k": k}
    return Case(spec["case"], params, {
        PATHS[0]: Path(exact, "fused", nbytes),
        PATHS[1]: Path(approx, "fused", nbytes),
        PATHS[2]: Path(topk, "reference", nbytes, **slow),
        PATHS[3]: Path(kthvalue, "anchor", nbytes, **slow),
    }, baseline=PATHS[0])


def probe(size: str, device: torch.device) -> dict[str, dict[str, dict]]:
    """Each path of each case once, after a warm-up: {case: {path: {"peak_extra_bytes", "selected"}}}."""
    from cpift_fast import core_region

    warm = {"w": torch.ones(4096, device=device)}
    core_region(warm, {"w": warm["w"] * 2}, FRACTION, progress=False)  # extension and thread pool up
    return {spec["case"]: _probe_case(build(spec, device), device) for spec in specs(size)}


def _probe_case(case: Case, device: torch.device) -> dict[str, dict]:
    out = {}
    for name, path in case.paths.items():
        fn = path.call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            selected = fn()
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            before = reset_peak_rss()
            selected = fn()
            peak = peak_rss() - before
        out[name] = {"peak_extra_bytes": peak, "selected": int(selected)}
    return out


def probe_in_subprocess(size: str, device: torch.device) -> dict[str, dict[str, dict]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "cpift_fast.benchmarks.bench_select", "--probe", size, str(device)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"select memory probe failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# streamed checkpoints
# ---------------------------------------------------------------------------------------------

def evict(directory: str) -> None:
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(directories: list[str]) -> int:
    total = 0
    buf = bytearray(16 << 20)
    for d in directories:
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                while (got := f.readinto(buf)):
                    total += got
    return total


STREAMED = "core_region (streamed)"


def run_stream(size: str, workdir: str, copy_gbps: float) -> tuple[list[dict], dict]:
    """Records of the streamed cases (cold, warm) and facts about the checkpoints."""
    from cpift_fast import core_region
    from cpift_fast.io import ShardedWriter

    s = SIZES[size]
    n = int(s["stream_gb"] * 1e9 / 2)  # bf16
    dirs = [os.path.join(workdir, "base"), os.path.join(workdir, "tuned")]
    t0 = time.perf_counter()
    with ShardedWriter(dirs[0], "1GB") as wb, ShardedWriter(dirs[1], "1GB") as wt:
        for i, each in enumerate(tensor_sizes(n, s["tensors"], seed=1)):
            b, t = make_pair(each, torch.bfloat16, 1000 + i)
            wb.add(f"layers.{i}.w", b)
            wt.add(f"layers.{i}.w", t)
    write_s = time.perf_counter() - t0
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d in dirs for f in os.listdir(d))
    selected = []

    def select(**kwargs):
        return lambda: selected.append(core_region(dirs[0], dirs[1], FRACTION, progress=False, **kwargs).count())

    paths = {"plain read of both": Path(lambda: plain_read(dirs), "floor", nbytes),
             STREAMED: Path(select(), "fused", nbytes),
             "core_region (streamed, readahead=0)": Path(select(readahead=0), "fused", nbytes)}
    budget = BUDGETS[size]
    records = []
    for temp in ("cold", "warm"):
        case = Case(f"streamed 2 x {nbytes / 2e9:.2g} GB bf16 checkpoints, {temp} page cache",
                    {"mix": "log", "n": n, "tensors": s["tensors"], "cache": temp, "headline": True},
                    paths, baseline="plain read of both")
        times = {name: [] for name in paths}
        for _ in range(budget.rounds):  # one call per round, evicted before it when cold
            for name, path in paths.items():
                if temp == "cold":
                    for d in dirs:
                        evict(d)
                t0 = time.perf_counter()
                path.fn()
                times[name].append(time.perf_counter() - t0)
        stats = {name: Stats.of(t) for name, t in times.items()}
        records += [record("select", case, name, stats[name], copy_gbps, stats[case.baseline]) for name in paths]
    return records, {"bytes_both": nbytes, "write_s": write_s, "selected": selected[-1]}


# ---------------------------------------------------------------------------------------------


def run(size: str, device: torch.device, progress: bool = True, workdir: str | None = None):
    result = run_op("select", specs(size), build, size, device, progress)
    if progress:
        print("  select: peak memory (one process)", flush=True)
    peaks = probe_in_subprocess(size, device)
    for spec in specs(size):
        for name, facts in peaks[spec["case"]].items():
            result.find(spec["case"], name).update(facts)
        exact, topk = result.find(spec["case"], PATHS[0]), result.find(spec["case"], PATHS[2])
        result.targets.append(target(f"exact vs concat + topk, {spec['case']}", topk["ratio"], ">= 5"))
        result.targets.append(target(f"exact: peak extra memory (MB), {spec['case']}",
                                     exact["peak_extra_bytes"] / 1e6, "<= 64"))
        result.targets.append(target(f"approx vs exact, {spec['case']}",
                                     1 / result.find(spec["case"], PATHS[1])["ratio"], ">= 1.5"))

    workdir = workdir or tempfile.gettempdir()
    gb = SIZES[size]["stream_gb"]
    need = 2 * gb * 1e9 * 1.1
    free = shutil.disk_usage(workdir).free
    if free < need + 2e9:
        result.skipped.append({"path": "streamed checkpoints", "reason": f"{free / 1e9:.1f} GB free in {workdir}, "
                                                                         f"need {need / 1e9:.1f}"})
    else:
        tmp = tempfile.mkdtemp(prefix="cpift-bench-select-", dir=workdir)
        try:
            if progress:
                print(f"  select: streamed, 2 x {gb} GB checkpoints", flush=True)
            records, facts = run_stream(size, tmp, result.meta["copy_gbps"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result.records += records
        result.extra["stream"] = facts
        for temp, goal in (("warm", "<= 1.5"), ("cold", "<= 1.1")):
            r = next(r for r in records if r["params"]["cache"] == temp and r["path"] == STREAMED)
            result.targets.append(target(f"streamed core_region / plain read, {temp} page cache", r["ratio"], goal))
    result.notes.append(f"fraction {FRACTION}; kthvalue does not break ties (bf16 has many), so it may select "
                        "more than k; 'selected' is each path's count. Peak extra memory includes the N/8-byte mask.")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        print(json.dumps(probe(sys.argv[2], torch.device(sys.argv[3]))))
    else:
        sys.exit("usage: python -m cpift_fast.benchmarks.bench_select --probe SIZE DEVICE "
                 "(internal; run `cpift bench select`)")
