"""Overlap counts / Jaccard (all backends, against bool tensors), grouping, stage order, plot, CLI."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift_fast import ParamMask, ops, group_tasks, jaccard_matrix, order_stages, overlap_counts, plot_overlap
from cpift_fast.cli import main
from helpers import forced

SHAPES = {"a": (1,), "b": (31,), "c": (3, 11), "d": (1000,), "e": (0,)}


def random_bools(gen, density, shapes=SHAPES):
    return {n: torch.rand(s, generator=gen) < density for n, s in shapes.items()}


def bool_counts(bools):
    """Independent oracle: pairwise |A ∩ B| and |A ∪ B| over flat bool tensors."""
    flat = [torch.cat([t.reshape(-1) for t in b.values()]) for b in bools]
    T = len(flat)
    inter = torch.tensor([[int((flat[i] & flat[j]).sum()) for j in range(T)] for i in range(T)])
    union = torch.tensor([[int((flat[i] | flat[j]).sum()) for j in range(T)] for i in range(T)])
    return inter, union


@pytest.mark.parametrize("T", [*range(1, 9), 12])
def test_counts_and_jaccard_match_bools(backend, T):
    gen = torch.Generator().manual_seed(T)
    densities = ([0.0, 1.0, 0.3, 0.01, 0.5, 0.9, 0.05, 0.7] * 2)[:T]  # includes the empty and the full mask
    bools = [random_bools(gen, d) for d in densities]
    masks = [ParamMask.from_bool(b) for b in bools]
    inter, union = overlap_counts(masks)
    ref_inter, ref_union = bool_counts(bools)
    assert torch.equal(inter, ref_inter) and torch.equal(union, ref_union)
    J = jaccard_matrix(masks)
    expected = torch.where(ref_union > 0, ref_inter.double() / ref_union.clamp(min=1).double(), 0.0)
    assert J.dtype == torch.float64 and torch.equal(J, expected)
    assert torch.equal(J, J.T)


def test_large_odd_size(backend):
    n = 2**20 + 7
    gen = torch.Generator().manual_seed(1)
    bools = [{"w": torch.rand(n, generator=gen) < d} for d in (0.01, 0.02, 0.5)]
    inter, union = overlap_counts([ParamMask.from_bool(b) for b in bools])
    ref_inter, ref_union = bool_counts(bools)
    assert torch.equal(inter, ref_inter) and torch.equal(union, ref_union)


def test_op_accepts_noncontiguous_and_odd_word_counts(backend):
    gen = torch.Generator().manual_seed(2)
    for nwords in (0, 1, 2, 3, 17, 129, 1001):
        big = [torch.randint(-2**31, 2**31 - 1, (2 * nwords,), dtype=torch.int32, generator=gen) for _ in range(3)]
        strided = [b[::2] for b in big]
        expected = ops.overlap_counts.reference([s.contiguous() for s in strided])
        assert torch.equal(ops.overlap_counts(strided).cpu(), expected)


def test_empty_masks_have_jaccard_zero():
    empty = ParamMask.zeros(ParamMask.from_bool(random_bools(torch.Generator(), 0.0)).layout)
    full = ~empty
    J = jaccard_matrix([empty, empty, full])
    assert J.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.data())
def test_hypothesis_all_backends_agree_with_bools(data):
    T = data.draw(st.integers(1, 5))
    sizes = data.draw(st.lists(st.integers(0, 200), min_size=1, max_size=4))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"t{i}": (s,) for i, s in enumerate(sizes)}
    bools = [random_bools(gen, data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])), shapes) for _ in range(T)]
    masks = [ParamMask.from_bool(b) for b in bools]
    ref_inter, ref_union = bool_counts(bools)
    for backend in ("cpp", "triton", "torch"):
        with forced(backend):
            inter, union = overlap_counts(masks)
        assert torch.equal(inter, ref_inter) and torch.equal(union, ref_union), backend


def test_layout_mismatch_raises():
    a = ParamMask.from_bool({"x": torch.zeros(10, dtype=torch.bool)})
    b = ParamMask.from_bool({"x": torch.zeros(11, dtype=torch.bool)})
    c = ParamMask.from_bool({"y": torch.zeros(10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        jaccard_matrix([a, b])
    with pytest.raises(ValueError, match="'x'.*'y'|'y'.*'x'"):
        jaccard_matrix([a, c])
    with pytest.raises(ValueError, match="at least one"):
        jaccard_matrix([])
    with pytest.raises(TypeError, match="not a ParamMask"):
        jaccard_matrix([a, torch.zeros(3)])


# ----- grouping ----------------------------------------------------------------------------------

def sym(n, entries):
    J = torch.eye(n, dtype=torch.float64)
    for (i, j), v in entries.items():
        J[i, j] = J[j, i] = v
    return J


def test_group_chain_is_one_component():
    J = sym(4, {(0, 1): 0.2, (1, 2): 0.15, (0, 2): 0.0, (2, 3): 0.05})
    assert group_tasks(J, 0.1, list("abcd")) == [["a", "b", "c"], ["d"]]
    assert group_tasks(J, 0.05, list("abcd")) == [["a", "b", "c", "d"]]
    assert group_tasks(J, 0.16, list("abcd")) == [["a", "b"], ["c"], ["d"]]


def test_group_isolated_and_order():
    J = sym(5, {(4, 1): 0.5, (3, 0): 0.3})
    assert group_tasks(J, 0.1) == [["0", "3"], ["1", "4"], ["2"]]
    assert group_tasks(J, 0.9) == [["0"], ["1"], ["2"], ["3"], ["4"]]


def test_group_tau_bounds():
    J = sym(3, {(0, 1): 1.0})
    assert group_tasks(J, 0.0) == [["0", "1", "2"]]  # J >= 0 everywhere: one group
    assert group_tasks(J, 1.0) == [["0", "1"], ["2"]]  # only identical cores join


def test_group_from_real_masks_identical_cores_at_tau_one():
    gen = torch.Generator().manual_seed(3)
    a, b = random_bools(gen, 0.2), random_bools(gen, 0.2)
    masks = [ParamMask.from_bool(x) for x in (a, b, a)]
    assert group_tasks(jaccard_matrix(masks), 1.0, ["p", "q", "r"]) == [["p", "r"], ["q"]]


def test_group_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        group_tasks(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="symmetric"):
        group_tasks(torch.tensor([[1.0, 0.2], [0.3, 1.0]]))
    with pytest.raises(ValueError, match="tau"):
        group_tasks(torch.eye(2), 1.5)
    with pytest.raises(ValueError, match="names"):
        group_tasks(torch.eye(2), 0.1, ["a"])
    with pytest.raises(ValueError, match="unique"):
        group_tasks(torch.eye(2), 0.1, ["a", "a"])


def test_order_stages():
    groups = [["a"], ["b", "c"], ["d", "e", "f"], ["g"]]
    r1 = order_stages(groups, "random", seed=1)
    assert r1 == order_stages(groups, "random", seed=1)
    assert sorted(map(tuple, r1)) == sorted(map(tuple, groups))
    assert {tuple(map(tuple, order_stages(groups, "random", seed=s))) for s in range(10)} != {tuple(map(tuple, r1))}
    assert order_stages(groups, "size") == [["d", "e", "f"], ["b", "c"], ["a"], ["g"]]
    layout_shapes = {"w": (64,)}
    sizes = {"a": 30, "b": 5, "c": 5, "d": 1, "e": 2, "f": 3, "g": 10}
    masks = {}
    for k, s in sizes.items():
        bits = torch.zeros(64, dtype=torch.bool)
        bits[:s] = True  # nested prefixes: the union of a group is its largest member
        masks[k] = ParamMask.from_bool({"w": bits.view(layout_shapes["w"])})
    assert order_stages(groups, "min_frozen", masks=masks) == [["d", "e", "f"], ["b", "c"], ["g"], ["a"]]
    with pytest.raises(ValueError, match="masks"):
        order_stages(groups, "min_frozen")
    with pytest.raises(ValueError, match="strategy"):
        order_stages(groups, "alphabetical")


def test_plot_and_cli(tmp_path, capsys):
    gen = torch.Generator().manual_seed(4)
    base = random_bools(gen, 0.1)
    paths = []
    for i, extra in enumerate([0.0, 0.02, 0.5]):
        b = {n: t | (torch.rand(t.shape, generator=gen) < extra) for n, t in base.items()} if i < 2 \
            else random_bools(gen, 0.3)
        path = tmp_path / f"task{i}.mask"
        ParamMask.from_bool(b).save(path)
        paths.append(str(path))
    png, js = tmp_path / "overlap.png", tmp_path / "overlap.json"
    assert main(["overlap", *paths, "--tau", "0.5", "--plot", str(png), "--json", str(js), "--order", "size"]) == 0
    out = capsys.readouterr().out
    assert "groups at tau = 0.5" in out and "stage order (size)" in out
    result = json.loads(js.read_text())
    assert result["groups"] == [["task0", "task1"], ["task2"]]
    J = jaccard_matrix([ParamMask.load(p) for p in paths])
    assert torch.allclose(torch.tensor(result["jaccard"], dtype=torch.float64), J)
    assert png.read_bytes()[:4] == b"\x89PNG"
    path = plot_overlap(J, ["x", "y", "z"], [["x", "y"], ["z"]], tmp_path / "p.svg", tau=0.5)
    assert os.path.getsize(path) > 0


@pytest.mark.gpu
def test_triton_on_gpu_matches_reference():
    """The compiled kernel (libdevice popc) on a real GPU; the interpreter runs the SWAR path."""
    gen = torch.Generator().manual_seed(7)
    words = [torch.randint(-2**31, 2**31 - 1, (100_003,), dtype=torch.int32, generator=gen) for _ in range(8)]
    want = ops.overlap_counts.reference(words)
    with forced("triton"):
        got = ops.overlap_counts([w.cuda() for w in words])
    assert torch.equal(got.cpu(), want)
