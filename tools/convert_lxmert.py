r"""Converts a PyTorch LXMERT / X-LXMERT checkpoint into params of the Flax unified transformer.

  python tools/convert_lxmert.py --input snap/pretrained/x_lxmert/Epoch20_LXRT.pth \
      --output checkpoints/xlxmert_params --config configs/model.py:paper [--init_missing_heads] \
      --codebook_out checkpoints/xlxmert_centroids.npy --feature_extractor frcnn_vg

Input: .pth/.bin (torch.load, weights only) or .safetensors in Hugging Face ``LxmertModel`` /
``LxmertForPreTraining`` naming or the original LXMERT / X-LXMERT naming (``module.``, ``bert.``).
Output: an orbax checkpoint directory (``ocp.StandardCheckpointer``), or a ``.npz`` file when the path ends
in .npz; read either with ``bigen_jax.convert.io.load_params``. X-LXMERT's centroids (``vis_emb.weight``),
when present, are written to ``--codebook_out`` (.npy [K, D]: ``tools/build_vocab.py --codebook`` assigns the
records' cells to them). Beside the output, ``<output>.provenance.json`` records what the weights were trained on
(``--feature_extractor``, the feature width, K and the centroids' sha256; ``bigen_jax/convert/provenance.py``):
training with ``--config.init_from=<output>`` checks the records and the vocabulary against it. Unknown or
missing keys stop the conversion with one line that counts them (with examples) and names the input; so does
an input that is not a state dict.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "model.py:paper"),
                                          "Model config (configs/model.py:ARG).")
_INPUT = flags.DEFINE_string("input", None, "PyTorch state dict: .pth, .bin or .safetensors.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Orbax checkpoint directory, or a .npz file.", required=True)
_INIT_MISSING_HEADS = flags.DEFINE_bool("init_missing_heads", False,
                                        "Initialise head params absent from the checkpoint instead of failing.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of freshly initialised heads.")
_CODEBOOK_OUT = flags.DEFINE_string("codebook_out", None, "Where to save vis_emb.weight (.npy), if present.")
_FEATURE_EXTRACTOR = flags.DEFINE_string(
    "feature_extractor", "frcnn_vg", "The backbone whose features the checkpoint was trained on, as the records "
    "manifest names it ('backbone'); X-LXMERT: Visual Genome Faster R-CNN (frcnn_vg). Recorded in the provenance "
    "file and checked against --config.data.records_dir when training from these params.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import io  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import lxmert  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import provenance  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import vocab  # pylint: disable=g-import-not-at-top
  if not _FEATURE_EXTRACTOR.value:
    raise app.UsageError("--feature_extractor is empty: name the backbone whose features the checkpoint was "
                         "trained on (the records manifest's 'backbone', e.g. frcnn_vg)")
  config = _CONFIG.value
  state = io.load_state_dict(_INPUT.value)
  with io.naming_file(_INPUT.value):
    result = lxmert.convert(state, config, init_missing_heads=_INIT_MISSING_HEADS.value, seed=_SEED.value)
  provenance.remove_provenance(_OUTPUT.value)  # a conversion that fails from here on leaves none, not a stale one
  io.save_params(result.params, _OUTPUT.value)
  logging.info("converted %d tensors -> %s", len(state), _OUTPUT.value)
  if result.dropped:
    logging.info("dropped (no counterpart): %s", ", ".join(result.dropped))
  if result.initialised:
    logging.warning("freshly initialised: %s", ", ".join(result.initialised))
  codebook_file = None
  if result.codebook is not None and _CODEBOOK_OUT.value:
    codebook_file = _CODEBOOK_OUT.value
    vocab.save_npy(codebook_file, np.asarray(result.codebook, np.float32))
    logging.info("codebook %s -> %s", result.codebook.shape, codebook_file)
  elif result.codebook is not None:
    logging.warning("%s holds X-LXMERT's centroids (vis_emb.weight) but --codebook_out is not set: "
                    "tools/build_vocab.py --codebook needs them to build the vocabulary these params expect",
                    _INPUT.value)
  elif _CODEBOOK_OUT.value:
    logging.warning("--codebook_out=%s: %s has no centroids (vis_emb.weight); nothing written",
                    _CODEBOOK_OUT.value, _INPUT.value)
  record = provenance.write_provenance(
      _OUTPUT.value, converter="tools/convert_lxmert.py", source=_INPUT.value,
      feature_extractor=_FEATURE_EXTRACTOR.value, visual_feat_dim=config.visual_feat_dim,
      num_clusters=config.num_clusters, codebook=result.codebook, codebook_file=codebook_file)
  logging.info("provenance (feature_extractor %s, codebook sha256 %s) -> %s", record["feature_extractor"],
               record["codebook_sha256"], provenance.provenance_path(_OUTPUT.value))


if __name__ == "__main__":
  cli.run(main)
