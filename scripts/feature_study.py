r"""How much of the scene survives the visual tokens: quantisation error and *reference* semantic accuracy
(true cluster ids -> preview drawing -> scene recogniser -> do the caption's claims hold?) per backbone and k.

  python scripts/feature_study.py --out demo_out --backbone scenes_detector --k 256,512,1024,2048
  python scripts/feature_study.py --out demo_out --backbone demo --k 256,1024

Reads the world and tokenizer that ``make demo`` wrote under ``--out``; writes records of the chosen backbone
to ``OUT/study/records_<backbone>``, one vocabulary per k beside them, and a markdown + JSON table to
``OUT/study/features_<backbone>.{md,json}``. Every step is cached: a second run only scores.
"""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", "demo_out", "The demo's output directory (world, tokenizer, recogniser).")
_BACKBONE = flags.DEFINE_enum("backbone", "scenes_detector", ["demo", "scenes_detector"], "Grid features.")
_K = flags.DEFINE_list("k", ["256", "512", "1024", "2048"], "Cluster counts to compare.")
_SPLIT = flags.DEFINE_string("split", "validation", "Split scored (tune on validation only).")
_SCENES = flags.DEFINE_string("scenes_config", "demo", "Captioned-scenes config of the world.")
_LAYER = flags.DEFINE_enum("layer", "fc6", ["fc6", "logits", "gated_logits"],
                           "scenes_detector: which layer's features.")
_EXACT_MIN_COUNT = flags.DEFINE_integer("exact_min_count", 0, "Vocabulary: feature vectors repeated at least this "
                                        "often get a code each (bigen_jax.data.vocab.train_codebook).")
_DETECTOR_STEPS = flags.DEFINE_integer("detector_steps", 0, "scenes_detector: training steps (0: the default).")
_DECODERS = flags.DEFINE_list("decoders", ["preview", "scene"], "Token decoders to score: preview (patches of "
                              "training cells), scene (the detector's heads + the world's renderer).")


def main(argv):
  del argv
  from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import records, tokenizer, vocab  # pylint: disable=g-import-not-at-top
  from bigen_jax.features import backbones, extract  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import preview  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import detector as scenes_detector  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import recognizer as scene_recognizer  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import scene_decoder  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import semantic as scene_semantic  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import tfds_builder as scenes_tfds  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(_OUT.value)
  study = os.path.join(out, "study")
  name = _BACKBONE.value + (f"{_DETECTOR_STEPS.value}" if _DETECTOR_STEPS.value else "") + (
      "" if _LAYER.value == "fc6" else f"_{_LAYER.value}")
  records_dir = os.path.join(study, f"records_{name}")
  tok_path = os.path.join(out, "tokenizer", "vocab.txt")
  tok = tokenizer.load_tokenizer(tok_path)
  weights = None
  if _BACKBONE.value == "scenes_detector":
    kwargs = {"steps": _DETECTOR_STEPS.value} if _DETECTOR_STEPS.value else {}
    weights, report = scenes_detector.load_or_train(os.path.join(out, "scenes_detector"), **kwargs)
    print("detector held-out:", report.get("heldout"), flush=True)
  backbone = backbones.build_backbone(_BACKBONE.value, weights=weights,
                                      **({"layer": _LAYER.value} if weights else {}))
  data_dir = os.path.join(out, "tfds")
  builder = scenes_tfds.builder(data_dir, config=_SCENES.value)
  for split in ("train", _SPLIT.value):
    extract.extract_split(scenes_tfds.source(split, data_dir=data_dir, config=_SCENES.value), split=split,
                          out_dir=records_dir, backbone=backbone, tokenizer=tok,
                          num_examples=builder.info.splits[split].num_examples, shard_size=500, batch_size=64,
                          store_images=True, source_info={"name": "scenes", "config": _SCENES.value},
                          vocab_path=tok_path, progress=False)
  recognizer, _ = scene_recognizer.load_or_train(os.path.join(out, "scene_recognizer"))
  batches = list(records.read_split(records_dir, _SPLIT.value, batch_size=256, fields=("dense", "captions")))
  dense = np.concatenate([b["dense"] for b in batches]).astype(np.float32)
  first_captions = [c[0].decode() for b in batches for c in b["captions"]]
  rows = []
  for k in [int(x) for x in _K.value]:
    t = time.time()
    exact = f"_exact{_EXACT_MIN_COUNT.value}" if _EXACT_MIN_COUNT.value else ""
    vocab_dir = os.path.join(study, f"vocab_{name}_k{k}{exact}")
    vocab.build_vocab(records_dir, vocab_dir, k=k, iterations=20, sample_size=64 * 2000, seed=0,
                      splits=("train", _SPLIT.value), exact_min_count=_EXACT_MIN_COUNT.value)
    v = vocab.load_vocab(vocab_dir, records_dir=records_dir)
    ids, _ = vocab.assign(dense.reshape(-1, dense.shape[-1]), v.codebook)
    with open(os.path.join(vocab_dir, "vocab.json")) as f:
      meta = json.load(f)
    for decoder in _DECODERS.value:
      if decoder == "preview":
        table = preview.load_or_build_patch_table(v, records_dir)
        drawn = preview.render_preview(ids.reshape(len(dense), -1), table)
      elif decoder == "scene" and weights:
        heads = scene_decoder.load_heads(weights + scene_decoder.HEADS_SUFFIX)
        attrs = scene_decoder.cluster_attributes(v.codebook, heads, layer=_LAYER.value)
        drawn = scene_decoder.render_scenes(ids.reshape(len(dense), -1), attrs)
      else:
        continue
      probs = scene_recognizer.predict(recognizer, drawn)
      semantic = scene_semantic.semantic_accuracy(probs, first_captions)
      row = {"backbone": _BACKBONE.value, "k": k, "decoder": decoder, "exact_codes": meta.get("exact_codes", 0),
             "relative_error_train": meta["splits"]["train"]["relative_error"],
             f"relative_error_{_SPLIT.value}": meta["splits"][_SPLIT.value]["relative_error"],
             "clusters_used": meta["splits"]["train"]["used_clusters"],
             "reference_semantic_accuracy": float(semantic["accuracy"]),
             **{f"reference_{k2}": float(v2) for k2, v2 in semantic.items() if k2 != "accuracy"},
             "seconds": round(time.time() - t, 1)}
      rows.append(row)
      print(json.dumps(row), flush=True)
  name += f"_exact{_EXACT_MIN_COUNT.value}" if _EXACT_MIN_COUNT.value else ""
  fileio.write_json_atomic(os.path.join(study, f"features_{name}.json"), rows)
  keys = ["k", "exact_codes", "decoder", "relative_error_train", f"relative_error_{_SPLIT.value}", "clusters_used",
          "reference_semantic_accuracy"]
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(f"{r[key]:.4f}" if isinstance(r[key], float) else str(r[key]) for key in keys) + " |"
            for r in rows]
  with open(os.path.join(study, f"features_{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
