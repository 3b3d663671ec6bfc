"""cpift_fast.shard.tensor_shares: which rank owns which tensor (deterministic, balanced, checked)."""

import random

import pytest

from cpift_fast.shard import ShardError, owners, tensor_shares


def test_every_name_once_in_checkpoint_order():
    names = [f"layers.{i}.w" for i in range(20)]
    sizes = [random.Random(i).randrange(1, 1000) for i in range(20)]
    for world in (1, 2, 3, 7, 25):
        shares = tensor_shares(names, sizes, world)
        assert len(shares) == world
        assert sorted(n for s in shares for n in s) == sorted(names)
        for share in shares:
            assert share == [n for n in names if n in share]  # each rank streams in checkpoint order
    assert tensor_shares(names, sizes, 1) == [names]


def test_largest_first_greedy_is_exact_and_stable():
    # sizes 5,4,3,3,2,1 over 2 ranks, LPT: 5->0, 4->1, 3(c)->1, 3(d)->0, 2(e)->0? loads 0:8 1:7 -> e->1, f->0
    names = ["a", "b", "c", "d", "e", "f"]
    assert tensor_shares(names, [5, 4, 3, 3, 2, 1], 2) == [["a", "d", "f"], ["b", "c", "e"]]
    # equal sizes: round robin in name order (lowest rank among equal loads)
    assert tensor_shares(list("abcde"), [1] * 5, 3) == [["a", "d"], ["b", "e"], ["c"]]
    # fewer tensors than ranks: the later ranks own nothing
    assert tensor_shares(["x"], [10], 3) == [["x"], [], []]
    assert tensor_shares([], [], 2) == [[], []]


@pytest.mark.parametrize("world", [2, 3, 8])
def test_balance_bound(world):
    rng = random.Random(world)
    names = [f"t{i}" for i in range(200)]
    sizes = [rng.choice([1, 10, 1000, 4096 * 11008]) * rng.randrange(1, 5) for _ in names]
    shares = tensor_shares(names, sizes, world)
    size_of = dict(zip(names, sizes))
    loads = [sum(size_of[n] for n in s) for s in shares]
    assert max(loads) <= sum(sizes) / world + max(sizes)
    assert owners(shares) == {n: r for r, s in enumerate(shares) for n in s}
    assert tensor_shares(names, sizes, world) == shares  # deterministic


@pytest.mark.parametrize("names, sizes, world, message", [
    (["a"], [1], 0, "world must be an integer >= 1 (the number of ranks), got 0"),
    (["a"], [1], 1.5, "got 1.5"),
    (["a"], [1], True, "got True"),
    (["a", "b"], [1], 2, "2 names but 1 sizes"),
    (["a", "a"], [1, 2], 2, "tensor 'a' appears twice"),
    (["a", "b"], [1, -3], 2, "tensor 'b' has size -3"),
    (["a"], [2.5], 2, "tensor 'a' has size 2.5"),
    ([3], [1], 2, "tensor names must be strings, got 3"),
])
def test_bad_input_is_named(names, sizes, world, message):
    with pytest.raises(ShardError, match="tensor_shares: ") as err:
        tensor_shares(names, sizes, world)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_numpy_sizes_are_integers():
    import numpy as np

    assert tensor_shares(["a", "b"], np.array([3, 5], dtype=np.int64), 2) == [["b"], ["a"]]
