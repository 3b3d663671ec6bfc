"""The CPI-FT pipeline (issue 6) on a tiny model: every stage, the run-time freeze check,
resumability (kill a subprocess, re-run, same result), config errors before any training."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from cpift_fast import ParamMask
from cpift_fast.io import open_tensors
from cpift_fast.pipeline import config as config_mod
from cpift_fast.pipeline import train as train_mod
from cpift_fast.pipeline.config import ConfigError, load_config
from cpift_fast.pipeline.driver import run_pipeline
from cpift_fast.pipeline.freeze import FreezeGuard, FrozenDriftError
from cpift_fast.pipeline.model import TinyLlamaSpec, build_tiny_llama, load_checkpoint
from cpift_fast.pipeline.run import KINDS, LOCKS, MANIFEST, Run
from cpift_fast.pipeline.tasks import make_synthetic
from helpers import stage_digests

TINY = {
    "name": "tiny",
    "seed": 0,
    "seeds": 1,
    "threads": 1,
    "progress": False,
    "model": {"source": "tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
    "pretrain": {"examples": 96, "epochs": 1.0, "lr": 3e-3},
    "data": {"n_train": 48, "n_test": 8},
    "tasks": ["shift", "mirror", "count"],
    "train": {"epochs": 1.0, "batch_size": 16, "lr": 3e-3, "max_len": 24},
    "probe": {"epochs": 1.0},
    "cpift": {"p": 0.05, "tau": 0.1, "t": 0.5,
              "consolidate": {"ratio": 0.5, "epochs": 1.0, "freeze": "all", "compare_modes": True}},
    "methods": ["full_sft", "ms_random", "ms_user", "cpift"],
    "baselines": {"ms_random": {"k": 2}, "ms_user": {"groups": [["shift", "count"], ["mirror"]]}},
    "forgetting": {"pairs": [["shift", "mirror"]]},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    results = run_pipeline(load_config(TINY), runs_dir=str(runs))
    return results, os.path.join(str(runs), "tiny")


def _params(stage_dir: str) -> dict[str, torch.Tensor]:
    with open_tensors(stage_dir) as src:
        return {n: t.clone() for n, t in src.items()}


def _mask(root: str, task: str) -> ParamMask:
    return ParamMask.load(os.path.join(root, "seed0", "core", f"{task}.mask"))


# ----- stages ------------------------------------------------------------------------------------

def test_base_and_probes_are_real_finetunes(tiny_run):
    _, root = tiny_run
    base = _params(os.path.join(root, "base"))
    assert base, "base checkpoint holds no tensors"
    for task in TINY["tasks"]:
        probe = _params(os.path.join(root, "seed0", "probe", task))
        assert probe.keys() == base.keys()
        assert any(not torch.equal(probe[n], base[n]) for n in base), f"probe {task} equals the base model"
    model, tok = load_checkpoint(os.path.join(root, "base"))
    assert tok.decode(tok.encode("abc=")) == "abc="


def test_core_masks_are_exact_top_p(tiny_run):
    _, root = tiny_run
    base = _params(os.path.join(root, "base"))
    n = sum(t.numel() for t in base.values())
    k = int(TINY["cpift"]["p"] * n + 0.5)
    for task in TINY["tasks"]:
        mask = _mask(root, task)
        probe = _params(os.path.join(root, "seed0", "probe", task))
        assert mask.count() == k
        bits = mask.to_bool()
        inside = torch.cat([(probe[m] - base[m]).abs()[bits[m]] for m in mask.names])
        outside = torch.cat([(probe[m] - base[m]).abs()[~bits[m]] for m in mask.names])
        assert inside.min() >= outside.max(), f"{task}: a non-core element changed more than a core element"


def test_seed_core_stage_collects_the_per_task_cores(tiny_run):
    """seed0/core holds each task's mask from seed0/cores/<task> (a hard link: the same file) and the
    stats of all tasks in one core_stats.json — the files a single core stage used to write."""
    _, root = tiny_run
    merged = {}
    for task in TINY["tasks"]:
        own = os.path.join(root, "seed0", "cores", task)
        assert sorted(f for f in os.listdir(own) if f != MANIFEST) == ["core_stats.json", f"{task}.mask"]
        assert os.path.samefile(os.path.join(own, f"{task}.mask"), os.path.join(root, "seed0", "core", f"{task}.mask"))
        with open(os.path.join(own, "core_stats.json")) as f:
            merged.update(json.load(f))
    with open(os.path.join(root, "seed0", "core", "core_stats.json")) as f:
        assert json.load(f) == merged and set(merged) == set(TINY["tasks"])
    assert all(merged[t]["count"] == _mask(root, t).count() for t in TINY["tasks"])


def test_groups_follow_jaccard_threshold(tiny_run):
    _, root = tiny_run
    with open(os.path.join(root, "seed0", "group", "group.json")) as f:
        g = json.load(f)
    names, jac, tau = g["names"], torch.tensor(g["jaccard"]), g["tau"]
    group_of = {t: i for i, grp in enumerate(g["groups"]) for t in grp}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j and jac[i, j] >= tau:
                assert group_of[a] == group_of[b]
    assert sorted(t for grp in g["order"] for t in grp) == sorted(names)
    assert os.path.exists(os.path.join(root, "seed0", "group", "overlap.png"))


def test_stages_keep_earlier_cores_bit_identical(tiny_run):
    _, root = tiny_run
    with open(os.path.join(root, "seed0", "group", "group.json")) as f:
        order = json.load(f)["order"]
    done: list[str] = []
    prev = _params(os.path.join(root, "base"))
    for k, group in enumerate(order):
        cur = _params(os.path.join(root, "seed0", "cpift", f"stage{k + 1}"))
        if done:
            frozen = _mask(root, done[0])
            for t in done[1:]:
                frozen = frozen | _mask(root, t)
            assert frozen.count() > 0
            for name, bits in frozen.to_bool().items():
                assert torch.equal(cur[name][bits].view(torch.int32), prev[name][bits].view(torch.int32)), name
        assert any(not torch.equal(cur[n], prev[n]) for n in cur), f"stage {k + 1} did not train"
        with open(os.path.join(root, "seed0", "cpift", f"stage{k + 1}", MANIFEST)) as f:
            assert json.load(f)["info"]["frozen_checked"] == (frozen.count() if done else 0)
        done += group
        prev = cur


def test_fuse_transplants_cores_and_consolidation_keeps_them(tiny_run):
    """Multi-stage consolidation (the default): one stage per group, every core frozen in each."""
    _, root = tiny_run
    with open(os.path.join(root, "seed0", "group", "group.json")) as f:
        order = json.load(f)["order"]
    fused = _params(os.path.join(root, "seed0", "cpift", "fuse"))
    stages = [os.path.join(root, "seed0", "cpift", f"consolidate{k + 1}") for k in range(len(order))]
    assert all(os.path.isdir(d) for d in stages) and not os.path.exists(stages[-1][:-1] + str(len(order) + 1))
    for d, group in zip(stages, order):
        with open(os.path.join(d, MANIFEST)) as f:
            info = json.load(f)["info"]
        assert info["tasks"] == group and info["frozen_checked"] > 0
    consolidated = _params(stages[-1])
    masks = {t: _mask(root, t) for t in TINY["tasks"]}
    for task, mask in masks.items():
        others = [m for t, m in masks.items() if t != task]
        only = mask
        for m in others:
            only = only - m
        probe = _params(os.path.join(root, "seed0", "probe", task))
        for name, bits in only.to_bool().items():
            assert torch.equal(fused[name][bits], probe[name][bits]), f"{task}: core of {name} not transplanted"
        for name, bits in mask.to_bool().items():
            assert torch.equal(consolidated[name][bits], fused[name][bits]), f"consolidation moved a core of {task}"
    assert any(not torch.equal(consolidated[n], fused[n]) for n in fused), "consolidation did not train"


def test_eval_and_report(tiny_run):
    results, root = tiny_run
    per = results["seeds"][0]["scores"]
    for method in ["base", "probe"] + TINY["methods"]:
        assert set(per[method]) == set(TINY["tasks"])
        assert all(0.0 <= v <= 1.0 for v in per[method].values())
    with open(os.path.join(root, "report.md")) as f:
        text = f.read()
    for row in ("Full SFT", "Multi-Stage (random groups)", "Multi-Stage (user groups)", "CPI-FT", "Forgetting"):
        assert row in text
    for png in ("results.png", "core_share.png", "loss_curves.png"):
        assert os.path.getsize(os.path.join(root, png)) > 1000
    f = results["seeds"][0]["forgetting"]
    assert set(f) == {"shift->mirror", "mirror->shift"}
    assert set(f["shift->mirror"]["methods"]) == {"full_sft", "multi_stage", "cpift"}
    assert "drop on A" in text and "Seesaw" in text and "Consolidation modes" in text
    modes = results["seeds"][0]["consolidation"]
    assert set(modes) == {"multi_stage", "single_stage"}
    assert modes["multi_stage"] == per["cpift"]  # the configured mode is the method's result
    assert os.path.isdir(os.path.join(root, "seed0", "cpift", "consolidate"))  # the single-stage variant
    for d in ("base", "seed0/cpift/fuse", "seed0/probe/shift"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.join(root, d))
        assert tok.decode(tok.encode("shf abc=", add_special_tokens=False)) == "shf abc="
        AutoModelForCausalLM.from_pretrained(os.path.join(root, d))


def test_rerun_skips_every_stage_and_from_reruns_deterministically(tiny_run, tmp_path):
    results, root = tiny_run
    before = stage_digests(root)
    again = run_pipeline(load_config(TINY), runs_dir=os.path.dirname(root))
    assert {s for _, s, _ in again["stage_log"]} == {"cached"}
    assert again["seeds"][0]["scores"] == results["seeds"][0]["scores"]
    redo = run_pipeline(load_config(TINY), runs_dir=os.path.dirname(root), from_kind="fuse")
    ran = {k for k, s, _ in redo["stage_log"] if s == "ran"}
    assert "seed0/cpift/fuse" in ran and "seed0/cpift/consolidate" in ran and "seed0/probe/shift" not in ran
    assert stage_digests(root) == before, "re-running from 'fuse' changed a result: the stages are not deterministic"


# ----- resumability: kill a subprocess mid-run, re-run, compare with the uninterrupted run ---------

def test_killed_run_resumes_to_the_same_result(tiny_run, tmp_path):
    _, root = tiny_run
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "cpift_fast.cli", "run", str(cfg_path), "--runs-dir", str(runs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe_dir = runs / "tiny" / "seed0" / "probe"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if probe_dir.exists() and any(p.name.startswith(".tmp-") for p in probe_dir.iterdir()):
            break  # killed while a probe is half-written
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = stage_digests(str(runs / "tiny"))
    assert "base" in partial and "seed0/eval/cpift" not in partial
    done = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reused from an earlier run" in done.stdout
    resumed = stage_digests(str(runs / "tiny"))
    assert resumed == stage_digests(root), "a killed and resumed run differs from an uninterrupted one"
    leftovers = [d for d, _, _ in os.walk(runs) if os.path.basename(d).startswith(".tmp-")]
    assert not leftovers


# ----- the run-time freeze check ----------------------------------------------------------------

def _tiny_model():
    return build_tiny_llama(TinyLlamaSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), seed=0)


def test_freeze_guard_fires_on_a_perturbed_element():
    model, _ = _tiny_model()
    bools = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    name = "model.layers.0.mlp.up_proj.weight"
    bools[name].view(-1)[[3, 77]] = True
    guard = FreezeGuard(model, ParamMask.from_bool(bools))
    assert guard.check(model) == 2
    with torch.no_grad():
        model.get_parameter(name).view(-1)[5] += 1.0  # not frozen: fine
    guard.check(model)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[77] = torch.nextafter(model.get_parameter(name).view(-1)[77],
                                                                 torch.tensor(1.0))
    with pytest.raises(FrozenDriftError, match=r"1 frozen element\(s\) of 'model.layers.0.mlp.up_proj.weight'.*flat index 77"):
        guard.check(model)


def test_freeze_guard_sees_sign_of_zero():
    model, _ = _tiny_model()
    name, p = next(iter(model.named_parameters()))
    with torch.no_grad():
        p.view(-1)[0] = 0.0
    bools = {n: torch.zeros_like(q, dtype=torch.bool) for n, q in model.named_parameters()}
    bools[name].view(-1)[0] = True
    guard = FreezeGuard(model, ParamMask.from_bool(bools))
    with torch.no_grad():
        p.view(-1)[0] = -0.0
    with pytest.raises(FrozenDriftError):
        guard.check(model)


def test_training_with_an_optimizer_that_ignores_the_mask_is_caught(monkeypatch):
    """The pipeline's own check fires when frozen elements move (here: plain AdamW)."""
    model, tok = _tiny_model()
    task = make_synthetic("shift", 32, 4, 0)
    bools = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    bools["lm_head.weight"][:] = True
    mask = ParamMask.from_bool(bools)

    def plain_adamw(params, lr, betas, eps, weight_decay, frozen=None, importance=None):
        return torch.optim.AdamW([p for _, p in params], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    spec = train_mod.TrainSpec(epochs=1.0, batch_size=16, max_len=24)
    out = train_mod.train(model, tok, task.train, spec, frozen=mask, progress=False)
    assert out["frozen_checked"] == mask.count()
    monkeypatch.setattr(train_mod, "MaskedAdamW", plain_adamw)
    with pytest.raises(FrozenDriftError, match="lm_head.weight"):
        train_mod.train(model, tok, task.train, spec, frozen=mask, progress=False)


def test_clipping_measures_trainable_gradients_only():
    """Huge frozen gradients must not shrink the trainable ones (Trainer's clip would)."""
    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.tensor([3.0, 4.0, 1000.0, -1000.0])
    mask = ParamMask.from_bool({"w": torch.tensor([False, False, True, True])})
    norm = train_mod.clip_trainable_grads_([("w", w)], mask, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    scale = 1.0 / (5.0 + 1e-6)
    assert torch.allclose(w.grad[:2], torch.tensor([3.0, 4.0]) * scale)
    w.grad = torch.tensor([0.3, 0.4, 1000.0, -1000.0])
    train_mod.clip_trainable_grads_([("w", w)], mask, max_norm=1.0)  # under the limit: untouched
    assert w.grad.tolist() == pytest.approx([0.3, 0.4, 1000.0, -1000.0])


# ----- config errors come before any training ----------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(tasks=["shift", "revrese"]), r"unknown task 'revrese'.*Built-in tasks"),
    (lambda c: c["cpift"].update(p=1.5), r"cpift.p = 1.5 is out of range"),
    (lambda c: c["cpift"].update(p=0), r"cpift.p = 0 is out of range"),
    (lambda c: c["cpift"].update(tau=-0.1), r"cpift.tau"),
    (lambda c: c["model"].update(source="/nonexistent/model-dir"), r"model '/nonexistent/model-dir' not found"),
    (lambda c: c.update(metods=["cpift"]), r"unknown config key 'metods' \(did you mean 'methods'\?\)"),
    (lambda c: c.update(methods=["cpift", "magic"]), r"unknown method 'magic'"),
    (lambda c: c["baselines"]["ms_user"].update(groups=[["shift"], ["mirror"]]), r"every task exactly once"),
    (lambda c: c.update(tasks=["shift", {"name": "gsm", "kind": "gsm8k", "source": "/nope/gsm8k"}]),
     r"data source '/nope/gsm8k' does not exist"),
])
def test_config_errors_before_training(change, message, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started before the config was validated")

    monkeypatch.setattr(train_mod, "train", no_training)
    cfg = copy.deepcopy(TINY)
    change(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
    from cpift_fast.cli import main

    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


def test_demo_yaml_matches_the_builtin_demo():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "examples", "demo.yaml")) as f:
        from_file = config_mod._merge(config_mod.DEFAULTS, yaml.safe_load(f))
    assert from_file == config_mod._merge(config_mod.DEFAULTS, config_mod.DEMO)
    load_config(config_mod.DEMO)


# ----- run cache ---------------------------------------------------------------------------------

def test_stage_is_atomic_and_invalidated_by_params_and_inputs(tmp_path):
    run = Run(str(tmp_path / "r"), progress=False)
    calls = []

    def write(value):
        def fn(out):
            calls.append(value)
            with open(os.path.join(out, "x.txt"), "w") as f:
                f.write(value)
        return fn

    def boom(out):
        with open(os.path.join(out, "half.txt"), "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run.stage("a", "base", {"v": 1}, [], boom)
    assert not os.path.exists(run.path("a")) and os.listdir(run.root) == [LOCKS]
    a = run.stage("a", "base", {"v": 1}, [], write("one"))
    b = run.stage("b", "probe", {}, [a], write("b"))
    again = Run(str(tmp_path / "r"), progress=False)
    assert again.stage("a", "base", {"v": 1}, [], write("x")).digest == a.digest
    assert again.stage("b", "probe", {}, [a], write("x")).digest == b.digest and calls == ["one", "b"]
    third = Run(str(tmp_path / "r"), progress=False)
    a2 = third.stage("a", "base", {"v": 2}, [], write("two"))  # changed setting: re-run
    third.stage("b", "probe", {}, [a2], write("b2"))      # changed input: re-run
    assert calls == ["one", "b", "two", "b2"] and a2.digest != a.digest
    os.makedirs(os.path.join(third.root, ".tmp-c-123"))
    Run(str(tmp_path / "r"), progress=False)
    assert not os.path.exists(os.path.join(third.root, ".tmp-c-123"))
    with pytest.raises(ValueError, match="unknown stage"):
        Run(str(tmp_path / "r"), from_kind="nope")
    assert KINDS.index("stages") < KINDS.index("fuse") < KINDS.index("consolidate")


def test_a_one_step_stage_trains():
    """Warm-up is ceil(3 % of the steps) but never all of them: with lr 0 on a warm-up's first step, a
    one-step stage would otherwise leave the model unchanged."""
    model, tok = _tiny_model()
    task = make_synthetic("shift", 16, 4, 0)
    spec = train_mod.TrainSpec(epochs=1.0, batch_size=16, max_len=24)
    assert train_mod.num_steps(len(task.train), spec) == 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_mod.train(model, tok, task.train, spec, progress=False)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
