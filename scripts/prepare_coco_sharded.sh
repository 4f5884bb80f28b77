#!/usr/bin/env bash
# COCO (Karpathy splits) from raw images to TFRecord shards, manifest and visual vocabulary, with the feature
# extraction split across workers (hosts, or GPUs of one host).
#
#   scripts/prepare_coco_sharded.sh check                      # once: lists missing or unreadable images
#   WORKER=i NUM_WORKERS=W scripts/prepare_coco_sharded.sh extract    # on every worker, i = 0 .. W-1
#   scripts/prepare_coco_sharded.sh finish                     # once, after every worker has ended
#
# extract: worker i runs tools/extract_features.py on its disjoint share of the work units, unit j going to worker
#   j mod W. Today a unit is a split (train, validation, test: 113,287 / 5,000 / 5,000 images, so at most 3 workers
#   are busy and train's worker sets the pace): the tool cannot yet be told to write only a range of a split's
#   shards. Every worker writes into the one OUT directory; the tool resumes, so an interrupted worker is re-run
#   as it was and keeps its finished shards.
# finish: runs the extraction once more over every split, which only verifies the finished shards (re-reading
#   them) and completes manifest.json (concurrent workers rewrite it in turn, so one may have lost another's last
#   entry), then builds the 10,000-cluster vocabulary (tools/build_vocab.py) into OUT/vocab10k.
# OUT must be a filesystem every worker writes (local, NFS, Filestore, a gcsfuse mount): the tool writes with
# os-level file calls, not to gs:// URLs; copy the result to a bucket afterwards (gsutil -m rsync -r OUT gs://...).
#
# Environment: IMAGES_DIR (COCO's train2014/ and val2014/ parent), ANNOTATIONS (captions_trainval2014.json),
# KARPATHY (dataset_coco.json), VOCAB (BERT's vocab.txt), OUT (required); WEIGHTS (Faster R-CNN state dict;
# without it the backbone is random: tests only); BACKBONE (default frcnn), SHORT_SIDE (default 800), DEVICE (default
# cuda:$LOCAL_GPU when LOCAL_GPU is set, else cuda), SPLITS (default "train validation test"), PYTHON (default
# .venv/bin/python of this checkout, else python3); extra arguments go to tools/extract_features.py (e.g.
# --batch_size 16). DRY_RUN=1 prints the commands (one argument a line) instead of running them.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
read -r -a splits <<< "${SPLITS:-train validation test}"

[[ $# -ge 1 ]] || usage
mode=$1
shift
: "${IMAGES_DIR:?set IMAGES_DIR, the folder of COCO images}"
: "${ANNOTATIONS:?set ANNOTATIONS, captions_trainval2014.json}"
: "${KARPATHY:?set KARPATHY, dataset_coco.json (the Karpathy splits)}"
source_args=(--source coco --annotations "$ANNOTATIONS" --images_dir "$IMAGES_DIR" --karpathy "$KARPATHY")

extract() {  # the splits given, into OUT
  local list
  list=$(IFS=,; echo "$*")
  : "${OUT:?set OUT, the records directory every worker writes}"
  : "${VOCAB:?set VOCAB, the BERT WordPiece vocab.txt}"
  local backbone=(--backbone "${BACKBONE:-frcnn}" --short_side "${SHORT_SIDE:-800}")
  [[ -n "${WEIGHTS:-}" ]] && backbone+=(--weights "$WEIGHTS")
  run "$PYTHON" tools/extract_features.py "${source_args[@]}" --split "$list" "${backbone[@]}" \
      --device "${DEVICE:-cuda${LOCAL_GPU:+:$LOCAL_GPU}}" --vocab "$VOCAB" --out "$OUT" --store_images \
      --store_image_size 256 "${extra[@]}"
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
    mine=()
    for j in "${!splits[@]}"; do
      if (( j % NUM_WORKERS == WORKER )); then
        mine+=("${splits[j]}")
      fi
    done
    if [[ ${#mine[@]} -eq 0 ]]; then
      echo "worker $WORKER of $NUM_WORKERS: no split left for this worker (${#splits[@]} splits)" >&2
      exit 0
    fi
    extract "${mine[@]}"
    ;;
  finish)
    extract "${splits[@]}"
    run "$PYTHON" tools/build_vocab.py --records "$OUT" --out "$OUT/vocab10k" --k 10000
    ;;
  *)
    usage
    ;;
esac
