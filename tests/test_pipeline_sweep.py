"""`cpift sweep` (issue 12): value parsing, a τ × p grid on a tiny config sharing stages across
points, the sweep report with the score-vs-value and overlap-vs-p plots."""

from __future__ import annotations

import copy
import json
import os

import pytest

from cpift_fast.pipeline.config import ConfigError
from cpift_fast.pipeline.sweep import parse_sweep, run_sweep

from test_pipeline import TINY


def test_parse_sweep_axes_and_fixed_values():
    fixed, axes = parse_sweep(["cpift.tau=0,0.05,0.1", "cpift.p=0.01, 0.05", "train.epochs=2",
                               "baselines.ms_user.groups=[[a, b], [c]]"])
    assert axes == [("cpift.tau", [0, 0.05, 0.1]), ("cpift.p", [0.01, 0.05])]
    assert fixed == [(["train", "epochs"], 2), (["baselines", "ms_user", "groups"], [["a", "b"], ["c"]])]
    with pytest.raises(ConfigError, match="at least one"):
        parse_sweep(["cpift.tau=0.1"])
    with pytest.raises(ConfigError, match="at most 2"):
        parse_sweep(["a=1,2", "b=1,2", "c=1,2"])
    with pytest.raises(ConfigError, match="repeated values"):
        parse_sweep(["cpift.tau=0.1,0.1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_sweep(["cpift.tau"])


def test_every_point_is_validated_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep point tau=1.5: cpift.tau = 1.5 is out of range"):
        run_sweep(copy.deepcopy(TINY), ["cpift.tau=0.1,1.5"], runs_dir=str(tmp_path))
    assert not (tmp_path / "tiny").exists()


def test_grid_sweep_shares_stages_and_plots(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg.update(methods=["full_sft", "cpift"], forgetting={"pairs": []})
    cfg["cpift"]["consolidate"]["compare_modes"] = False
    out = run_sweep(cfg, ["cpift.tau=0,1", "cpift.p=0.05,0.2"], runs_dir=str(tmp_path))
    root = os.path.join(str(tmp_path), "tiny", "sweep")
    labels = [p["label"] for p in out["points"]]
    assert labels == ["tau=0,p=0.05", "tau=0,p=0.2", "tau=1,p=0.05", "tau=1,p=0.2"]
    first, second, third = out["points"][:3]
    assert first["cached"] == 0
    assert second["cached"] > 0 and second["ran"] < first["ran"], "base/probes/full_sft were not shared"
    # tau = 0: one group; tau = 1: each task alone (cores differ)
    assert first["groups"] == [TINY["tasks"]] and len(third["groups"]) == len(TINY["tasks"])
    # the probes of point 2 are the very files of point 1 (hard links), not recomputed copies
    a = os.path.join(root, labels[0], "seed0", "probe", "shift", "model.safetensors")
    b = os.path.join(root, labels[1], "seed0", "probe", "shift", "model.safetensors")
    assert os.path.samefile(a, b)
    # a larger p gives larger, more overlapping cores
    assert out["points"][1]["overlap"] > out["points"][0]["overlap"]
    for name in ("report.md", "score_vs_value.png", "overlap_vs_p.png", "sweep.json"):
        assert os.path.getsize(os.path.join(root, name)) > 100, name
    text = open(os.path.join(root, "report.md")).read()
    assert "| cpift.tau | cpift.p |" in text and "CPI-FT" in text
    with open(os.path.join(root, "sweep.json")) as f:
        assert len(json.load(f)["points"]) == 4
    # the sweep is resumable: a second invocation reuses every stage
    again = run_sweep(cfg, ["cpift.tau=0,1", "cpift.p=0.05,0.2"], runs_dir=str(tmp_path))
    assert all(p["ran"] == 0 for p in again["points"])
    assert [p["avg"] for p in again["points"]] == [p["avg"] for p in out["points"]]
