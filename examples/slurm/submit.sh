#!/usr/bin/env bash
# Submit a whole CPI-FT run (cpift run CONFIG) to Slurm as one job per stage kind, with the per-task
# stages (probes, then each task's core) as job arrays: one array task per task of the config.
#
#   examples/slurm/submit.sh CONFIG [RUNS_DIR]
#
#   base ─► probe[0..n-1] ─(aftercorr)─► core[0..n-1] ─► core ─► group ─► stages ─► fuse
#        ─► consolidate ─► forgetting ─► eval ─► report (a plain `cpift run`: every stage reused)
#
# The run directory (RUNS_DIR/<config name>) must be on a file system every node sees: it is the
# only shared state; its stage locks keep jobs from computing a stage twice, and a job whose input
# stage is missing stops with one error naming it (nothing upstream is computed). Every command is
# idempotent: resubmitting this script after a failure recomputes only the unfinished stages.
#
# Environment: CPIFT (the cpift command; default `cpift`), PYTHON (the Python that has cpift_fast,
# used to read the task list; default python3), SBATCH_ARGS (sbatch options of the GPU jobs — base,
# probes, stages, consolidate, forgetting, eval, report — e.g. "--partition=gpu --gres=gpu:1
# --time=04:00:00"), SBATCH_CPU_ARGS (options of the jobs that run on CPUs: the cores, group and
# fuse; default: SBATCH_ARGS). Multi-GPU jobs: CPIFT="torchrun --nproc_per_node 8 $(which cpift)"
# with --gres=gpu:8 (docs/cluster.md).
set -euo pipefail

CFG=${1:?usage: submit.sh CONFIG [RUNS_DIR]}
RUNS=${2:-runs}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CPIFT=${CPIFT:-cpift}
PYTHON=${PYTHON:-python3}
read -r -a GPU_ARGS <<< "${SBATCH_ARGS:-}"
read -r -a CPU_ARGS <<< "${SBATCH_CPU_ARGS:-${SBATCH_ARGS:-}}"

# the config's task names, in config order (the same list probes.sbatch indexes)
mapfile -t TASKS < <("$PYTHON" -c 'import sys
from cpift_fast.pipeline.config import load_config
print("\n".join(load_config(sys.argv[1]).task_names))' "$CFG")
N=${#TASKS[@]}
if (( N == 0 )); then
  echo "submit.sh: $CFG has no tasks" >&2
  exit 1
fi
LAST=$((N - 1))
echo "submit.sh: $N tasks (${TASKS[*]}); run directory $RUNS"

run() {  # one cpift command as one job: run KIND [dependency]
  local kind=$1 dep=${2:-} args=("${GPU_ARGS[@]}")
  case $kind in core|group|fuse) args=("${CPU_ARGS[@]}") ;; esac
  sbatch --parsable "${args[@]}" --job-name "cpift-${kind:-report}" ${dep:+--dependency=$dep} \
    --wrap "$CPIFT run $(printf %q "$CFG") --runs-dir $(printf %q "$RUNS") --no-progress${kind:+ --stage $kind}"
}

jid=$(run base)
# the probes: one array task per task; each task's core as soon as its own probe is done (aftercorr)
jid=$(sbatch --parsable "${GPU_ARGS[@]}" --job-name cpift-probe --array=0-$LAST --dependency=afterok:$jid \
      "$HERE/probes.sbatch" "$CFG" "$RUNS" probe "${TASKS[@]}")
jid=$(sbatch --parsable "${CPU_ARGS[@]}" --job-name cpift-core --array=0-$LAST --dependency=aftercorr:$jid \
      "$HERE/probes.sbatch" "$CFG" "$RUNS" core "${TASKS[@]}")
for kind in core group stages fuse consolidate forgetting eval; do
  jid=$(run $kind afterok:$jid)
done
jid=$(run "" afterok:$jid)   # every stage reused: writes the report
echo "submit.sh: last job $jid writes the report"
