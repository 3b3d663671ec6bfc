"""ParamMask: bit layout, set algebra, persistence and layout errors, on every backend."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift_fast import MaskLayout, ParamMask

ODD_SIZES = [1, 31, 32, 33, 2**20 + 7]


def random_bools(shapes, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.rand(s, generator=g) < p for i, s in enumerate(shapes)}


def packbits_words(bits: torch.Tensor) -> np.ndarray:
    """The expected words: numpy little-endian packbits of the flat tensor, padded to 32 bits."""
    flat = bits.reshape(-1).numpy()
    padded = np.concatenate([flat, np.zeros((-flat.size) % 32, dtype=bool)])
    return np.packbits(padded, bitorder="little").view("<i4")


def expected_words(bools: dict) -> np.ndarray:
    parts = [packbits_words(b) for b in bools.values()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype="<i4")


@pytest.mark.parametrize("n", ODD_SIZES)
def test_words_equal_numpy_packbits(backend, n):
    bools = random_bools([(n,)], seed=n)
    mask = ParamMask.from_bool(bools)
    assert mask.words.numel() == math.ceil(n / 32)
    np.testing.assert_array_equal(mask.words.numpy(), expected_words(bools))
    assert torch.equal(mask.to_bool()["t0"], bools["t0"])
    assert mask.count() == int(bools["t0"].sum())


def test_layout_offsets_word_aligned_and_padding_zero(backend):
    shapes = [(3, 11), (0,), (1,), (2, 0, 5), (64,), (7, 5)]
    bools = {f"t{i}": torch.ones(s, dtype=torch.bool) for i, s in enumerate(shapes)}
    mask = ParamMask.from_bool(bools)
    assert mask.offsets == (0, 2, 2, 3, 3, 5, 7)
    np.testing.assert_array_equal(mask.words.numpy(), expected_words(bools))
    full = ~ParamMask.zeros(mask.layout)
    assert full == mask  # complement of empty sets exactly the elements, never padding
    assert full.count() == sum(math.prod(s) for s in shapes)


def test_empty_tensors_and_empty_layout(backend):
    mask = ParamMask.from_bool({"e": torch.zeros(0, 4, dtype=torch.bool)})
    assert mask.words.numel() == 0 and mask.count() == 0
    assert mask.to_bool()["e"].shape == (0, 4)
    assert (~mask).count() == 0
    nothing = ParamMask.zeros(MaskLayout((), ()))
    assert nothing.count() == 0 and nothing.count_per_tensor() == {}


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple), min_size=1, max_size=6),
    p=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_round_trip_random_layouts(shapes, p, seed):
    bools = random_bools(shapes, p, seed)
    mask = ParamMask.from_bool(bools)
    back = mask.to_bool()
    assert list(back) == list(bools)
    for name in bools:
        assert torch.equal(back[name], bools[name])
    assert mask.count_per_tensor() == {n: int(b.sum()) for n, b in bools.items()}
    np.testing.assert_array_equal(mask.words.numpy(), expected_words(bools))


@settings(max_examples=20, deadline=None)
@given(shapes=st.lists(st.integers(0, 100).map(lambda n: (n,)), min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_set_algebra_equals_bool_algebra(shapes, seed):
    a_bool, b_bool = random_bools(shapes, 0.4, seed), random_bools(shapes, 0.6, seed + 1)
    a, b = ParamMask.from_bool(a_bool), ParamMask.from_bool(b_bool)
    cases = {
        "|": (a | b, lambda x, y: x | y),
        "&": (a & b, lambda x, y: x & y),
        "-": (a - b, lambda x, y: x & ~y),
        "^": (a ^ b, lambda x, y: x ^ y),
    }
    for symbol, (result, fn) in cases.items():
        expected = ParamMask.from_bool({n: fn(a_bool[n], b_bool[n]) for n in a_bool})
        assert result == expected, symbol
    assert ~a == ParamMask.from_bool({n: ~v for n, v in a_bool.items()})
    assert (~a).count() + a.count() == a.numel


def test_set_algebra_each_backend(backend):
    shapes = [(33,), (5, 7), (2**20 + 7,)]
    a_bool, b_bool = random_bools(shapes, 0.3, 1), random_bools(shapes, 0.5, 2)
    a, b = ParamMask.from_bool(a_bool), ParamMask.from_bool(b_bool)
    union, inter, diff = (a | b).to_bool(), (a & b).to_bool(), (a - b).to_bool()
    for n in a_bool:
        assert torch.equal(union[n], a_bool[n] | b_bool[n])
        assert torch.equal(inter[n], a_bool[n] & b_bool[n])
        assert torch.equal(diff[n], a_bool[n] & ~b_bool[n])
    assert (a | b).count_per_tensor() == {n: int((a_bool[n] | b_bool[n]).sum()) for n in a_bool}


def test_backends_give_identical_words(monkeypatch):
    bools = random_bools([(31,), (33,), (4, 1000), (1,)], 0.5, 7)
    results = {}
    for name in ("cpp", "triton", "torch"):
        monkeypatch.setenv("CPIFT_BACKEND", name)
        mask = ParamMask.from_bool(bools)
        results[name] = (mask.words.clone(), (~mask).words.clone(), mask.count_per_tensor())
    for name in ("triton", "torch"):
        assert torch.equal(results[name][0], results["cpp"][0]), name
        assert torch.equal(results[name][1], results["cpp"][1]), name
        assert results[name][2] == results["cpp"][2], name


def test_non_contiguous_input(backend):
    base = torch.rand(40, 70) < 0.5
    view = base.t()[::2]  # non-contiguous
    mask = ParamMask.from_bool({"v": view})
    assert torch.equal(mask.tensor_bits("v"), view)


def test_zeros_like_module_and_pairs():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    mask = ParamMask.zeros_like(model)
    assert mask.names == ("0.weight", "0.bias", "1.weight", "1.bias")
    assert mask.shapes == ((5, 3), (5,), (1, 5), (1,))
    assert mask.count() == 0
    assert ParamMask.zeros_like(list(model.named_parameters())).layout == mask.layout
    assert ParamMask.zeros_like(dict(model.named_parameters())).layout == mask.layout


def test_tensor_words_is_a_view():
    mask = ParamMask.zeros(MaskLayout(("a", "b"), ((40,), (3,))))
    mask.tensor_words("b")[0] = 0b101
    assert mask.tensor_bits("b").tolist() == [True, False, True]
    assert mask.count_per_tensor() == {"a": 0, "b": 2}
    with pytest.raises(KeyError, match="'c'"):
        mask.tensor_bits("c")


def test_save_load_round_trip(tmp_path):
    bools = random_bools([(3, 33), (1,), (0,), (100,)], 0.5, 3)
    mask = ParamMask.from_bool(bools)
    path = tmp_path / "task.mask"
    mask.save(path)
    loaded = ParamMask.load(path)
    assert loaded == mask and loaded.layout == mask.layout
    assert ParamMask.load(path, layout=mask.layout) == mask
    assert [p.name for p in tmp_path.iterdir()] == ["task.mask"]  # no temp file left behind


@pytest.mark.parametrize(
    "other, message",
    [
        (MaskLayout(("t0", "tX", "t2"), ((4,), (5,), (6,))), "tensor #1 is 'tX' in the expected layout but 't1' in the file"),
        (MaskLayout(("t0", "t1", "t2"), ((4,), (5, 1), (6,))), "tensor 't1' has shape \\[5, 1\\] in the expected layout but \\[5\\] in the file"),
        (MaskLayout(("t0", "t1"), ((4,), (5,))), "the expected layout has 2 tensors, the file 3 \\(first extra: 't2'\\)"),
    ],
)
def test_layout_mismatch_errors(tmp_path, other, message):
    mask = ParamMask.zeros(MaskLayout(("t0", "t1", "t2"), ((4,), (5,), (6,))))
    path = tmp_path / "m.mask"
    mask.save(path)
    with pytest.raises(ValueError, match=message):
        ParamMask.load(path, layout=other)
    with pytest.raises(ValueError, match="mask layouts differ: .*the left operand of \\|"):
        mask | ParamMask.zeros(other)


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a ParamMask file"):
        ParamMask.load(tmp_path / "x.safetensors")


def test_bad_inputs():
    with pytest.raises(TypeError, match="tensor 'x' must be bool"):
        ParamMask.from_bool({"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="appears twice"):
        MaskLayout(("a", "a"), ((1,), (1,)))
    with pytest.raises(ValueError, match="needs 1"):
        ParamMask(MaskLayout(("a",), ((3,),)), torch.zeros(2, dtype=torch.int32))


def test_to_device_keeps_layout(device):
    mask = ParamMask.from_bool(random_bools([(33,), (2, 3)], 0.5, 4))
    moved = mask.to(device)
    assert moved.device.type == device.type and moved.layout == mask.layout
    assert moved.to("cpu") == mask


def test_billion_element_mask_fits_in_126_mb(monkeypatch):
    # The words' size is the point here, not a backend: count with the default (C++ on CPU), as
    # the Triton interpreter would need minutes for 31M words.
    monkeypatch.delenv("CPIFT_BACKEND", raising=False)
    layout = MaskLayout(tuple(f"layer{i}" for i in range(8)), tuple((125_000_000,) for _ in range(8)))
    mask = ParamMask.zeros(layout)
    assert layout.numel == 10**9
    nbytes = mask.words.numel() * mask.words.element_size()
    assert nbytes <= 126 * 10**6, nbytes
    mask.tensor_words("layer3")[:10] = -1
    assert mask.count() == 320
    assert (~mask).count() == 10**9 - 320
