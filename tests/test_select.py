"""core_region: exact global top-k by |tuned − base| against a brute-force oracle, on every backend."""

import math
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift_fast import ParamMask, core_region, io, ops
from cpift_fast.ops.select import core_region_topk
from cpift_fast.select import DEFAULT_LAYER_PATTERN, round_half_up

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tied_pair(shapes, dtype=torch.float32, seed=0, zero_p=0.3):
    """base/tuned dicts whose diffs take few distinct values (heavy ties) and are often zero."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    steps = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, -0.5, -1.0, 3.0])
    for i, shape in enumerate(shapes):
        b = torch.randint(-8, 8, shape, generator=g).to(torch.float32) / 4
        delta = steps[torch.randint(0, len(steps), shape, generator=g)]
        delta = torch.where(torch.rand(shape, generator=g) < zero_p, torch.zeros(()), delta)
        noise = (torch.rand(shape, generator=g) < 0.2) * torch.randn(shape, generator=g)  # some distinct values
        base[f"layers.{i}.w"] = b.to(dtype)
        tuned[f"layers.{i}.w"] = (b + delta + noise).to(dtype)
    return base, tuned


def oracle(base, tuned, k):
    """Brute force: sort all elements by (|diff| desc, tensor order, flat index); first k nonzero."""
    diffs = [np.abs(b.reshape(-1).float().numpy() - t.reshape(-1).float().numpy()) for b, t in
             zip(base.values(), tuned.values())]
    flat = np.concatenate(diffs) if diffs else np.zeros(0, np.float32)
    position = np.arange(flat.size)  # concatenation order = (tensor order, flat index)
    order = np.lexsort((position, -flat.astype(np.float64)))
    chosen = order[: min(k, int((flat > 0).sum()))]
    bits = np.zeros(flat.size, dtype=bool)
    bits[chosen] = True
    out, start = {}, 0
    for name, b in base.items():
        out[name] = torch.from_numpy(bits[start:start + b.numel()].copy()).view(b.shape)
        start += b.numel()
    return ParamMask.from_bool(out)


def k_of(fraction, n):
    return math.floor(Fraction(repr(fraction)) * n + Fraction(1, 2))


SHAPES = [(1,), (31,), (0,), (33, 7), (2, 0, 3), (2**12 + 3,), (5, 513)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fraction", [0.0, 0.013, 0.37, 1.0])
def test_exact_equals_oracle(backend, dtype, fraction):
    base, tuned = tied_pair(SHAPES, dtype, seed=int(fraction * 1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = core_region(base, tuned, fraction, progress=False)
    n = sum(t.numel() for t in base.values())
    k = k_of(fraction, n)
    expected = oracle(base, tuned, k)
    assert mask == expected
    assert mask.info.k == k and mask.count() == mask.info.selected == min(k, mask.info.nonzero)
    assert mask.info.nonzero == sum(int((b.float() != t.float()).sum()) for b, t in zip(base.values(), tuned.values()))


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_large_tensor_crosses_chunks(monkeypatch, backend_name, dtype):
    """2^20 + 7 elements (the C++ kernel splits it into 17 chunks; ties cross chunk borders).
    Triton runs the same code path at smaller sizes (the interpreter is too slow here)."""
    monkeypatch.setenv("CPIFT_BACKEND", backend_name)
    base, tuned = tied_pair([(2**20 + 7,), (1000,)], dtype, seed=3, zero_p=0.5)
    mask = core_region(base, tuned, 0.05, progress=False)
    assert mask == oracle(base, tuned, k_of(0.05, 2**20 + 1007))
    assert mask.count() == k_of(0.05, 2**20 + 1007)


def test_ops_agree_across_backends(backend):
    base, tuned = tied_pair([(4099,)], torch.bfloat16, seed=5)
    a, b = base["layers.0.w"], tuned["layers.0.w"]
    a[7], b[9] = float("inf"), float("nan")
    same = torch.randn(40)
    f32 = torch.randn(3, 33), torch.randn(3, 33)
    # a list of pairs: mixed dtypes, an empty pair, a pair without a nonzero diff (top -1)
    gen = torch.Generator().manual_seed(6)
    tiny = [torch.randn(5, generator=gen) for _ in range(62)]  # past the Triton launcher's 32 rows per group
    bases = [a, f32[0], torch.empty(0), same, *tiny[:31]]
    tuneds = [b, f32[1], torch.empty(0), same.clone(), *tiny[31:]]
    for level, prefix in [(0, 0), (1, 0), (1, 0x3E80), (1, 0x3F80)]:
        hist, top = ops.select_histogram(bases, tuneds, level, prefix)
        ref_hist, ref_top = ops.select_histogram.reference(bases, tuneds, level, prefix)
        assert torch.equal(hist, ref_hist) and torch.equal(top, ref_top), (level, prefix)
        alone = [ops.select_histogram.reference([x], [y], level, prefix)[0] for x, y in zip(bases, tuneds)]
        assert torch.equal(hist, sum(alone))  # the list's histogram is the sum of the pairs'
    hist, top = ops.select_histogram(bases, tuneds, 0, 0)
    assert int(hist[0x7F80:].sum()) == 2 and top[0] >= 0x7F80 and top[1] < 0x7F80 and top[2:4].tolist() == [-1, -1]
    assert ops.select_histogram([], [], 0, 0)[1].numel() == 0
    for threshold, budget in [(0x3F800000, 0), (0x3F800000, 17), (0x3F800000, 2**63 - 1), (1, 5), (1, 4100)]:
        words, n_eq = ops.select_mask(bases, tuneds, threshold, budget)
        ref_words, ref_eq = ops.select_mask.reference(bases, tuneds, threshold, budget)
        assert torch.equal(words, ref_words) and torch.equal(n_eq, ref_eq), (threshold, budget)
    # the list's bits are the pairs' bits, each pair taking the ties the earlier ones left
    words, n_eq = ops.select_mask(bases, tuneds, 1, 4100)
    alone, left = [], 4100
    for x, y in zip(bases, tuneds):
        w, eq = ops.select_mask.reference([x], [y], 1, left)
        alone.append(w)
        left -= min(left, int(eq))
    assert torch.equal(words, torch.cat(alone)) and n_eq.numel() == len(bases)


def test_reference_concat_topk_equals_oracle():
    base, tuned = tied_pair(SHAPES, seed=11)
    k = 200
    bools = core_region_topk(list(base.items()), list(tuned.items()), k)
    assert ParamMask.from_bool(bools) == oracle(base, tuned, k)


def test_non_contiguous_inputs(backend):
    base, tuned = tied_pair([(40, 70)], seed=2)
    t_base = {n: t.t() for n, t in base.items()}
    t_tuned = {n: t.t() for n, t in tuned.items()}
    mask = core_region(t_base, t_tuned, 0.1, progress=False)
    contiguous = {n: t.contiguous() for n, t in t_base.items()}, {n: t.contiguous() for n, t in t_tuned.items()}
    assert mask == oracle(*contiguous, k_of(0.1, 2800))


def test_deterministic_across_runs_and_threads():
    base, tuned = tied_pair([(30000,), (2**16 + 5,)], torch.bfloat16, seed=4)
    first = core_region(base, tuned, 0.1, progress=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = core_region(base, tuned, 0.1, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert first == single == core_region(base, tuned, 0.1, progress=False)


def test_fewer_nonzero_than_k_warns_and_says_so():
    base = {"a": torch.zeros(100)}
    tuned = {"a": torch.zeros(100)}
    tuned["a"][:3] = 1.0
    with pytest.warns(UserWarning, match="mask holds 3 < k = 50"):
        mask = core_region(base, tuned, 0.5, progress=False)
    assert mask.count() == 3 and mask.info.short_by == 47
    with pytest.warns(UserWarning):
        nothing = core_region(base, {"a": torch.zeros(100)}, 1.0, progress=False)
    assert nothing.count() == 0 and nothing.info.threshold is None


def test_empty_inputs():
    mask = core_region({}, {}, 0.5, progress=False)
    assert mask.numel == 0 and mask.count() == 0 and mask.info.k == 0
    mask = core_region({"e": torch.zeros(0, 3)}, {"e": torch.zeros(0, 3)}, 1.0, progress=False)
    assert mask.names == ("e",) and mask.count() == 0


def test_negative_zero_is_zero():
    base = {"a": torch.tensor([0.0, 1.0, 2.0])}
    tuned = {"a": torch.tensor([-0.0, 1.5, 2.0])}
    with pytest.warns(UserWarning, match="zero diffs are never selected"):
        mask = core_region(base, tuned, 1.0, progress=False)
    assert mask.to_bool()["a"].tolist() == [False, True, False]


def test_rounding_is_half_up():
    assert round_half_up(0.01, 50) == 1  # Python's round(0.5) would give 0
    assert round_half_up(0.5, 3) == 2
    assert round_half_up(0.1, 25) == 3  # 2.5 -> 3 (float 0.1 * 25 is 2.5000000000000004 anyway)
    assert round_half_up(0.0, 10**12) == 0 and round_half_up(1.0, 10**12) == 10**12


@given(st.floats(0, 1, allow_nan=False), st.integers(0, 10**13))
def test_rounding_matches_decimal_definition(fraction, n):
    assert round_half_up(fraction, n) == k_of(fraction, n)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=5), st.floats(0, 1), st.integers(0, 2**16),
       st.sampled_from(DTYPES))
def test_property_exact_equals_oracle(sizes, fraction, seed, dtype):
    base, tuned = tied_pair([(s,) for s in sizes], dtype, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = core_region(base, tuned, fraction, progress=False)
    assert mask == oracle(base, tuned, k_of(fraction, sum(sizes)))


def test_threshold_reported():
    base = {"a": torch.zeros(10)}
    tuned = {"a": torch.arange(10, dtype=torch.float32)}
    mask = core_region(base, tuned, 0.3, progress=False)
    assert mask.info.threshold == 7.0 and mask.to_bool()["a"].tolist() == [False] * 7 + [True] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_approx_mode(backend, dtype):
    g = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(3000, generator=g).to(dtype) for i in range(3)}
    tuned = {n: (t.float() + 0.01 * torch.randn(3000, generator=g)).to(dtype) for n, t in base.items()}
    mask = core_region(base, tuned, 0.02, mode="approx", progress=False)
    info = mask.info
    assert info.selected == mask.count()
    assert abs(info.selected - info.k) <= info.error_bound
    assert info.error_bound < info.k  # one bucket spans a 2^-7 relative width: small here
    thr = info.threshold  # the approx mask is exactly {|diff| >= bucket edge}
    expect = {n: ((base[n].float() - tuned[n].float()).abs() >= thr) & (base[n].float() != tuned[n].float())
              for n in base}
    assert mask == ParamMask.from_bool(expect)


def test_per_tensor_scope(backend):
    base, tuned = tied_pair([(100,), (33,), (0,), (1000,)], seed=7)
    mask = core_region(base, tuned, 0.1, scope="per_tensor", progress=False)
    for name in base:
        one = oracle({name: base[name]}, {name: tuned[name]}, k_of(0.1, base[name].numel()))
        assert torch.equal(mask.tensor_words(name), one.words), name
    assert [g.name for g in mask.info.groups] == list(base)
    assert [g.selected for g in mask.info.groups] == list(mask.count_per_tensor().values())


def test_per_layer_scope():
    base, tuned = {}, {}
    b, t = tied_pair([(50,), (70,), (30,), (20,), (11,)], seed=9)
    names = ["embed.weight", "model.layers.0.q", "model.layers.0.k", "model.layers.1.q", "lm_head.weight"]
    for name, bt, tt in zip(names, b.values(), t.values()):
        base[name], tuned[name] = bt, tt
    mask = core_region(base, tuned, 0.2, scope="per_layer", progress=False)
    groups = {"other": ["embed.weight", "lm_head.weight"], "0": names[1:3], "1": names[3:4]}
    assert {g.name for g in mask.info.groups} == set(groups)
    for members in groups.values():
        sub_b, sub_t = {n: base[n] for n in members}, {n: tuned[n] for n in members}
        expected = oracle(sub_b, sub_t, k_of(0.2, sum(x.numel() for x in sub_b.values())))
        for n in members:
            assert torch.equal(mask.tensor_bits(n), expected.tensor_bits(n)), n
    assert {g.name: g.selected for g in mask.info.groups} == {
        layer: sum(mask.count_per_tensor()[n] for n in members) for layer, members in groups.items()}
    assert re.search(DEFAULT_LAYER_PATTERN, "transformer.h.12.attn.c_attn.weight").group(1) == "12"


def test_streaming_from_sharded_directories_equals_in_memory(tmp_path):
    base, tuned = tied_pair([(300,), (17, 19), (0,), (1000,), (64,)], torch.bfloat16, seed=12)
    io.save_sharded(base, tmp_path / "base", max_shard_size=1000)
    io.save_sharded(tuned, tmp_path / "tuned", max_shard_size=700)
    streamed = core_region(tmp_path / "base", tmp_path / "tuned", 0.05, progress=False)
    natural = sorted(base, key=io.natural_key)
    in_memory = core_region({n: base[n] for n in natural}, {n: tuned[n] for n in natural}, 0.05, progress=False)
    assert streamed == in_memory
    file_vs_dir = core_region(str(tmp_path / "base"), {n: tuned[n] for n in natural}, 0.05, progress=False)
    assert file_vs_dir == in_memory


def test_module_layout_wins_over_directory_order(tmp_path):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 8)
    model = torch.nn.ModuleDict({"z_emb": emb, "a_proj": torch.nn.Linear(8, 8), "head": torch.nn.Linear(8, 20, bias=False)})
    model["head"].weight = emb.weight  # tied: one parameter, named z_emb.weight
    tuned = {n: p.detach() + torch.randn_like(p) for n, p in model.named_parameters()}
    io.save_sharded(tuned, tmp_path / "tuned")
    mask = core_region(model, tmp_path / "tuned", 0.1, progress=False)
    assert mask.names == tuple(n for n, _ in model.named_parameters())
    reverse = core_region(tmp_path / "tuned", model, 0.1, progress=False)
    assert reverse.names == mask.names and reverse == mask


def test_progress_bar_runs(capsys):
    base, tuned = tied_pair([(100,), (200,)], seed=1)
    assert core_region(base, tuned, 0.1, progress=True).count() == 30


def test_nonfinite_diff_raises_naming_tensor(backend):
    base, tuned = tied_pair([(10,), (10,)], seed=0)
    tuned["layers.1.w"][3] = float("nan")
    with pytest.raises(ValueError, match=r"'layers.1.w' has 1 Inf/NaN"):
        core_region(base, tuned, 0.1, progress=False)
    tuned["layers.1.w"][3] = 0.0
    base["layers.0.w"][0] = float("inf")
    with pytest.raises(ValueError, match=r"'layers.0.w'"):
        core_region(base, tuned, 0.1, progress=False)


@pytest.mark.parametrize("fraction", [-0.01, 1.5, float("nan"), "0.1", True])
def test_bad_fraction_raises(fraction):
    base, tuned = tied_pair([(10,)])
    with pytest.raises(ValueError, match="fraction must be a number in"):
        core_region(base, tuned, fraction, progress=False)


def test_mismatches_raise_naming_first():
    base, tuned = tied_pair([(10,), (4, 5)])
    with pytest.raises(ValueError, match="'layers.1.w' is in base .* but not in tuned"):
        core_region(base, {"layers.0.w": tuned["layers.0.w"]}, progress=False)
    with pytest.raises(ValueError, match="'extra' is in tuned .* but not in base"):
        core_region(base, {**tuned, "extra": torch.ones(1)}, progress=False)
    with pytest.raises(ValueError, match=r"'layers.1.w' has shape \[4, 5\] in base but \[5, 4\] in tuned"):
        core_region(base, {**tuned, "layers.1.w": tuned["layers.1.w"].reshape(5, 4)}, progress=False)
    with pytest.raises(ValueError, match="'layers.0.w' is torch.float32 in base but torch.float16 in tuned"):
        core_region(base, {**tuned, "layers.0.w": tuned["layers.0.w"].half()}, progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        core_region(base, tuned, mode="fast", progress=False)
    with pytest.raises(ValueError, match="scope must be"):
        core_region(base, tuned, scope="layer", progress=False)


def test_other_dtypes_are_compared_in_fp32():
    base = {"d": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), "i": torch.tensor([1, 2, 3])}
    tuned = {"d": torch.tensor([1.0, 2.5, 3.0], dtype=torch.float64), "i": torch.tensor([1, 2, 9])}
    with pytest.warns(UserWarning, match="only 2 of 6 elements changed"):
        mask = core_region(base, tuned, 1.0, progress=False)
    assert mask.to_bool()["d"].tolist() == [False, True, False]
    assert mask.to_bool()["i"].tolist() == [False, False, True]


def test_in_memory_pairs_are_reused_across_passes_only_when_uncopied():
    """The passes reuse the caller's own tensors (no copies held); a pair that needs a conversion
    (float64 -> fp32) is converted again per pass, never kept."""
    from cpift_fast.select import _Pairs

    base = {"b": torch.randn(40).bfloat16(), "d": torch.randn(40, dtype=torch.float64)}
    tuned = {n: t + 1 for n, t in base.items()}
    pairs = _Pairs(io.open_tensors(base, "base"), io.open_tensors(tuned, "tuned"), torch.device("cpu"), 0)
    a, b = pairs.get("b")
    assert a.data_ptr() == base["b"].data_ptr() and b.data_ptr() == tuned["b"].data_ptr()
    assert pairs.get("b")[0] is a, "an uncopied pair is looked up again, not re-read"
    d1, d2 = pairs.get("d")[0], pairs.get("d")[0]
    assert d1.dtype == torch.float32 and d1 is not d2 and "d" not in pairs._as_given


def test_cli_core(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from cpift_fast.cli import main

    base, tuned = tied_pair([(100,), (300,), (50,)], seed=6)
    io.save_sharded(base, tmp_path / "b")
    io.save_sharded(tuned, tmp_path / "t")
    out, plot = tmp_path / "task.mask", tmp_path / "share.png"
    assert main(["core", str(tmp_path / "b"), str(tmp_path / "t"), "--fraction", "0.1", "-o", str(out),
                 "--plot", str(plot), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "k = 45" in text and "threshold |diff| =" in text
    counts = ParamMask.load(out).count_per_tensor()
    for i in range(3):  # one breakdown row per layer: "layer elements core share density"
        assert re.search(rf"^\s+{i}\s+{base[f'layers.{i}.w'].numel()}\s+{counts[f'layers.{i}.w']}\s", text, re.M), text
    assert sum(counts.values()) == 45
    mask = ParamMask.load(out)
    assert mask == core_region(tmp_path / "b", tmp_path / "t", 0.1, progress=False)
    assert plot.stat().st_size > 1000


def test_tensors_below_the_threshold_are_not_reread(monkeypatch):
    """A tensor whose largest diff is below the threshold bucket skips the refine and mask passes."""
    g = torch.Generator().manual_seed(0)
    base = {"small": torch.zeros(500), "big": torch.zeros(500), "mixed": torch.zeros(500)}
    tuned = {"small": torch.rand(500, generator=g) * 1e-6, "big": 1 + torch.rand(500, generator=g),
             "mixed": torch.cat([torch.rand(250, generator=g) * 1e-6, 1 + torch.rand(250, generator=g)])}
    seen = []
    real_mask = ops.select_mask

    def spy(a, b, threshold, budget):
        seen.extend(t.numel() for t in a)
        return real_mask(a, b, threshold, budget)

    monkeypatch.setattr(ops, "select_mask", spy)
    mask = core_region(base, tuned, 0.2, progress=False)
    assert len(seen) == 2  # "small" never reaches the mask pass
    assert mask == oracle(base, tuned, 300)


