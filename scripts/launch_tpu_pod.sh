#!/usr/bin/env bash
# Stage 1 on a Cloud TPU VM pod slice: every worker (host) runs the same command.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b scripts/launch_tpu_pod.sh setup
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://bucket/runs/coco scripts/launch_tpu_pod.sh train \
#       --config.data.records_dir=gs://bucket/coco_frcnn --config.data.vocab_dir=gs://bucket/coco_frcnn/vocab10k \
#       --config.data.tokenizer=gs://bucket/bert-base-uncased-vocab.txt
#
# setup: copies this checkout's tracked files to ~/bigen_jax on every worker and installs it with JAX's TPU build
# into ~/bigen_jax/.venv. train: runs `python -m bigen_jax.main --config $CONFIG --workdir $WORKDIR
# --config.distributed.auto=True [overrides]` on every worker at once (`--worker=all`); jax.distributed.initialize()
# finds the pod's hosts itself, the mesh comes from the config (configs/coco.py: fsdp over every chip of the slice)
# and each host feeds its share of the global batch. WORKDIR and every data path must be gs:// URLs (or a
# filesystem all workers share): every host writes its part of each checkpoint there. Re-running the same
# command resumes from the newest checkpoint; a preempted slice writes one at the next step (SIGTERM).
#
# Environment: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); WORKDIR (train, required); CONFIG (default
# configs/coco.py); REMOTE_DIR (default bigen_jax, relative to the workers' home); DETACH=1 runs training in the
# background on each worker (log: REMOTE_DIR/train.log) and returns; DRY_RUN=1 prints the gcloud commands (one
# argument a line) instead of running them.
set -euo pipefail

CONFIG=${CONFIG:-configs/coco.py}
REMOTE_DIR=${REMOTE_DIR:-bigen_jax}
JAX_VERSION=0.10.2  # pyproject.toml's pin

source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

[[ $# -ge 1 ]] || usage
mode=$1
shift
: "${TPU_NAME:?set TPU_NAME, the name of the TPU VM}"
: "${ZONE:?set ZONE, the zone of the TPU VM}"
gcloud_args=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")

case "$mode" in
  setup)
    [[ $# -eq 0 ]] || usage
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    git -C "$repo" ls-files -z | tar -C "$repo" --null -T - -czf "$archive"
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:bigen_jax.tar.gz" --worker=all "${gcloud_args[@]}"
    install="mkdir -p $REMOTE_DIR && tar -xzf bigen_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR"
    install+=" && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
    install+=" && .venv/bin/pip install -q -e . 'jax[tpu]==$JAX_VERSION'"
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_args[@]}" --command="$install"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR, the run directory (gs://bucket/path: every worker writes there)}"
    train="cd $(printf '%q' "$REMOTE_DIR") && .venv/bin/python -m bigen_jax.main"
    train+=$(printf ' %q' --config "$CONFIG" --workdir "$WORKDIR" --config.distributed.auto=True "$@")
    if [[ "${DETACH:-0}" == 1 ]]; then
      train="nohup bash -c $(printf '%q' "$train") > $REMOTE_DIR/train.log 2>&1 < /dev/null &"
    fi
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_args[@]}" --command="$train"
    ;;
  *)
    usage
    ;;
esac
