"""Benchmark: core-region selection (exact global top-k of |tuned − base|).

In memory: N elements in ~T tensors (bf16 and fp32), fraction 1%:
  exact      cpift_fast.core_region (3 passes: histogram, refine, mask)
  approx     core_region(mode="approx") (2 passes)
  topk       the pure-PyTorch path: concatenate |diff| and torch.topk (cpift_fast.ops.select.core_region_topk)
  kthvalue   concatenate |diff|, torch.kthvalue for the threshold, compare (no tie handling)
Each method runs in its own subprocess: time = median of --repeats runs; peak extra memory = the
RSS high-water mark during the first run (reset through /proc/self/clear_refs just before it)
minus the RSS before it, the inputs being resident (tracemalloc cannot see torch's allocations).

Streamed: two sharded bf16 checkpoint directories of --stream-gb GB each; core_region over the
directories vs a plain read of every byte of both, with the page cache evicted first
(posix_fadvise DONTNEED: the disk is the limit) and warm.

    python bench/bench_select.py            # N = 1e8, ~200 tensors, 2 GB checkpoints
    python bench/bench_select.py --quick    # N = 2e6, 20 tensors, 0.05 GB checkpoints
Writes bench/results/select.json and select.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .harness import RESULTS, machine_info, tensor_sizes

METHODS = ("exact", "approx", "topk", "kthvalue")


def make_pair(size: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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
# one method in one process
# ---------------------------------------------------------------------------------------------

def run_worker(method: str, dtype_name: str, n: int, tensors: int, repeats: int, fraction: float) -> dict:
    from cpift_fast import core_region
    from cpift_fast.ops.select import core_region_topk
    from cpift_fast.select import round_half_up

    dtype = getattr(torch, dtype_name)
    base, tuned = {}, {}
    for i, size in enumerate(tensor_sizes(n, tensors)):
        base[f"layers.{i}.w"], tuned[f"layers.{i}.w"] = make_pair(size, dtype, i)
    k = round_half_up(fraction, n)

    def exact():
        return core_region(base, tuned, fraction, progress=False).count()

    def approx():
        return core_region(base, tuned, fraction, mode="approx", progress=False).count()

    def topk():
        bits = core_region_topk(list(base.items()), list(tuned.items()), k)
        return sum(int(b.sum()) for b in bits.values())

    def kthvalue():
        diff = torch.cat([(tuned[n].reshape(-1).float() - base[n].reshape(-1).float()).abs() for n in base])
        threshold = torch.kthvalue(diff, diff.numel() - k + 1).values
        bits = diff >= threshold
        return int(bits.sum())

    fn = {"exact": exact, "approx": approx, "topk": topk, "kthvalue": kthvalue}[method]
    before = reset_peak_rss()
    t0 = time.perf_counter()
    count = fn()
    times = [time.perf_counter() - t0]
    peak = peak_rss() - before
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"method": method, "dtype": dtype_name, "n": n, "k": k, "count": count, "times": times,
            "median_s": median, "input_gb_per_s": 2 * n * base["layers.0.w"].element_size() / median / 1e9,
            "peak_extra_bytes": peak}


def run_in_subprocess(method: str, dtype: str, args) -> dict:
    cmd = [sys.executable, "-m", "cpift_fast.benchmarks.bench_select", "--worker", method, dtype, str(args.n), str(args.tensors),
           str(args.repeats), str(args.fraction)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def run_stream(args, workdir: str) -> dict:
    from cpift_fast import core_region
    from cpift_fast.io import ShardedWriter

    n = int(args.stream_gb * 1e9 / 2)  # bf16
    dirs = [os.path.join(workdir, "base"), os.path.join(workdir, "tuned")]
    t0 = time.perf_counter()
    with ShardedWriter(dirs[0], "1GB") as wb, ShardedWriter(dirs[1], "1GB") as wt:
        for i, size in enumerate(tensor_sizes(n, args.tensors, seed=1)):
            b, t = make_pair(size, torch.bfloat16, 1000 + i)
            wb.add(f"layers.{i}.w", b)
            wt.add(f"layers.{i}.w", t)
    write_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d in dirs for f in os.listdir(d))
    result = {"n_per_checkpoint": n, "bytes_both": size, "write_s": write_s}
    for temp in ("cold", "warm"):
        if temp == "cold":
            for d in dirs:
                evict(d)
        t0 = time.perf_counter()
        plain_read(dirs)
        result[f"read_{temp}_s"] = time.perf_counter() - t0
        if temp == "cold":
            for d in dirs:
                evict(d)
        t0 = time.perf_counter()
        mask = core_region(dirs[0], dirs[1], args.fraction, progress=False)
        result[f"core_{temp}_s"] = time.perf_counter() - t0
        result[f"ratio_{temp}"] = result[f"core_{temp}_s"] / result[f"read_{temp}_s"]
    result["selected"] = mask.count()
    return result


# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    return {**machine_info("cpu"), "cores": os.cpu_count(), "platform": platform.platform(),
            "load_average_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--tensors", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--stream-gb", type=float, default=None, help="GB per checkpoint (0: skip)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, dtype, n, tensors, repeats, fraction = args.worker
        print(json.dumps(run_worker(method, dtype, int(n), int(tensors), int(repeats), float(fraction))))
        return
    args.n = args.n or (2_000_000 if args.quick else 100_000_000)
    args.tensors = args.tensors or (20 if args.quick else 200)
    if args.stream_gb is None:
        args.stream_gb = 0.05 if args.quick else 2.0

    rows = []
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            r = run_in_subprocess(method, dtype, args)
            rows.append(r)
            print(f"{dtype:>9} {method:>9}: {1e3 * r['median_s']:9.1f} ms  {r['input_gb_per_s']:6.2f} GB/s  "
                  f"peak extra {r['peak_extra_bytes'] / 2**20:8.1f} MiB  selected {r['count']}", flush=True)
    summary = {}
    for dtype in args.dtypes.split(","):
        by = {r["method"]: r for r in rows if r["dtype"] == dtype}
        s = {}
        if "exact" in by and "topk" in by:
            s["exact_vs_topk"] = by["topk"]["median_s"] / by["exact"]["median_s"]
        if "exact" in by and "kthvalue" in by:
            s["exact_vs_kthvalue"] = by["kthvalue"]["median_s"] / by["exact"]["median_s"]
        if "exact" in by and "approx" in by:
            s["approx_vs_exact"] = by["exact"]["median_s"] / by["approx"]["median_s"]
        summary[dtype] = s
        print(dtype, {k: round(v, 2) for k, v in s.items()})

    stream = None
    if args.stream_gb > 0:
        need = 2 * args.stream_gb * 1e9 * 1.1
        free = shutil.disk_usage(args.workdir).free
        if free < need + 2e9:
            print(f"skipping the streamed run: {free / 1e9:.1f} GB free in {args.workdir}, need {need / 1e9:.1f}")
        else:
            workdir = tempfile.mkdtemp(prefix="cpift-bench-select-", dir=args.workdir)
            try:
                stream = run_stream(args, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            print("streamed:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stream.items()})

    result = {"machine": machine(), "n": args.n, "tensors": args.tensors, "fraction": args.fraction,
              "repeats": args.repeats, "rows": rows, "ratios": summary, "stream": stream,
              "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.makedirs(args.out, exist_ok=True)
    tag = "select_quick" if args.quick else "select"
    write_atomic(os.path.join(args.out, f"{tag}.json"), json.dumps(result, indent=2))
    write_atomic(os.path.join(args.out, f"{tag}.md"), markdown(result))
    print(f"results in {args.out}/{tag}.json and .md")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# core selection benchmark ({result['date']})", "",
             f"N = {result['n']:.3g} elements in {result['tensors']} tensors, fraction {result['fraction']}, "
             f"median of {result['repeats']}; {m['device']}, {m['cores']} cores ({m['cpu_threads']} torch threads), "
             f"torch {m['torch']}, triton {m['triton']}, load average {m['load_average_1m']:.1f} at the start", "",
             "GB/s: input bytes (both checkpoints) / time. Peak extra includes the N/8-byte result mask.", "",
             "| dtype | method | time (ms) | GB/s | peak extra (MiB) | selected |", "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['method']} | {1e3 * r['median_s']:.1f} | {r['input_gb_per_s']:.2f} | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} | {r['count']} |")
    lines += ["", "| dtype | exact vs concat+topk | exact vs kthvalue | approx vs exact |", "|---|---:|---:|---:|"]
    for dtype, s in result["ratios"].items():
        lines.append(f"| {dtype} | {s.get('exact_vs_topk', float('nan')):.2f}× | "
                     f"{s.get('exact_vs_kthvalue', float('nan')):.2f}× | {s.get('approx_vs_exact', float('nan')):.2f}× |")
    s = result["stream"]
    if s:
        lines += ["", f"Streamed: two bf16 checkpoints, {s['bytes_both'] / 2e9:.2f} GB each",
                  "", "| page cache | plain read of both (s) | core_region (s) | ratio |", "|---|---:|---:|---:|"]
        for temp in ("cold", "warm"):
            lines.append(f"| {temp} | {s[f'read_{temp}_s']:.2f} | {s[f'core_{temp}_s']:.2f} | {s[f'ratio_{temp}']:.2f}× |")
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
