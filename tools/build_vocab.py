r"""Builds the visual vocabulary: FAISS k-means over grid-cell features, cluster id of every cell.

  python tools/build_vocab.py --records data/coco_frcnn --out data/coco_frcnn/vocab10k \
      --k 10000 --iterations 20 --sample_size 2600000 --seed 0
  python tools/build_vocab.py --records data/coco_vg --out data/coco_vg/vocab_xlxmert --codebook xlxmert_centroids.npy

Writes codebook.npy [K, D], cluster_ids_{split}.npy [n, 64] and vocab.json (see bigen_jax/data/vocab.py),
and prints the quantisation error of every split. Re-running with the same settings does nothing. With
``--codebook`` (a .npy [K, D], e.g. tools/convert_lxmert.py --codebook_out) no k-means runs: every cell is
assigned to those centroids, which a checkpoint converted with them needs (--config.init_from checks it).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_RECORDS = flags.DEFINE_string("records", None, "Records directory (tools/extract_features.py --out).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory of the vocabulary.", required=True)
_K = flags.DEFINE_integer("k", 10000, "Number of clusters (10,000 in the papers).")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "k-means iterations.")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", 2_600_000, "Training cells sampled for k-means.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the cell sample and of k-means.")
_EXACT_MIN_COUNT = flags.DEFINE_integer(
    "exact_min_count", 0, "Feature vectors repeated at least this often in the sample get a code each; k-means "
    "fits the rest (0: off). For backbones that write one canonical vector per class of cells, such as "
    "scenes_detector's gated_logits.")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to assign (default: all in the manifest).")
_CODEBOOK = flags.DEFINE_string(
    "codebook", None, "Imported codebook (.npy [K, D], e.g. tools/convert_lxmert.py --codebook_out): assign every "
    "cell to it instead of training k-means.")
_KMEANS_FLAGS = (_K, _ITERATIONS, _SAMPLE_SIZE, _SEED, _EXACT_MIN_COUNT)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigen_jax.data import vocab  # pylint: disable=g-import-not-at-top
  if _CODEBOOK.value:
    given = [f"--{f.name}" for f in _KMEANS_FLAGS if f.present]
    if given:
      raise app.UsageError(f"{', '.join(given)} set k-means, which --codebook={_CODEBOOK.value} replaces: "
                           "drop them (K is the codebook's)")
    vocab.import_vocab(_RECORDS.value, _OUT.value, _CODEBOOK.value, splits=_SPLITS.value)
    return
  vocab.build_vocab(_RECORDS.value, _OUT.value, k=_K.value, iterations=_ITERATIONS.value,
                    sample_size=_SAMPLE_SIZE.value, seed=_SEED.value, splits=_SPLITS.value,
                    exact_min_count=_EXACT_MIN_COUNT.value)


if __name__ == "__main__":
  cli.run(main)
