#!/usr/bin/env bash
# The offline LLM embedding job on several GPU hosts: N workers each embed a disjoint, deterministic set of
# shards (--num_workers/--worker_index), as a SLURM array, over ssh on a list of hosts, or as local
# processes; then one --verify pass checks that every study has exactly one record. --dry_run prints the
# commands without running them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/precompute.sh --num_workers=N (--slurm | --hosts=H1,H2,... | --local) [options] -- JOB_FLAGS...

  --num_workers     workers splitting the shards (required)
  --slurm           one SLURM array task per worker (a GPU each), then a --verify job after all succeed
  --hosts           ssh to these hosts (worker i on host i mod len(hosts)), wait for all, verify here
  --local           N processes on this machine (e.g. one per GPU with --gpus), wait, verify
  --gpus            local: GPU ids handed out round-robin as CUDA_VISIBLE_DEVICES (e.g. 0,1,2,3)
  --partition, --account, --time   SLURM options (time default 12:00:00)
  --remote_dir      hosts: the checkout on every host (default: this checkout's path)
  --python          interpreter (default: REPO/.venv/bin/python)
  --dry_run         print the commands, run nothing
  after --           flags of data_prep.precompute_text_embeddings; --output_dir is required and must be
                    storage every worker can write
USAGE
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKERS="" USE_SLURM=0 USE_LOCAL=0 HOSTS="" GPUS="" PARTITION="" ACCOUNT="" TIME="12:00:00" REMOTE_DIR="$ROOT"
PYTHON="$ROOT/.venv/bin/python" JOB_FLAGS=()
declare -A VALUE_FLAGS=([num_workers]=WORKERS [hosts]=HOSTS [gpus]=GPUS [partition]=PARTITION [account]=ACCOUNT [time]=TIME [remote_dir]=REMOTE_DIR [python]=PYTHON)
declare -A SWITCH_FLAGS=([slurm]=USE_SLURM [local]=USE_LOCAL)
parse_args "$@"
JOB_FLAGS=("${EXTRA[@]}")
need num_workers "$WORKERS"
positive_int num_workers "$WORKERS"
MODES=()
[[ $USE_SLURM == 1 ]] && MODES+=(slurm)
[[ -n $HOSTS ]] && MODES+=(hosts)
[[ $USE_LOCAL == 1 ]] && MODES+=(local)
[[ ${#MODES[@]} -gt 0 ]] || die "choose where the workers run: --slurm, --hosts=... or --local"
[[ ${#MODES[@]} -eq 1 ]] || die "choose one of --slurm, --hosts, --local"
MODE=${MODES[0]}
printf '%s\n' "${JOB_FLAGS[@]}" | grep -q -- '^--output_dir=.' || die "the job flags after -- need --output_dir=DIR"
for flag in "${JOB_FLAGS[@]}"; do
  case $flag in --num_workers*|--worker_index*|--verify*) die "$flag is set by this script" ;; esac
done
JOB=(-m data_prep.precompute_text_embeddings "${JOB_FLAGS[@]}")
PIDS=()
SPLIT=(--num_workers="$WORKERS")
spawn() {  # run "$@" in the background (in order, in the foreground, for a dry run); its pid joins PIDS
  if [[ $DRY_RUN == 1 ]]; then "$@"; else "$@" & PIDS+=($!); fi
}
wait_all() {
  local pid
  for pid in "${PIDS[@]}"; do
    wait "$pid" || { echo "a worker failed; rerun this command: finished shards are kept" >&2; exit 1; }
  done
}
job_line() {  # the job's command line as one shell string, for ssh and sbatch --wrap
  local line="$(quote "$PYTHON")" arg
  for arg in "${JOB[@]}" "$@"; do line+=" $(quote "$arg")"; done
  printf '%s' "$line"
}

case $MODE in
  slurm)
    OPTS=(--parsable --job-name=mvlp_jax_embed --time="$TIME")
    [[ -n $PARTITION ]] && OPTS+=(--partition="$PARTITION")
    [[ -n $ACCOUNT ]] && OPTS+=(--account="$ACCOUNT")
    WRAP="cd $(quote "$ROOT") && $(job_line "${SPLIT[@]}") --worker_index=\$SLURM_ARRAY_TASK_ID"
    if [[ $DRY_RUN == 1 ]]; then
      run sbatch "${OPTS[@]}" --array=0-$((WORKERS - 1)) --gpus-per-task=1 --wrap="$WRAP"
      ARRAY='$ARRAY_JOB_ID'
    else
      echo "+ sbatch ${OPTS[*]} --array=0-$((WORKERS - 1)) --gpus-per-task=1 --wrap=$(quote "$WRAP")"
      ARRAY=$(sbatch "${OPTS[@]}" --array=0-$((WORKERS - 1)) --gpus-per-task=1 --wrap="$WRAP")
      echo "array job $ARRAY"
    fi
    run sbatch "${OPTS[@]}" --dependency=afterok:"$ARRAY" --wrap="cd $(quote "$ROOT") && $(job_line --verify)"
    ;;
  hosts)
    IFS=, read -r -a HOST_LIST <<< "$HOSTS"
    [[ ${#HOST_LIST[@]} -gt 0 ]] || die "--hosts is empty"
    for ((i = 0; i < WORKERS; i++)); do
      host=${HOST_LIST[i % ${#HOST_LIST[@]}]}
      spawn run ssh "$host" "cd $(quote "$REMOTE_DIR") && $(job_line "${SPLIT[@]}" --worker_index=$i)"
    done
    wait_all
    run "$PYTHON" "${JOB[@]}" --verify
    ;;
  local)
    IFS=, read -r -a GPU_LIST <<< "$GPUS"
    cd "$ROOT"
    for ((i = 0; i < WORKERS; i++)); do
      ENV=()
      [[ ${#GPU_LIST[@]} -gt 0 ]] && ENV=(env CUDA_VISIBLE_DEVICES="${GPU_LIST[i % ${#GPU_LIST[@]}]}")
      spawn run "${ENV[@]}" "$PYTHON" "${JOB[@]}" "${SPLIT[@]}" --worker_index=$i
    done
    wait_all
    run "$PYTHON" "${JOB[@]}" --verify
    ;;
esac
