"""The importance EMA op (every backend against the reference, bit for bit) and ImportanceTracker:
EMA math per signal and state dtype, low-precision tracking bounds, layer normalization, selection,
state_dict round trip, bad inputs."""

from __future__ import annotations

import pytest
import torch

from cpift_fast import _ops, ops
from cpift_fast.importance import ImportanceTracker, bytes_per_element
from cpift_fast.ops.importance import QBLOCK, SIGNALS, num_scales
from cpift_fast.ops.select import core_region_topk
from helpers import forced

OP = _ops.OPS["importance_ema_"]
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)
# one full GPU block (1024), a tensor ending in a partial 8-bit block, one below one 8-bit block, an empty one
SIZES = (1024, 1024 + 300, 37, 0)


def _available_backends():
    out = []
    for b in ("triton", "cpp", "torch"):
        if OP.why_not(b, torch.device("cpu")) is None:
            out.append(b)
    return out


def _op_inputs(p_dtype, s_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(p_dtype) for n in SIZES]
    grads = [torch.randn(n, generator=gen).to(p_dtype) for n in SIZES]
    if s_dtype == torch.uint8:
        state = [torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8) for n in SIZES]
        scales = [torch.rand(num_scales(n), generator=gen) * 0.01 for n in SIZES]
    else:
        state = [(torch.rand(n, generator=gen) * 0.1).to(s_dtype) for n in SIZES]
        scales = []
    return state, scales, grads, params


def _bits(t):
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def test_cpu_runs_the_reference_and_cpp_says_why_not():
    assert OP.backend_for("cpu") in ("torch", "cpp")  # "cpp" only once a C++ kernel is registered
    if OP.why_not("cpp", torch.device("cpu")) is not None:
        assert OP.backend_for("cpu") == "torch"
        with forced("cpp"), pytest.raises(_ops.BackendUnavailable, match="importance_ema_"):
            ops.importance_ema_(*_op_inputs(torch.float32, torch.float32), 0.9, 0, 0, None, None)


@pytest.mark.parametrize("p_dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("s_dtype", STATE_DTYPES)
def test_every_backend_matches_the_reference_bit_for_bit(p_dtype, s_dtype):
    backends = _available_backends()
    assert "torch" in backends
    for signal in range(len(SIGNALS)):
        for grad_scale in (None, torch.tensor([4.0])):
            want = _op_inputs(p_dtype, s_dtype)
            OP.reference(*want, 0.99, signal, 7, grad_scale, None)
            for backend in backends:
                got = _op_inputs(p_dtype, s_dtype)
                with forced(backend):
                    ops.importance_ema_(*got, 0.99, signal, 7, grad_scale, None)
                for a, b in zip(want[0] + want[1], got[0] + got[1]):
                    assert torch.equal(_bits(a), _bits(b)), (backend, signal, grad_scale)


@pytest.mark.parametrize("backend", _available_backends())
def test_found_inf_leaves_state_untouched(backend):
    before = _op_inputs(torch.float32, torch.uint8)
    got = _op_inputs(torch.float32, torch.uint8)
    with forced(backend):
        ops.importance_ema_(*got, 0.9, 0, 1, None, torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], got[0] + got[1]))


def _tracker(n=2048, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(n // 32, 32, bias=True), torch.nn.Linear(32, 4))
    return model, ImportanceTracker(model.named_parameters(), ["a", "b"], **kw)


def _fill_grads(model, gen):
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("signal", SIGNALS)
def test_fp32_ema_is_the_formula_and_updates_only_the_active_task(signal):
    model, tr = _tracker(signal=signal, beta=0.9, normalize="none")
    gen = torch.Generator().manual_seed(1)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    beta, rest = torch.tensor(0.9), torch.tensor(1 - 0.9)
    for step in range(3):
        _fill_grads(model, gen)
        tr.set_task("a")
        tr.update()
        for n, p in model.named_parameters():
            s = {"grad_x_param": (p.grad * p).abs(), "grad_sq": p.grad * p.grad, "grad_abs": p.grad.abs()}[signal]
            want[n] = want[n] * beta + s * rest
    got = tr.importance("a")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert all(not v.any() for v in tr.importance("b").values())
    assert tr.counts == {"a": 3, "b": 0}
    corrected = tr.importance("a", bias_correction=True)
    assert all(torch.equal(corrected[n], want[n] / (1 - 0.9 ** 3)) for n in want)


def _track(state_dtype, steps=2000, n=2048):
    """fp32 EMA, `state_dtype` EMA and a round-to-nearest bf16 EMA of g² with beta = 0.999 over
    `steps` steps of noisy grads around a per-element level."""
    p = torch.nn.Parameter(torch.zeros(n))
    exact = ImportanceTracker([("w", p)], ["t"], beta=0.999, signal="grad_sq", normalize="none", seed=3)
    low = ImportanceTracker([("w", p)], ["t"], beta=0.999, signal="grad_sq", normalize="none", seed=3,
                            state_dtype=state_dtype)
    exact.set_task("t")
    low.set_task("t")
    gen = torch.Generator().manual_seed(0)
    level = torch.rand(n, generator=gen) + 0.5
    nearest = torch.zeros(n, dtype=torch.bfloat16)
    for _ in range(steps):
        p.grad = level * (1 + 0.3 * torch.randn(n, generator=gen))
        exact.update()
        low.update()
        nearest = (nearest.float() * 0.999 + p.grad * p.grad * (1 - 0.999)).to(torch.bfloat16)
    return exact.importance("t")["w"], low.importance("t")["w"], nearest.float()


def test_bf16_state_tracks_fp32_where_round_to_nearest_stalls():
    """Stated bound (docs/epi.md): after 2000 steps at beta = 0.999, the stochastically rounded bf16
    EMA is unbiased within 1% over the tensor, 5% mean / 25% max relative error per element; a
    round-to-nearest bf16 EMA stalls below the truth (increments of 0.1% are below half a bf16 step)."""
    ref, bf16, nearest = _track(torch.bfloat16)
    rel = (bf16 - ref).abs() / ref
    assert abs(bf16.sum() / ref.sum() - 1) < 0.01
    assert rel.mean() < 0.05 and rel.max() < 0.25
    assert nearest.sum() / ref.sum() < 0.9


def test_int8_state_tracks_fp32_within_its_block_resolution():
    """Stated bound (docs/epi.md): 8-bit blockwise state is unbiased within 1% over the tensor, and
    each element is within 15% of its block's max importance (mean error < 2% of it)."""
    ref, q8, _ = _track("int8")
    block_max = ref.view(-1, QBLOCK).amax(1).repeat_interleave(QBLOCK)
    err = (q8 - ref).abs() / block_max
    assert abs(q8.sum() / ref.sum() - 1) < 0.01
    assert err.mean() < 0.02 and err.max() < 0.15


@pytest.mark.parametrize("state_dtype", (torch.bfloat16, "int8"))
def test_stochastic_rounding_is_seeded(state_dtype):
    def run(seed):
        model, tr = _tracker(state_dtype=state_dtype, seed=seed)
        gen = torch.Generator().manual_seed(1)
        tr.set_task("b")
        for _ in range(3):
            _fill_grads(model, gen)
            tr.update()
        return torch.cat([s.view(-1).view(torch.uint8) for s in tr.state["b"]])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_layer_normalization_divides_by_the_tensor_mean():
    model, tr = _tracker(normalize="layer")
    gen = torch.Generator().manual_seed(2)
    tr.set_task("a")
    _fill_grads(model, gen)
    model[1].bias.grad.zero_()  # an all-zero importance stays zero
    tr.update()
    raw = ImportanceTracker(model.named_parameters(), ["a", "b"], normalize="none")
    raw.state = tr.state
    norm, plain = tr.importance("a"), raw.importance("a")
    for name, x in norm.items():
        if name == "1.bias":
            assert not x.any()
        else:
            assert torch.equal(x, plain[name] / plain[name].mean())
            assert abs(x.mean().item() - 1) < 1e-5


@pytest.mark.parametrize("state_dtype", (torch.float32, "int8"))
def test_select_is_the_exact_top_ratio_of_the_normalized_importance(state_dtype):
    model, tr = _tracker(state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(3)
    tr.set_task("a")
    for _ in range(2):
        _fill_grads(model, gen)
        tr.update()
    imp = tr.importance("a")
    mask = tr.select("a", 0.05)
    zero = [(n, torch.zeros_like(x)) for n, x in imp.items()]
    want = core_region_topk(zero, list(imp.items()), mask.info.k)
    assert mask.count() == mask.info.k == round(0.05 * sum(x.numel() for x in imp.values()))
    assert all(torch.equal(mask.tensor_bits(n).view(want[n].shape), want[n]) for n in want)
    assert tr.select("b", 0.05).count() == 0  # no update yet: zero importance is never selected


def test_state_bytes_per_dtype():
    for dtype in (torch.float32, torch.bfloat16, "int8"):
        model, tr = _tracker(state_dtype=dtype)
        numel = sum(p.numel() for p in model.parameters())
        scales = sum(num_scales(p.numel()) for p in model.parameters()) * 4 if dtype == "int8" else 0
        assert tr.state_bytes() == 2 * (numel * {torch.float32: 4, torch.bfloat16: 2, "int8": 1}[dtype] + scales)
    assert bytes_per_element("int8") == 1 + 4 / 256


@pytest.mark.parametrize("state_dtype", (torch.float32, torch.bfloat16, "int8"))
def test_state_dict_round_trip(state_dtype):
    model, tr = _tracker(state_dtype=state_dtype, seed=9)
    gen = torch.Generator().manual_seed(4)
    tr.set_task("b")
    _fill_grads(model, gen)
    tr.update()
    sd = tr.state_dict()
    other = ImportanceTracker(model.named_parameters(), ["a", "b"], state_dtype=state_dtype, seed=9)
    other.load_state_dict(sd)
    assert other.counts == tr.counts and other.active == "b"
    _fill_grads(model, gen)
    tr.update()
    other.update()  # same counts, seed and grads: the same stochastic rounding
    for x, y in zip(tr.state["b"] + tr.scales["b"], other.state["b"] + other.scales["b"]):
        assert torch.equal(_bits(x), _bits(y))
    with pytest.raises(ValueError, match="state_dtype"):
        _tracker(state_dtype=torch.float32 if state_dtype != torch.float32 else "int8")[1].load_state_dict(sd)


def test_bad_inputs_name_the_argument():
    model = torch.nn.Linear(4, 4)
    named = list(model.named_parameters())
    for kwargs, match in ((dict(tasks=[]), "tasks"), (dict(tasks=["a", "a"]), "tasks"), (dict(beta=1.0), "beta"),
                          (dict(signal="fisher"), "signal"), (dict(state_dtype=torch.float16), "state_dtype"),
                          (dict(normalize="global"), "normalize"), (dict(seed=-1), "seed")):
        args = dict(tasks=["a"]) | kwargs
        with pytest.raises(ValueError, match=match):
            ImportanceTracker(named, **args)
    tr = ImportanceTracker(named, ["a"])
    with pytest.raises(RuntimeError, match="set_task"):
        tr.update()
    with pytest.raises(ValueError, match="unknown task 'z'"):
        tr.set_task("z")
    with pytest.raises(ValueError, match="unknown task"):
        tr.select("z", 0.1)
    state, scales, grads, params = _op_inputs(torch.float32, torch.uint8)
    for args, match in (((state, [], grads, params, 0.9, 0, 0), "scales must hold"),
                        ((state, scales, grads, params, 1.5, 0, 0), "beta"),
                        ((state, scales, grads, params, 0.9, 3, 0), "signal"),
                        ((state, scales, grads, params, 0.9, 0, 2**32), "seed"),
                        ((state, scales, grads[:1], params, 0.9, 0, 0), "same length"),
                        (([state[0][:10]] + state[1:], scales, grads, params, 0.9, 0, 0), r"state\[0\]"),
                        ((state, scales, [g.double() for g in grads], params, 0.9, 0, 0), r"grads\[0\]")):
        with pytest.raises((ValueError, TypeError), match=match):
            ops.importance_ema_(*args, None, None)


@pytest.mark.parametrize("s_dtype", (torch.bfloat16, torch.uint8))
@pytest.mark.parametrize("backend", _available_backends())
def test_opcheck(backend, s_dtype):
    """Schema (what it mutates), fake impl and the backend's kernel agree (what torch.compile relies
    on); the backend under test is put on the CPU key for the duration."""
    impl = OP.triton if backend == "triton" else OP.reference
    overload = torch.ops.cpift.importance_ema_.default
    with torch.library._scoped_library("cpift", "IMPL") as lib:
        lib.impl("importance_ema_", impl, "CPU")
        torch.library.opcheck(overload, (*_op_inputs(torch.bfloat16, s_dtype), 0.99, 0, 3, torch.tensor(2.0), None))


@pytest.mark.parametrize("state_dtype", [torch.float32, "int8"])
def test_masked_adamw_importance_updates_before_the_step(state_dtype):
    """MaskedAdamW(importance=tracker) = tracker.update() then the step: same params, same state bits."""
    from cpift_fast import MaskedAdamW

    def run(fused):
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 30)
        tracker = ImportanceTracker(model.named_parameters(), ["a", "b"], beta=0.9, state_dtype=state_dtype, seed=5)
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, importance=tracker if fused else None)
        gen = torch.Generator().manual_seed(1)
        for step in range(6):
            tracker.set_task("ab"[step % 2])
            opt.zero_grad()
            model(torch.randn(8, 40, generator=gen)).square().mean().backward()
            if not fused:
                tracker.update()
            opt.step()
        return model, tracker

    (m1, t1), (m2, t2) = run(True), run(False)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    for task in ("a", "b"):
        for name, value in t1.importance(task).items():
            assert torch.equal(value, t2.importance(task)[name])
    with pytest.raises(TypeError, match="importance must be an ImportanceTracker"):
        MaskedAdamW(m1.parameters(), importance=object())


# ----- the fused AdamW + EMA step (cpift::masked_adamw_ema_) ---------------------------------------

FUSED = _ops.OPS["masked_adamw_ema_"]


def _fused_inputs(p_dtype, m_dtype, e_dtype, amsgrad, seed=0):
    """(adamw tensors..., ema state, ema scales) over SIZES, a mask freezing ~40 % of the elements."""
    gen = torch.Generator().manual_seed(seed)
    state, scales, grads, params = _op_inputs(p_dtype, e_dtype, seed)
    moments = [[(torch.rand(n, generator=gen) * 0.01).to(m_dtype) for n in SIZES] for _ in range(3 if amsgrad else 2)]
    frozen = [ops.mask_pack(torch.rand(n, generator=gen) < 0.4) for n in SIZES]
    return params, grads, moments, frozen, state, scales


def _fused_call(op, inputs, amsgrad, maximize, grad_scale, found_inf=None, ids=(3, 0, 7, 1)):
    params, grads, moments, frozen, state, scales = inputs
    steps = torch.full((len(SIZES),), 4.0)
    lr = torch.tensor(1e-2, dtype=torch.float64)
    adamw = (params, grads, moments[0], moments[1], moments[2] if amsgrad else [], frozen, steps, lr, 0.9, 0.999,
             0.01, 1e-8, amsgrad, maximize, grad_scale, found_inf)
    if op == "separate":  # the two ops, EMA first (params before the step)
        ops.importance_ema_(state, scales, grads, params, 0.95, 0, 11, grad_scale, found_inf, list(ids))
        ops.masked_adamw_(*adamw)
    else:
        ops.masked_adamw_ema_(*adamw, state, scales, 0.95, 0, 11, list(ids))


def _all_bits(inputs):
    params, _, moments, _, state, scales = inputs
    return [_bits(t.contiguous()) for t in params + [m for ms in moments for m in ms] + state + scales]


@pytest.mark.parametrize("p_dtype,m_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("e_dtype", STATE_DTYPES)
def test_fused_step_equals_ema_then_step_on_every_backend(p_dtype, m_dtype, e_dtype):
    """Fused = importance_ema_ then masked_adamw_ of the same backend, bit for bit, on every backend,
    with amsgrad, maximize and a GradScaler scale; ids key the random streams, not positions. (The
    AdamW half of C++ and Triton agree bit for bit — tests/test_adamw_bitexact.py — the reference
    computes bf16 params in bf16 as torch's foreach AdamW does; the EMA state agrees everywhere.)"""
    for amsgrad, maximize, grad_scale in ((False, False, None), (True, True, torch.tensor([4.0]))):
        ema_bits = []
        for backend in _available_backends():
            want = _fused_inputs(p_dtype, m_dtype, e_dtype, amsgrad)
            got = _fused_inputs(p_dtype, m_dtype, e_dtype, amsgrad)
            with forced(backend):
                _fused_call("separate", want, amsgrad, maximize, grad_scale)
                _fused_call("fused", got, amsgrad, maximize, grad_scale)
            for k, (a, b) in enumerate(zip(_all_bits(want), _all_bits(got))):
                assert torch.equal(a, b), (backend, amsgrad, k)
            ema_bits.append([_bits(t) for t in got[4] + got[5]])
        assert all(torch.equal(a, b) for bits in ema_bits[1:] for a, b in zip(ema_bits[0], bits))


@pytest.mark.parametrize("backend", _available_backends())
def test_fused_step_keeps_frozen_bits_and_tracks_every_element(backend):
    inputs = _fused_inputs(torch.float32, torch.float32, torch.float32, False)
    before = [[t.clone() for t in ts] for ts in (inputs[0], inputs[2][0], inputs[4])]
    with forced(backend):
        _fused_call("fused", inputs, False, False, None)
    for k, n in enumerate(SIZES):
        bits = ops.mask_unpack(inputs[3][k], n)
        for old, new in ((before[0][k], inputs[0][k]), (before[1][k], inputs[2][0][k])):
            assert torch.equal(old[bits], new[bits]) and not torch.equal(old[~bits], new[~bits]) or n == 0
        assert n == 0 or not torch.equal(before[2][k][bits], inputs[4][k][bits])  # frozen elements' EMA moves


@pytest.mark.parametrize("backend", _available_backends())
def test_fused_step_found_inf_changes_nothing(backend):
    inputs = _fused_inputs(torch.bfloat16, torch.float32, torch.uint8, True)
    before = [t.clone() for t in _all_bits(inputs)]
    with forced(backend):
        _fused_call("fused", inputs, True, False, torch.tensor([2.0]), found_inf=torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(before, _all_bits(inputs)))


def test_fused_step_rejects_bad_ema_arguments():
    inputs = _fused_inputs(torch.float32, torch.float32, torch.uint8, False)
    for change, match in ((lambda i: i[:5] + ([],), r"masked_adamw_ema_: ema_scales must hold one float32"),
                          (lambda i: i[:4] + ([i[4][0][:5]] + i[4][1:], i[5]), r"masked_adamw_ema_: ema_state\[0\]")):
        with pytest.raises(ValueError, match=match):
            _fused_call("fused", change(inputs), False, False, None)
    with pytest.raises(ValueError, match=r"masked_adamw_ema_: ema_ids must be empty or hold one id"):
        _fused_call("fused", inputs, False, False, None, ids=(1, 2))


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
def test_masked_adamw_with_a_tracker_over_some_parameters(state_dtype):
    """Parameters the tracker does not hold are stepped without an EMA; the tracked ones get the
    bits of tracker.update() then a plain step; copies of the optimizer keep working."""
    import copy

    from cpift_fast import MaskedAdamW

    def run(fused):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 5))
        tracker = ImportanceTracker(list(model.named_parameters())[:3], ["a", "b"], beta=0.9,
                                    state_dtype=state_dtype, seed=2)
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, importance=tracker if fused else None)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            tracker.set_task("ab"[step % 2])
            opt.zero_grad()
            model(torch.randn(8, 30, generator=gen)).square().mean().backward()
            if not fused:
                tracker.update()
            opt.step()
        return model, tracker, opt

    (m1, t1, opt), (m2, t2, _) = run(True), run(False)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    for task in ("a", "b"):
        assert all(torch.equal(v, t2.importance(task)[k]) for k, v in t1.importance(task).items())
    twin = copy.deepcopy(opt)
    assert twin.importance.tracks(twin.param_groups[0]["params"][0])
    assert not twin.importance.tracks(opt.param_groups[0]["params"][0])
    t1.active = None
    with pytest.raises(RuntimeError, match="no active task"):
        opt.step()
