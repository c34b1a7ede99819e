#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice: create (or reuse) it, ship the code, install on every worker, run the
# main binary on all workers at once (jax.distributed starts itself on a TPU VM), stream the logs, and tear
# the slice down when asked. --dry_run prints every command without running any.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --config=CONFIG --workdir=gs://BUCKET/DIR [options] [-- MAIN_FLAGS...]

  --name, --zone          TPU VM slice name and zone (required)
  --accelerator_type      e.g. v4-32, v5litepod-64 (default v4-32)
  --version               TPU VM runtime (default tpu-ubuntu2204-base)
  --project               gcloud project (default: gcloud's configured one)
  --spot                  spot capacity (cheaper, preemptible: the run resumes from its checkpoints)
  --queued                request through a queued resource and wait until it is ACTIVE
  --config                e.g. configs/pretrain.py (required to run)
  --workdir               checkpoints + TensorBoard; a gs:// path so every worker sees it (required to run)
  --repo                  git URL to clone on the workers (default: ship this checkout's HEAD with scp)
  --jax_version           jax[tpu] version installed (default 0.10.2, the project's pin)
  --delete                delete the slice after the run
  --delete_only           only delete the slice
  --dry_run               print the commands, run nothing
  after --                extra flags for mvlp_jax.main, e.g. --config.data.batch_size=4096
USAGE
}

NAME="" ZONE="" TYPE="v4-32" VERSION="tpu-ubuntu2204-base" PROJECT="" SPOT=0 QUEUED=0 CONFIG="" WORKDIR=""
REPO_URL="" JAX_VERSION="0.10.2" DELETE=0 DELETE_ONLY=0 EXTRA=()
declare -A VALUE_FLAGS=([name]=NAME [zone]=ZONE [accelerator_type]=TYPE [version]=VERSION [project]=PROJECT [config]=CONFIG [workdir]=WORKDIR [repo]=REPO_URL [jax_version]=JAX_VERSION)
declare -A SWITCH_FLAGS=([spot]=SPOT [queued]=QUEUED [delete]=DELETE [delete_only]=DELETE_ONLY)
parse_args "$@"
need name "$NAME"
need zone "$ZONE"
[[ $TYPE =~ ^v[0-9]+[a-z]*(pod)?-[0-9]+$ ]] || die "--accelerator_type '$TYPE' is not like v4-32 or v5litepod-64"
GCLOUD=(gcloud compute tpus)
LOC=("--zone=$ZONE")
[[ -n $PROJECT ]] && LOC+=("--project=$PROJECT")

delete_slice() {
  if [[ $QUEUED == 1 ]]; then
    run "${GCLOUD[@]}" queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run "${GCLOUD[@]}" tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}
if [[ $DELETE_ONLY == 1 ]]; then delete_slice; exit 0; fi
need config "$CONFIG"
need workdir "$WORKDIR"
[[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path that every worker can write, got '$WORKDIR'"

# 1. The slice: reuse it when it exists.
if [[ $DRY_RUN == 1 ]] || ! "${GCLOUD[@]}" tpu-vm describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  [[ $DRY_RUN == 1 ]] && echo "# (creates the slice only if 'gcloud compute tpus tpu-vm describe $NAME' fails)"
  CAPACITY=()
  [[ $SPOT == 1 ]] && CAPACITY=(--spot)
  if [[ $QUEUED == 1 ]]; then
    run "${GCLOUD[@]}" queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" "${CAPACITY[@]}"
    echo "# waiting for the queued resource to become ACTIVE"
    if [[ $DRY_RUN == 0 ]]; then
      until [[ $("${GCLOUD[@]}" queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)') == ACTIVE ]]; do
        sleep 30
      done
    fi
  else
    run "${GCLOUD[@]}" tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION" \
      "${CAPACITY[@]}"
  fi
fi
ALL=("$NAME" "${LOC[@]}" --worker=all)

# 2. The code on every worker: a clone, or this checkout's HEAD as a tarball.
if [[ -n $REPO_URL ]]; then
  run "${GCLOUD[@]}" tpu-vm ssh "${ALL[@]}" --command="rm -rf ~/mvlp_jax && git clone --depth=1 $(quote "$REPO_URL") ~/mvlp_jax"
else
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  TARBALL=/tmp/mvlp_jax-$NAME.tar.gz
  run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
  run "${GCLOUD[@]}" tpu-vm scp "$TARBALL" "$NAME:mvlp_jax.tar.gz" "${LOC[@]}" --worker=all
  run "${GCLOUD[@]}" tpu-vm ssh "${ALL[@]}" \
    --command="rm -rf ~/mvlp_jax && mkdir -p ~/mvlp_jax && tar -xzf ~/mvlp_jax.tar.gz -C ~/mvlp_jax"
fi

# 3. Install: Python 3.11, the core package (no torch: workers train) and jax for TPU.
INSTALL="cd ~/mvlp_jax && (command -v python3.11 || (sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv))"
INSTALL+=" && python3.11 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
INSTALL+=" && .venv/bin/pip install -q -e . $(quote "jax[tpu]==$JAX_VERSION")"
run "${GCLOUD[@]}" tpu-vm ssh "${ALL[@]}" --command="$INSTALL"

# 4. Train on all workers at once; gcloud streams every worker's output (also kept in ~/mvlp_jax/train.log).
# Every user value is quoted: the remote shell sees it as one word, never as code.
MAIN="cd ~/mvlp_jax && .venv/bin/python -m mvlp_jax.main --config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR")"
for flag in "${EXTRA[@]}"; do MAIN+=" $(quote "$flag")"; done
run "${GCLOUD[@]}" tpu-vm ssh "${ALL[@]}" --command="$MAIN 2>&1 | tee -a ~/mvlp_jax/train.log"

# 5. Tear down when asked.
if [[ $DELETE == 1 ]]; then delete_slice; fi
