"""EPI in the pipeline (issue 11): methods epi / epi_static on a tiny run, the drift log, frozen
elements bit-exact on every step between refreshes, epi config errors before any training, the
report's EPI rows and drift plot."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import yaml

from cpift_fast.cli import main
from cpift_fast.evolving import TaskBatchSampler
from cpift_fast.io import open_tensors
from cpift_fast.pipeline import stages as stages_mod
from cpift_fast.pipeline import train as train_mod
from cpift_fast.pipeline.config import ConfigError, load_config
from cpift_fast.pipeline.driver import run_pipeline
from cpift_fast.pipeline.freeze import FrozenDriftError
from cpift_fast.pipeline.model import TinyLlamaSpec, build_tiny_llama
from cpift_fast.pipeline.tasks import make_synthetic
from cpift_fast.pipeline.train import EpiSpec, TrainSpec
from helpers import set_config_value
from test_pipeline import TINY as PIPELINE_TINY

# 3 tasks x 48 examples in batches of 16: 9 task-homogeneous steps; refreshes after steps 2, 4, 6, 8
TINY = {  # the pipeline tests' tiny model, data and training, with the EPI methods only
    **{k: v for k, v in PIPELINE_TINY.items() if k not in ("probe", "cpift", "baselines", "forgetting")},
    "name": "tiny_epi",
    "epi": {"ratio": 0.05, "interval": 2, "warmup": 2},
    "methods": ["full_sft", "epi", "epi_static"],
}
STEPS = 9


@pytest.fixture(scope="module")
def epi_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    results = run_pipeline(load_config(TINY), runs_dir=str(runs))
    return results, os.path.join(str(runs), TINY["name"])


def _stage(root: str, method: str) -> str:
    return os.path.join(root, "seed0", method, "train")


def _drift(root: str, method: str) -> dict:
    with open(os.path.join(_stage(root, method), "drift.json")) as f:
        return json.load(f)


def _sampler() -> TaskBatchSampler:  # the EPI stage's step order
    return TaskBatchSampler([t for t in TINY["tasks"] for _ in range(TINY["data"]["n_train"])],
                            TINY["train"]["batch_size"], seed=0)


def _refreshes(method: str) -> list[int]:
    """The steps of the logged refreshes: every schedule point for epi; for epi_static the warmup and
    each later point at which a task whose mask was empty has had a step (docs/epi.md)."""
    sampler, e = _sampler(), TINY["epi"]
    points = list(range(e["warmup"], STEPS + 1, e["interval"]))
    if method == "epi":
        return points
    out, masked = [], set()
    for p in points:
        trained = {sampler.task_of_step(j) for j in range(p)}
        if not out or trained - masked:
            out.append(p)
            masked |= trained
    return out


def _params(path: str) -> dict[str, torch.Tensor]:
    with open_tensors(path) as src:
        return {n: t.clone() for n, t in src.items()}


def test_epi_stages_train_and_record_their_settings(epi_run):
    _, root = epi_run
    base = _params(os.path.join(root, "base"))
    assert _refreshes("epi_static") == [2, 4]  # 3 tasks, 2 steps before warmup: one task's mask comes late
    for method in ("epi", "epi_static"):
        refreshes = len(_refreshes(method))
        with open(os.path.join(_stage(root, method), "manifest.json")) as f:
            manifest = json.load(f)
        info = manifest["info"]
        assert info["steps"] == STEPS and info["refreshes"] == refreshes and info["tasks"] == TINY["tasks"]
        assert info["frozen_checked"] > 0, f"{method}: no frozen element was checked"
        assert manifest["params"]["epi"]["policy"] == {"epi": "evolving", "epi_static": "static"}[method]
        assert manifest["params"]["epi"]["ratio"] == TINY["epi"]["ratio"]
        trained = _params(_stage(root, method))
        assert any(not torch.equal(trained[n], base[n]) for n in base), f"{method} did not train"
    assert any(not torch.equal(a, b) for a, b in zip(_params(_stage(root, "epi")).values(),
                                                     _params(_stage(root, "epi_static")).values()))


def test_drift_log_counts_add_up(epi_run):
    _, root = epi_run
    n = sum(t.numel() for t in _params(os.path.join(root, "base")).values())
    k = int(TINY["epi"]["ratio"] * n + 0.5)
    sampler = _sampler()
    for method in ("epi", "epi_static"):
        steps = _refreshes(method)
        drift = _drift(root, method)
        assert drift["steps"] == STEPS and drift["settings"]["warmup"] == TINY["epi"]["warmup"]
        assert drift["state_bytes"] == 4 * n * len(TINY["tasks"])  # float32 state per task
        log = drift["log"]
        assert sorted({r["step"] for r in log}) == steps
        assert len(log) == len(steps) * len(TINY["tasks"])
        previous = dict.fromkeys(TINY["tasks"], 0)
        had_mask = set()
        for r in log:
            assert r["applied"] is True  # the last refresh (step 8) comes before the last step (9)
            assert r["protected"] == r["kept"] + r["added"], r
            assert previous[r["task"]] == r["kept"] + r["released"], r
            trained = {sampler.task_of_step(j) for j in range(r["step"])}  # tasks with steps before the refresh
            assert r["protected"] == (k if r["task"] in trained else 0), r
            union = previous[r["task"]] + r["protected"] - r["kept"]
            assert r["jaccard_prev"] == pytest.approx(r["kept"] / union if union else 0.0)
            others = sum(x["protected"] for x in log if x["step"] == r["step"] and x["task"] != r["task"])
            assert r["frozen"] <= others
            previous[r["task"]] = r["protected"]
            if r["task"] in had_mask:
                assert r["jaccard_first"] is not None and (method == "epi" or r["jaccard_first"] == 1.0), r
            elif r["protected"]:  # the task's first non-empty mask
                assert r["jaccard_first"] == 1.0, r
                had_mask.add(r["task"])
            else:
                assert r["jaccard_first"] is None, r
        assert had_mask == set(TINY["tasks"])


class _Recorder:
    """Wraps train's MaskedAdamW and EvolvingIsolation to record, per optimizer step: the task, the
    frozen mask in force, whether it is that task's F_t, and the parameters before and after."""

    def __init__(self, monkeypatch):
        self.steps, self.isolations = [], []
        recorder = self

        class Optimizer(train_mod.MaskedAdamW):
            def step(self, closure=None):
                before = {n: p.detach().clone() for n, p in self._named_params()}
                frozen = self.frozen_mask()
                iso = recorder.isolations[0]
                task = self.importance.active
                expected = None if iso.frozen is None else iso.frozen[task]
                same = (frozen is None and expected is None) or (
                    frozen is not None and expected is not None
                    and (frozen - expected).count() == 0 and (expected - frozen).count() == 0)
                out = super().step(closure)
                after = {n: p.detach().clone() for n, p in self._named_params()}
                recorder.steps.append({"task": task, "frozen": frozen, "same": same, "before": before, "after": after})
                return out

        class Isolation(train_mod.EvolvingIsolation):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                recorder.isolations.append(self)

        monkeypatch.setattr(train_mod, "MaskedAdamW", Optimizer)
        monkeypatch.setattr(train_mod, "EvolvingIsolation", Isolation)


def _tiny_train_setup():
    model, tok = build_tiny_llama(TinyLlamaSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                                max_positions=64), seed=0)
    examples, tasks = [], []
    for name in ("shift", "mirror"):
        data = make_synthetic(name, 48, 4, seed=0).train
        examples += data
        tasks += [name] * len(data)
    return model, tok, examples, tasks


@pytest.mark.parametrize("policy", ["evolving", "static"])
def test_frozen_elements_stay_bit_exact_on_every_step(monkeypatch, policy):
    """Direct check, independent of the run-time FreezeGuard: on each step, the elements frozen then
    are bit-identical after it, the frozen set is F_t of the step's task, and training happens."""
    rec = _Recorder(monkeypatch)
    model, tok, examples, tasks = _tiny_train_setup()
    epi = EpiSpec(policy=policy, ratio=0.05, interval=2, warmup=2)
    result = train_mod.train(model, tok, examples, TrainSpec(batch_size=16, max_len=24), epi=epi, tasks=tasks,
                             progress=False)
    assert result["steps"] == len(rec.steps) == 6
    assert [r["step"] for r in result["drift"]][::2] == ([2, 4, 6] if policy == "evolving" else [2])
    # the refresh after the last step (6) is logged, its masks never used
    assert [r["applied"] for r in result["drift"]] == [r["step"] < 6 for r in result["drift"]]
    checked = 0
    for k, s in enumerate(rec.steps):
        assert s["same"], f"step {k + 1}: the frozen set in force is not F_t of task {s['task']}"
        assert (s["frozen"] is None) == (k < 2), f"step {k + 1}: frozen set present before warmup or absent after"
        if s["frozen"] is None:
            continue
        bits = s["frozen"].to_bool()
        for name, before in s["before"].items():
            after = s["after"][name]
            assert torch.equal(before[bits[name]], after[bits[name]]), f"step {k + 1}: frozen {name} changed"
            assert not torch.equal(before, after), f"step {k + 1}: {name} did not train"
            checked += int(bits[name].sum())
    assert checked > 0 and result["frozen_checked"] == checked


def test_run_time_guard_catches_a_frozen_element_that_moves(monkeypatch):
    """The per-step FreezeGuard is live: an optimizer that also moves frozen elements fails the stage."""

    class Leaky(train_mod.MaskedAdamW):
        def step(self, closure=None):
            out = super().step(closure)
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(1e-3)
            return out

    monkeypatch.setattr(train_mod, "MaskedAdamW", Leaky)
    model, tok, examples, tasks = _tiny_train_setup()
    with pytest.raises(FrozenDriftError, match=r"step 3: .*frozen element"):
        train_mod.train(model, tok, examples, TrainSpec(batch_size=16, max_len=24), tasks=tasks, progress=False,
                        epi=EpiSpec(policy="evolving", ratio=0.05, interval=2, warmup=2))


def test_warmup_beyond_the_stage_fails_before_training(monkeypatch):
    def not_reached(*a, **k):
        raise AssertionError("training was being set up")

    monkeypatch.setattr(train_mod, "FreezeGuard", not_reached)
    model, tok, examples, tasks = _tiny_train_setup()
    with pytest.raises(ValueError, match=r"epi\.warmup = 6 must be below the stage's 6 optimizer steps"):
        train_mod.train(model, tok, examples, TrainSpec(batch_size=16, max_len=24), tasks=tasks, progress=False,
                        epi=EpiSpec(policy="static", warmup=6))


BAD_EPI = [
    (set_config_value("epi.ratio", 0), r"epi\.ratio = 0 is out of range: it must be in \(0, 1\]"),
    (set_config_value("epi.ratio", 1.5), r"epi\.ratio = 1\.5 is out of range"),
    (set_config_value("epi.ratio", "most"), r"epi\.ratio must be a number, got 'most'"),
    (set_config_value("epi.interval", 0), r"epi\.interval = 0 is out of range"),
    (set_config_value("epi.interval", 2.5), r"epi\.interval must be an integer, got 2\.5"),
    (set_config_value("epi.warmup", -1), r"epi\.warmup = -1 is out of range"),
    (set_config_value("epi.warmup", STEPS), rf"epi\.warmup = {STEPS} must be below the EPI training stage's {STEPS} optimizer steps"),
    (set_config_value("epi.beta", 1.0), r"epi\.beta = 1\.0 is out of range: it must be in \[0, 1\)"),
    (set_config_value("epi.beta", -0.1), r"epi\.beta = -0\.1 is out of range"),
    (set_config_value("epi.signal", "grad_squared"), r"epi\.signal must be one of .*did you mean 'grad_sq'"),
    (set_config_value("epi.state_dtype", "fp16"), r"epi\.state_dtype must be one of float32, bfloat16, int8"),
    (set_config_value("epi.normalize", "tensor"), r"epi\.normalize must be one of layer, none"),
    (set_config_value("epi.policy", "static"), r"unknown config key 'epi\.policy'"),
    (set_config_value("epi", 0.05), r"config key 'epi' must be a mapping"),
]


@pytest.mark.parametrize("change, message", BAD_EPI, ids=[m.split(" ")[0].replace("\\", "") + f"-{i}"
                                                          for i, (_, m) in enumerate(BAD_EPI)])
def test_bad_epi_values_fail_before_any_training(change, message, tmp_path, monkeypatch, capsys):
    def no_training(*a, **k):
        raise AssertionError("training started before the config was validated")

    monkeypatch.setattr(train_mod, "train", no_training)
    monkeypatch.setattr(stages_mod, "train", no_training)
    cfg = copy.deepcopy(TINY)
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epi" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_warmup_is_only_checked_when_an_epi_method_runs():
    cfg = copy.deepcopy(TINY)
    cfg["methods"] = ["full_sft"]
    cfg["epi"]["warmup"] = 10 * STEPS
    load_config(cfg)


def test_report_has_the_epi_rows_and_the_drift_plot(epi_run):
    results, root = epi_run
    per = results["seeds"][0]["scores"]
    assert set(per["epi"]) == set(per["epi_static"]) == set(TINY["tasks"])
    with open(os.path.join(root, "report.md")) as f:
        text = f.read()
    for row in ("| EPI (evolving masks) |", "| EPI, static masks (ablation) |", "| Full SFT (multi-task) |",
                "## EPI: importance drift", "![EPI mask drift](epi_drift.png)", "evolving − static"):
        assert row in text, row
    assert os.path.getsize(os.path.join(root, "epi_drift.png")) > 1000
    section = text.split("## EPI: importance drift")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in table] == _refreshes("epi") + _refreshes("epi_static")
    assert "EPI (evolving masks): 9 steps, 4 refresh(es)" in section


def test_epi_rerun_is_cached_and_recompute_is_bit_identical(epi_run):
    results, root = epi_run
    digests = {m: json.load(open(os.path.join(_stage(root, m), "manifest.json")))["digest"] for m in ("epi", "epi_static")}
    again = run_pipeline(load_config(TINY), runs_dir=os.path.dirname(root), write_report=False)
    assert {s for k, s, _ in again["stage_log"] if "/epi" in k} == {"cached"}
    redo = run_pipeline(load_config(TINY), runs_dir=os.path.dirname(root), from_kind="stages", write_report=False)
    assert {s for k, s, _ in redo["stage_log"] if k.endswith("/train")} == {"ran"}
    for m, d in digests.items():
        assert json.load(open(os.path.join(_stage(root, m), "manifest.json")))["digest"] == d, m
    assert redo["seeds"][0]["scores"] == results["seeds"][0]["scores"]
