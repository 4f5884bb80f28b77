"""TFDS builder of the captioned-scenes world: generated offline, no downloads, examples in index order.

Configs: the named datasets of ``world.DATASETS``: ``demo`` (2000/250/250 at 128 px), ``tiny`` (64/16/16 at
64 px, for tests), ``large`` (50000/5000/5000 at 128 px); ``builder(data_dir, config, **overrides)`` makes a
custom one. The class is not entered in TFDS's global registry (``skip_registration``), so importing this module
twice is harmless; reach it through ``builder`` rather than ``tfds.builder("captioned_scenes")``. ``source``
reads a prepared split in the source-dict format of docs/data_interfaces.md.

The one module of the world that imports TensorFlow (through TFDS); nothing else in the world imports it.
"""

import dataclasses
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from bigen_jax.worlds.scenes import qa
from bigen_jax.worlds.scenes import world


@dataclasses.dataclass
class CaptionedScenesConfig(tfds.core.BuilderConfig):
  """A prepared variant: its name and its split sizes and scene settings (``world.DatasetConfig``)."""
  dataset: world.DatasetConfig = world.DatasetConfig()


CONFIGS = tuple(CaptionedScenesConfig(name=name, description=d.description, dataset=d)
                for name, d in world.DATASETS.items())


class CaptionedScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Procedurally generated captioned scenes with scene graphs, hard negatives and QA pairs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = list(CONFIGS)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.dataset.image_size
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(size, size, 3)),
        "image_id": tfds.features.Scalar(dtype=np.int64),
        "key": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "scene_graph": tfds.features.Text(),
        "hard_negatives": tfds.features.Sequence({"caption": tfds.features.Text(),
                                                  "category": tfds.features.Text(),
                                                  "negative": tfds.features.Text()}),
        "questions": tfds.features.Sequence({"question": tfds.features.Text(),
                                             "answer": tfds.features.Text()}),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n", 1)[0], features=features, disable_shuffling=True,
        supervised_keys=None)

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # nothing to download
    sizes = self.builder_config.dataset.split_sizes()
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config.dataset.scene_config()
    for index in range(num):
      ex = world.make_example(index, cfg, split=split)
      yield index, {"image": ex["image"], "image_id": ex["image_id"], "key": ex["key"],
                    "captions": ex["captions"], "scene_graph": ex["scene_graph"],
                    "hard_negatives": ex["hard_negatives"], "questions": ex["qa"]}


def _custom_name(base: str, overrides: dict[str, Any]) -> str:
  return "-".join([base] + [f"{k}{v}" for k, v in sorted(overrides.items())])


def builder(data_dir: str, config: str | CaptionedScenesConfig = "demo", **overrides) -> CaptionedScenes:
  """The builder of a named config, or of a custom one: ``builder(d, "tiny", num_train=10)``.

  Overrides are fields of ``world.DatasetConfig``; the custom config's name lists them (``tiny-num_train10``),
  so differently sized variants live side by side under ``data_dir/captioned_scenes/``.
  """
  if isinstance(config, str):
    if config not in CaptionedScenes.builder_configs:
      raise ValueError(f"unknown captioned_scenes config {config!r}; expected one of "
                       f"{sorted(CaptionedScenes.builder_configs)} or a CaptionedScenesConfig")
    config = CaptionedScenes.builder_configs[config]
  if overrides:
    fields = {f.name for f in dataclasses.fields(world.DatasetConfig)} - {"description"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"unknown captioned_scenes dataset field(s) {unknown}; expected some of {sorted(fields)}")
    config = dataclasses.replace(config, name=_custom_name(config.name, overrides),
                                 dataset=dataclasses.replace(config.dataset, **overrides))
  return CaptionedScenes(data_dir=data_dir, config=config)


def prepare(b: CaptionedScenes) -> None:
  """Generates the dataset unless it is already there; never touches the network."""
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def as_numpy(b: CaptionedScenes, split: str) -> Iterator[dict[str, Any]]:
  """The split's examples as numpy dicts, in index order."""
  ds = b.as_dataset(split=split, shuffle_files=False,
                    read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
  return iter(tfds.as_numpy(ds))


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _rows(seq: dict[str, Any], fields: tuple[str, ...]) -> list[dict[str, str]]:
  return [dict(zip(fields, (_text(v) for v in vals))) for vals in zip(*(seq[f] for f in fields))]


def source(split: str, *, data_dir: str, config: Any = "demo", **overrides) -> Iterator[dict[str, Any]]:
  """Yields the source dicts of one split, in index order, from the TFDS dataset (prepared on first use).

  ``config``: a config name ("demo", "tiny", "large") or a ``CaptionedScenesConfig``; keyword overrides
  (e.g. ``num_train=100``) make a custom config (see ``builder``). ``questions`` holds the ``qa`` pairs in the
  extractor's form, ``[{"question", "answers": [answer], "type"}]`` (type: ``qa.question_type``).
  """
  b = builder(data_dir, config=config, **overrides)
  prepare(b)
  for ex in as_numpy(b, split):
    pairs = _rows(ex["questions"], ("question", "answer"))
    yield {"image_id": int(ex["image_id"]), "key": _text(ex["key"]), "image": ex["image"],
           "captions": [_text(c) for c in ex["captions"]], "scene_graph": _text(ex["scene_graph"]),
           "hard_negatives": _rows(ex["hard_negatives"], ("caption", "category", "negative")), "qa": pairs,
           "questions": [{"question": p["question"], "answers": [p["answer"]], "type": qa.question_type(p["question"])}
                         for p in pairs]}
