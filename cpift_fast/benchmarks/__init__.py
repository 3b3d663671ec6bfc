"""The benchmark suite behind ``cpift bench``: every op against its pure-PyTorch path and outside anchors.

One module per op, ``bench_<op>.py``, each with the same three functions:

- ``specs(size) -> list[dict]``: the cases at ``size`` ("quick" or "full"), cheap (no tensors):
  ``case`` (its name), ``paths`` (the path names), ``headline`` (shown in the README table) and
  the case's parameters;
- ``build(spec, device) -> harness.Case``: the inputs and one callable per path;
- ``run(size, device, progress) -> harness.Result``: the records of every case (timed by
  :func:`harness.run_op`), the op's targets and notes.

:func:`run` runs ops one after the other in this process and writes ``<op>.json``, ``.md`` and
``.png`` per op (:func:`harness.write_result`; the JSON format is described in harness.py).
``pytest bench/ --benchmark-only`` times the same callables of the quick cases with
pytest-benchmark.
"""

from __future__ import annotations

import gc
import importlib
import time
from types import ModuleType

import torch

OPS = ("mask", "adamw", "select", "overlap", "fuse", "importance")


def load(op: str) -> ModuleType:
    """The benchmark module of `op` (one of OPS)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the ops are: {', '.join(OPS)}")
    return importlib.import_module(f"{__name__}.bench_{op}")


def run(ops: list[str], size: str, out: str, device: torch.device, progress: bool = True) -> list[str]:
    """Run the benchmarks of `ops` at `size` on `device`; write each op's files into `out`.
    Returns the paths written."""
    from .harness import SIZES, write_result

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    modules = [load(op) for op in ops]  # every name checked before anything runs
    written = []
    for op, module in zip(ops, modules):
        start = time.perf_counter()
        if progress:
            print(f"{op} ({size}, {device})", flush=True)
        result = module.run(size, device, progress)
        written += write_result(result, out)
        if progress:
            print(f"{op}: {time.perf_counter() - start:.0f} s -> {out}/{op}.json, .md, .png", flush=True)
        del result
        gc.collect()
    return written
