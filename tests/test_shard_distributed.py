"""Sharded selection and fusion (issue 13) on 2 and 3 gloo processes against the 1-process result.

Selection: every rank passes the same checkpoint directories, reads only its share of the tensors
(its sources raise on any other tensor, and the ranks' read sets are disjoint), and the gathered
mask — and the one file ``mask.save(path, group=)`` writes — equals the 1-process mask bit for bit.
Fusion: each rank fuses and writes its share; the output directory is byte-identical (sha256 of
every file) to the 1-process output and loads with ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist

from cpift_fast import ParamMask, core_region, fuse_models
from cpift_fast.io import TensorSource, open_tensors, save_sharded
from cpift_fast.shard import tensor_shares

from helpers import one_thread, run_ranks

SHAPES = {"embed.weight": (37, 11), "layers.0.w": (1,), "layers.0.b": (0,), "layers.1.w": (5000,),
          "layers.1.b": (300,), "layers.2.w": (64, 20), "layers.10.w": (17,), "lm_head.weight": (2000,)}


def _write_pair(root, dtype) -> tuple[str, str]:
    """base/tuned checkpoint directories (several files each) with heavy ties at every threshold."""
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for name, shape in SHAPES.items():
        b = torch.randint(-4, 4, shape, generator=g).float()
        delta = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.25])[torch.randint(0, 5, shape, generator=g)]
        base[name], tuned[name] = b.to(dtype), (b + delta).to(dtype)
    dirs = []
    for side, tensors in (("base", base), ("tuned", tuned)):
        path = os.path.join(str(root), f"{side}-{str(dtype)[6:]}")
        if not os.path.exists(path):
            save_sharded(tensors, path, max_shard_size="8KB")
        dirs.append(path)
    return dirs[0], dirs[1]


class Reads:
    """A checkpoint source that records the tensors read and raises on those outside `allowed`."""

    def __init__(self, path: str, allowed: set[str], rank: int):
        self.src, self.allowed, self.rank, self.read = open_tensors(path), allowed, rank, []

    def _fetch(self, name: str, prefetch: bool = False) -> torch.Tensor:
        if name not in self.allowed:
            raise AssertionError(f"rank {self.rank} read tensor {name!r} of {self.src.description}, not its share")
        self.read.append(name)
        return self.src.prefetch(name) if prefetch else self.src.get(name)

    def source(self) -> TensorSource:
        s = self.src
        return TensorSource(s.names, {n: s.shape(n) for n in s.names}, {n: s.dtype(n) for n in s.names},
                            self._fetch, s.description, close=s.close, prefetch=lambda n: self._fetch(n, True))


def _select_worker(rank, world, out, base_dir, tuned_dir, fraction, mode, scope):
    with open_tensors(base_dir) as b, open_tensors(tuned_dir) as t:  # the documented split: bytes of both sides
        share = tensor_shares(b.names, [b.nbytes(n) + t.nbytes(n) for n in b.names], world)[rank]
    base, tuned = Reads(base_dir, set(share), rank), Reads(tuned_dir, set(share), rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = core_region(base.source(), tuned.source(), fraction, mode=mode, scope=scope, group=dist.group.WORLD,
                           shard_by="tensor", progress=False, readahead=4096)
    foreign = [n for n in part.names if n not in share and part.count_per_tensor()[n]]
    full = part.gather(dist.group.WORLD, dst=None)  # on every rank
    on_zero = part.gather(dist.group.WORLD)  # rank 0 only
    part.save(os.path.join(out, "core.mask"), group=dist.group.WORLD)
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump({"bits": full.to_bool(), "rank0": None if on_zero is None else on_zero.to_bool(),
                     "k": full.info.k, "selected": full.info.selected, "foreign": foreign,
                     "read": set(base.read), "read_tuned": set(tuned.read), "share": share}, f)


CASES = [  # world, fraction, mode, scope, dtype
    (2, 0.3, "exact", "global", torch.float32),
    (3, 0.3, "exact", "global", torch.float32),
    (3, 0.05, "exact", "global", torch.bfloat16),
    (2, 0.3, "approx", "global", torch.float32),
    (3, 0.2, "exact", "per_layer", torch.float32),
    (2, 0.9, "exact", "per_tensor", torch.float32),
]


@pytest.mark.parametrize("world, fraction, mode, scope, dtype", CASES)
def test_sharded_selection_equals_one_process(tmp_path, world, fraction, mode, scope, dtype):
    base_dir, tuned_dir = _write_pair(tmp_path, dtype)
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_select_worker, world, tmp_path, str(out), base_dir, tuned_dir, fraction, mode, scope)
    with warnings.catch_warnings(), one_thread():  # as the ranks (integer histograms: any thread count agrees)
        warnings.simplefilter("ignore")
        single = core_region(base_dir, tuned_dir, fraction, mode=mode, scope=scope, progress=False)
    assert 0 < single.count() < single.numel
    parts = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    expected = single.to_bool()
    for r, p in enumerate(parts):
        assert p["foreign"] == [], f"rank {r} set bits in tensors it does not own"
        assert p["k"] == single.info.k and p["selected"] == single.info.selected
        assert p["bits"].keys() == expected.keys()
        for name in expected:
            assert torch.equal(p["bits"][name], expected[name]), (r, name)
        assert (p["rank0"] is None) == (r != 0)
    for name in expected:
        assert torch.equal(parts[0]["rank0"][name], expected[name]), name
    # each rank read exactly its share, on both sides (pass 1 reads every owned tensor); no tensor twice
    reads = [p["read"] for p in parts]
    for p in parts:
        assert p["read"] == set(p["share"]) == p["read_tuned"] and p["read"]
    assert all(not (reads[i] & reads[j]) for i in range(world) for j in range(i + 1, world))
    assert set().union(*reads) == set(SHAPES)
    saved = ParamMask.load(out / "core.mask")
    assert saved == ParamMask(single.layout, single.words)
    assert sorted(os.listdir(out)) == ["core.mask"] + [f"rank{r}.pkl" for r in range(world)]  # no temp left


def _mismatch_worker(rank, world, out, base_dir, tuned_dir, other_dir):
    try:
        core_region(base_dir if rank == 0 else other_dir, tuned_dir if rank == 0 else other_dir, 0.1,
                    group=dist.group.WORLD, shard_by="tensor", progress=False)
        message = None
    except ValueError as exc:
        message = str(exc)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(message or "")


def test_sharded_selection_refuses_different_checkpoints(tmp_path):
    base_dir, tuned_dir = _write_pair(tmp_path, torch.float32)
    other = str(tmp_path / "other")
    save_sharded({"layers.0.w": torch.zeros(3)}, other)
    run_ranks(_mismatch_worker, 2, tmp_path, str(tmp_path), base_dir, tuned_dir, other)
    for r in range(2):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert "rank 1 sees other tensors (names, shapes or dtypes) than rank 0" in text, text


def test_shard_by_is_checked():
    with pytest.raises(ValueError, match="shard_by must be 'slice' or 'tensor', got 'rows'"):
        core_region({"a": torch.zeros(2)}, {"a": torch.ones(2)}, 0.5, shard_by="rows")


# ----- fusion ---------------------------------------------------------------------------------------

def _fusion_inputs(root) -> dict:
    """A tiny Llama checkpoint family: base, backbone (with config + tokenizer), two tasks, their cores."""
    from cpift_fast.pipeline.model import TinyLlamaSpec, build_tiny_llama, save_checkpoint

    paths = {k: os.path.join(str(root), k) for k in ("base", "backbone", "a", "b")}
    if os.path.exists(paths["b"]):
        return paths
    model, tok = build_tiny_llama(TinyLlamaSpec(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_sharded(state, paths["base"])
    g = torch.Generator().manual_seed(1)
    for key, scale in (("backbone", 0.05), ("a", 0.2), ("b", 0.3)):
        moved = {n: t + scale * torch.randn(t.shape, generator=g) for n, t in state.items()}
        if key == "backbone":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(moved[n])
            os.makedirs(paths[key])
            save_checkpoint(model, tok, paths[key])
        else:
            save_sharded(moved, paths[key], max_shard_size="6KB")
            core_region(paths["base"], paths[key], 0.05, progress=False).save(paths[key] + ".mask")
    return paths


def _fuse(paths: dict, out: str, group=None):
    return fuse_models(paths["backbone"], {"a": paths["a"], "b": paths["b"]},
                       {"a": paths["a"] + ".mask", "b": paths["b"] + ".mask"}, t=[0.2, 0.7], base=paths["base"],
                       out=out, max_shard_size="10KB", progress=False, readahead=8192, group=group)


def _fuse_worker(rank, world, out, paths):
    _, stats = _fuse(paths, out, group=dist.group.WORLD)
    with open(os.path.join(os.path.dirname(out), f"stats{rank}.json"), "w") as f:
        json.dump(stats, f, sort_keys=True)


def _digests(path: str) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def fused_once(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    paths = _fusion_inputs(root)
    with one_thread():  # as the OMP_NUM_THREADS=1 ranks
        out, stats = _fuse(paths, os.path.join(str(root), "single"))
    return paths, out, json.loads(json.dumps(stats, sort_keys=True))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_fusion_is_byte_identical(fused_once, tmp_path, world):
    paths, single, stats = fused_once
    shards = [f for f in os.listdir(single) if f.endswith(".safetensors")]
    assert len(shards) >= 4, shards  # the output spans several shards, each written by several ranks
    out = str(tmp_path / "fused")
    run_ranks(_fuse_worker, world, tmp_path, out, paths)
    assert _digests(out) == _digests(single)
    for r in range(world):  # every rank returns the full stats, as one process counts them
        assert json.loads((tmp_path / f"stats{r}.json").read_text()) == stats
    assert stats["transplanted"] > 0 and "slerp" in stats["modes"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith((".tmp-", ".old-"))]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    with open_tensors(single) as ref:
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), ref.get(name)), name


def _record_outcome(rank: int, out: str, run) -> None:
    """Run `run()` and write "no error" or the exception's type and text to error<rank>.txt beside out."""
    try:
        run()
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        message = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(os.path.dirname(out), f"error{rank}.txt"), "w") as f:
        f.write(message)


def _fail_worker(rank, world, out, paths):
    class Broken(Exception):
        pass

    def fuse():
        if rank == 1:
            src = open_tensors(paths["b"])

            def fetch(name):
                raise Broken(f"disk error reading {name}")
            task_b = TensorSource(src.names, {n: src.shape(n) for n in src.names},
                                  {n: src.dtype(n) for n in src.names}, fetch, "broken task b", close=src.close)
        else:
            task_b = paths["b"]
        fuse_models(paths["backbone"], {"a": paths["a"], "b": task_b},
                    {"a": paths["a"] + ".mask", "b": paths["b"] + ".mask"}, t=0.5, base=paths["base"], out=out,
                    max_shard_size="10KB", progress=False, readahead=0, group=dist.group.WORLD)

    _record_outcome(rank, out, fuse)


def test_sharded_fusion_failure_on_one_rank_leaves_nothing(fused_once, tmp_path):
    paths, _, _ = fused_once
    out = str(tmp_path / "fused")
    run_ranks(_fail_worker, 2, tmp_path, out, paths)
    assert "disk error reading" in (tmp_path / "error1.txt").read_text()
    assert "rank 1 failed (Broken: disk error reading" in (tmp_path / "error0.txt").read_text()
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith((".tmp-", ".old-"))]


def test_sharded_fusion_needs_out():
    with pytest.raises(ValueError, match="group= \\(sharded fusion\\) needs out=DIR"):
        fuse_models({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], None, group=object())


def _exists_worker(rank, world, out, paths):
    _record_outcome(rank, out, lambda: _fuse(paths, out, group=dist.group.WORLD))


def test_sharded_fusion_refuses_an_existing_output_on_every_rank(fused_once, tmp_path):
    paths, _, _ = fused_once
    out = tmp_path / "fused"
    out.mkdir()
    (out / "keep").write_text("x")
    run_ranks(_exists_worker, 2, tmp_path, str(out), paths)
    assert (tmp_path / "error0.txt").read_text() == f"FileExistsError: {out} exists; pass overwrite=True to replace it"
    assert (tmp_path / "error1.txt").read_text() == \
        f"OSError: rank 0 failed: FileExistsError: {out} exists; pass overwrite=True to replace it"
    assert os.listdir(out) == ["keep"] and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


# ----- the commands under torchrun -----------------------------------------------------------------

@pytest.mark.slow
def test_cli_core_and_fuse_under_torchrun(fused_once, tmp_path):
    """`torchrun --nproc_per_node N $(which cpift) core|fuse ...`: the processes split the tensors; the
    mask file and the fused directory equal the 1-process ones; rank 0 alone reports."""
    import subprocess
    import sys

    cpift = os.path.join(os.path.dirname(sys.executable), "cpift")
    if not os.path.exists(cpift):
        pytest.skip(f"no cpift console script next to {sys.executable} (install the package: make install)")
    paths, single_fused, _ = fused_once
    base_dir, tuned_dir = _write_pair(tmp_path, torch.float32)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)

    def torchrun(n):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), cpift]

    mask_path, out = str(tmp_path / "core.mask"), str(tmp_path / "fused")
    commands = [
        torchrun(2) + ["core", base_dir, tuned_dir, "--fraction", "0.3", "-o", mask_path, "--no-progress"],
        torchrun(3) + ["fuse", "--backbone", paths["backbone"], "--base", paths["base"], "-t", "[0.2, 0.7]",
                       "--task", f"a={paths['a']}:{paths['a']}.mask", "--task", f"b={paths['b']}:{paths['b']}.mask",
                       "--max-shard-size", "10KB", "-o", out, "--no-progress"],
    ]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = core_region(base_dir, tuned_dir, 0.3, progress=False)
    assert ParamMask.load(mask_path) == ParamMask(single.layout, single.words)
    assert outputs[0][0].count(f"mask written to {mask_path}") == 1  # rank 0 only
    assert _digests(out) == _digests(single_fused)
    assert outputs[1][0].count("fused ") == 1
