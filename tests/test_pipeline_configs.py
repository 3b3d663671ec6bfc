"""configs/ (issue 12): the paper config and the real-small config use only known keys and values;
real-small validates in full when ../shared/data is present (no network: tiny model, local files)."""

from __future__ import annotations

import os

import pytest
import yaml

from cpift_fast.pipeline import config as config_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("CPIFT_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def _raw(name: str) -> dict:
    with open(os.path.join(ROOT, "configs", name)) as f:
        return yaml.safe_load(f)


def test_paper_config_keys_values_and_tasks():
    raw = _raw("paper-llama2-7b.yaml")
    merged = config_mod._merge(config_mod.DEFAULTS, raw)  # unknown keys raise here
    config_mod.check_rules(merged)
    specs = [config_mod._task_spec(t, merged["data"]) for t in merged["tasks"]]
    assert [s.kind for s in specs] == ["gsm8k", "codealpaca", "logiqa", "alpaca", "ultrachat"]
    c = merged["cpift"]
    assert (c["p"], c["tau"], merged["train"]["warmup_ratio"], merged["probe"]["epochs"]) == (0.01, 0.1, 0.03, 1.0)
    assert c["consolidate"]["mode"] == "multi_stage" and c["consolidate"]["freeze"] == "all"
    assert merged["baselines"]["ms_random"]["k"] == 3


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "gsm8k")), reason="real data (../shared/data) not present")
def test_real_small_config_validates(monkeypatch):
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository root
    raw = _raw("real-small.yaml")
    for t in raw["tasks"]:
        if t["source"].startswith("../shared/data"):
            t["source"] = os.path.join(DATA, t["source"][len("../shared/data/"):])
    cfg = config_mod.load_config(raw)
    assert {t.kind for t in cfg.tasks} == {"gsm8k", "codealpaca", "logiqa", "alpaca", "ultrachat"}
