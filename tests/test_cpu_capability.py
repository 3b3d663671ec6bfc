"""CPU capabilities of the C++ kernels (csrc/dispatch.h): what is compiled, what runs, how to choose,
and that every capability computes the same bits.

Each op's tests against its reference run at every capability through the ``cpu_capability``
fixture (tests/conftest.py); here every CPU kernel is run once per supported capability on inputs
that reach the vector bodies, the tails and (for AdamW) several work-list chunks, and must leave
the bits the DEFAULT (scalar-baseline) build leaves.
"""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import cpift_fast
from cpift_fast import _ops, ops

pytestmark = pytest.mark.skipif(not _ops.extension()[0], reason="the C++ extension is not built")


def _cpu():
    return torch.ops.cpift_cpu


def test_compiled_supported_and_in_use():
    compiled = list(_cpu().compiled_capabilities())
    supported = list(_cpu().supported_capabilities())
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert compiled == (["default", "avx2", "avx512"] if x86 else ["default"])
    assert supported[0] == "default" and supported == compiled[:len(supported)]
    assert _cpu().capability() in supported
    built = cpift_fast.backend_info()["built"]
    assert built["cpu_capability"] == _cpu().capability()
    assert built["cpu_capabilities_compiled"] == compiled and built["cpu_capabilities_supported"] == supported
    assert not any("march" in flag for flag in built["cxx_flags"])


def test_set_capability_refuses_what_cannot_run():
    with pytest.raises(RuntimeError, match="set_capability: 'sse9' is not a compiled CPU capability; compiled: default"):
        _cpu().set_capability("sse9")
    unsupported = [c for c in _cpu().compiled_capabilities() if c not in _cpu().supported_capabilities()]
    for name in unsupported:
        with pytest.raises(RuntimeError, match=f"this CPU does not support '{name}'"):
            _cpu().set_capability(name)


def test_set_capability_switches_and_is_case_insensitive(cpu_capability):
    assert _cpu().capability() == cpu_capability
    _cpu().set_capability(cpu_capability.upper())
    assert _cpu().capability() == cpu_capability


def test_aten_cpu_capability_caps_the_choice():
    """ATEN_CPU_CAPABILITY (torch's switch) caps the capability of cpift's kernels too."""
    supported = list(_cpu().supported_capabilities())
    code = "import json, torch, cpift_fast; print(json.dumps(torch.ops.cpift_cpu.capability()))"
    for name in supported[:-1] or supported:
        env = os.environ | {"ATEN_CPU_CAPABILITY": name}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == name


# ---------------------------------------------------------------------------------------------
# every kernel, every capability, the same bits
# ---------------------------------------------------------------------------------------------

SIZES = (0, 1, 17, 33, 4099, 3 * 2**15 + 77)  # tails of a vector, a word, an EMA block, work-list chunks


def _bits(x):
    if isinstance(x, (list, tuple)):
        return [_bits(t) for t in x]
    return x.contiguous().view(torch.uint8).clone() if x.is_floating_point() else x.clone()


def _adamw(dtype, state_dtype, amsgrad, ema):
    gen = torch.Generator().manual_seed(7)
    p = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    g = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    m = [(0.1 * torch.randn(n, generator=gen)).to(state_dtype) for n in SIZES]
    v = [(0.01 * torch.rand(n, generator=gen)).to(state_dtype) for n in SIZES]
    vmax = [(0.01 * torch.rand(n, generator=gen)).to(state_dtype) for n in SIZES] if amsgrad else []
    bits = [torch.rand(n, generator=gen) < 0.3 for n in SIZES]
    for b in bits[-2:]:
        b[:64] = True  # whole frozen words
        b[64:160] = False  # whole trainable words
    words = [ops.mask_pack(b) if b.numel() else torch.zeros(0, dtype=torch.int32) for b in bits]
    steps = torch.tensor([float(k % 5 + 1) for k in range(len(SIZES))])
    args = [p, g, m, v, vmax, words, steps, torch.tensor(1e-2, dtype=torch.float64), 0.9, 0.99, 0.1, 1e-8, amsgrad,
            True, torch.tensor(4.0), None]
    if not ema:
        torch.ops.cpift.masked_adamw_(*args)
        return p, m, v, vmax
    state = [torch.rand(n, generator=gen).to(torch.bfloat16) for n in SIZES]
    torch.ops.cpift.masked_adamw_ema_(*args, state, [], 0.9, 0, 3, list(range(len(SIZES))))
    return p, m, v, vmax, state


def _importance():
    gen = torch.Generator().manual_seed(8)
    g = [torch.randn(n, generator=gen) for n in SIZES]
    p = [torch.randn(n, generator=gen) for n in SIZES]
    state = [torch.randint(0, 255, (n,), generator=gen, dtype=torch.uint8) for n in SIZES]
    scales = [torch.rand((n + 255) // 256, generator=gen) for n in SIZES]
    torch.ops.cpift.importance_ema_(state, scales, g, p, 0.9, 0, 5, None, None, [])
    return state, scales


def _select(dtype):
    gen = torch.Generator().manual_seed(9)
    a = [torch.randn(n, generator=gen).to(dtype) for n in (SIZES[-1], 31)]
    b = [(x.float() + 1e-3 * torch.randn(x.shape, generator=gen)).to(dtype) for x in a]
    hist, top = torch.ops.cpift.select_histogram(a, b, 0, 0)
    prefix = int(torch.nonzero(hist).max())
    words, n_eq = torch.ops.cpift.select_mask(a, b, prefix << 16, 5)
    return hist, top, *torch.ops.cpift.select_histogram(a, b, 1, prefix), words, n_eq


def _overlap(count):
    gen = torch.Generator().manual_seed(10)
    masks = [torch.randint(-2**31, 2**31 - 1, (4099,), generator=gen, dtype=torch.int32) for _ in range(count)]
    return torch.ops.cpift.overlap_counts(masks)


def _fuse_inputs(dtype):
    gen = torch.Generator().manual_seed(11)
    n = 4099 + 2048
    base, a, b = (torch.randn(n, generator=gen).to(dtype) for _ in range(3))
    words = [ops.mask_pack(torch.rand(n, generator=gen) < 0.2) for _ in range(2)]
    values = [torch.randn(n, generator=gen).to(dtype) for _ in range(2)]
    return a, b, base, values, words


def _fuse_apply(dtype):
    a, b, base, values, words = _fuse_inputs(dtype)
    return [torch.ops.cpift.slerp_apply(a, b, base, 0.3, 0.5, 0.2, values, words, rule) for rule in (0, 2)]


def _fuse_lists(dtype):
    """Both list ops over tensors of several sizes (one work list over all of them)."""
    a, b, base, values, words = _fuse_inputs(dtype)
    cut = [a[:1], a[1:40], a[40:]], [b[:1], b[1:40], b[40:]], [None, base[1:40], base[40:]]
    cores = [v[40:] for v in values], [ops.mask_pack(ops.mask_unpack(w, a.numel())[40:]) for w in words]
    stats = torch.ops.cpift.slerp_stats_list(*cut)
    outs = torch.ops.cpift.slerp_apply_list(*cut, [0.3, 0.5, 0.2] * 3, *cores, [0, 0, 2], 2)
    return stats, outs


def _mask():
    gen = torch.Generator().manual_seed(12)
    bits = torch.rand(4099, generator=gen) < 0.4
    words = torch.ops.cpift.mask_pack(bits)
    other = torch.randint(-2**31, 2**31 - 1, words.shape, generator=gen, dtype=torch.int32)
    return (words, torch.ops.cpift.mask_unpack(words, 4099), torch.ops.cpift.mask_popcount(words, torch.tensor([0, 7, 129])),
            [torch.ops.cpift.mask_binary(words, other, op) for op in range(4)])


def _grad_norm(dtype):
    gen = torch.Generator().manual_seed(13)
    grads = [torch.randn(n, generator=gen).to(dtype) for n in SIZES[1:]]
    words = [ops.mask_pack(torch.rand(n, generator=gen) < 0.5) for n in SIZES[1:]]
    return torch.ops.cpift.masked_grad_sq_norm(grads, words)


# name: (run, exact). Reductions (sums of squares, dot products) add in an order that follows the
# vector width: equal to rounding, not bit for bit.
KERNELS = {
    **{f"adamw-{str(d)[6:]}-{str(s)[6:]}-{'amsgrad' if a else 'adamw'}": ((lambda d=d, s=s, a=a: _adamw(d, s, a, False)), True)
       for d, s in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                    (torch.bfloat16, torch.float32))
       for a in (False, True)},
    "adamw_ema-bfloat16": (lambda: _adamw(torch.bfloat16, torch.bfloat16, False, True), True),
    "importance_ema-uint8": (_importance, True),
    **{f"select-{str(d)[6:]}": ((lambda d=d: _select(d)), True) for d in (torch.float32, torch.bfloat16, torch.float16)},
    "overlap-3": (lambda: _overlap(3), True),
    "overlap-11": (lambda: _overlap(11), True),
    **{f"slerp_apply-{str(d)[6:]}": ((lambda d=d: _fuse_apply(d)), True) for d in (torch.float32, torch.bfloat16, torch.float16)},
    "slerp_stats-bfloat16": (lambda: torch.ops.cpift.slerp_stats(*_fuse_inputs(torch.bfloat16)[:3]), False),
    **{f"slerp_apply_list-{str(d)[6:]}": ((lambda d=d: _fuse_lists(d)[1]), True) for d in (torch.float32, torch.bfloat16)},
    "slerp_stats_list-bfloat16": (lambda: _fuse_lists(torch.bfloat16)[0], False),
    "mask": (_mask, True),
    "grad_sq_norm-bfloat16": (lambda: _grad_norm(torch.bfloat16), False),
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_capability_gives_the_same_bits(kernel):
    run, exact = KERNELS[kernel]
    cpu = _cpu()
    previous = cpu.capability()
    results = {}
    try:
        for name in cpu.supported_capabilities():
            cpu.set_capability(name)
            out = run()
            results[name] = _bits(out) if exact else out
    finally:
        cpu.set_capability(previous)
    if len(results) == 1:
        pytest.skip(f"this CPU supports one capability only ({next(iter(results))})")
    want = torch.utils._pytree.tree_leaves(results.pop("default"))
    for name, got in results.items():
        for k, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(got), want)):
            if exact:
                assert torch.equal(a, b), f"{kernel}: {name} differs from default in the bits of output {k}"
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"{kernel}: {name} vs default, output {k}")


# ---------------------------------------------------------------------------------------------
# CPIFT_CPU_CAPABILITIES: a subset at build time (a subset build is run by tests/test_packaging.py)
# ---------------------------------------------------------------------------------------------

def test_capability_subset_from_the_environment(monkeypatch):
    from cpift_fast import _extension

    monkeypatch.delenv("CPIFT_CPU_CAPABILITIES", raising=False)
    assert _extension.capabilities("x86_64") == ["DEFAULT", "AVX2", "AVX512"]
    assert _extension.capabilities("aarch64") == ["DEFAULT"]
    for wanted, expected in (("avx512", ["DEFAULT", "AVX512"]), (" Default , AVX2 ", ["DEFAULT", "AVX2"]),
                             ("default", ["DEFAULT"]), ("avx512,avx2", ["DEFAULT", "AVX2", "AVX512"])):
        monkeypatch.setenv("CPIFT_CPU_CAPABILITIES", wanted)
        assert _extension.capabilities("x86_64") == expected, wanted
    monkeypatch.setenv("CPIFT_CPU_CAPABILITIES", "avx512")
    assert [f for f in _extension.cxx_flags(cuda=False) if f.startswith("-DCPIFT_WITH")] == (
        ["-DCPIFT_WITH_AVX512"] if platform.machine().lower() in ("x86_64", "amd64") else [])
    monkeypatch.setenv("CPIFT_CPU_CAPABILITIES", "avx2,sse9")
    with pytest.raises(ValueError, match=r"CPIFT_CPU_CAPABILITIES='avx2,sse9': SSE9 cannot be compiled on x86_64; "
                                         r"choose among DEFAULT, AVX2, AVX512"):
        _extension.capabilities("x86_64")
    monkeypatch.setenv("CPIFT_CPU_CAPABILITIES", "avx2")
    with pytest.raises(ValueError, match="AVX2 cannot be compiled on aarch64; choose among DEFAULT"):
        _extension.capabilities("aarch64")
