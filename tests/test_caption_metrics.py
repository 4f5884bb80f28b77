"""caption_metrics: PTB tokenisation then pycocoevalcap's scorers (CIDEr-D from bigen_jax.eval.cider) give
the same numbers as calling the scorers directly; SPICE is skipped with a notice when its jars are missing;
a clear error without Java."""

import logging
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from bigen_jax.eval import caption_metrics as metrics

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

GTS = {
    7: ["A man riding a horse on the beach.", "A person rides a brown horse along the shore!",
        "Man on horseback, near the ocean."],
    "b": ["Two dogs play with a frisbee in the park.", "A pair of dogs playing in the grass.",
          "Dogs chasing a red Frisbee on a lawn."],
    3: ["A plate of food with broccoli and rice.", "Rice, chicken and broccoli on a white plate."],
}
RES = {7: ["A man rides a horse on the beach."], "b": ["Two dogs playing with a frisbee."],
       3: ["A white plate with rice and broccoli."]}


@needs_java
def test_matches_the_scorers_and_skips_spice(caplog, monkeypatch):
  meteor = Meteor()  # its Java process takes seconds to load; both sides share it
  monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", lambda: meteor)
  with caplog.at_level(logging.WARNING):
    got = metrics.caption_metrics(GTS, RES)
  gts, res = metrics.ptb_tokenize(GTS), metrics.ptb_tokenize(RES)
  assert gts[7][0] == "a man riding a horse on the beach" and res["b"] == ["two dogs playing with a frisbee"]
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  want = {f"BLEU-{i + 1}": b for i, b in enumerate(bleu)}
  want["METEOR"] = meteor.compute_score(gts, res)[0]
  want["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
  want["CIDEr-D"] = Cider().compute_score(gts, res)[0]
  missing = metrics.missing_spice_jar()
  assert set(got) == set(want) | ({"SPICE"} if missing is None else set())
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-9), key
  if missing is not None:
    assert any("SPICE skipped" in r.getMessage() and missing in r.getMessage() for r in caplog.records)


def test_clear_error_without_java(monkeypatch):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="pycocoevalcap needs Java"):
    metrics.caption_metrics(GTS, RES)
