"""EPI's cost per step: MaskedAdamW with an importance EMA beside MaskedAdamW alone (issue 11).

Paths, timed in one run, interleaved (round robin over repeats), fp32 params in `--tensors` tensors:

  alone           MaskedAdamW.step()
  fused/<dtype>   MaskedAdamW(importance=tracker).step(): the fused op masked_adamw_ema_ (C++ on CPU,
                  Triton on CUDA), one pass over g and θ; EMA state fp32 / bf16 / int8
  separate/<dtype> tracker.update() then MaskedAdamW.step(): the same two ops as two passes
  torch EMA       MaskedAdamW.step() after the EMA as a user would write it in PyTorch (fp32 state,
                  grad_x_param: foreach mul / abs / mul_ / add_)
  copy        torch.add(a, b, out=c) over the same number of fp32 elements: the machine's streaming
              bandwidth in this run (12 B per element)

Bytes per element: AdamW 28 (p and both moments read and written, g read); the EMA adds its state
read and written (8 / 4 / ≈2.03 B) and, unfused, g and θ read again (8 B). GB/s uses the bytes a
fused step would move (28 + state), so an unfused path shows its extra traffic as lost bandwidth.

    python bench/bench_importance.py [--quick] [--n N] [--tensors T] [--repeats R]
"""

from __future__ import annotations

import argparse
import os

import torch

from .harness import machine_info, median, tensor_sizes, time_it, write_results

STATE_BYTES = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0 + 8.0 / 256}  # read + write per element (+ scales)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2^22 parameters in 20 tensors")
    parser.add_argument("--n", type=int, default=None, help="parameters (default 2^26, quick 2^22)")
    parser.add_argument("--tensors", type=int, default=None, help="tensors (default 100, quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    n = args.n or (2**22 if args.quick else 2**26)
    count = args.tensors or (20 if args.quick else 100)
    repeats = args.repeats or (3 if args.quick else 7)
    device = torch.device(args.device)

    from cpift_fast import ImportanceTracker, MaskedAdamW, ops

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in tensor_sizes(n, count)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    named = [(f"t{i}", p) for i, p in enumerate(params)]

    def optimizer(**kw):
        return MaskedAdamW(named, lr=1e-6, **kw)

    steps = {"alone": optimizer().step}
    plain = optimizer()
    for name, dtype in DTYPES.items():
        tracker = ImportanceTracker(named, ["a"], beta=0.999, state_dtype=dtype)
        tracker.set_task("a")
        steps[f"fused/{name}"] = optimizer(importance=tracker).step
        apart = ImportanceTracker(named, ["a"], beta=0.999, state_dtype=dtype)
        apart.set_task("a")
        steps[f"separate/{name}"] = lambda apart=apart: (apart.update(), plain.step())
    ema = [torch.zeros_like(p) for p in params]
    grads = [p.grad for p in params]

    def torch_ema_step():
        with torch.no_grad():
            signal = torch._foreach_mul(grads, [p.detach() for p in params])
            torch._foreach_abs_(signal)
            torch._foreach_mul_(ema, 0.999)
            torch._foreach_add_(ema, signal, alpha=0.001)
        plain.step()

    steps["torch EMA"] = torch_ema_step
    a, b, c = (torch.randn(n, generator=gen).to(device) for _ in range(3))
    steps["copy"] = lambda: torch.add(a, b, out=c)

    times = {name: [] for name in steps}
    for fn in steps.values():  # warm-up: states created, kernels compiled
        fn()
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name] += time_it(fn, warmup=0, repeats=1, device=device)
    ms = {name: 1e3 * median(t) for name, t in times.items()}
    copy_gbps = 12 * n / (ms["copy"] / 1e3) / 1e9
    rows = []
    for name in steps:
        if name == "copy":
            continue
        state = name.split("/")[1] if "/" in name else ("fp32" if name == "torch EMA" else None)
        nbytes = (28 + (STATE_BYTES[state] if state else 0)) * n
        gbps = nbytes / (ms[name] / 1e3) / 1e9
        rows.append({"path": name, "state B/elem/task": STATE_BYTES[state] / 2 if state else 0, "ms": ms[name],
                     "GB/s": gbps, "% copy BW": 100 * gbps / copy_gbps, "vs alone": ms[name] / ms["alone"],
                     "GB/s vs alone": gbps / (28 * n / (ms["alone"] / 1e3) / 1e9)})
    by_path = {r["path"]: r for r in rows}
    notes = (f"copy: {ms['copy']:.1f} ms = {copy_gbps:.1f} GB/s (12 B/element). Medians of {repeats} interleaved "
             f"rounds, {n} fp32 params in {count} tensors, backend {ops.masked_adamw_ema_.backend_for(device)}. "
             f"Issue 11's targets: fused GB/s >= 90 % of alone's — fp32 / bf16 / int8 state: "
             + " / ".join(f"{by_path['fused/' + d]['GB/s vs alone']:.2f}" for d in DTYPES)
             + f"; fused with bf16 state <= 1.2x alone — {ms['fused/bf16'] / ms['alone']:.2f}x; fused >= 1.5x faster "
             f"than MaskedAdamW after a PyTorch EMA (fp32 state) — {ms['torch EMA'] / ms['fused/fp32']:.2f}x; fused "
             f"vs the two cpift ops as separate passes — fp32 / bf16 / int8: "
             + " / ".join(f"{ms['separate/' + d] / ms['fused/' + d]:.2f}x" for d in DTYPES) + " faster.")
    write_results("importance" if device.type == "cpu" else "importance-gpu", rows,
                  ["path", "state B/elem/task", "ms", "GB/s", "% copy BW", "vs alone", "GB/s vs alone"],
                  machine_info(device), notes)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    raise SystemExit(main())
