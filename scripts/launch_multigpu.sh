#!/usr/bin/env bash
# Stage 1 on GPUs: one host with several GPUs, or several hosts.
#
#   WORKDIR=runs/coco scripts/launch_multigpu.sh local [--config.<field>=value ...]
#   WORKDIR=/shared/runs/coco NUM_HOSTS=4 HOST_INDEX=i COORDINATOR=host0:29500 scripts/launch_multigpu.sh host [...]
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
#       --wrap "WORKDIR=/shared/runs/coco scripts/launch_multigpu.sh slurm [...]"
#
# local: one process sees every GPU of this host (CUDA_VISIBLE_DEVICES picks some); the mesh comes from the
#   config (configs/coco.py: params and optimizer state sharded over all of them, fsdp).
# host: run it on every host, HOST_INDEX = 0 .. NUM_HOSTS-1 (by hand, pdsh, or your scheduler); one process per
#   host sees that host's GPUs; process 0 serves the coordinator at COORDINATOR (its address and a free port,
#   reachable from every host): --config.distributed.{num_processes,process_id,coordinator_address}.
# slurm: inside an allocation with one task per node: srun starts one process per node, and
#   jax.distributed.initialize() reads SLURM's variables (--config.distributed.auto=True). JAX's SLURM default
#   gives each process one GPU; JAX_LOCAL_DEVICE_IDS gives it every GPU of its node (GPUS_PER_NODE, default
#   SLURM_GPUS_ON_NODE).
# With several hosts, WORKDIR and the data paths must be on storage every host reads (gs:// URLs or a shared
# filesystem): each process writes its part of every checkpoint into WORKDIR and reads its 1/P of the records.
#
# The command runs in this checkout's root: relative paths (WORKDIR, CONFIG, data) are relative to it.
# Environment: WORKDIR (required); CONFIG (default configs/coco.py); PYTHON (default .venv/bin/python of this
# checkout, else python3); DRY_RUN=1 prints the command (one argument a line) instead of running it.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
CONFIG=${CONFIG:-configs/coco.py}

[[ $# -ge 1 ]] || usage
mode=$1
shift
: "${WORKDIR:?set WORKDIR, the run directory (checkpoints, metrics)}"
train=("$PYTHON" -m bigen_jax.main --config "$CONFIG" --workdir "$WORKDIR")

case "$mode" in
  local)
    run_exec "${train[@]}" "$@"
    ;;
  host)
    : "${NUM_HOSTS:?set NUM_HOSTS, the number of hosts (one process each)}"
    : "${HOST_INDEX:?set HOST_INDEX, the index of this host, 0 .. NUM_HOSTS-1}"
    : "${COORDINATOR:?set COORDINATOR, host:port of process 0}"
    run_exec "${train[@]}" --config.distributed.num_processes="$NUM_HOSTS" \
        --config.distributed.process_id="$HOST_INDEX" --config.distributed.coordinator_address="$COORDINATOR" "$@"
    ;;
  slurm)
    gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    : "${gpus:?set GPUS_PER_NODE (SLURM_GPUS_ON_NODE is not set: allocate with --gpus-per-node)}"
    run_exec srun --ntasks-per-node=1 env JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))" \
        "${train[@]}" --config.distributed.auto=True "$@"
    ;;
  *)
    usage
    ;;
esac
