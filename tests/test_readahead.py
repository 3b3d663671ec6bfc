"""cpift_fast.readahead and its use in streamed selection and fusion: order, the byte budget, errors
from the reader thread, no thread left behind; results bit-identical at every budget."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch

from cpift_fast import ParamMask, core_region, fuse_models, io, open_tensors, save_sharded
from cpift_fast import readahead as ra
from cpift_fast.io import CheckpointError
from cpift_fast.readahead import ReadAhead, WriteBehind


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("cpift-readahead", "cpift-writebehind")]


@pytest.fixture(autouse=True)
def no_reader_left():
    yield
    gc.collect()
    assert not readers(), "a read-ahead thread outlived its test"


class Recorder:
    """fetch/nbytes for a ReadAhead, and what the reader did: per key, the bytes of the items the
    caller had not yet asked for when its fetch started (a lower bound of what counts against the
    budget then, free of races: an item not yet asked for cannot have been taken)."""

    def __init__(self, sizes: dict, delay: float = 0.0, fail: object = None):
        self.sizes, self.keys, self.delay, self.fail = sizes, list(sizes), delay, fail
        self.asked = 0  # the caller sets it to i before asking for item i
        self.ahead_at_start: dict = {}  # key -> bytes of items asked-for-later (excluding the key), fetch order
        self.depth: dict = {}  # key -> how many items past the one asked for the fetch is
        self.threads: set = set()

    def nbytes(self, key) -> int:
        return self.sizes[key]

    def fetch(self, key):
        j, i = self.keys.index(key), self.asked
        self.ahead_at_start[key] = sum(self.sizes[k] for k in self.keys[i + 1:j])
        self.depth[key] = j - i
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if key == self.fail:
            raise OSError(f"disk error at {key}")
        return f"value of {key}"

    def consume(self, items, work: float = 0.0) -> list:
        got = []
        it = iter(items)
        for i in range(len(self.keys) + 1):
            self.asked = i
            try:
                got.append(next(it))
            except StopIteration:
                return got
            time.sleep(work)
        raise AssertionError("more items than keys")


def test_order_and_values():
    keys = [f"k{i}" for i in range(50)]
    rec = Recorder(dict.fromkeys(keys, 10))
    with ReadAhead(keys, rec.fetch, rec.nbytes, budget=35) as items:
        got = rec.consume(items)
    assert got == [(k, f"value of {k}") for k in keys]
    assert rec.threads == {"cpift-readahead"}


def test_budget_zero_reads_in_the_caller():
    rec = Recorder({"a": 5, "b": 5})
    with ReadAhead(["a", "b"], rec.fetch, rec.nbytes, budget=0) as items:
        assert not items.reader_alive
        assert [k for k, _ in rec.consume(items)] == ["a", "b"]
    assert rec.threads == {threading.current_thread().name}
    assert set(rec.depth.values()) == {0}


def test_budget_is_respected_and_used():
    """A slow caller: the reader runs ahead up to the budget and never past it; an item bigger than
    the budget is read only when nothing else is ahead."""
    sizes = {f"k{i}": s for i, s in enumerate([10, 20, 5, 5, 30, 100, 10, 10, 25, 1, 1, 1, 40, 8, 8, 8, 8])}
    rec = Recorder(sizes)
    budget = 40
    with ReadAhead(list(sizes), rec.fetch, rec.nbytes, budget=budget) as items:
        assert len(rec.consume(items, work=0.01)) == len(sizes)
    assert rec.ahead_at_start["k5"] == 0, "the item bigger than the budget waits until nothing is ahead"
    over = {k: rec.ahead_at_start[k] + sizes[k] for k in sizes if sizes[k] <= budget}
    assert max(over.values()) <= budget, over
    assert max(rec.depth.values()) >= 3, "the reader did not run ahead of the caller"


def test_reader_error_reaches_the_caller_in_order_with_the_item_named():
    keys = ["a", "b", "bad", "c"]
    rec = Recorder(dict.fromkeys(keys, 1), fail="bad")
    got = []
    with pytest.raises(OSError, match="disk error at bad") as info:
        with ReadAhead(keys, rec.fetch, rec.nbytes, budget=100, describe=lambda k: f"tensor {k!r} of ckpt") as items:
            for key, _ in items:
                got.append(key)
    assert got == ["a", "b"]
    assert any("tensor 'bad' of ckpt" in note and "reader thread" in note for note in info.value.__notes__)
    assert "c" not in rec.depth, "the reader stops at the first error"


def test_error_in_nbytes_is_raised_not_hung():
    def nbytes(key):
        if key == 2:
            raise KeyError("no size for 2")
        return 1

    with pytest.raises(KeyError, match="no size for 2"):
        with ReadAhead([0, 1, 2, 3], lambda k: k, nbytes, budget=10) as items:
            assert [k for k, _ in items] == [0, 1, 2, 3]


@pytest.mark.parametrize("how", ["break", "exception", "close_while_blocked", "garbage"])
def test_early_exit_leaves_no_thread(how):
    keys = list(range(100))
    rec = Recorder(dict.fromkeys(keys, 10), delay=0.001)
    items = ReadAhead(keys, rec.fetch, rec.nbytes, budget=30)
    thread = items._thread
    if how == "break":
        with items:
            for key, _ in items:
                if key == 3:
                    break
    elif how == "exception":
        with pytest.raises(RuntimeError, match="caller failed"):
            with items:
                for key, _ in items:
                    raise RuntimeError("caller failed")
    elif how == "close_while_blocked":
        next(items)
        time.sleep(0.05)  # the reader has filled the budget and waits
        assert thread.is_alive()
        items.close()
    else:
        next(items)
        del items
        gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(rec.depth) < 100, "the reader went on after the caller stopped"


def test_check_budget():
    assert ra.check_budget(0) == 0 and ra.check_budget("64MiB") == 64 << 20 and ra.check_budget(7) == 7
    for bad in (-1, 1.5, True, "lots", None):
        with pytest.raises(ValueError, match="readahead"):
            ra.check_budget(bad)
    with pytest.raises(ValueError, match="core_region: readahead"):
        core_region({"a": torch.ones(3)}, {"a": torch.zeros(3)}, 0.5, readahead=-5, progress=False)
    with pytest.raises(ValueError, match="fuse_models: readahead"):
        fuse_models({"a": torch.ones(3)}, {"t": {"a": torch.zeros(3)}}, None, readahead="x", progress=False)


# ---- write-behind ----------------------------------------------------------------------------------

class Sink:
    """write/nbytes for a WriteBehind, recording what the writer did."""

    def __init__(self, delay: float = 0.0, fail: object = None):
        self.delay, self.fail = delay, fail
        self.written: list = []
        self.started = -1  # index of the last item whose write began
        self.threads: set = set()

    def write(self, key, value) -> None:
        self.started = key
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if key == self.fail:
            raise OSError(f"no space left writing {key}")
        self.written.append((key, value))


def test_write_behind_order_budget_and_overlap():
    """Items are written in the order put; put waits while the bytes queued would pass the budget
    (lower bound, free of races: items after the one being written are surely queued); the caller
    gets ahead of the writer."""
    sizes = [10, 20, 5, 5, 30, 100, 10, 10, 25, 1, 1, 1, 40, 8, 8]
    sink = Sink(delay=0.01)
    budget = 40
    queued_after_put = []
    with WriteBehind(sink.write, lambda v: v[1], budget) as behind:
        for i, size in enumerate(sizes):
            behind.put(i, ("value", size))
            queued_after_put.append((i, sum(sizes[sink.started + 1:i + 1]), i - sink.started))
        behind.finish()
        assert not behind.writer_alive
    assert sink.written == [(i, ("value", s)) for i, s in enumerate(sizes)]
    assert sink.threads == {"cpift-writebehind"}
    assert all(queued <= budget for i, queued, _ in queued_after_put if sizes[i] <= budget), queued_after_put
    assert max(depth for *_, depth in queued_after_put) >= 2, "the caller never got ahead of the writer"


def test_write_behind_budget_zero_writes_in_the_caller():
    sink = Sink()
    behind = WriteBehind(sink.write, lambda v: 1, 0)
    behind.put("a", 1)
    assert sink.written == [("a", 1)] and sink.threads == {threading.current_thread().name}
    behind.finish()


def test_write_behind_error_reaches_the_caller():
    sink = Sink(fail=2)
    with pytest.raises(OSError, match="no space left writing 2") as info:
        with WriteBehind(sink.write, lambda v: 1, 100, describe=lambda k: f"fused tensor {k!r} to OUT") as behind:
            for i in range(6):
                behind.put(i, i)
            behind.finish()
    assert any("fused tensor 2 to OUT" in note and "writer thread" in note for note in info.value.__notes__)
    assert [k for k, _ in sink.written] == [0, 1], "nothing is written after an error"


def test_write_behind_close_drops_the_queue():
    sink = Sink(delay=0.02)
    behind = WriteBehind(sink.write, lambda v: 1, 100)
    for i in range(20):
        behind.put(i, i)
    behind.close()
    assert not behind.writer_alive
    assert len(sink.written) < 20
    with pytest.raises(RuntimeError, match="after finish"):
        behind.put(99, 99)


def test_fusion_write_error_cleans_up(tmp_path, monkeypatch):
    """A write failing on the writer thread: fuse_models raises it, naming the tensor; no output
    directory, no temporary directory, no thread left."""
    tensors = {f"layers.{i}.w": torch.randn(5000) for i in range(6)}
    save_sharded(tensors, tmp_path / "bb")
    save_sharded({n: t + 0.1 for n, t in tensors.items()}, tmp_path / "task")
    real = io.ShardedWriter.add

    def add(self, name, tensor):
        if name == "layers.3.w":
            raise OSError(28, "No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(io.ShardedWriter, "add", add)
    with pytest.raises(OSError, match="No space left") as info:
        fuse_models(tmp_path / "bb", {"t": tmp_path / "task"}, None, out=tmp_path / "out", progress=False)
    assert any("layers.3.w" in note for note in info.value.__notes__)
    assert sorted(os.listdir(tmp_path)) == ["bb", "task"]


# ---- files: load() reads a tensor's pages in ----------------------------------------------------

def test_prefetch_equals_get_and_starts_the_reads(tmp_path, monkeypatch):
    tensors = {"big": torch.randn(100_000), "bf": torch.randn(70_000).to(torch.bfloat16), "small": torch.arange(7),
               "empty": torch.zeros(0, 2), "odd": torch.randn(4097 * 5).to(torch.float16)}
    save_sharded(tensors, tmp_path / "c")
    advised = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        advised.append((length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(io.os, "posix_fadvise", record)
    with open_tensors(tmp_path / "c") as src:
        for name, t in tensors.items():
            fetched = src.prefetch(name)
            assert fetched.dtype == t.dtype and torch.equal(fetched, t), name
            assert torch.equal(src.get(name), t)
    big = [n for n, t in tensors.items() if t.numel() * t.element_size() >= 1 << 16]  # the mapped ones
    assert sorted(advised) == sorted((tensors[n].numel() * tensors[n].element_size(), os.POSIX_FADV_WILLNEED)
                                     for n in big)


def test_file_shrunk_before_the_read_is_named(tmp_path):
    """A shard truncated after its header was checked: the error names the file and the tensor, and
    reaches the caller of core_region although the read ran on the reader thread."""
    base = {f"layers.{i}.w": torch.randn(40_000) for i in range(4)}
    tuned = {n: t + 0.01 * torch.randn_like(t) for n, t in base.items()}
    save_sharded(base, tmp_path / "base")
    save_sharded(tuned, tmp_path / "tuned")
    shard = tmp_path / "tuned" / "model-00001-of-00001.safetensors"
    src_b, src_t = open_tensors(tmp_path / "base"), open_tensors(tmp_path / "tuned")
    os.truncate(shard, os.path.getsize(shard) - 3 * 160_000)  # layers.1 .. layers.3 lose their bytes
    with pytest.raises(CheckpointError, match=r"tuned/model-00001-of-00001\.safetensors: tensor 'layers\.1\.w': "
                                              r"its bytes are no longer in the file") as info:
        core_region(src_b, src_t, 0.1, progress=False)
    assert any("layers.1.w" in note and "reader thread" in note for note in info.value.__notes__)


# ---- selection and fusion: same bits at every budget, read-ahead really used ---------------------

def _pair(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = {f"model.layers.{i}.w{j}": (torch.randn(s, generator=g) * 0.02).to(dtype)
            for i, s in enumerate(shapes) for j in range(2)}
    tuned = {n: (t.double() + 1e-3 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(dtype)
             for n, t in base.items()}
    return base, tuned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("scope", ["global", "per_layer", "per_tensor"])
def test_streamed_selection_is_identical_at_every_budget(tmp_path, dtype, scope, monkeypatch):
    base, tuned = _pair([(300,), (40, 50), (0,), (5000,), (64,), (20_000,)], dtype, seed=3)
    save_sharded(base, tmp_path / "base", max_shard_size="30KB")
    save_sharded(tuned, tmp_path / "tuned", max_shard_size="50KB")
    names = sorted(base, key=io.natural_key)
    expected = core_region({n: base[n] for n in names}, {n: tuned[n] for n in names}, 0.03, scope=scope,
                           progress=False)
    started = []
    original = ra.ReadAhead.__init__

    def spy(self, keys, *args, **kwargs):
        original(self, keys, *args, **kwargs)
        started.append(self._thread is not None)

    monkeypatch.setattr(ra.ReadAhead, "__init__", spy)
    for budget in (0, 1, 4096, ra.DEFAULT_BUDGET):
        started.clear()
        mask = core_region(tmp_path / "base", tmp_path / "tuned", 0.03, scope=scope, progress=False, readahead=budget)
        assert mask == expected and mask.info.selected == expected.info.selected, budget
        assert [g.threshold for g in mask.info.groups] == [g.threshold for g in expected.info.groups]
        assert any(started) == (budget > 0), budget


def test_selection_failure_stops_the_reader(tmp_path, monkeypatch):
    """A kernel error in the middle of a streamed pass: the error reaches the caller and no reader
    thread is left running (checked by the autouse fixture)."""
    base, tuned = _pair([(1000,)] * 8, torch.float32, seed=4)
    save_sharded(base, tmp_path / "base")
    save_sharded(tuned, tmp_path / "tuned")
    from cpift_fast import select

    calls = []
    real = select.ops.select_histogram

    def failing(a, b, level, prefix):
        calls.append(level)
        if len(calls) == 3:
            raise RuntimeError("kernel failed")
        return real(a, b, level, prefix)

    monkeypatch.setattr(select.ops, "select_histogram", failing)
    monkeypatch.setattr(select, "_BATCH_ELEMENTS", 1)  # one kernel call per pair: the third fails mid-pass
    with pytest.raises(RuntimeError, match="kernel failed"):
        core_region(tmp_path / "base", tmp_path / "tuned", 0.1, progress=False, readahead=1 << 20)
    assert len(calls) == 3


@pytest.mark.parametrize("budget", [0, 1, ra.DEFAULT_BUDGET])
def test_streamed_fusion_is_identical_at_every_budget(tmp_path, budget):
    base, backbone = _pair([(300,), (40, 50), (5000,), (2000,)], torch.bfloat16, seed=5)
    backbone["ids"] = torch.arange(6)  # a non-float tensor: copied
    base["ids"] = torch.arange(6)
    tasks = {}
    for k in range(2):
        g = torch.Generator().manual_seed(10 + k)
        tasks[f"t{k}"] = {n: (t + 0.01 * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point()
                          else t.clone() for n, t in backbone.items()}
    names = sorted(backbone, key=io.natural_key)
    gen = torch.Generator().manual_seed(1)
    cores = {k: ParamMask.from_bool({n: torch.rand(backbone[n].shape, generator=gen) < 0.1 for n in names})
             for k in tasks}
    for what, tensors in [("backbone", backbone), ("base", base), *tasks.items()]:
        save_sharded(tensors, tmp_path / what, max_shard_size="20KB")
    ordered = {n: backbone[n] for n in names}
    expected, _ = fuse_models(ordered, {k: {n: v[n] for n in names} for k, v in tasks.items()}, cores, t=0.4,
                              base={n: base[n] for n in names}, progress=False)
    out, stats = fuse_models(tmp_path / "backbone", {k: tmp_path / k for k in tasks}, cores, t=0.4,
                             base=tmp_path / "base", out=tmp_path / "fused", progress=False, readahead=budget)
    with open_tensors(out) as src:
        assert list(src.names) == names
        for name, tensor in src:
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    assert stats["transplanted"] > 0
