"""Benchmark: ParamMask primitives (pack, union, count) vs the pure-PyTorch path and bool masks.

N elements in ~100 tensors (log-uniform mix), and the tensor shapes of a LLaMA-style model. Per op:
  fused      ParamMask through the default backend (C++ on CPU, Triton on CUDA)
  reference  ParamMask on the pure-PyTorch path (CPIFT_BACKEND=torch)
  bool       what users write today: one bool tensor per parameter (8x the memory)
GB/s counts the bytes each path must move (words: 4 B per 32 elements; bool: 1 B per element).
"""

from __future__ import annotations

import functools

import torch

from .harness import Case, Path, describe_mix, mix, run_op

SIZES = {"quick": 2**22, "full": 2**28}
OPS = ("pack", "union", "count")
PATHS = ("fused", "pure PyTorch", "bool tensors")


def specs(size: str) -> list[dict]:
    n = SIZES[size]
    return [{"case": f"{op}, {n / 2**20:.0f}M elements in 100 tensors", "op": op, "mix": "log", "n": n,
             "tensors": 100, "headline": True, "paths": PATHS} for op in OPS] + [
        {"case": f"{op}, LLaMA shapes, {n / 2**20:.0f}M elements", "op": op, "mix": "llama", "n": n, "tensors": None,
         "headline": False, "paths": PATHS} for op in OPS]


@functools.lru_cache(maxsize=1)  # the cases of one mix (pack, union, count) come one after the other
def _bools(kind: str, n: int, tensors: int | None, device: torch.device):
    shapes = mix(kind, n, tensors)
    g = torch.Generator().manual_seed(0)
    a_bool = {name: (torch.rand(shape, generator=g) < 0.01).to(device) for name, shape in shapes}
    b_bool = {name: (torch.rand(shape, generator=g) < 0.01).to(device) for name, shape in shapes}
    return shapes, a_bool, b_bool


def build(spec: dict, device: torch.device) -> Case:
    from cpift_fast import ParamMask, _ops

    shapes, a_bool, b_bool = _bools(spec["mix"], spec["n"], spec["tensors"], device)
    n = sum(v.numel() for v in a_bool.values())
    a, b = ParamMask.from_bool(a_bool), ParamMask.from_bool(b_bool)
    op = spec["op"]
    ours = {"pack": (lambda: ParamMask.from_bool(a_bool), n / 8 + n),
            "union": (lambda: a | b, 3 * n / 8),
            "count": (lambda: a.count(), n / 8)}[op]
    theirs = {"pack": (lambda: {k: v.clone() for k, v in a_bool.items()}, 2 * n),
              "union": (lambda: {k: a_bool[k] | b_bool[k] for k in a_bool}, 3 * n),
              "count": (lambda: sum(int(v.sum()) for v in a_bool.values()), n)}[op]
    kernel = _ops.OPS[{"pack": "mask_pack", "union": "mask_binary", "count": "mask_popcount"}[op]]
    params = {k: v for k, v in spec.items() if k not in ("case", "paths")} | describe_mix(shapes)
    return Case(spec["case"], params, {
        PATHS[0]: Path(ours[0], "fused", ours[1], extra={"backend": kernel.backend_for(device)}),
        PATHS[1]: Path(ours[0], "reference", ours[1], backend="torch", extra={"backend": "torch"}),
        PATHS[2]: Path(theirs[0], "anchor", theirs[1]),
    }, baseline=PATHS[0])


def run(size: str, device: torch.device, progress: bool = True):
    from cpift_fast import ParamMask

    try:
        result = run_op("mask", specs(size), build, size, device, progress)
    finally:
        _bools.cache_clear()
    n = SIZES[size]
    words = ParamMask.from_bool({"w": torch.zeros(n, dtype=torch.bool)}).words.numel() * 4
    result.notes.append(f"words for {n} elements: {words / 1e6:.1f} MB (bool: {n / 1e6:.1f} MB). GB/s: the bytes "
                        "each path must move (words 4 B per 32 elements, bool 1 B per element).")
    return result
