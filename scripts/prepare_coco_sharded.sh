#!/usr/bin/env bash
# COCO (Karpathy splits) from raw images to TFRecord shards, manifest and visual vocabulary, with the feature
# extraction split across workers (hosts, or GPUs of one host).
#
#   scripts/prepare_coco_sharded.sh check                      # once: lists missing or unreadable images
#   WORKER=i NUM_WORKERS=W scripts/prepare_coco_sharded.sh extract    # on every worker, i = 0 .. W-1
#   scripts/prepare_coco_sharded.sh finish                     # once, after every worker has ended
#
# extract: worker i runs tools/extract_features.py once per split with --shards=$((i * S / W)):$(((i + 1) * S / W))
#   (the last worker: to the split's end), S = the split's shard count from SPLIT_IMAGES and SHARD_SIZE; a worker
#   whose range of a small split is empty leaves it out. With W = 1 it runs all splits whole in one command. Every
#   worker writes into the one OUT directory (manifest.json is merged under a file lock); the tool resumes, so an
#   interrupted worker is re-run as it was and keeps its finished shards. --shards needs the default
#   --on_bad_image=fail: run check first and fix (or remove) the images it lists.
# finish: runs the extraction once more over every split, which only verifies the finished shards (re-reading
#   them), writes any shard the ranges left out (if SPLIT_IMAGES was too small) and completes manifest.json, then
#   builds the 10,000-cluster vocabulary (tools/build_vocab.py) into OUT/vocab10k.
# OUT must be a filesystem every worker writes (local, NFS, Filestore; workers on several hosts need its file locks
# to reach across them, which a gcsfuse mount's do not): the tool writes with os-level file calls, not to gs://
# URLs; copy the result to a bucket afterwards (gsutil -m rsync -r OUT gs://...).
#
# Environment: IMAGES_DIR (COCO's train2014/ and val2014/ parent), ANNOTATIONS (captions_trainval2014.json),
# KARPATHY (dataset_coco.json), VOCAB (BERT's vocab.txt), OUT (required); WEIGHTS (Faster R-CNN state dict;
# without it the backbone is random: tests only); BACKBONE (default frcnn), SHORT_SIDE (default 800), DEVICE (default
# cuda:$LOCAL_GPU when LOCAL_GPU is set, else cuda), SPLITS (default "train validation test"), SPLIT_IMAGES (images
# per split, default "train=113287 validation=5000 test=5000", Karpathy's), SHARD_SIZE (records per shard, default
# 1000), PYTHON (default .venv/bin/python of this checkout, else python3); extra arguments go to
# tools/extract_features.py (e.g. --batch_size 16). DRY_RUN=1 prints the commands (one argument a line) instead of
# running them.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
read -r -a splits <<< "${SPLITS:-train validation test}"
shard_size=${SHARD_SIZE:-1000}

split_images() {  # the image count SPLIT_IMAGES gives split $1; nothing if none
  local pair
  for pair in ${SPLIT_IMAGES:-train=113287 validation=5000 test=5000}; do
    if [[ ${pair%%=*} == "$1" ]]; then
      echo "${pair#*=}"
    fi
  done
}

[[ $# -ge 1 ]] || usage
mode=$1
shift
: "${IMAGES_DIR:?set IMAGES_DIR, the folder of COCO images}"
: "${ANNOTATIONS:?set ANNOTATIONS, captions_trainval2014.json}"
: "${KARPATHY:?set KARPATHY, dataset_coco.json (the Karpathy splits)}"
source_args=(--source coco --annotations "$ANNOTATIONS" --images_dir "$IMAGES_DIR" --karpathy "$KARPATHY")

extract() {  # the splits given (comma-separated) into OUT; further arguments go to the tool
  local list=$1
  shift
  : "${OUT:?set OUT, the records directory every worker writes}"
  : "${VOCAB:?set VOCAB, the BERT WordPiece vocab.txt}"
  local backbone=(--backbone "${BACKBONE:-frcnn}" --short_side "${SHORT_SIDE:-800}")
  [[ -n "${WEIGHTS:-}" ]] && backbone+=(--weights "$WEIGHTS")
  run "$PYTHON" tools/extract_features.py "${source_args[@]}" --split "$list" "${backbone[@]}" \
      --device "${DEVICE:-cuda${LOCAL_GPU:+:$LOCAL_GPU}}" --vocab "$VOCAB" --out "$OUT" --store_images \
      --store_image_size 256 --shard_size "$shard_size" "$@" "${extra[@]}"
}

extra=("$@")
case "$mode" in
  check)
    run "$PYTHON" tools/extract_features.py "${source_args[@]}" --split "$(IFS=,; echo "${splits[*]}")" \
        --check_only "${extra[@]}"
    ;;
  extract)
    : "${WORKER:?set WORKER, the index of this worker, 0 .. NUM_WORKERS-1}"
    : "${NUM_WORKERS:?set NUM_WORKERS, the number of workers}"
    if (( NUM_WORKERS == 1 )); then
      extract "$(IFS=,; echo "${splits[*]}")"
      exit 0
    fi
    for split in "${splits[@]}"; do
      images=$(split_images "$split")
      [[ -n "$images" ]] || { echo "SPLIT_IMAGES gives no image count for split $split" >&2; exit 2; }
      num_shards=$(( (images + shard_size - 1) / shard_size ))
      start=$(( WORKER * num_shards / NUM_WORKERS ))
      end=$(( (WORKER + 1) * num_shards / NUM_WORKERS ))
      if (( WORKER == NUM_WORKERS - 1 )); then
        end=""  # to the split's end, whatever its true shard count
      elif (( start == end )); then
        continue
      fi
      extract "$split" --shards "$start:$end"
    done
    ;;
  finish)
    extract "$(IFS=,; echo "${splits[*]}")"
    run "$PYTHON" tools/build_vocab.py --records "$OUT" --out "$OUT/vocab10k" --k 10000
    ;;
  *)
    usage
    ;;
esac
