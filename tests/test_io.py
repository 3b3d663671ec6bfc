"""cpift_fast.io: reading named tensors one at a time; sharded, atomic safetensors writing."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpift_fast import io


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.10.mlp.weight": torch.randn(7, 5, generator=g),
        "model.layers.2.mlp.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "model.layers.2.norm": torch.randn(33, generator=g).to(torch.float16),
        "embed": torch.randn(4, 3, generator=g).t(),  # non-contiguous
        "ids": torch.arange(5, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }


def natural(names):
    return sorted(names, key=io.natural_key)


def test_natural_key_orders_layer_numbers():
    assert natural(["l.10.w", "l.2.w", "l.1.b", "a"]) == ["a", "l.1.b", "l.2.w", "l.10.w"]


def test_sharded_roundtrip(tmp_path):
    tensors = sample_tensors()
    out = tmp_path / "ckpt"
    io.save_sharded(tensors, out, max_shard_size=200)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and io.INDEX_NAME in files
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / io.INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # every shard is a plain safetensors file within the size limit (or one tensor)
        content = load_file(out / shard)
        size = sum(t.numel() * t.element_size() for t in content.values())
        assert size <= 200 or len(content) == 1
    with io.open_tensors(out) as src:
        assert src.names == tuple(natural(tensors))
        for name, t in tensors.items():
            assert src.shape(name) == tuple(t.shape) and src.dtype(name) == t.dtype
            assert src.numel(name) == t.numel()
        for name, t in src:
            assert torch.equal(t, tensors[name]), name
    assert [p for p in os.listdir(tmp_path) if p != "ckpt"] == []  # no temp dir left


def test_writer_metadata_and_transformers_format(tmp_path):
    from safetensors import safe_open

    io.save_sharded({"w": torch.ones(3)}, tmp_path / "c", metadata={"step": 7})
    with safe_open(str(tmp_path / "c" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7"}


def test_transformers_loads_our_checkpoint(tmp_path):
    """A tiny GPT-2 (tied embeddings) saved by save_sharded loads with from_pretrained, unchanged."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    io.save_sharded(model, tmp_path / "c", max_shard_size=4000)
    cfg.save_pretrained(tmp_path / "c")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "c")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_header_overflow_rewrites_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_HEADER_RESERVE", 64)
    tensors = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(20)}
    io.save_sharded(tensors, tmp_path / "c")
    with io.open_tensors(tmp_path / "c") as src:
        assert {n: t for n, t in src}.keys() == tensors.keys()
        for n, t in src:
            assert torch.equal(t, tensors[n])


def test_writer_is_atomic_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with io.ShardedWriter(tmp_path / "c") as w:
            w.add("a", torch.ones(4))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_refuses_existing_unless_overwrite(tmp_path):
    io.save_sharded({"a": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.save_sharded({"a": torch.zeros(2)}, tmp_path / "c")
    io.save_sharded({"b": torch.zeros(3)}, tmp_path / "c", overwrite=True)
    with io.open_tensors(tmp_path / "c") as src:
        assert src.names == ("b",)
    assert os.listdir(tmp_path) == ["c"]


def test_writer_errors(tmp_path):
    with io.ShardedWriter(tmp_path / "c") as w:
        w.add("a", torch.ones(2))
        with pytest.raises(ValueError, match="'a' added twice"):
            w.add("a", torch.ones(2))
        with pytest.raises(TypeError, match="'z'.*complex"):
            w.add("z", torch.ones(2, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="outside"):
        io.ShardedWriter(tmp_path / "d").add("a", torch.ones(1))
    with pytest.raises(ValueError, match="cannot parse size"):
        io.ShardedWriter(tmp_path / "d", max_shard_size="lots")


def test_parse_size():
    assert io.parse_size("5GB") == 5 * 10**9
    assert io.parse_size("2GiB") == 2 * 2**30
    assert io.parse_size("500MB") == 500 * 10**6
    assert io.parse_size(123) == 123
    with pytest.raises(ValueError):
        io.parse_size(0)


def test_module_source_order_and_tied_weights():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"emb": emb, "mid": torch.nn.Linear(4, 4), "head": head})
    src = io.open_tensors(model)
    assert src.names == tuple(n for n, _ in model.named_parameters())
    assert "head.weight" not in src.names and "emb.weight" in src.names
    assert src.get("emb.weight").data_ptr() == emb.weight.data_ptr()  # no copy
    assert not src.get("mid.weight").requires_grad


def test_dict_and_pairs_sources_keep_order():
    tensors = sample_tensors()
    assert io.open_tensors(tensors).names == tuple(tensors)
    pairs = list(tensors.items())[::-1]
    assert io.open_tensors(pairs).names == tuple(n for n, _ in pairs)
    with pytest.raises(ValueError, match="'x' appears twice"):
        io.open_tensors([("x", torch.ones(1)), ("x", torch.ones(1))])


def test_single_file_and_unindexed_directories(tmp_path):
    tensors = {"b.1": torch.ones(3), "a": torch.zeros(2, 2)}
    save_file(tensors, tmp_path / "one.safetensors")
    with io.open_tensors(tmp_path / "one.safetensors") as src:
        assert src.names == ("a", "b.1")
        assert torch.equal(src.get("b.1"), tensors["b.1"])
    d = tmp_path / "single"
    d.mkdir()
    save_file(tensors, d / io.SINGLE_NAME)
    assert io.open_tensors(d).names == ("a", "b.1")
    d = tmp_path / "loose"
    d.mkdir()
    save_file({"a": torch.ones(1)}, d / "x.safetensors")
    save_file({"c": torch.ones(1)}, d / "y.safetensors")
    assert io.open_tensors(d).names == ("a", "c")
    save_file({"a": torch.ones(1)}, d / "z.safetensors")
    with pytest.raises(ValueError, match="'a' is in both"):
        io.open_tensors(d)


def test_index_errors(tmp_path):
    io.save_sharded({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "c", max_shard_size=8)
    index_path = tmp_path / "c" / io.INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'ghost' is in the index but in no shard"):
        io.open_tensors(tmp_path / "c")
    index["weight_map"]["ghost"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009"):
        io.open_tensors(tmp_path / "c")


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        io.open_tensors(tmp_path / "nowhere")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json"):
        io.open_tensors(tmp_path / "emptydir")
    with pytest.raises(TypeError, match="cannot read tensors from a int"):
        io.open_tensors(3)
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        io.open_tensors({"a": torch.ones(1)}).get("nope")


# ----- GroupShardedWriter: planned layout, the bytes ShardedWriter writes ---------------------------

def _files_bytes(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


@pytest.mark.parametrize("case", ["several shards", "header past the reservation", "empty"])
def test_group_writer_writes_the_bytes_of_sharded_writer(tmp_path, case):
    g = torch.Generator().manual_seed(0)
    if case == "several shards":
        tensors = {f"layers.{i}.w": torch.randn(37 * (i % 4) + 1, generator=g).to(
            [torch.float32, torch.bfloat16, torch.float16][i % 3]) for i in range(12)}
        tensors["ids"] = torch.arange(10)
        tensors["zero"] = torch.zeros(0)
    elif case == "header past the reservation":  # > 256 KiB of JSON header in one shard: the rewrite path
        tensors = {f"model.layers.{i}.a_rather_long_tensor_name_to_fill_the_header.weight": torch.ones(1)
                   for i in range(3000)}
    else:
        tensors = {}
    limit = "5GB" if case == "header past the reservation" else "1KB"
    io.save_sharded(tensors, tmp_path / "plain", max_shard_size=limit, metadata={"producer": "x"})
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    if case == "header past the reservation":
        assert len(io.plan_shards(plan, limit)) == 1
        assert len(io._header_block(io.plan_shards(plan, limit)[0], {"format": "pt"})) > io._HEADER_RESERVE
    with io.GroupShardedWriter(tmp_path / "planned", plan, max_shard_size=limit, metadata={"producer": "x"}) as w:
        for name in reversed(list(tensors)):  # any order
            w.add(name, tensors[name])
    assert _files_bytes(tmp_path / "planned") == _files_bytes(tmp_path / "plain")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_group_writer_checks_what_is_added(tmp_path):
    plan = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(RuntimeError, match=r"tensor 'b' was added by no rank; nothing was written"):
        with io.GroupShardedWriter(tmp_path / "out", plan) as w:
            w.add("a", torch.zeros(2))
            with pytest.raises(ValueError, match="tensor 'c' is not one of the planned tensors"):
                w.add("c", torch.zeros(2))
            with pytest.raises(ValueError, match=r"tensor 'a' added twice"):
                w.add("a", torch.zeros(2))
            with pytest.raises(ValueError, match=r"tensor 'b' is torch.float64 of shape \[3\]; the plan has F32 "
                                                 r"of shape \[3\]"):
                w.add("b", torch.zeros(3, dtype=torch.float64))
    assert os.listdir(tmp_path) == []  # nothing written, no temp left
    with pytest.raises(KeyError, match="boom"):
        with io.GroupShardedWriter(tmp_path / "out", plan) as w:
            w.add("a", torch.zeros(2))
            raise KeyError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        with io.GroupShardedWriter(tmp_path / "out", plan):
            pass
