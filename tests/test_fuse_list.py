"""The list SLERP ops (slerp_stats_list, slerp_apply_list): tensor t's result is the single op's on
tensor t, bit for bit, on every backend and every CPU capability, whatever the thread count and the
other tensors of the list; their argument errors name the tensor; fuse_models gives the same bits
and stats whether it hands the kernels runs of many tensors or one tensor at a time."""

import json
import re

import pytest
import torch

from cpift_fast import ParamMask, _ops, fuse_models, ops
from cpift_fast import fuse as fuse_mod
from helpers import forced

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# several C++ work-list chunks (2048 elements) in the big one; the interpreter runs a smaller one
BIG = {"cpp": 2**20 + 7, "torch": 2**20 + 7, "triton": 2**16 + 7}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1).view(torch.uint8)


def _words(n: int, gen: torch.Generator, density: float = 0.3) -> torch.Tensor:
    return ops.mask_pack(torch.rand(n, generator=gen) < density)


def _tensor(n: int, dtype, gen, layout: str) -> torch.Tensor:
    """n elements of `dtype`; layout 'flat', or 'transposed' / 'strided' (non-contiguous views)."""
    if layout == "transposed" and n > 1:
        rows = next(r for r in (7, 3, 1) if n % r == 0)
        return torch.randn(n // rows, rows, generator=gen).to(dtype).t()
    if layout == "strided":
        return torch.randn(2 * n, generator=gen).to(dtype)[::2]
    return torch.randn(n, generator=gen).to(dtype)


def _case(dtype, big: int, with_base: bool, seed: int = 0):
    """A list of pairs of mixed sizes (0, 1, 31, 33, big) and layouts; tensor 2's b has another dtype
    (a fold step blends an fp32 partial result with a task tensor); per-tensor coefficients and
    cores (0, 1 or 2 per tensor, some overlapping)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [0, 1, 31, 33, big, 33]
    layouts = ["flat", "flat", "transposed", "strided", "flat", "transposed"]
    a = [_tensor(n, dtype, gen, lay) for n, lay in zip(sizes, layouts)]
    b = [_tensor(n, torch.float32 if t == 2 else dtype, gen, "strided" if t == 4 else "flat")
         for t, n in enumerate(sizes)]
    base = [_tensor(n, dtype, gen, "flat") if with_base and t != 3 else None for t, n in enumerate(sizes)]
    coeffs = [float(c) for c in torch.rand(3 * len(sizes), generator=gen)]
    counts = [0, 1, 2, 0, 2, 1]
    values, words = [], []
    for n, k in zip(sizes, counts):
        values += [_tensor(n, dtype, gen, "strided") for _ in range(k)]
        words += [_words(n, gen) for _ in range(k)]
    return a, b, base, coeffs, values, words, counts


def _singles(a, b, base, coeffs, values, words, counts, rule):
    stats = [ops.slerp_stats(x, y, z) for x, y, z in zip(a, b, base)]
    outs = [ops.slerp_apply(x, y, z, *coeffs[3 * t:3 * t + 3], values[s], words[s], rule)
            for t, (x, y, z, s) in enumerate(zip(a, b, base, ops.fuse.core_slices(counts)))]
    return stats, outs


def _assert_same(stats_list, outs_list, stats, outs):
    assert stats_list.dtype == torch.float64 and stats_list.shape == (len(stats), 3)
    for t, (row, want) in enumerate(zip(stats_list, stats)):
        assert torch.equal(_bits(row), _bits(want)), f"stats of tensor {t}: {row.tolist()} vs {want.tolist()}"
    assert len(outs_list) == len(outs)
    for t, (got, want) in enumerate(zip(outs_list, outs)):
        assert got.dtype == want.dtype and got.shape == want.shape, t
        assert torch.equal(_bits(got), _bits(want)), f"apply of tensor {t}"


@pytest.mark.parametrize("rule", [0, 1, 2])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_list_ops_equal_single_ops(backend, dtype, with_base, rule):
    args = _case(dtype, BIG[backend], with_base)
    stats, outs = _singles(*args, rule)
    a, b, base, coeffs, values, words, counts = args
    _assert_same(ops.slerp_stats_list(a, b, base), ops.slerp_apply_list(*args, rule), stats, outs)


def test_empty_list(backend):
    stats = ops.slerp_stats_list([], [], [])
    assert stats.shape == (0, 3) and stats.dtype == torch.float64
    assert ops.slerp_apply_list([], [], [], [], [], [], [], 0) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_same_bits_on_every_capability_and_thread_count(cpu_capability, dtype):
    """C++: a tensor's stats are the same bits alone or in a list, on 1, 2 or 3 threads (the chunk
    sums are added in chunk order); the apply pass is elementwise."""
    if not _ops.extension()[0]:
        pytest.skip("the C++ extension is not built")
    args = _case(dtype, BIG["cpp"], True, seed=1)
    a, b, base = args[:3]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with forced("cpp"):
                runs.append((ops.slerp_stats_list(a, b, base), ops.slerp_apply_list(*args, 2),
                             *_singles(*args, 2)))
    finally:
        torch.set_num_threads(threads)
    want_stats, want_outs = runs[0][2], runs[0][3]
    for stats_list, outs_list, stats, outs in runs:
        _assert_same(stats_list, outs_list, want_stats, want_outs)
        _assert_same(torch.stack(stats), outs, want_stats, want_outs)


def test_cpp_stats_match_reference():
    """The fixed chunk order still sums in fp64 exactly enough: within rounding of the reference."""
    if not _ops.extension()[0]:
        pytest.skip("the C++ extension is not built")
    a, b, base = _case(torch.bfloat16, BIG["cpp"], True, seed=2)[:3]
    with forced("cpp"):
        got = ops.slerp_stats_list(a, b, base)
    torch.testing.assert_close(got, ops.slerp_stats_list.reference(a, b, base), rtol=1e-12, atol=1e-9)


# ---- argument errors: the same text on every backend, naming the tensor, its index and shape ----

def _bad_cases():
    def pairs():
        return [torch.randn(5), torch.randn(40)], [torch.randn(5), torch.randn(41)]

    def apply_args(**change):
        gen = torch.Generator().manual_seed(5)
        args = dict(a=[torch.randn(5), torch.randn(40)], b=[torch.randn(5), torch.randn(40)], base=[None, None],
                    coeffs=[1.0, 0.0, 0.0] * 2, values=[torch.randn(40)], words=[_words(40, gen)], counts=[0, 1],
                    rule=0)
        args.update(change)
        return tuple(args.values())

    return {
        "stats-numel": (lambda: (*pairs(), [None, None]), "slerp_stats_list",
                        "slerp_stats_list: a[1] has 40 elements (shape [40]), b[1] has 41 (shape [41])"),
        "stats-base": (lambda: ([torch.randn(5)], [torch.randn(5)], [torch.randn(2, 3)]), "slerp_stats_list",
                       "slerp_stats_list: base[0] has 6 elements (shape [2, 3]), a[0] has 5 (shape [5])"),
        "stats-dtype": (lambda: ([torch.randn(5), torch.ones(3, dtype=torch.float64)], [torch.randn(5), torch.randn(3)],
                                 [None, None]), "slerp_stats_list",
                        "slerp_stats_list: a[1] must be float32, float16 or bfloat16, got torch.float64"),
        "stats-lengths": (lambda: ([torch.randn(5)], [torch.randn(5)], []), "slerp_stats_list",
                          "slerp_stats_list: 1 a tensors, 1 b, 0 base"),
        "apply-numel": (lambda: apply_args(b=[torch.randn(5), torch.randn(4, 10).t()[:, :3]]), "slerp_apply_list",
                        "slerp_apply_list: a[1] has 40 elements (shape [40]), b[1] has 30 (shape [10, 3])"),
        "apply-coeffs": (lambda: apply_args(coeffs=[1.0, 0.0, 0.0]), "slerp_apply_list",
                         "slerp_apply_list: coeffs has 3 values, 2 tensors need 6"),
        "apply-counts": (lambda: apply_args(counts=[1, 1]), "slerp_apply_list",
                         "slerp_apply_list: counts sum to 2 cores but 1 value tensors are given"),
        "apply-values": (lambda: apply_args(values=[torch.randn(40).half()]), "slerp_apply_list",
                         "slerp_apply_list: values[0] (a core of a[1]) has dtype torch.float16, a[1] has torch.float32"),
        "apply-words": (lambda: apply_args(words=[torch.zeros(1, dtype=torch.int32)]), "slerp_apply_list",
                        "slerp_apply_list: words[0] (a core of a[1]) must be 2 int32 words, got 1"),
        "apply-rule": (lambda: apply_args(rule=3), "slerp_apply_list",
                       "slerp_apply_list: rule must be 0 (last), 1 (first) or 2 (mean); got 3"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_name_the_tensor_on_every_backend(case):
    make, name, expected = BAD[case]
    backends = ["torch"] + (["cpp"] if _ops.extension()[0] else []) + (
        ["triton"] if _ops.triton_version()[0] is not None and _ops.interpreting() else [])
    for backend in backends:
        with forced(backend), pytest.raises(ValueError) as info:
            getattr(ops, name)(*make())
        assert expected in str(info.value), (backend, str(info.value))


@pytest.mark.parametrize("case", [c for c in sorted(BAD) if c not in ("stats-lengths",)])
def test_cpp_kernel_checks_too(case):
    """Called without the Python check (torch.ops.cpift.*), the C++ kernel names the tensor the same way
    (dtypes print as c10 names there: Half, not torch.float16)."""
    if not _ops.extension()[0]:
        pytest.skip("the C++ extension is not built")
    make, name, expected = BAD[case]
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.cpift, name)(*make())
    assert re.split(r" has dtype|, got", expected)[0] in str(info.value), str(info.value)


# ---- fuse_models: runs of tensors vs one tensor at a time ----

def _model(n_small: int, dtype, gen, scale: float = 0.0):
    out = {}
    for i in range(n_small):
        out[f"model.layers.{i}.norm.weight"] = torch.randn(33 + i % 5, generator=gen).to(dtype)
        out[f"model.layers.{i}.proj.bias"] = torch.randn(7, 3, generator=gen).float()
    out["model.layers.0.big.weight"] = torch.randn(512, 1100, generator=gen).to(dtype)
    out["model.steps"] = torch.arange(5)
    return out


def _perturbed(model, gen, scale):
    return {n: (v.float() + scale * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point()
            else v.clone() for n, v in model.items()}


@pytest.mark.parametrize("task_vector", [False, True])
def test_fuse_models_runs_equal_one_tensor_at_a_time(monkeypatch, task_vector):
    gen = torch.Generator().manual_seed(7)
    base = _model(40, torch.bfloat16, gen)
    backbone = _perturbed(base, gen, 0.05)
    tasks = {f"task{k}": _perturbed(base, gen, 0.05) for k in range(3)}
    tasks["task1"] = {n: v.float() if n.endswith("norm.weight") else v for n, v in tasks["task1"].items()}  # cast cores
    floats = {n: v.shape for n, v in base.items() if v.is_floating_point()}
    cores = {k: ParamMask.from_bool({n: torch.rand(s, generator=gen) < 0.1 for n, s in floats.items()}) for k in tasks}
    t = {r"layers\.3\.": 0.0, "norm": 0.3, "default": [0.2, 0.7]}
    kwargs = dict(t=t, base=base if task_vector else None, overlap_rule="mean", progress=False, readahead=0)
    runs, stats = fuse_models(backbone, tasks, cores, **kwargs)
    monkeypatch.setattr(fuse_mod, "_RUN_ELEMENTS", 1)  # every tensor alone
    singles, stats1 = fuse_models(backbone, tasks, cores, **kwargs)
    assert list(runs) == list(singles) == list(base)
    for name in base:
        assert runs[name].dtype == singles[name].dtype and torch.equal(_bits(runs[name]), _bits(singles[name])), name
    assert json.dumps(stats, sort_keys=False) == json.dumps(stats1, sort_keys=False)
    assert stats["modes"]["copy"] == 2 and stats["modes"]["copy_non_float"] == 1 and stats["cast_cores"]
