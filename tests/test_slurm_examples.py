"""examples/slurm (docs/cluster.md): the scripts parse (`bash -n`), and run with stub `sbatch`/`srun`
(which execute each job's command line at once, array tasks in order) and a stub `cpift` (which
records its arguments), they submit exactly the per-stage commands of the config — one probe and
one core per task, then every later kind, then the report — each accepted by `cpift run`'s own
argument checks, with every job depending on the one before."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import yaml

from cpift_fast.cli import build_parser
from cpift_fast.pipeline.config import load_config
from cpift_fast.pipeline.driver import _check_selection
from cpift_fast.pipeline.run import KINDS

from test_pipeline import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "examples", "slurm")

SBATCH = r'''#!/usr/bin/env bash
# stub sbatch: record (job id, dependency, array), run the job now, print the id (--parsable)
set -euo pipefail
id=$(( $(cat "$STUB_DIR/last_id" 2>/dev/null || echo 100) + 1 )); echo $id > "$STUB_DIR/last_id"
dep=- array=- wrap= script= part=-
while (( $# )); do
  case $1 in
    --dependency=*) dep=${1#--dependency=} ;;
    --partition=*) part=${1#--partition=} ;;
    --array=*) array=${1#--array=} ;;
    --wrap) wrap=$2; shift ;;
    --job-name|--partition|--time|--gres) shift ;;
    -*) ;;
    *) script=$1; shift; break ;;
  esac
  shift
done
echo "$id $dep $array $part" >> "$STUB_DIR/sbatch.log"
if [[ -n $wrap ]]; then
  bash -c "$wrap" >> "$STUB_DIR/jobs.out" 2>&1
elif [[ $array == - ]]; then
  bash "$script" "$@" >> "$STUB_DIR/jobs.out" 2>&1
else
  for (( i = ${array%-*}; i <= ${array#*-}; i++ )); do
    SLURM_ARRAY_TASK_ID=$i bash "$script" "$@" >> "$STUB_DIR/jobs.out" 2>&1
  done
fi
echo $id
'''
SRUN = '#!/usr/bin/env bash\nexec "$@"\n'
CPIFT = '#!/usr/bin/env bash\nprintf "%q " "$@" >> "$STUB_DIR/cpift.log"\necho >> "$STUB_DIR/cpift.log"\n'


@pytest.mark.parametrize("script", ["submit.sh", "probes.sbatch"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", os.path.join(SLURM, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _stubs(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("cpift", CPIFT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_DIR=str(tmp_path),
                PYTHON=sys.executable, CPIFT="cpift", PYTHONPATH=ROOT, SBATCH_ARGS="--partition=gpu --gres=gpu:1",
                SBATCH_CPU_ARGS="--partition=cpu")


def test_submit_runs_the_configs_stage_commands_in_order(tmp_path):
    cfg_path = tmp_path / "my run.yaml"  # a space: the commands must quote the path
    cfg_path.write_text(yaml.safe_dump(TINY))
    proc = subprocess.run(["bash", os.path.join(SLURM, "submit.sh"), str(cfg_path), str(tmp_path / "runs")],
                          env=_stubs(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "jobs.out").read_text()

    commands = [shlex.split(line) for line in (tmp_path / "cpift.log").read_text().splitlines()]
    tasks = TINY["tasks"]
    expected = ([["--stage", "base"]] + [["--stage", "probe", "--task", t] for t in tasks]
                + [["--stage", "core", "--task", t] for t in tasks]
                + [["--stage", k] for k in KINDS[KINDS.index("core"):]] + [[]])
    assert [c[5:] for c in commands] == expected
    cfg = load_config(str(cfg_path))
    parser = build_parser()
    for argv in commands:
        assert argv[:5] == ["run", str(cfg_path), "--runs-dir", str(tmp_path / "runs"), "--no-progress"], argv
        args = parser.parse_args(argv)
        seeds = range(int(cfg["seed"]), int(cfg["seed"]) + int(cfg["seeds"]))
        _check_selection(cfg, args.stage, args.task, args.seed, seeds, args.from_stage)  # raises if refused

    jobs = [line.split() for line in (tmp_path / "sbatch.log").read_text().splitlines()]
    assert len(jobs) == 2 + 1 + len(KINDS) - KINDS.index("core") + 1
    assert jobs[0][1] == "-"
    for (prev, *_), (_, dep, *_) in zip(jobs, jobs[1:]):  # a chain: each job waits for the one before
        assert dep.split(":") in (["afterok", prev], ["aftercorr", prev]), jobs
    assert [j[2] for j in jobs[1:3]] == [f"0-{len(tasks) - 1}"] * 2 and jobs[2][1].startswith("aftercorr:")
    kinds = ["base", "probe", "core"] + list(KINDS[KINDS.index("core"):]) + ["report"]
    cpu = {"core", "group", "fuse"}  # SBATCH_CPU_ARGS for the CPU stages, SBATCH_ARGS for the others
    assert [j[3] for j in jobs] == ["cpu" if k in cpu else "gpu" for k in kinds]


def test_array_index_past_the_tasks_is_an_error(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    env = dict(_stubs(tmp_path), SLURM_ARRAY_TASK_ID=str(len(TINY["tasks"])))
    proc = subprocess.run(["bash", os.path.join(SLURM, "probes.sbatch"), str(cfg_path), "runs", "probe"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"array index 3, but {cfg_path} has 3 tasks" in proc.stderr
    assert not (tmp_path / "cpift.log").exists()
