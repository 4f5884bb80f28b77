r"""Trains the captioned-scenes world's scene recogniser once, the reader of the `generation` evaluator.

  python tools/train_scene_recognizer.py --out demo_out/scene_recognizer

Writes ``scene_recognizer_<settings>.msgpack`` (params and the training report) into ``--out``, the directory
``--config.eval.generation.recognizer_dir`` names (``bigen_jax/worlds/scenes/recognizer.py``: about 3 minutes
on 2 CPU cores), and prints its held-out accuracy. Re-running finds the file and trains nothing.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Directory of the recogniser (config.eval.generation.recognizer_dir).",
                           required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigen_jax.worlds.scenes import recognizer  # pylint: disable=g-import-not-at-top
  _, report = recognizer.load_or_train(_OUT.value)
  print(json.dumps({"path": recognizer.recognizer_path(_OUT.value), "heldout": report.get("heldout")}, indent=2))


if __name__ == "__main__":
  cli.run(main)
