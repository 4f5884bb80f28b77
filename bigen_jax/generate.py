r"""Pictures of captions and captions of pictures from an export bundle (``bigen_jax.export``).

  python -m bigen_jax.generate --bundle demo_out/bundle --text "a red circle" --out circle.png
  python -m bigen_jax.generate --bundle B --text "..." --text "..." --out x.png [--steps 8 --seed 1 --guidance 4]
  python -m bigen_jax.generate --bundle B --image photo.png [--image other.jpg] [--decoder beam]

One ``--text`` writes ``--out``; several write ``<out stem>_<i><suffix>`` (x_0.png, x_1.png, ...); each path
written is printed. Each ``--image`` prints its caption, one line per image in order. Drawing and captioning are
``bigen_jax.pipeline.Pipeline``'s (the bundled generator, or the preview decoder in a bundle without one). User
errors (a missing or corrupt bundle or image, a bad option) print one line and exit with status 2 (``cli.run``).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_BUNDLE = flags.DEFINE_string("bundle", None, "The bundle directory (python -m bigen_jax.export).", required=True)
_TEXT = flags.DEFINE_multi_string("text", [], "A caption to draw (repeatable).")
_IMAGE = flags.DEFINE_multi_string("image", [], "An image file to caption (repeatable).")
_OUT = flags.DEFINE_string("out", "generated.png", "The PNG of one --text; several: <stem>_<i><suffix>.")
_STEPS = flags.DEFINE_integer("steps", None, "T2I decoding passes (default: the run's eval.generation.num_steps).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the decoding and the generator's noise.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance weight (default: the run's).")
_ORDER = flags.DEFINE_string("order", None, "Image-token decoder: mask_predict, maskgit, ... (default: the run's).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature of the tokens (default: the run's).")
_DECODER = flags.DEFINE_string("decoder", None, "Caption decoder: greedy, beam, sample (default: the run's).")


def output_paths(out: str, count: int) -> list[str]:
  """``[out]`` for one picture; ``<stem>_<i><suffix>`` of ``out`` for several."""
  if count == 1:
    return [out]
  stem, suffix = os.path.splitext(out)
  return [f"{stem}_{i}{suffix or '.png'}" for i in range(count)]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TEXT.value and not _IMAGE.value:
    raise app.UsageError("nothing to do: give --text (captions to draw) and/or --image (pictures to caption)")
  from bigen_jax import pipeline  # pylint: disable=g-import-not-at-top
  from bigen_jax import viz  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import images  # pylint: disable=g-import-not-at-top
  pipe = pipeline.Pipeline.load(_BUNDLE.value)
  if _IMAGE.value:
    pictures = [images.decode_image(path) for path in _IMAGE.value]
    for caption in pipe.caption(pictures, _DECODER.value):
      print(caption)
  if _TEXT.value:
    drawn = pipe.generate(_TEXT.value, steps=_STEPS.value, seed=_SEED.value, guidance=_GUIDANCE.value,
                          order=_ORDER.value, temperature=_TEMPERATURE.value)
    for picture, path in zip(drawn, output_paths(_OUT.value, len(drawn))):
      print(viz.save_png(picture, path))


if __name__ == "__main__":
  cli.run(main)
