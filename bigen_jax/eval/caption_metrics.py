"""COCO caption metrics on raw captions: PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE.

The scorers are pycocoevalcap's, except CIDEr-D (``bigen_jax.eval.cider.CiderD``, equal and much faster).
``COCOEvalCap.evaluate`` is not used: it downloads the Stanford CoreNLP models for SPICE. The tokenizer,
METEOR and SPICE are Java programs; SPICE runs only when its CoreNLP jars are already installed.
"""

import os
import shutil

from absl import logging

from bigen_jax.eval import cider

SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _require_java() -> None:
  if shutil.which("java") is None:
    raise RuntimeError("pycocoevalcap needs Java (its PTB tokenizer, METEOR and SPICE are Java programs), "
                       "and no `java` is on PATH; install a JRE, e.g. `apt-get install default-jre-headless`")


def missing_spice_jar() -> str | None:
  """The path of the first Stanford CoreNLP jar SPICE needs that is not installed, or None."""
  from pycocoevalcap import spice  # pylint: disable=g-import-not-at-top
  lib = os.path.join(os.path.dirname(os.path.abspath(spice.__file__)), "lib")
  return next((os.path.join(lib, name) for name in SPICE_JARS if not os.path.exists(os.path.join(lib, name))),
              None)


def ptb_tokenize(captions: dict) -> dict[object, list[str]]:
  """image id -> raw captions → image id -> PTB-tokenised, lower-cased captions without punctuation."""
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top
  _require_java()
  return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def caption_metrics(gts: dict, res: dict, *, spice: bool = True) -> dict[str, float]:
  """Corpus scores of candidate captions against references, both raw (untokenised).

  gts: image id -> list of reference captions; res: image id -> [one candidate caption], same ids.
  Returns BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and, when its jars are installed and ``spice``, SPICE.
  """
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
  if gts.keys() != res.keys():
    raise ValueError("gts and res must have the same image ids")
  if any(len(c) != 1 for c in res.values()):
    raise ValueError("res must map each image id to a list holding one candidate")
  both = ptb_tokenize({**{("ref", k): v for k, v in gts.items()}, **{("cand", k): v for k, v in res.items()}})
  gts, res = {k: both["ref", k] for k in gts}, {k: both["cand", k] for k in res}  # one Java start, not two
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  out = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
  out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
  out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
  out["CIDEr-D"] = cider.CiderD().compute_score(gts, res)[0]
  missing = missing_spice_jar()
  if spice and missing is None:
    from pycocoevalcap.spice.spice import Spice  # pylint: disable=g-import-not-at-top
    out["SPICE"] = float(Spice().compute_score(gts, res)[0])
  elif spice:
    logging.warning("SPICE skipped: %s is missing (pycocoevalcap/spice/get_stanford_models.py downloads the "
                    "Stanford CoreNLP 3.6.0 jars)", missing)
  return out
