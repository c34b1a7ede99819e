#!/usr/bin/env bash
# Pretrain on a SLURM GPU cluster: writes an sbatch script (N nodes x G GPUs, one process per GPU or per
# node) that runs the main binary under srun, and submits it. Every task finds its peers from SLURM's
# variables (mvlp_jax/runtime/distributed.py), so the binary takes no JAX flags. --dry_run prints the script and
# the sbatch command without submitting.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/gpu_slurm.sh --nodes=N --gpus_per_node=G --config=CONFIG --workdir=DIR [options] [-- MAIN_FLAGS...]

  --nodes, --gpus_per_node   the allocation (required)
  --per                      gpu (one process per GPU, default) or node (one process sees all its node's GPUs)
  --config, --workdir        as for python -m mvlp_jax.main; the workdir on storage every node sees (required)
  --partition, --account     SLURM partition and account (optional)
  --time                     wall-time limit (default 24:00:00); preempted or timed-out jobs resume from checkpoints
  --cpus_per_gpu             CPU cores per GPU for the input pipeline (default 8)
  --job_name                 (default mvlp_jax)
  --venv                     Python environment with mvlp_jax and jax[cuda12] installed (default: REPO/.venv)
  --script                   where the sbatch script is written (default: WORKDIR/slurm/pretrain.sbatch)
  --dry_run                  print the script and the sbatch command, submit nothing
  after --                   extra flags for mvlp_jax.main
USAGE
}

NODES="" GPUS="" PER="gpu" CONFIG="" WORKDIR="" PARTITION="" ACCOUNT="" TIME="24:00:00" CPUS=8 JOB="mvlp_jax"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv" SCRIPT="" EXTRA=()
declare -A VALUE_FLAGS=([nodes]=NODES [gpus_per_node]=GPUS [per]=PER [config]=CONFIG [workdir]=WORKDIR [partition]=PARTITION [account]=ACCOUNT [time]=TIME [cpus_per_gpu]=CPUS [job_name]=JOB [venv]=VENV [script]=SCRIPT)
declare -A SWITCH_FLAGS=()
parse_args "$@"
need nodes "$NODES"
need gpus_per_node "$GPUS"
need config "$CONFIG"
need workdir "$WORKDIR"
positive_int nodes "$NODES"
positive_int gpus_per_node "$GPUS"
positive_int cpus_per_gpu "$CPUS"
case $PER in
  gpu) TASKS=$GPUS; CPUS_PER_TASK=$CPUS; DEVICES="" ;;
  node) TASKS=1; CPUS_PER_TASK=$((CPUS * GPUS)); DEVICES=$(seq -s, 0 $((GPUS - 1))) ;;
  *) die "--per must be gpu or node, got '$PER'" ;;
esac
SCRIPT=${SCRIPT:-$WORKDIR/slurm/pretrain.sbatch}
# Values written into #SBATCH lines cannot be quoted there: they must be single plain words.
for pair in "job_name:$JOB" "time:$TIME" "partition:$PARTITION" "account:$ACCOUNT"; do
  [[ ${pair#*:} =~ ^[A-Za-z0-9_.:,@+=-]*$ ]] || die "--${pair%%:*} must be one word of letters, digits and _.:,@+=-"
done
[[ $WORKDIR != *$'\n'* && $WORKDIR != *' '* ]] || die "--workdir must not contain spaces or newlines (SLURM's --output)"

MAIN="$(quote "$VENV/bin/python") -m mvlp_jax.main --config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR")"
for flag in "${EXTRA[@]}"; do MAIN+=" $(quote "$flag")"; done
{
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$JOB"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  echo "#SBATCH --time=$TIME"
  echo "#SBATCH --signal=TERM@120"
  echo "#SBATCH --requeue"
  echo "#SBATCH --output=$WORKDIR/slurm/%j.log"
  [[ -n $PARTITION ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n $ACCOUNT ]] && echo "#SBATCH --account=$ACCOUNT"
  echo "# One task per $PER; each finds its peers from SLURM_* (mvlp_jax/runtime/distributed.py). SIGTERM 120 s"
  echo "# before the limit: the run saves a checkpoint and exits 0. A preempted job is requeued and resumes;"
  echo "# a timed-out one resumes when this script is submitted again."
  echo "set -euo pipefail"
  echo "cd $(quote "$ROOT")"
  [[ -n $DEVICES ]] && echo "export JAX_LOCAL_DEVICE_IDS=$DEVICES"
  echo "srun --kill-on-bad-exit=1 $MAIN"
} > /tmp/mvlp_jax_sbatch.$$
if [[ $DRY_RUN == 1 ]]; then
  echo "# $SCRIPT"
  cat /tmp/mvlp_jax_sbatch.$$
else
  mkdir -p "$(dirname "$SCRIPT")" "$WORKDIR/slurm"
  mv /tmp/mvlp_jax_sbatch.$$ "$SCRIPT"
fi
rm -f /tmp/mvlp_jax_sbatch.$$
run sbatch "$SCRIPT"
