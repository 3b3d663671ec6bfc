"""SLERP (against a mergekit-formula oracle), the fused ops on every backend, and fuse_models."""

import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift_fast import ParamMask, fuse_models, ops, slerp
from cpift_fast.fuse import TSchedule, layer_index, slerp_coefficients
from cpift_fast.io import INDEX_NAME, open_tensors
from cpift_fast.cli import main
from helpers import forced

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def mergekit_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """mergekit's slerp formula on fp32 vectors, plus the documented zero-norm rule (lerp).

    The scalar part (norms, dot, angle, coefficients) is evaluated in fp64: mergekit evaluates it
    in fp32, which near anti-parallel vectors (sin θ → 0) is itself off by ~1e-5; the fp32 blend
    ``s0·v0 + s1·v1`` is mergekit's.
    """
    v0 = np.asarray(v0, dtype=np.float32).reshape(-1)
    v1 = np.asarray(v1, dtype=np.float32).reshape(-1)
    t32 = np.float32(t)
    lerp = (np.float32(1) - t32) * v0 + t32 * v1
    w0, w1 = v0.astype(np.float64), v1.astype(np.float64)
    n0, n1 = np.linalg.norm(w0), np.linalg.norm(w1)
    if t == 0:
        return v0.copy()
    if n0 <= eps or n1 <= eps:
        return lerp
    dot = np.sum((w0 / n0) * (w1 / n1))
    if np.abs(dot) > dot_threshold:
        return lerp
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return np.float32(s0) * v0 + np.float32(s1) * v1


def case_pair(case, n, gen):
    a = torch.randn(n, generator=gen)
    if case == "random":
        b = torch.randn(n, generator=gen)
    elif case == "collinear":
        b = 2.5 * a
    elif case == "antiparallel":
        b = -0.5 * a
    elif case == "near":  # cos just below the threshold: a genuine small-angle slerp
        b = a + 0.02 * a.norm() / math.sqrt(max(n, 1)) * torch.randn(n, generator=gen)
    elif case == "zero_a":
        a, b = torch.zeros(n), torch.randn(n, generator=gen)
    elif case == "zero_both":
        a, b = torch.zeros(n), torch.zeros(n)
    else:
        raise ValueError(case)
    return a, b


def expected_slerp(t, a, b):
    return torch.from_numpy(mergekit_slerp(t, a.float().numpy(), b.float().numpy())).view(a.shape)


def assert_close_in_dtype(got, want32, dtype):
    """fp32: within 1e-6 (relative + absolute); fp16/bf16: within one ulp of the dtype."""
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want32, rtol=1e-6, atol=1e-6)
    else:
        tol = ULP[dtype]
        torch.testing.assert_close(got.float(), want32, rtol=tol, atol=tol * 1e-3)


CASES = ["random", "collinear", "antiparallel", "near", "zero_a", "zero_both"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 31, 33, 4099])
def test_slerp_matches_mergekit_formula(backend, dtype, case, n):
    gen = torch.Generator().manual_seed(n)
    a, b = case_pair(case, n, gen)
    a, b = a.to(dtype), b.to(dtype)
    for t in (0.0, 0.3, 0.5, 1.0):
        got = slerp(t, a, b)
        assert_close_in_dtype(got, expected_slerp(t, a, b), dtype)
    a[0] = -0.0
    same = slerp(0.0, a, b)  # t = 0 -> a, bit for bit (signed zeros too)
    assert torch.equal(same.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       a.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp_large_odd_size(backend_name, dtype):
    n = 2**20 + 7  # the C++ and PyTorch backends; the interpreted Triton kernel runs the smaller sizes
    gen = torch.Generator().manual_seed(0)
    a, b = case_pair("random", n, gen)
    a, b = a.to(dtype), b.to(dtype)
    with forced(backend_name):
        got = slerp(0.37, a, b)
    assert_close_in_dtype(got, expected_slerp(0.37, a, b), dtype)


def test_slerp_modes_and_info():
    gen = torch.Generator().manual_seed(0)
    a, b = case_pair("random", 100, gen)
    assert slerp(0.5, a, b, return_info=True)[1]["mode"] == "slerp"
    assert slerp(0.5, a, 3 * a, return_info=True)[1]["mode"] == "lerp_collinear"
    info = slerp(0.5, a, -a, return_info=True)[1]
    assert info["mode"] == "lerp_collinear" and abs(info["angle_deg"] - 180) < 1e-6
    assert slerp(0.5, torch.zeros(100), b, return_info=True)[1]["mode"] == "lerp_zero_norm"
    assert slerp(0.0, a, b, return_info=True)[1]["mode"] == "copy"
    # a lower dot_threshold turns the same pair into a lerp
    cos = float(a @ b / (a.norm() * b.norm()))
    assert slerp(0.5, a, b, dot_threshold=abs(cos) / 2, return_info=True)[1]["mode"] == "lerp_collinear"


def test_slerp_noncontiguous_and_empty(backend):
    gen = torch.Generator().manual_seed(5)
    big_a, big_b = torch.randn(40, 66, generator=gen), torch.randn(66, 40, generator=gen)
    a, b = big_a[:, ::2], big_b.T[:, 1::2]  # strided and transposed views, shape (40, 33)
    assert not a.is_contiguous() and not b.is_contiguous()
    got = slerp(0.4, a, b)
    assert got.shape == (40, 33)
    torch.testing.assert_close(got, expected_slerp(0.4, a, b), rtol=1e-6, atol=1e-6)
    for dtype in DTYPES:
        empty = torch.empty(0, 5, dtype=dtype)
        out = slerp(0.5, empty, empty)
        assert out.shape == (0, 5) and out.dtype == dtype


def test_slerp_result_in_a_dtype():
    a = torch.randn(64, dtype=torch.bfloat16)
    b = torch.randn(64, dtype=torch.float32)
    out = slerp(0.5, a, b)
    assert out.dtype == torch.bfloat16
    assert_close_in_dtype(out, expected_slerp(0.5, a, b), torch.bfloat16)


def test_slerp_task_vector_space(backend):
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(257, generator=gen)
    a = base + 0.01 * torch.randn(257, generator=gen)
    b = base + 0.01 * torch.randn(257, generator=gen)
    # raw weights are nearly collinear (mostly lerp); task vectors are not
    assert slerp(0.5, a, b, return_info=True)[1]["mode"] == "lerp_collinear"
    got, info = slerp(0.3, a, b, base=base, return_info=True)
    assert info["mode"] == "slerp" and 60 < info["angle_deg"] < 120
    want = base + expected_slerp(0.3, a - base, b - base)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(slerp(0.0, a, b, base=base), a)
    # explicit weights space ignores the base
    assert torch.equal(slerp(0.3, a, b, base=base, space="weights"), slerp(0.3, a, b))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(t=st.floats(0, 1), n=st.integers(0, 300), scale=st.floats(1e-3, 1e3), mix=st.floats(-1, 1),
       seed=st.integers(0, 2**31 - 1))
def test_slerp_hypothesis(t, n, scale, mix, seed):
    gen = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(n, generator=gen)
    b = mix * a + (1 - abs(mix)) * scale * torch.randn(n, generator=gen)
    want = expected_slerp(t, a, b)
    for backend in ("cpp", "torch", "triton"):
        with forced(backend):
            got = slerp(t, a, b)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=5e-6 * scale, msg=backend)


def test_slerp_bad_inputs():
    a = torch.randn(4)
    for t in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="t must be a number in \\[0, 1\\]"):
            slerp(t, a, a)
    with pytest.raises(ValueError, match="shape"):
        slerp(0.5, a, torch.randn(5))
    with pytest.raises(ValueError, match="non-finite"):
        slerp(0.5, a, torch.tensor([1.0, float("inf"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="needs base"):
        slerp(0.5, a, a, space="task_vector")
    with pytest.raises(TypeError, match="floating"):
        slerp(0.5, torch.arange(4), torch.arange(4))


# ----- the fused ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 31, 33, 5000])
def test_ops_match_reference(backend, dtype, n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=gen).to(dtype)
    b32 = torch.randn(2 * n, generator=gen)[::2]  # fp32 and strided, like a fold result view
    base = torch.randn(n, generator=gen).to(dtype)
    values = [torch.randn(n, generator=gen).to(dtype) for _ in range(3)]
    words = [ops.mask_pack.reference(torch.rand(n, generator=gen) < 0.3) for _ in range(3)]
    for bb in (None, base):
        torch.testing.assert_close(ops.slerp_stats(a, b32, bb), ops.slerp_stats.reference(a, b32, bb), rtol=1e-5, atol=1e-5)
        for rule in (0, 1, 2):
            got = ops.slerp_apply(a, b32, bb, 0.3, 0.6, 0.1, values, words, rule)
            want = ops.slerp_apply.reference(a, b32, bb, 0.3, 0.6, 0.1, values, words, rule)
            assert got.dtype == dtype and got.shape == a.shape
            assert torch.equal(got, want), (bb is None, rule)  # same fp32 operation order: bit-identical
    assert torch.equal(ops.slerp_apply(a, a, None, 1.0, 0.0, 0.0, [], [], 0), a)


def test_ops_reject_bad_arguments(backend):
    a = torch.randn(40)
    w = ops.mask_pack.reference(torch.ones(40, dtype=torch.bool))
    with pytest.raises((ValueError, RuntimeError), match="dtype"):
        ops.slerp_apply(a, a, None, 1.0, 0.0, 0.0, [a.half()], [w], 0)
    with pytest.raises((ValueError, RuntimeError), match="words"):
        ops.slerp_apply(a, a, None, 1.0, 0.0, 0.0, [a], [w[:1]], 0)
    with pytest.raises((ValueError, RuntimeError), match="rule"):
        ops.slerp_apply(a, a, None, 1.0, 0.0, 0.0, [a], [w], 3)
    with pytest.raises((ValueError, RuntimeError), match="elements"):
        ops.slerp_stats(a, torch.randn(41), None)


# ----- fuse_models --------------------------------------------------------------------------------

SHAPES = {"model.embed.weight": (10, 8), "model.layers.0.w": (8, 33), "model.layers.0.b": (31,),
          "model.layers.1.w": (8, 33), "model.layers.1.b": (31,), "model.norm.weight": (1,)}


def make_models(dtype=torch.float32, K=3, seed=0, density=0.2):
    gen = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=gen).to(dtype) for n, s in SHAPES.items()}
    backbone = {n: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(dtype) for n, v in base.items()}
    tasks = {f"task{k}": {n: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(dtype)
                          for n, v in base.items()} for k in range(K)}
    cores = {k: ParamMask.from_bool({n: torch.rand(s, generator=gen) < density for n, s in SHAPES.items()})
             for k in tasks}
    return base, backbone, tasks, cores


def manual_fold(t, backbone, tasks, name, base=None):
    """The documented fold: m = task_0; m = slerp(1/(i+1), m, task_i); result = slerp(t, backbone, m)."""
    models = [tasks[k][name] for k in tasks]
    m = models[0]
    for i in range(1, len(models)):
        m = slerp(1.0 / (i + 1), m.float(), models[i], base=None if base is None else base[name])
    return slerp(t, backbone[name], m, base=None if base is None else base[name])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["last", "first", "mean"])
def test_fuse_core_transplant_and_blend(dtype, rule):
    base, backbone, tasks, cores = make_models(dtype)
    fused, stats = fuse_models(backbone, tasks, cores, t=0.4, overlap_rule=rule, progress=False)
    assert list(fused) == list(SHAPES)
    names = list(tasks)
    total_core, total_multi = 0, 0
    for name in SHAPES:
        out = fused[name]
        assert out.dtype == dtype and out.shape == SHAPES[name]
        bits = torch.stack([cores[k].tensor_bits(name).reshape(-1) for k in names])
        vals = torch.stack([tasks[k][name].reshape(-1) for k in names])
        flat = out.reshape(-1)
        hits = bits.sum(0)
        total_core += int((hits > 0).sum())
        total_multi += int((hits > 1).sum())
        for k in range(len(names)):  # elements in exactly one core: bit-exact copies
            only = bits[k] & (hits == 1)
            assert torch.equal(flat[only].view(torch.int16 if dtype != torch.float32 else torch.int32),
                               vals[k][only].view(torch.int16 if dtype != torch.float32 else torch.int32))
        multi = hits > 1
        if rule in ("last", "first"):
            order = range(len(names)) if rule == "first" else reversed(range(len(names)))
            winner = torch.full_like(hits, -1)
            for k in order:
                winner = torch.where(bits[k] & (winner < 0), k, winner)
            idx = multi.nonzero().flatten()
            assert torch.equal(flat[idx], vals[winner[idx], idx])
        else:
            mean = (torch.where(bits, vals.float(), 0).sum(0) / hits.clamp(min=1)).to(dtype)
            assert torch.equal(flat[multi], mean[multi])
        rest = hits == 0
        want = manual_fold(0.4, backbone, tasks, name).reshape(-1)
        assert torch.equal(flat[rest], want[rest])
        assert stats["tensors"][name]["transplanted"] == int((hits > 0).sum())
    assert stats["transplanted"] == total_core and stats["overlapping"] == total_multi > 0
    assert stats["modes"]["slerp"] + stats["modes"].get("lerp_collinear", 0) == len(SHAPES)


def test_fuse_single_task_is_slerp_and_t0_is_backbone_plus_cores():
    base, backbone, tasks, cores = make_models(K=1)
    fused, _ = fuse_models(backbone, tasks, None, t=0.7, progress=False)
    for name in SHAPES:
        assert torch.equal(fused[name], slerp(0.7, backbone[name], tasks["task0"][name]))
    fused, stats = fuse_models(backbone, tasks, cores, t=0.0, progress=False)
    for name in SHAPES:
        bits = cores["task0"].tensor_bits(name)
        assert torch.equal(fused[name], torch.where(bits, tasks["task0"][name], backbone[name]))
    assert stats["modes"] == {"copy": len(SHAPES)}


def test_fuse_task_vector_space_and_fold_order():
    base, backbone, tasks, cores = make_models(K=3)
    fused, stats = fuse_models(backbone, tasks, None, t=0.5, base=base, progress=False)
    assert stats["space"] == "task_vector"
    # every tensor is a genuine slerp except the 1-element norm weight (always collinear)
    assert stats["modes"]["slerp"] == len(SHAPES) - 1 and stats["modes"]["lerp_collinear"] == 1
    for name in SHAPES:
        torch.testing.assert_close(fused[name], manual_fold(0.5, backbone, tasks, name, base), rtol=0, atol=0)
    reordered = dict(reversed(list(tasks.items())))
    other, _ = fuse_models(backbone, reordered, None, t=0.5, base=base, progress=False)
    diff = max(float((fused[n] - other[n]).abs().max()) for n in SHAPES)
    assert 0 < diff < 0.05  # order dependent, but only slightly


def test_t_schedules():
    names = list(SHAPES)
    sched = TSchedule([0.0, 1.0], names)
    assert [sched(n) for n in names] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    sched = TSchedule([0.2, 0.4, 0.8], ["lm_head", "model.embed", *(f"model.layers.{i}.w" for i in range(5))])
    assert sched("model.embed") == 0.2 and sched("lm_head") == 0.8 and sched("transformer.wte.weight") == 0.2
    assert [round(sched(f"model.layers.{i}.w"), 9) for i in range(5)] == [0.2, 0.3, 0.4, 0.6, 0.8]
    sched = TSchedule({r"\.b$": 0.1, "embed": [0.3, 0.9], "default": 0.5}, names)
    assert [sched(n) for n in names] == [0.3, 0.5, 0.1, 0.5, 0.1, 0.5]
    with pytest.raises(ValueError, match="no filter matches"):
        TSchedule({"embed": 0.5}, names)("model.norm.weight")
    for bad in (1.2, [0.5, -0.1], {"default": 2}, [], float("nan")):
        with pytest.raises(ValueError, match="t"):
            TSchedule(bad, names)
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12 and layer_index("transformer.h.3.attn") == 3
    assert layer_index("model.embed_tokens.weight") is None
    _, backbone, tasks, _ = make_models(K=1)
    _, stats = fuse_models(backbone, tasks, None, t={"layers": [0.0, 1.0], "default": 0.25}, progress=False)
    assert [stats["tensors"][n]["t"] for n in names] == [0.25, 0.0, 0.0, 1.0, 1.0, 0.25]


def test_fuse_bad_inputs(tmp_path):
    base, backbone, tasks, cores = make_models(K=2)
    with pytest.raises(ValueError, match="t must be a number in \\[0, 1\\]"):
        fuse_models(backbone, tasks, cores, t=1.5, progress=False)
    with pytest.raises(ValueError, match="t must be"):
        fuse_models(backbone, tasks, cores, t=[0.0, -1.0], progress=False)
    with pytest.raises(ValueError, match="overlap_rule"):
        fuse_models(backbone, tasks, cores, overlap_rule="max", progress=False)
    bad_task = {k: dict(v) for k, v in tasks.items()}
    del bad_task["task1"]["model.layers.1.w"]
    with pytest.raises(KeyError, match="task 'task1'.*model.layers.1.w"):
        fuse_models(backbone, bad_task, cores, progress=False)
    bad_task["task1"]["model.layers.1.w"] = torch.randn(3, 3)
    with pytest.raises(ValueError, match="model.layers.1.w.*shape"):
        fuse_models(backbone, bad_task, cores, progress=False)
    other = ParamMask.from_bool({n: torch.zeros(s, dtype=torch.bool) for n, s in list(SHAPES.items())[:-1]})
    with pytest.raises(ValueError, match="layout"):
        fuse_models(backbone, tasks, {"task0": cores["task0"], "task1": other}, progress=False)
    extra = ParamMask.from_bool({**{n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()},
                                 "missing.weight": torch.zeros(3, dtype=torch.bool)})
    with pytest.raises(KeyError, match="missing.weight"):
        fuse_models(backbone, tasks, {"task0": extra, "task1": extra}, progress=False)
    with pytest.raises(ValueError, match="cores are given for tasks"):
        fuse_models(backbone, tasks, {"task0": cores["task0"]}, progress=False)
    with pytest.raises(ValueError, match="needs base"):
        fuse_models(backbone, tasks, cores, space="task_vector", progress=False)
    with pytest.raises(ValueError, match="at least one task"):
        fuse_models(backbone, {}, None, progress=False)
    nan_task = {k: dict(v) for k, v in tasks.items()}
    nan_task["task0"]["model.layers.0.b"] = torch.full((31,), float("nan"))
    with pytest.raises(ValueError, match="model.layers.0.b.*non-finite"):
        fuse_models(backbone, nan_task, None, progress=False)
    out = tmp_path / "never"
    with pytest.raises(ValueError):
        fuse_models(backbone, nan_task, None, out=out, progress=False)
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing half-written


# ----- streamed checkpoints + transformers ----------------------------------------------------------

def tiny_llama(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def test_streamed_sharded_fusion_equals_in_memory_and_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    backbone = tiny_llama(0)
    tasks = {}
    for k in range(2):
        m = tiny_llama(0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        tasks[f"t{k}"] = m
    dirs = {}
    for name, model in [("backbone", backbone), *tasks.items()]:
        dirs[name] = tmp_path / name
        model.save_pretrained(dirs[name], max_shard_size="60KB")
        assert (dirs[name] / INDEX_NAME).exists()
    gen = torch.Generator().manual_seed(1)
    cores = {k: ParamMask.from_bool({n: torch.rand(p.shape, generator=gen) < 0.05 for n, p in m.named_parameters()})
             for k, m in tasks.items()}
    in_memory, stats_mem = fuse_models(backbone, tasks, cores, t=[0.3, 0.7], progress=False)
    out, stats = fuse_models(dirs["backbone"], {k: dirs[k] for k in tasks}, cores, t=[0.3, 0.7],
                             out=tmp_path / "fused", max_shard_size="60KB", progress=False)
    assert out == os.fspath(tmp_path / "fused")
    assert len(json.loads((tmp_path / "fused" / INDEX_NAME).read_text())["weight_map"]) == len(in_memory)
    assert len(list((tmp_path / "fused").glob("*.safetensors"))) > 1
    assert "config.json" in stats["copied_files"]
    with open_tensors(out) as src:
        assert set(src.names) == set(in_memory)
        for name, tensor in src:
            assert torch.equal(tensor, in_memory[name]), name
    assert stats["transplanted"] == stats_mem["transplanted"] > 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, p in loaded.named_parameters():
        assert torch.equal(p.detach(), in_memory[name]), name
    with torch.no_grad():
        logits = loaded(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    # the CLI on the same checkpoints gives the same result
    for k, m in cores.items():
        m.save(tmp_path / f"{k}.mask")
    stats_path = tmp_path / "stats.json"
    argv = ["fuse", "--backbone", str(dirs["backbone"]), "-t", "[0.3, 0.7]", "-o", str(tmp_path / "cli"),
            "--max-shard-size", "60KB", "--stats", str(stats_path), "--no-progress",
            "--plot", str(tmp_path / "fuse.png")]
    for k in tasks:
        argv += ["--task", f"{k}={dirs[k]}:{tmp_path / f'{k}.mask'}"]
    assert main(argv) == 0
    with open_tensors(tmp_path / "cli") as src:
        for name, tensor in src:
            assert torch.equal(tensor, in_memory[name]), name
    assert json.loads(stats_path.read_text())["transplanted"] == stats["transplanted"]
    assert (tmp_path / "fuse.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 1  # the output exists: one error line, no traceback (--debug re-raises)
    with pytest.raises(FileExistsError):
        main(argv + ["--debug"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_on_gpu_matches_reference(dtype):
    """The compiled kernels on a real GPU, within one ulp of the dtype of the reference."""
    gen = torch.Generator().manual_seed(8)
    n = 2**20 + 7
    a, b, base = (torch.randn(n, generator=gen).to(dtype) for _ in range(3))
    values = [torch.randn(n, generator=gen).to(dtype) for _ in range(3)]
    words = [ops.mask_pack.reference(torch.rand(n, generator=gen) < 0.2) for _ in range(3)]
    with forced("triton"):
        stats = ops.slerp_stats(a.cuda(), b.cuda(), base.cuda())
        outs = [ops.slerp_apply(a.cuda(), b.cuda(), base.cuda(), 0.3, 0.6, 0.1, [v.cuda() for v in values],
                                 [w.cuda() for w in words], rule) for rule in (0, 1, 2)]
    torch.testing.assert_close(stats.cpu(), ops.slerp_stats.reference(a, b, base), rtol=1e-9, atol=1e-6)
    for rule, got in enumerate(outs):
        want = ops.slerp_apply.reference(a, b, base, 0.3, 0.6, 0.1, values, words, rule)
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=ULP[dtype], atol=ULP[dtype])


def test_slerp_coefficients_directly():
    # (u·v, |u|², |v|²) for two unit vectors 90° apart
    c0, c1, c2, info = slerp_coefficients(0.5, [0.0, 1.0, 1.0])
    assert info["mode"] == "slerp" and abs(info["angle_deg"] - 90) < 1e-12
    assert abs(c0 - math.sqrt(0.5)) < 1e-15 and abs(c1 - math.sqrt(0.5)) < 1e-15 and c2 == 0.0
    c0, c1, c2, _ = slerp_coefficients(0.5, [0.0, 1.0, 1.0], task_vector=True)
    assert abs(c2 - (1 - 2 * math.sqrt(0.5))) < 1e-15  # base + s0·(a − base) + s1·(b − base)
    assert slerp_coefficients(1.0, [0.0, 1.0, 1.0])[:3] == (0.0, 1.0, 0.0)
    assert slerp_coefficients(0.0, [0.0, 1.0, 1.0])[:3] == (1.0, 0.0, 0.0)
    assert slerp_coefficients(0.25, [4.0, 4.0, 4.0])[:3] == (0.75, 0.25, 0.0)  # collinear -> lerp
    assert slerp_coefficients(0.25, [0.0, 0.0, 4.0])[3]["mode"] == "lerp_zero_norm"
    with pytest.raises(ValueError, match="non-finite"):
        slerp_coefficients(0.5, [float("nan"), 1.0, 1.0])
