"""Benchmark: ParamMask primitives (pack, union, count) vs the pure-PyTorch path and bool masks.

N elements in ~100 tensors. For each op:
  fused      ParamMask through the default backend (C++ on CPU, Triton on CUDA)
  reference  ParamMask on the pure-PyTorch path (CPIFT_BACKEND=torch)
  bool       what users write today: one bool tensor per parameter (8x the memory)
GB/s counts the bytes each path must move (words: 4 B per 32 elements; bool: 1 B per element).

    python bench/bench_mask.py            # N = 2^28
    python bench/bench_mask.py --quick    # N = 2^22
"""

from __future__ import annotations

import argparse
import os

import torch

from .harness import machine_info, median, tensor_sizes, time_it, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from cpift_fast import ParamMask

    n = 2**22 if args.quick else 2**28
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    sizes = tensor_sizes(n, 100)
    a_bool = {f"p{i}": (torch.rand(s, generator=g) < 0.01).to(device) for i, s in enumerate(sizes)}
    b_bool = {f"p{i}": (torch.rand(s, generator=g) < 0.01).to(device) for i, s in enumerate(sizes)}

    def per_path(backend: str | None):
        if backend is None:
            os.environ.pop("CPIFT_BACKEND", None)
        else:
            os.environ["CPIFT_BACKEND"] = backend
        a, b = ParamMask.from_bool(a_bool), ParamMask.from_bool(b_bool)
        return {
            "pack": (lambda: ParamMask.from_bool(a_bool), n / 8 + n),
            "union": (lambda: a | b, 3 * n / 8),
            "count": (lambda: a.count(), n / 8),
        }

    paths = {"fused": per_path(None), "reference": per_path("torch")}
    os.environ.pop("CPIFT_BACKEND", None)
    paths["bool"] = {
        "pack": (lambda: {k: v.clone() for k, v in a_bool.items()}, 2 * n),
        "union": (lambda: {k: a_bool[k] | b_bool[k] for k in a_bool}, 3 * n),
        "count": (lambda: sum(int(v.sum()) for v in a_bool.values()), n),
    }

    rows = []
    for op in ("pack", "union", "count"):
        times = {}
        for path, ops in paths.items():
            if path == "reference":
                os.environ["CPIFT_BACKEND"] = "torch"
            fn, nbytes = ops[op]
            times[path] = median(time_it(fn, repeats=args.repeats, device=device))
            os.environ.pop("CPIFT_BACKEND", None)
            rows.append({"op": op, "path": path, "ms": 1e3 * times[path], "GB/s": nbytes / times[path] / 1e9})
        for row in rows[-3:]:
            row["fused speed-up"] = times[row["path"]] / times["fused"]

    meta = machine_info(device) | {"elements": n, "tensors": len(sizes)}
    write_results("mask" + ("_quick" if args.quick else ""), rows, ["op", "path", "ms", "GB/s", "fused speed-up"], meta,
                  notes=f"words for {n} elements: {ParamMask.from_bool(a_bool).words.numel() * 4 / 1e6:.1f} MB "
                        f"(bool: {n / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
