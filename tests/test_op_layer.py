"""The op layer: every op has one home (cpift_fast/ops/<op>.py), exists as torch.ops.cpift.<op> right
after import, passes torch.library.opcheck on every backend, and rejects bad input with the same
message whichever backend would have run it."""

import importlib

import pytest
import torch

import cpift_fast  # noqa: F401 - defines torch.ops.cpift.*
from cpift_fast import _ops, ops
from helpers import forced

HOMES = {
    "mask": {"mask_pack", "mask_unpack", "mask_popcount", "mask_binary"},
    "adamw": {"masked_adamw_", "masked_adamw_ema_", "masked_grad_sq_norm"},
    "select": {"select_histogram", "select_mask"},
    "overlap": {"overlap_counts"},
    "fuse": {"slerp_stats", "slerp_apply", "slerp_stats_list", "slerp_apply_list"},
    "importance": {"importance_ema_"},
}


def _words(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=gen)


def _adamw_args():
    gen = torch.Generator().manual_seed(0)
    sizes = (33, 70)
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    moments = [[torch.rand(n, generator=gen) for n in sizes] for _ in range(3)]
    frozen = [_words((n + 31) // 32, n) for n in sizes]
    return (params, grads, *moments, frozen, torch.tensor([3.0, 3.0]), torch.tensor(1e-3, dtype=torch.float64),
            0.9, 0.999, 0.01, 1e-8, True, False, torch.tensor(2.0), None)


def _pair(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1000, generator=gen).to(dtype)
    return base, (base.float() + 0.01 * torch.randn(1000, generator=gen)).to(dtype)


# one valid call per op (CPU tensors)
SAMPLES = {
    "mask_pack": lambda: (torch.rand(77, generator=torch.Generator().manual_seed(0)) < 0.5,),
    "mask_unpack": lambda: (_words(5, 0), 150),
    "mask_popcount": lambda: (_words(9, 1), torch.tensor([0, 4, 4, 9])),
    "mask_binary": lambda: (_words(6, 2), _words(6, 3), ops.MASK_ANDNOT),
    "masked_adamw_": _adamw_args,
    "masked_adamw_ema_": lambda: (*_adamw_args(), [torch.zeros(n, dtype=torch.uint8) for n in (33, 70)],
                                  [torch.rand(1), torch.rand(1)], 0.99, 1, 3, [4, 1]),
    "masked_grad_sq_norm": lambda: ([torch.randn(33), torch.randn(70)], [_words(2, 4), _words(3, 5)]),
    "select_histogram": lambda: (lambda p: ([p[0], torch.randn(5)], [p[1], torch.randn(5)], 0, 0))(_pair()),
    "select_mask": lambda: (lambda p: ([p[0], torch.randn(40)], [p[1], torch.randn(40)], 0x3C000000, 3))(_pair()),
    "overlap_counts": lambda: ([_words(7, 6), _words(7, 7), _words(7, 8)],),
    "slerp_stats": lambda: (torch.randn(70), torch.randn(70), torch.randn(70)),
    "slerp_apply": lambda: (torch.randn(70), torch.randn(70), torch.randn(70), 0.5, 0.25, 0.25, [torch.randn(70)],
                            [_words(3, 9)], 2),
    "slerp_stats_list": lambda: ([torch.randn(70), torch.randn(5).half()], [torch.randn(70), torch.randn(5).half()],
                                 [torch.randn(70), None]),
    "slerp_apply_list": lambda: ([torch.randn(70), torch.randn(40)], [torch.randn(70), torch.randn(40)],
                                 [torch.randn(70), None], [0.5, 0.25, 0.25, 0.3, 0.7, 0.0],
                                 [torch.randn(70), torch.randn(40), torch.randn(40)], [_words(3, 9), _words(2, 10),
                                                                                        _words(2, 11)], [1, 2], 2),
    "importance_ema_": lambda: ([torch.zeros(70, dtype=torch.uint8)], [torch.rand(1)], [torch.randn(70)],
                                [torch.randn(70)], 0.99, 0, 3, torch.tensor(2.0), None, [7]),
}

# one bad call per op, and the message every backend must give
BAD = {
    "mask_pack": (lambda: (torch.zeros(3),), "mask_pack: bits must be bool"),
    "mask_unpack": (lambda: (_words(1, 0), 40), "mask_unpack: numel 40 needs 2 words, got 1"),
    "mask_popcount": (lambda: (_words(4, 0), torch.tensor([0, 9])), "mask_popcount"),
    "mask_binary": (lambda: (_words(3, 0), _words(4, 0), 0), "mask_binary"),
    "masked_adamw_": (lambda: (lambda a: (a[0], [a[1][0], a[1][1][:5]], *a[2:]))(_adamw_args()),
                      "masked_adamw_: grads[1]"),
    "masked_adamw_ema_": (lambda: (*_adamw_args(), [torch.zeros(33), torch.zeros(69)], [], 0.99, 1, 3, []),
                          "masked_adamw_ema_: ema_state[1]"),
    "masked_grad_sq_norm": (lambda: ([torch.randn(33)], [_words(2, 0), _words(2, 0)]), "masked_grad_sq_norm: frozen"),
    "select_histogram": (lambda: ([torch.randn(3), torch.randn(10)], [torch.randn(3), torch.randn(11)], 0, 0),
                         "select_histogram: base[1]"),
    "select_mask": (lambda: ([torch.randn(10)], [torch.randn(11)], 1, 0), "select_mask: base[0]"),
    "overlap_counts": (lambda: ([_words(7, 0), _words(6, 0)],), "overlap_counts"),
    "slerp_stats": (lambda: (torch.randn(40), torch.randn(41), None), "slerp_stats"),
    "slerp_apply": (lambda: (torch.randn(40), torch.randn(40), None, 1.0, 0.0, 0.0, [], [], 3), "slerp_apply"),
    "slerp_stats_list": (lambda: ([torch.randn(4), torch.randn(40)], [torch.randn(4), torch.randn(41)], [None, None]),
                         "slerp_stats_list: a[1] has 40 elements (shape [40]), b[1] has 41 (shape [41])"),
    "slerp_apply_list": (lambda: ([torch.randn(40)], [torch.randn(40)], [None], [1.0, 0.0, 0.0], [], [], [1], 0),
                         "slerp_apply_list: counts sum to 1 cores but 0 value tensors"),
    "importance_ema_": (lambda: ([torch.zeros(70)], [], [torch.randn(70)], [torch.randn(69)], 0.9, 0, 0, None, None),
                        "importance_ema_: grads[0]"),
}


def _backends():
    out = ["torch"]
    if _ops.extension()[0]:
        out.append("cpp")
    if _ops.triton_version()[0] is not None and _ops.interpreting():
        out.append("triton")
    return out


def test_every_op_has_one_home_and_exists_after_import():
    assert set(_ops.OPS) == set().union(*HOMES.values())
    for module, names in HOMES.items():
        home = importlib.import_module(f"cpift_fast.ops.{module}")
        for name in names:
            op = _ops.OPS[name]
            assert getattr(home, name) is op, f"{name} is not defined in cpift_fast/ops/{module}.py"
            assert getattr(ops, name) is op
            assert hasattr(torch.ops.cpift, name), f"torch.ops.cpift.{name} missing after import"
            assert _ops.has_kernel(f"cpift::{name}", "CompositeExplicitAutograd")  # the reference, default


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name, backend):
    """Schema, fake impl and the backend's kernel agree (what torch.compile relies on). The backend
    under test is put on the CPU key for the duration (C++ is there already)."""
    if backend not in _backends():
        pytest.skip(f"{backend} backend not available here: {_ops.OPS[name].why_not(backend, torch.device('cpu'))}")
    op = _ops.OPS[name]
    overload = getattr(torch.ops.cpift, name).default
    if backend == "cpp":
        torch.library.opcheck(overload, SAMPLES[name]())
        return
    impl = op.triton if backend == "triton" else op.reference
    with torch.library._scoped_library("cpift", "IMPL") as lib:
        lib.impl(name, impl, "CPU")
        torch.library.opcheck(overload, SAMPLES[name]())


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_gives_the_same_message_on_every_backend(name):
    make, expected = BAD[name]
    seen = {}
    for backend in _backends():
        with forced(backend), pytest.raises((ValueError, TypeError)) as info:
            getattr(ops, name)(*make())
        seen[backend] = (type(info.value), str(info.value))
    assert expected in next(iter(seen.values()))[1]
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize("rule", [0, 1, 2])
def test_slerp_apply_ignores_padding_bits_on_every_backend(rule):
    """Bits past numel in a mask's last word name no element: every backend ignores them (the C++
    kernel once wrote past the output's end)."""
    gen = torch.Generator().manual_seed(3)
    a, b, base = (torch.randn(70, generator=gen) for _ in range(3))
    values = [torch.randn(70, generator=gen) for _ in range(2)]
    words = [torch.full((3,), -1, dtype=torch.int32), _words(3, 11)]
    want = ops.slerp_apply.reference(a, b, base, 0.5, 0.25, 0.25, values, words, rule)
    for backend in _backends():
        with forced(backend):
            got = ops.slerp_apply(a, b, base, 0.5, 0.25, 0.25, values, words, rule)
        assert torch.equal(got, want), backend
