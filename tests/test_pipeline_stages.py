"""Cluster fan-out (issue 13): `cpift run CFG --stage KIND [--task NAME]` computes one stage kind (one
task's probe), reuses finished stages, refuses to start without its inputs, and the per-stage
commands — the probes as concurrent processes on one run directory — reach the same result as one
`cpift run`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from cpift_fast.cli import main
from cpift_fast.pipeline.config import load_config
from cpift_fast.pipeline.driver import run_pipeline
from cpift_fast.pipeline.run import KINDS

from test_pipeline import TINY
from helpers import stage_digests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("cpift: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def cfg_path(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def _stage_procs(cfg_path: str, runs: str, tasks: list[str], kind: str = "probe") -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [subprocess.Popen([sys.executable, "-m", "cpift_fast.cli", "run", cfg_path, "--runs-dir", runs,
                              "--stage", kind, "--task", t, "--set", "progress=true"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for t in tasks]


def _concurrently(cfg_path: str, runs: str, kind: str, key: str) -> None:
    """`cpift run CFG --stage KIND --task T` for every task at once; each computes exactly its stage."""
    procs = _stage_procs(cfg_path, runs, TINY["tasks"], kind)
    for task, proc in zip(TINY["tasks"], procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        computed = [ln.split()[1] for ln in out.splitlines() if ln.startswith("▶ ")]
        assert computed == [key.format(task=task)], (task, out)


def test_stage_by_stage_equals_one_run(cfg_path, tmp_path):
    one = run_pipeline(load_config(TINY), runs_dir=str(tmp_path / "one"), write_report=False)
    runs = str(tmp_path / "staged")
    root = os.path.join(runs, "tiny")

    assert main(["run", cfg_path, "--runs-dir", runs, "--stage", "base"]) == 0
    assert set(stage_digests(root)) == {"base"}

    _concurrently(cfg_path, runs, "probe", "seed0/probe/{task}")  # concurrent processes, one directory
    probes = {f"seed0/probe/{t}" for t in TINY["tasks"]}
    assert set(stage_digests(root)) == {"base"} | probes

    again = run_pipeline(load_config(TINY), runs_dir=runs, stage="probe", task="mirror")  # idempotent
    assert {s for _, s, _ in again["stage_log"]} == {"cached"} and again["selected"] == ["seed0/probe/mirror"]

    _concurrently(cfg_path, runs, "core", "seed0/cores/{task}")  # each task's core: concurrent too
    assert set(stage_digests(root)) == {"base"} | probes | {f"seed0/cores/{t}" for t in TINY["tasks"]}

    for kind in KINDS[KINDS.index("core"):]:
        before = set(stage_digests(root))
        res = run_pipeline(load_config(TINY), runs_dir=runs, stage=kind)
        ran = {k for k, s, _ in res["stage_log"] if s == "ran"}
        assert res["selected"] and ran == set(stage_digests(root)) - before and ran <= set(res["selected"]), kind

    final = run_pipeline(load_config(TINY), runs_dir=runs, write_report=False)
    assert {s for _, s, _ in final["stage_log"]} == {"cached"}, "the per-stage commands left work undone"
    assert stage_digests(root) == stage_digests(os.path.join(str(tmp_path / "one"), "tiny"))
    assert final["seeds"] == one["seeds"]


@pytest.mark.parametrize("args, message", [
    (["--stage", "probes"], "--stage 'probes': unknown stage"),
    (["--stage", "probe", "--task", "gsm8k"], "--task 'gsm8k': not a task of the config"),
    (["--stage", "group", "--task", "shift"], "--task applies to the per-task stages (probe, core), not --stage group"),
    (["--stage", "core", "--seed", "3"], "--seed 3: not a seed of the run"),
    (["--task", "shift"], "--task needs --stage"),
    (["--stage", "fuse", "--from", "fuse"], "--stage and --from cannot be combined"),
])
def test_bad_stage_arguments_fail_before_any_work(cfg_path, tmp_path, capsys, args, message):
    runs = tmp_path / "runs"
    assert main(["run", cfg_path, "--runs-dir", str(runs), *args]) == 2
    _one_error_line(capsys.readouterr().err, message)
    assert not runs.exists()


def test_missing_prerequisite_is_named_with_its_command(cfg_path, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    assert main(["run", cfg_path, "--runs-dir", runs, "--stage", "probe", "--task", "shift"]) == 1
    _one_error_line(capsys.readouterr().err, "needs stage base, which is not finished",
                    f"`cpift run {cfg_path} --stage base` first")
    assert stage_digests(os.path.join(runs, "tiny")) == {}

    assert main(["run", cfg_path, "--runs-dir", runs, "--stage", "base"]) == 0
    assert main(["run", cfg_path, "--runs-dir", runs, "--stage", "probe", "--task", "shift"]) == 0
    capsys.readouterr()
    assert main(["run", cfg_path, "--runs-dir", runs, "--stage", "core"]) == 1
    _one_error_line(capsys.readouterr().err, "--stage core needs stage seed0/probe/mirror",
                    f"`cpift run {cfg_path} --stage probe --task mirror` first")
    assert set(stage_digests(os.path.join(runs, "tiny"))) == {"base", "seed0/probe/shift"}
    # one task's core needs only that task's probe (a Slurm array can chain them with aftercorr)
    assert main(["run", cfg_path, "--runs-dir", runs, "--stage", "core", "--task", "shift"]) == 0
    assert set(stage_digests(os.path.join(runs, "tiny"))) == {"base", "seed0/probe/shift", "seed0/cores/shift"}
