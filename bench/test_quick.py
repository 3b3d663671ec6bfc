"""The quick benchmark cases under pytest-benchmark: ``pytest bench/ --benchmark-only``.

One test per (op, case, path) of ``cpift bench --size quick`` (cpift_fast/benchmarks), timing the
same callables; tests are grouped per case, so pytest-benchmark's table compares the paths of a
case. ``--benchmark-json=FILE`` writes its JSON, ``--benchmark-autosave`` then
``--benchmark-compare`` compares runs. The streamed-checkpoint cases of ``select`` (page cache
evicted between calls) and the peak-memory probe are left to ``cpift bench``.
"""

import functools

import pytest
import torch

from cpift_fast.benchmarks import OPS, load

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(op, i, path) for op in OPS for i, spec in enumerate(load(op).specs("quick")) for path in spec["paths"]]


@functools.lru_cache(maxsize=1)  # the tests of one case run one after the other: its inputs are built once
def built(op: str, index: int):
    return load(op).build(load(op).specs("quick")[index], DEVICE)


@pytest.mark.parametrize(("op", "index", "path"), CASES,
                         ids=[f"{op}-{load(op).specs('quick')[i]['case']}-{path}" for op, i, path in CASES])
def test_quick(benchmark, op, index, path):
    case = built(op, index)
    benchmark.group = f"{op}: {case.name}"
    benchmark.extra_info.update({"role": case.paths[path].role, "bytes": case.paths[path].nbytes})
    benchmark(case.paths[path].call())
