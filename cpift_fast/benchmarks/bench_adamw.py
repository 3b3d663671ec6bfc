"""Benchmark: the masked AdamW step.

N parameters in ~T tensors of mixed sizes (fp32, then bf16 with bf16 moments), frozen fraction
0.01 / 0.5 / 0.99, frozen elements either random or one contiguous run per tensor. Per step:

  masked     cpift_fast.MaskedAdamW, fused kernel (C++ on CPU, Triton on CUDA)
  torch      torch.optim.AdamW(fused=True), no mask (the speed a masked step should approach)
  reference  MaskedAdamW on the pure-PyTorch path (reference.masked_adamw_: foreach AdamW on the
             tensors, then the frozen elements restored from a copy) — what a user would write

Time = median of --steps steps after --warmup steps; masked and torch steps alternate, so that both
see the same machine load (the table also gives the ratio of the fastest steps: on a shared machine
the median drifts with other load, the minimum much less). Effective GB/s = the bytes a full unmasked AdamW step moves (fp32:
28 B/param, bf16: 14 B/param) plus the mask (N/8 B), over the time.
On CUDA it also measures the copy bandwidth (read + write of one large buffer) and reports the
masked step's effective bandwidth as a fraction of it.

    python bench/bench_adamw.py              # N = 64M (2^26), 100 tensors
    python bench/bench_adamw.py --quick      # N = 4M, 20 tensors
Writes bench/results/adamw[_quick].json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from .harness import RESULTS, tensor_sizes


FRACTIONS = (0.01, 0.5, 0.99)
LAYOUTS = ("random", "contiguous")


def make_mask(names, params, fraction: float, layout: str, seed: int = 0):
    from cpift_fast import ParamMask

    g = torch.Generator().manual_seed(seed)
    bits = {}
    for name, p in zip(names, params):
        if layout == "random":
            bits[name] = torch.rand(p.numel(), generator=g) < fraction
        else:
            b = torch.zeros(p.numel(), dtype=torch.bool)
            b[: round(fraction * p.numel())] = True
            bits[name] = b
    return ParamMask.from_bool(bits, device=params[0].device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(runs: dict, device, warmup: int, steps: int) -> dict[str, float]:
    """Median ms/step of each (optimizer, CPIFT_BACKEND) in `runs`, their steps alternating so
    that a change in machine load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for k in range(warmup + steps):
        for name, (opt, backend) in runs.items():
            if backend is not None:
                os.environ["CPIFT_BACKEND"] = backend
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            if k >= warmup:
                times[name].append(time.perf_counter() - t0)
            os.environ.pop("CPIFT_BACKEND", None)
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def bench_dtype(dtype: torch.dtype, sizes: list[int], device: torch.device, args, progress) -> list[dict]:
    from cpift_fast import MaskedAdamW

    n = sum(sizes)
    g = torch.Generator().manual_seed(1)
    names = [f"t{i}" for i in range(len(sizes))]
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype)) for s in sizes]
    for p in params:
        p.grad = (torch.randn(p.numel(), generator=g) * 1e-3).to(device=device, dtype=dtype)
    nominal = n * (28 if dtype == torch.float32 else 14) + n / 8

    torch_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    fused_backend = "cpp" if device.type == "cpu" else "triton"
    rows = []
    for layout in LAYOUTS:
        for fraction in FRACTIONS:
            mask = make_mask(names, params, fraction, layout)
            opt = MaskedAdamW(list(zip(names, params)), lr=1e-4, frozen=mask)
            ms = time_interleaved({"masked": (opt, fused_backend), "torch": (torch_opt, None)}, device,
                                  args.warmup, args.steps)
            (masked_ms, masked_min), (torch_ms, torch_min) = ms["masked"], ms["torch"]
            ref_ms = time_interleaved({"reference": (opt, "torch")}, device, 0, args.ref_steps)["reference"][0]
            del opt
            progress.update(1)
            rows.append({
                "dtype": str(dtype).replace("torch.", ""), "layout": layout, "frozen": fraction,
                "masked_ms": masked_ms, "torch_fused_ms": torch_ms, "reference_ms": ref_ms,
                "masked_gbps": nominal / masked_ms / 1e6, "torch_fused_gbps": nominal / torch_ms / 1e6,
                "masked_over_torch": masked_ms / torch_ms, "reference_over_masked": ref_ms / masked_ms,
                "masked_min_ms": masked_min, "torch_fused_min_ms": torch_min,
                "masked_over_torch_min": masked_min / torch_min,
            })
    del params, torch_opt
    return rows


def machine(device: torch.device) -> dict:
    import triton

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# masked AdamW step — {result['n'] / 2**20:.0f}M params in {result['tensors']} tensors",
             "", f"{m['date']}; {m.get('gpu', m['cpu'])}, {m['threads']} threads; torch {m['torch']}, "
             f"triton {m['triton']}; median of {result['steps']} steps (reference: {result['ref_steps']}).", ""]
    if "copy_gbps" in result:
        lines += [f"Copy bandwidth: {result['copy_gbps']:.0f} GB/s.", ""]
    lines += ["| dtype | frozen | layout | masked ms | torch fused ms | reference ms | masked GB/s | "
              "masked / torch | (best of steps) | reference / masked |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['frozen']:.0%} | {r['layout']} | {r['masked_ms']:.1f} | "
                     f"{r['torch_fused_ms']:.1f} | {r['reference_ms']:.0f} | {r['masked_gbps']:.1f} | "
                     f"{r['masked_over_torch']:.2f}x | {r['masked_over_torch_min']:.2f}x | "
                     f"{r['reference_over_masked']:.1f}x |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['dtype']}\n{r['frozen']:.0%} {r['layout'][:4]}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    width = 0.28
    ax.bar([i - width for i in x], [r["masked_ms"] for r in rows], width, label="MaskedAdamW (fused)")
    ax.bar(list(x), [r["torch_fused_ms"] for r in rows], width, label="torch AdamW fused (no mask)")
    ax.bar([i + width for i in x], [r["reference_ms"] for r in rows], width, label="pure-PyTorch masked path")
    ax.set_yscale("log")
    ax.set_ylabel("ms / step (log)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_title(f"masked AdamW step, {result['n'] / 2**20:.0f}M params, {result['machine'].get('gpu', 'CPU')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4M params in 20 tensors")
    parser.add_argument("--n", type=int, default=None, help="total parameters (default 2^26, quick 2^22)")
    parser.add_argument("--tensors", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per config")
    parser.add_argument("--ref-steps", type=int, default=None, help="timed steps of the reference path")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    args.n = args.n or (2**22 if args.quick else 2**26)
    args.tensors = args.tensors or (20 if args.quick else 100)
    args.steps = args.steps or (5 if args.quick else 9)
    args.ref_steps = args.ref_steps or (3 if args.quick else 2)
    device = torch.device(args.device)
    from tqdm import tqdm

    sizes = tensor_sizes(args.n, args.tensors)
    dtypes = (torch.float32, torch.bfloat16)
    rows = []
    with tqdm(total=len(dtypes) * len(LAYOUTS) * len(FRACTIONS), desc="adamw configs") as progress:
        for dtype in dtypes:
            rows += bench_dtype(dtype, sizes, device, args, progress)
    result = {"n": args.n, "tensors": args.tensors, "steps": args.steps, "ref_steps": args.ref_steps,
              "machine": machine(device), "rows": rows}
    if device.type == "cuda":
        result["copy_gbps"] = copy_bandwidth(device, 1 << 30)
        for r in rows:
            r["masked_over_copy_bw"] = r["masked_gbps"] / result["copy_gbps"]
    os.makedirs(args.out, exist_ok=True)
    tag = "adamw_quick" if args.quick else "adamw"
    text = markdown(result)
    print(text)
    write_atomic(os.path.join(args.out, f"{tag}.json"), json.dumps(result, indent=2))
    write_atomic(os.path.join(args.out, f"{tag}.md"), text)
    plot(result, os.path.join(args.out, f"{tag}.png"))
    print(f"results in {args.out}/{tag}.json, .md and .png")


if __name__ == "__main__":
    main()
