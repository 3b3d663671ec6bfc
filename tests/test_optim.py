"""MaskedAdamW and masked_adamw_: frozen elements bit-exact, trainable ones = torch AdamW."""

import copy
import io
import os
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift_fast import MaskedAdamW, ParamMask, masked_grad_norm, ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (0, 1, 31, 33, 4099)
BIG = 2**20 + 7


def _random_words(n: int, gen: torch.Generator) -> torch.Tensor:
    """~half the bits set, plus whole frozen and whole trainable words; padding bits clear."""
    bits = torch.rand(n, generator=gen) < 0.5
    if n >= 96:
        bits[:32] = True
        bits[32:64] = False
    return ops.mask_pack(bits) if n else torch.zeros(0, dtype=torch.int32)


def _problem(sizes, dtype, state_dtype, amsgrad, seed=0, strided_grads=True):
    gen = torch.Generator().manual_seed(seed)
    p = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    # non-contiguous grads: every other element of a longer buffer
    g = [torch.randn(2 * n, generator=gen).to(dtype)[::2] if strided_grads else torch.randn(n, generator=gen).to(dtype)
         for n in sizes]
    m = [(0.1 * torch.randn(n, generator=gen)).to(state_dtype) for n in sizes]
    v = [(0.01 * torch.rand(n, generator=gen)).to(state_dtype) for n in sizes]
    vmax = [(0.01 * torch.rand(n, generator=gen)).to(state_dtype) for n in sizes] if amsgrad else []
    words = [_random_words(n, gen) for n in sizes]
    steps = [float(k % 7 + 1) for k in range(len(sizes))]
    return p, g, m, v, vmax, words, steps


def _clone(ts):
    return [t.clone() for t in ts]


def _run_op(backend_op, prob, amsgrad, maximize=False, grad_scale=None, lr=1e-2, wd=0.1, found_inf=None):
    p, g, m, v, vmax, words, steps = (_clone(x) if isinstance(x, list) and x and isinstance(x[0], torch.Tensor) else x
                                      for x in prob)
    backend_op(p, g, m, v, vmax, words, torch.tensor(steps, dtype=torch.float32),
               torch.tensor(lr, dtype=torch.float64), 0.9, 0.99, wd, 1e-8, amsgrad, maximize, grad_scale, found_inf)
    return p, m, v, vmax


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The stored bits (so that NaN == NaN and -0.0 != 0.0)."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_frozen_untouched(before, after, words):
    for b, a, w in zip(before, after, words):
        frozen = ops.mask_unpack(w, b.numel())
        assert torch.equal(_raw(a)[frozen], _raw(b)[frozen])


# ---------------------------------------------------------------------------------------------
# the op, every backend, against the reference
# ---------------------------------------------------------------------------------------------

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("dtype,state_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_op_matches_reference(backend, dtype, state_dtype, amsgrad):
    prob = _problem(SIZES, dtype, state_dtype, amsgrad)
    got = _run_op(ops.masked_adamw_, prob, amsgrad)
    want = _run_op(ops.masked_adamw_.reference, prob, amsgrad)
    before = (prob[0], prob[2], prob[3], prob[4])
    for g_list, w_list, b_list in zip(got, want, before):
        _assert_frozen_untouched(b_list, g_list, prob[5])
        for a, b in zip(g_list, w_list):
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            else:  # the reference rounds every foreach intermediate to the param dtype
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)
    # trainable elements did move
    trainable = ~ops.mask_unpack(prob[5][-1], SIZES[-1])
    assert not torch.equal(got[0][-1][trainable], prob[0][-1][trainable])


@pytest.mark.parametrize("dtype,state_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cpp_matches_reference_at_every_cpu_capability(cpu_capability, dtype, state_dtype, amsgrad):
    """Many tensors, one of several work-list chunks, grad scale and maximize: frozen bits kept,
    trainable elements as the reference."""
    sizes = SIZES + (3 * 2**15 + 77,) + (300,) * 20
    prob = _problem(sizes, dtype, state_dtype, amsgrad, seed=3)
    extra = dict(maximize=True, grad_scale=torch.tensor(8.0))
    got = _run_op(torch.ops.cpift.masked_adamw_, prob, amsgrad, **extra)
    want = _run_op(ops.masked_adamw_.reference, prob, amsgrad, **extra)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for g_list, w_list, b_list in zip(got, want, (prob[0], prob[2], prob[3], prob[4])):
        _assert_frozen_untouched(b_list, g_list, prob[5])
        for a, b in zip(g_list, w_list):
            torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_frozen_bits_survive_in_mixed_vectors_at_every_cpu_capability(cpu_capability, dtype):
    """Frozen elements interleaved with trainable ones (every vector mixed) keep their exact bits,
    NaN payloads and signalling NaNs included: the vector stores blend the old storage bits back in
    (or mask the store), never a widened-and-narrowed copy."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    nans = {torch.float32: [0x7F800001, 0x7FC00123, -0x3FFFF], torch.bfloat16: [0x7F81, 0x7FC3, -0x3F],
            torch.float16: [0x7C01, 0x7E05, -0x1FF]}[dtype]
    n = 32 * 9 + 5
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(n, generator=gen).to(dtype)
    frozen = torch.arange(n) % 3 == 1
    frozen[64:96] = True  # one whole frozen word among the mixed ones
    payload = torch.tensor(nans, dtype=bits).repeat(n // len(nans) + 1)[:n]
    p.view(bits)[frozen] = payload[frozen]
    moments = [torch.randn(n, generator=gen).to(dtype).abs() for _ in range(3)]
    for m in moments:
        m.view(bits)[frozen] = payload.flip(0)[frozen]
    before = [t.clone() for t in (p, *moments)]
    grads = [torch.randn(n, generator=gen).to(dtype)]
    torch.ops.cpift.masked_adamw_([p], grads, [moments[0]], [moments[1]], [moments[2]], [ops.mask_pack(frozen)],
                                  torch.tensor([3.0]), torch.tensor(1e-2, dtype=torch.float64), 0.9, 0.99, 0.1,
                                  1e-8, True, False, None, None)
    for name, old, new in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), before, (p, *moments)):
        assert torch.equal(new.view(bits)[frozen], old.view(bits)[frozen]), f"{name}: a frozen element's bits changed"
        assert not torch.equal(new.view(bits)[~frozen], old.view(bits)[~frozen]), f"{name}: nothing trainable moved"


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_backends_agree_in_low_precision(monkeypatch, backend_name, dtype):
    """Both fused kernels compute in fp32 and round once: they agree to one unit in the last place."""
    prob = _problem(SIZES, dtype, dtype, amsgrad=True, seed=3)
    monkeypatch.setenv("CPIFT_BACKEND", backend_name)
    got = _run_op(ops.masked_adamw_, prob, True)
    # fp32 oracle: the reference on fp32 copies, rounded once
    p32 = [x.float() for x in prob[0]]
    oracle_prob = (p32, [x.float() for x in prob[1]], [x.float() for x in prob[2]], [x.float() for x in prob[3]],
                   [x.float() for x in prob[4]], prob[5], prob[6])
    want = _run_op(ops.masked_adamw_.reference, oracle_prob, True)
    for g_list, w_list in zip(got, want):
        for a, b in zip(g_list, w_list):
            ulp = torch.finfo(dtype).eps * b.abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((a.float() - b.to(dtype).float()).abs() <= ulp * 1.01).all()


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_op_big_tensor(monkeypatch, backend_name):
    """2^20 + 7 elements (cpp and torch; the interpreted Triton kernel is covered by
    test_triton_big_tensor with fewer dtypes to keep the suite fast)."""
    monkeypatch.setenv("CPIFT_BACKEND", backend_name)
    prob = _problem([BIG], torch.bfloat16, torch.float32, amsgrad=False, seed=1, strided_grads=False)
    got = _run_op(ops.masked_adamw_, prob, False)
    want = _run_op(ops.masked_adamw_.reference, prob, False)
    _assert_frozen_untouched(prob[0], got[0], prob[5])
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a[0].float(), b[0].float(), rtol=1e-2, atol=1e-3)


def test_triton_big_tensor(monkeypatch):
    monkeypatch.setenv("CPIFT_BACKEND", "triton")
    prob = _problem([BIG], torch.float32, torch.float32, amsgrad=False, seed=2, strided_grads=False)
    got = _run_op(ops.masked_adamw_, prob, False)
    want = _run_op(ops.masked_adamw_.reference, prob, False)
    _assert_frozen_untouched(prob[0], got[0], prob[5])
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_grad_scale_and_maximize(backend, dtype):
    prob = _problem(SIZES, dtype, dtype, amsgrad=False, seed=4)
    scale = torch.tensor(1024.0)
    scaled = list(prob)
    scaled[1] = [(g.float() * 1024).to(dtype) for g in prob[1]]
    got = _run_op(ops.masked_adamw_, scaled, False, maximize=True, grad_scale=scale)
    want = _run_op(ops.masked_adamw_.reference, prob, False, maximize=True)
    _assert_frozen_untouched(prob[0], got[0], prob[5])
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for g_list, w_list in zip(got[:3], want[:3]):
        for a, b in zip(g_list, w_list):
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_op_errors(backend):
    p = [torch.zeros(40)]
    one, lr = torch.ones(1), torch.tensor(1e-3)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="grads"):
        ops.masked_adamw_(p, [torch.zeros(40, dtype=torch.float16)], [torch.zeros(40)], [torch.zeros(40)], [],
                          [], one, lr, 0.9, 0.999, 0.0, 1e-8, False, False, None, None)
    with pytest.raises(ValueError, match="frozen"):
        ops.masked_adamw_(p, [torch.zeros(40)], [torch.zeros(40)], [torch.zeros(40)], [],
                          [torch.zeros(1, dtype=torch.int32)], one, lr, 0.9, 0.999, 0.0, 1e-8, False, False, None, None)
    with pytest.raises(TypeError, match="steps must be a 1-D float32 tensor"):
        ops.masked_adamw_(p, [torch.zeros(40)], [torch.zeros(40)], [torch.zeros(40)], [], [], [1.0], lr, 0.9,
                          0.999, 0.0, 1e-8, False, False, None, None)
    with pytest.raises(TypeError, match="lr must be a floating-point tensor"):
        ops.masked_adamw_(p, [torch.zeros(40)], [torch.zeros(40)], [torch.zeros(40)], [], [], one, 1e-3, 0.9,
                          0.999, 0.0, 1e-8, False, False, None, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_grad_sq_norm(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    sizes = list(SIZES) + ([BIG] if backend != "triton" else [])
    grads = [torch.randn(2 * n, generator=gen).to(dtype)[::2] for n in sizes]
    words = [_random_words(n, gen) for n in sizes]
    grads[-1][0] = float("inf") if ops.mask_unpack(words[-1], sizes[-1])[0] else grads[-1][0]  # frozen inf ignored
    got = ops.masked_grad_sq_norm(grads, words)
    want = torch.stack([torch.where(ops.mask_unpack(w, g.numel()), 0.0, g.float()).square().sum()
                        for g, w in zip(grads, words)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------

def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(33, 31), torch.nn.ReLU(), torch.nn.Linear(31, 1)).to(dtype)


def _train(model, opt, steps, seed=0, dtype=torch.float32, scheduler=None, clip=False):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 33, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _random_mask(model, frac, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ParamMask.from_bool({n: torch.rand(p.shape, generator=gen) < frac for n, p in model.named_parameters()})


def test_parity_with_torch_adamw_when_nothing_frozen(backend):
    """100 fp32 steps, an all-zero mask: torch's foreach and fused AdamW give the same result."""
    ours = _model()
    opt = MaskedAdamW(ours.named_parameters(), lr=3e-3, weight_decay=0.1, frozen=ParamMask.zeros_like(ours))
    _train(ours, opt, 100)
    for torch_impl in ("foreach", "fused"):
        theirs = _model()
        ref = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=0.1, **{torch_impl: True})
        _train(theirs, ref, 100)
        for a, b, init in zip(ours.parameters(), theirs.parameters(), _model().parameters()):
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6, torch_impl
            assert (a - init).abs().max() > 1e-2  # it did train
        for a, b in zip(opt.state.values(), ref.state.values()):
            torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-5, atol=1e-8)
            assert float(a["step"]) == float(b["step"]) == 100


@pytest.mark.parametrize("amsgrad", [False, True])
def test_parity_amsgrad_maximize_no_mask(backend, amsgrad):
    ours, theirs = _model(), _model()
    opt = MaskedAdamW(ours.parameters(), lr=1e-2, amsgrad=amsgrad, maximize=True)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, amsgrad=amsgrad, maximize=True, foreach=True)
    _train(ours, opt, 20)
    _train(theirs, ref, 20)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_frozen_bit_exact_through_mask_changes(backend, dtype, amsgrad):
    model = _model(dtype)
    first, second = _random_mask(model, 0.5, seed=1), _random_mask(model, 0.3, seed=2)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.5, amsgrad=amsgrad, frozen=first,
                      state_dtype=torch.float32 if dtype != torch.float32 else None)
    _train(model, opt, 3, dtype=dtype)  # states exist now
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    _train(model, opt, 4, seed=1, dtype=dtype)
    for n, p in model.named_parameters():
        bits = first.tensor_bits(n)
        assert torch.equal(p.detach()[bits], params[n][bits])
        assert not torch.equal(p.detach()[~bits], params[n][~bits])
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert torch.equal(opt.state[p][key][bits], states[n][key][bits])
    # change the mask: released elements get zero moments, newly frozen keep theirs from now on
    before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    opt.set_frozen(second)
    assert opt.frozen_mask() == second
    for n, p in model.named_parameters():
        released = first.tensor_bits(n) & ~second.tensor_bits(n)
        kept = ~released
        for key in ("exp_avg", "exp_avg_sq"):
            assert (opt.state[p][key][released] == 0).all()
            assert torch.equal(opt.state[p][key][kept], before[n][key][kept])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    _train(model, opt, 3, seed=2, dtype=dtype)
    for n, p in model.named_parameters():
        bits = second.tensor_bits(n)
        assert torch.equal(p.detach()[bits], params[n][bits])
        assert torch.equal(opt.state[p]["exp_avg"][bits], states[n]["exp_avg"][bits])
        assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_no_reset_on_unfreeze_keeps_moments(backend):
    model = _model()
    mask = _random_mask(model, 0.5)
    opt = MaskedAdamW(model.named_parameters(), frozen=mask, reset_on_unfreeze=False)
    _train(model, opt, 2)
    before = {p: opt.state[p]["exp_avg"].clone() for p in model.parameters()}
    opt.set_frozen(None)
    assert opt.frozen_mask() is None
    for p in model.parameters():
        assert torch.equal(opt.state[p]["exp_avg"], before[p])


def test_dict_mask_and_unnamed_params(backend):
    model = _model()
    w = model[0].weight
    bits = torch.rand(w.shape) < 0.5
    opt = MaskedAdamW(model.parameters(), lr=1e-2, frozen={w: bits})
    w0, b0 = w.detach().clone(), model[0].bias.detach().clone()
    _train(model, opt, 3)
    assert torch.equal(w.detach()[bits], w0[bits])
    assert not torch.equal(w.detach()[~bits], w0[~bits])
    assert not torch.equal(model[0].bias.detach(), b0)
    assert torch.equal(opt.frozen_mask()[w], bits)


def test_param_groups_lr_tensor_and_schedulers(backend):
    transformers = pytest.importorskip("transformers")
    ours, theirs = _model(), _model()

    def groups(m, named):
        items = list(m.named_parameters()) if named else list(m.parameters())
        return [{"params": items[:2], "lr": torch.tensor(2e-3)}, {"params": items[2:], "weight_decay": 0.0}]

    opt = MaskedAdamW(groups(ours, True), lr=torch.tensor(1e-3), frozen=ParamMask.zeros_like(ours))
    ref = torch.optim.AdamW(groups(theirs, False), lr=torch.tensor(1e-3), fused=True)
    s1 = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=30)
    s2 = transformers.get_cosine_schedule_with_warmup(ref, num_warmup_steps=3, num_training_steps=30)
    _train(ours, opt, 30, scheduler=s1, clip=True)
    _train(theirs, ref, 30, scheduler=s2, clip=True)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6

    ours, theirs = _model(), _model()
    opt = MaskedAdamW(ours.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=True)
    _train(ours, opt, 10, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10))
    _train(theirs, ref, 10, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=10))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


def test_grad_scaler_fp16(backend):
    model = _model(torch.float16)
    mask = _random_mask(model, 0.5)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, frozen=mask, state_dtype=torch.float32)
    twin = _model(torch.float16)
    twin_opt = MaskedAdamW(twin.named_parameters(), lr=1e-2, frozen=mask, state_dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gen = torch.Generator().manual_seed(0)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(4):
        x = torch.randn(16, 33, generator=gen).half()
        opt.zero_grad()
        scaler.scale(model(x).float().square().mean()).backward()
        if step == 2:  # an overflow: the whole step must be skipped
            model[0].weight.grad[0, 0] = float("inf")
            snapshot = ({n: p.detach().clone() for n, p in model.named_parameters()},
                        {p: float(opt.state[p]["step"]) for p in model.parameters()})
        scaler.step(opt)
        scaler.update()
        if step == 2:
            for n, p in model.named_parameters():
                assert torch.equal(p.detach(), snapshot[0][n])
                assert float(opt.state[p]["step"]) == snapshot[1][p]
            assert scaler.get_scale() == 2.0**9
        else:  # same step without a scaler
            twin_opt.zero_grad()
            twin(x).float().square().mean().backward()
            twin_opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        bits = mask.tensor_bits(n)
        assert torch.equal(p.detach()[bits], p0[n][bits])
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-3)


def test_masked_grad_norm(backend):
    model = _model()
    mask = _random_mask(model, 0.4)
    _train(model, torch.optim.SGD(model.parameters(), lr=0.0), 1)
    got = masked_grad_norm(model.named_parameters(), mask)
    want = torch.sqrt(sum(torch.where(mask.tensor_bits(n), 0.0, p.grad).square().sum()
                          for n, p in model.named_parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(masked_grad_norm(model.parameters()),
                               torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    model = _model(dtype)
    mask = _random_mask(model, 0.3)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, amsgrad=True, frozen=mask,
                      state_dtype=torch.float32 if dtype == torch.bfloat16 else None)
    _train(model, opt, 3, dtype=dtype)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    clone = _model(dtype, seed=1)
    clone.load_state_dict(saved["model"])
    opt2 = MaskedAdamW(clone.named_parameters(), lr=1e-2, amsgrad=True,
                       state_dtype=torch.float32 if dtype == torch.bfloat16 else None)
    opt2.load_state_dict(saved["opt"])
    assert opt2.frozen_mask() == mask
    for p, q in zip(model.parameters(), clone.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            a, b = opt.state[p][key], opt2.state[q][key]
            assert b.dtype == a.dtype == torch.float32
            assert torch.equal(a, b)
    _train(model, opt, 3, seed=5, dtype=dtype)
    _train(clone, opt2, 3, seed=5, dtype=dtype)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_state_dict_dict_mask():
    model = _model()
    w = model[0].weight
    bits = torch.rand(w.shape) < 0.5
    opt = MaskedAdamW(model.parameters(), frozen={w: bits})
    _train(model, opt, 1)
    opt2 = MaskedAdamW(model.parameters())
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.frozen_mask()[w], bits)


def test_mask_errors():
    model = _model()
    other = torch.nn.Linear(33, 30)
    with pytest.raises(ValueError, match="no tensor named '0.bias'"):
        MaskedAdamW(model.named_parameters(), frozen=ParamMask.zeros_like({"0.weight": model[0].weight}))
    wrong_shape = ParamMask.zeros_like({n: (other.weight if n == "0.weight" else p)
                                        for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \[30, 33\], the parameter has shape \[31, 33\]"):
        MaskedAdamW(model.named_parameters(), frozen=wrong_shape)
    with pytest.raises(ValueError, match="matched to parameters by name"):
        MaskedAdamW(model.parameters(), frozen=ParamMask.zeros_like(model))
    with pytest.raises(ValueError, match="not one of the parameters"):
        MaskedAdamW(model.parameters(), frozen={other.weight: torch.zeros(30, 33, dtype=torch.bool)})
    with pytest.raises(TypeError, match="must be a bool tensor"):
        MaskedAdamW(model.parameters(), frozen={model[0].weight: torch.zeros(31, 33)})
    with pytest.raises(ValueError, match="state_dtype"):
        MaskedAdamW(model.parameters(), state_dtype=torch.float16)
    opt = MaskedAdamW(model.named_parameters())
    with pytest.raises(ValueError, match="shape"):
        opt.set_frozen(wrong_shape)


def test_callers_mask_edits_do_not_leak_in():
    model = _model()
    mask = _random_mask(model, 0.5)
    opt = MaskedAdamW(model.named_parameters(), frozen=mask)
    kept = mask.clone()
    mask.words.zero_()
    assert opt.frozen_mask() == kept
    w0 = model[0].weight.detach().clone()
    _train(model, opt, 2)
    bits = kept.tensor_bits("0.weight")
    assert torch.equal(model[0].weight.detach()[bits], w0[bits])


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 200), min_size=1, max_size=5),
                  dtype=st.sampled_from(DTYPES), amsgrad=st.booleans(), seed=st.integers(0, 2**16))
def test_cpp_matches_reference_property(sizes, dtype, amsgrad, seed):
    """Random sizes and masks: the C++ kernel leaves frozen bits alone and agrees with the reference."""
    if ops.masked_adamw_.backend_for("cpu") != "cpp":
        pytest.skip("the C++ extension is not built")
    prob = _problem(sizes, dtype, dtype, amsgrad, seed=seed)
    got = _run_op(torch.ops.cpift.masked_adamw_, prob, amsgrad)
    want = _run_op(ops.masked_adamw_.reference, prob, amsgrad)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for g_list, w_list, b_list in zip(got, want, (prob[0], prob[2], prob[3], prob[4])):
        _assert_frozen_untouched(b_list, g_list, prob[5])
        for a, b in zip(g_list, w_list):
            torch.testing.assert_close(a.float(), b.float(), **tol)


# ---------------------------------------------------------------------------------------------
# drop-in: torch.optim.AdamW's keywords, compile, state dicts, copies (issues 10 and 15)
# ---------------------------------------------------------------------------------------------

def test_accepts_every_torch_adamw_keyword():
    import inspect

    theirs = set(inspect.signature(torch.optim.AdamW.__init__).parameters) - {"self"}
    ours = set(inspect.signature(MaskedAdamW.__init__).parameters)
    assert theirs <= ours, f"missing: {sorted(theirs - ours)}"
    model = _model()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05, amsgrad=True,
                      maximize=False, foreach=True, capturable=True, differentiable=False, fused=True)
    _train(model, opt, 2)
    assert all(s["step"].device == p.device and float(s["step"]) == 2 for p, s in opt.state.items())


def test_differentiable_is_a_clear_error():
    with pytest.raises(ValueError, match="differentiable=True"):
        MaskedAdamW(_model().parameters(), differentiable=True)
    with pytest.raises(ValueError, match="always decoupled"):
        MaskedAdamW(_model().parameters(), decoupled_weight_decay=False)


def test_found_inf_skips_the_step_on_every_backend(backend):
    prob = _problem([40, 70], torch.float32, torch.float32, amsgrad=False, seed=6)
    got = _run_op(ops.masked_adamw_, prob, False, found_inf=torch.tensor(1.0))
    for after, before in zip(got[:3], (prob[0], prob[2], prob[3])):
        for a, b in zip(after, before):
            assert torch.equal(a, b)
    moved = _run_op(ops.masked_adamw_, prob, False, found_inf=torch.tensor(0.0))
    assert not torch.equal(moved[0][1], prob[0][1])


def _plain_state(model, steps=2):
    """A torch.optim.AdamW state dict (no mask) after a few steps."""
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, plain, steps)
    return plain.state_dict()


def test_plain_adamw_state_dict_keeps_the_constructors_mask():
    """Issue 15: loading torch.optim.AdamW's state (no "frozen") must not clear the mask in force."""
    model = _model()
    mask = _random_mask(model, 0.5)
    sd = _plain_state(model)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, frozen=mask)
    opt.load_state_dict(sd)
    assert opt.frozen_mask() == mask
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, 3, seed=3)
    for n, p in model.named_parameters():
        bits = mask.tensor_bits(n)
        assert torch.equal(p.detach()[bits], before[n][bits]), f"frozen elements of {n} moved"
        assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 5


def test_saved_mask_versus_constructor_mask():
    model = _model()
    saved_mask, own = _random_mask(model, 0.5, seed=1), _random_mask(model, 0.2, seed=2)
    src = MaskedAdamW(model.named_parameters(), lr=1e-2, frozen=saved_mask)
    _train(model, src, 1)
    sd = src.state_dict()
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, frozen=own)
    with pytest.warns(UserWarning, match="keeping the one in force"):
        opt.load_state_dict(sd)
    assert opt.frozen_mask() == own
    opt.load_state_dict(sd, use_saved_mask=True)
    assert opt.frozen_mask() == saved_mask
    same = MaskedAdamW(model.named_parameters(), lr=1e-2, frozen=saved_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(sd)  # equal masks: no warning
    fresh = MaskedAdamW(model.named_parameters(), lr=1e-2)
    fresh.load_state_dict(sd)  # no mask in force: the saved one loads
    assert fresh.frozen_mask() == saved_mask


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_mask_and_settings(how):
    """Issue 15: deepcopy / pickle round-trip the whole optimizer and the next step works."""
    model = _model(torch.bfloat16)
    mask = _random_mask(model, 0.5)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, frozen=mask, reset_on_unfreeze=False,
                      state_dtype=torch.float32)
    _train(model, opt, 2, dtype=torch.bfloat16)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.frozen_mask() == mask
    assert opt2.reset_on_unfreeze is False and opt2.state_dtype == torch.float32
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}
    _train(model2, opt2, 2, seed=4, dtype=torch.bfloat16)
    _train(model, opt, 2, seed=4, dtype=torch.bfloat16)
    for (n, p), q in zip(model2.named_parameters(), model.parameters()):
        bits = mask.tensor_bits(n)
        assert torch.equal(p.detach()[bits], before[n][bits])
        assert torch.equal(p.detach(), q.detach())  # the copy steps exactly as the original
        assert opt2.state[p]["exp_avg"].dtype == torch.float32


def test_masked_grad_norm_caches_device_words(monkeypatch):
    from cpift_fast import optim

    model = _model()
    mask = _random_mask(model, 0.4)
    _train(model, torch.optim.SGD(model.parameters(), lr=0.0), 1)
    first = masked_grad_norm(model.named_parameters(), mask)
    calls = []
    monkeypatch.setattr(optim, "_localize", lambda *a: calls.append(a) or a[0])
    again = masked_grad_norm(model.named_parameters(), mask)
    assert calls == [] and torch.equal(first, again)  # nothing re-derived on the second call
    mask.words.zero_()  # an in-place edit is seen
    torch.testing.assert_close(masked_grad_norm(model.named_parameters(), mask),
                               torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]), rtol=1e-5, atol=0)


def test_triton_grad_norm_is_deterministic():
    """Per-block partials summed in a fixed order (no atomics): the same bits on every call."""
    from cpift_fast.kernels import adamw as triton_adamw

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel on CPU tensors (the interpreter)")
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(n, generator=gen) for n in (5000, 33, 70000)]
    words = [ops.mask_pack(torch.rand(g.numel(), generator=gen) < 0.3) for g in grads]
    a = triton_adamw.masked_grad_sq_norm(grads, words)
    assert torch.equal(a, triton_adamw.masked_grad_sq_norm(grads, words))
    want = torch.stack([torch.where(ops.mask_unpack(w, g.numel()), 0.0, g).square().sum() for g, w in zip(grads, words)])
    torch.testing.assert_close(a, want, rtol=1e-5, atol=0)


def _compiled_training(opt_step, model, opt, steps, scheduler):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 33, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt_step()
        scheduler.step()


def test_compiled_step_with_scheduler_compiles_once():
    """Step counts and lr reach the kernel as tensors: a tensor lr changed by a scheduler and the
    growing step count recompile nothing after the first step; the step compiles with fullgraph=True."""
    torch._dynamo.reset()
    model = _model()
    mask = _random_mask(model, 0.3)
    opt = MaskedAdamW(model.named_parameters(), lr=torch.tensor(1e-2), frozen=mask)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    # the scheduler wraps opt.step in a function dynamo skips (torch/optim/lr_scheduler.py): compile
    # MaskedAdamW.step itself, and tell the scheduler the optimizer stepped (what the wrapper does)
    compiled = torch.compile(MaskedAdamW.step.__get__(opt), backend=counter, fullgraph=True)

    def step():
        opt._opt_called = True
        compiled()

    _compiled_training(step, model, opt, 6, scheduler)
    # one graph for the first step (it creates the state), one for every later step: step counts
    # and the scheduled lr change nothing the graph guards on
    assert counter.frame_count == 2, f"compiled {counter.frame_count} times in 6 steps"
    twin = _model()
    twin_opt = MaskedAdamW(twin.named_parameters(), lr=torch.tensor(1e-2), frozen=mask)
    _compiled_training(twin_opt.step, twin, twin_opt, 6, torch.optim.lr_scheduler.LambdaLR(twin_opt,
                                                                                            lambda k: 1.0 / (1 + k)))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # compiled == eager, bit for bit


def test_dynamo_explain_finds_no_graph_break_in_the_step():
    torch._dynamo.reset()
    model = _model()
    opt = MaskedAdamW(model.named_parameters(), lr=torch.tensor(1e-2), frozen=_random_mask(model, 0.3))
    _train(model, torch.optim.SGD(model.parameters(), lr=0.0), 1)
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, [str(b) for b in explanation.break_reasons]


def test_trainer_with_unnamed_groups_names_through_the_model(tmp_path):
    """transformers.Trainer passes unnamed decay / no-decay groups: names_from=model names them, the
    ParamMask is matched, and frozen elements stay bit-exact through Trainer steps."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    mask = ParamMask.from_bool({n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (8, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, weight_decay=0.1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizer_cls_and_kwargs=(MaskedAdamW, {"frozen": mask, "names_from": model}))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      MaskedAdamW)
    moved = 0
    for n, p in model.named_parameters():
        bits = mask.tensor_bits(n)
        assert torch.equal(p.detach()[bits], before[n][bits]), f"frozen elements of {n} moved"
        moved += int((p.detach()[~bits] != before[n][~bits]).sum())
    assert moved > 0  # the trainable ones did train
    with pytest.raises(ValueError, match="names_from: a parameter of shape"):
        MaskedAdamW([torch.nn.Parameter(torch.zeros(3))], frozen=mask, names_from=model)


def test_wrapper_prefixes_are_dropped_from_names():
    from cpift_fast.optim import _clean_name

    assert _clean_name("module.layers.0._checkpoint_wrapped_module.mlp.weight") == "layers.0.mlp.weight"
    assert _clean_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    assert _clean_name("encoder.module.weight") == "encoder.module.weight"  # only DDP's leading module.
