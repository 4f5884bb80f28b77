"""TFDS builder of the captioned-scenes world: generated offline, no downloads, examples in index order.

Configs: ``demo`` (2000/250/250 at 128 px), ``tiny`` (64/16/16 at 64 px, for tests), ``large``
(50000/5000/5000 at 128 px); ``builder(data_dir, config, **overrides)`` makes a custom one. The class is not
entered in TFDS's global registry (``skip_registration``), so importing this module twice is harmless; reach it
through ``builder`` rather than ``tfds.builder("captioned_scenes")``.
"""

import dataclasses
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from bigen_jax.data import scenes


@dataclasses.dataclass
class CaptionedScenesConfig(tfds.core.BuilderConfig):
  """Split sizes and scene settings of one prepared variant."""
  num_train: int = 2000
  num_validation: int = 250
  num_test: int = 250
  image_size: int = 128
  min_objects: int = 1
  max_objects: int = 4
  seed: int = 0

  def scene_config(self) -> scenes.SceneConfig:
    return scenes.SceneConfig(image_size=self.image_size, min_objects=self.min_objects,
                              max_objects=self.max_objects, seed=self.seed)

  def split_sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


CONFIGS = (
    CaptionedScenesConfig(name="demo", description="2000/250/250 scenes at 128 px"),
    CaptionedScenesConfig(name="tiny", description="64/16/16 scenes at 64 px (tests)", num_train=64,
                          num_validation=16, num_test=16, image_size=64),
    CaptionedScenesConfig(name="large", description="50000/5000/5000 scenes at 128 px", num_train=50000,
                          num_validation=5000, num_test=5000),
)


class CaptionedScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Procedurally generated captioned scenes with scene graphs, hard negatives and QA pairs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = list(CONFIGS)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
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
    return {split: self._generate_examples(split, n) for split, n in self.builder_config.split_sizes().items()}

  def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config.scene_config()
    for index in range(num):
      ex = scenes.make_example(index, cfg, split=split)
      yield index, {"image": ex["image"], "image_id": ex["image_id"], "key": ex["key"],
                    "captions": ex["captions"], "scene_graph": ex["scene_graph"],
                    "hard_negatives": ex["hard_negatives"], "questions": ex["qa"]}


def _custom_name(base: str, overrides: dict[str, Any]) -> str:
  return "-".join([base] + [f"{k}{v}" for k, v in sorted(overrides.items())])


def builder(data_dir: str, config: str | CaptionedScenesConfig = "demo", **overrides) -> CaptionedScenes:
  """The builder of a named config, or of a custom one: ``builder(d, "tiny", num_train=10)``.

  Overrides are fields of ``CaptionedScenesConfig``; the custom config's name lists them (``tiny-num_train10``),
  so differently sized variants live side by side under ``data_dir/captioned_scenes/``.
  """
  if isinstance(config, str):
    if config not in CaptionedScenes.builder_configs:
      raise ValueError(f"unknown captioned_scenes config {config!r}; expected one of "
                       f"{sorted(CaptionedScenes.builder_configs)} or a CaptionedScenesConfig")
    config = CaptionedScenes.builder_configs[config]
  if overrides:
    fields = {f.name for f in dataclasses.fields(CaptionedScenesConfig)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"unknown CaptionedScenesConfig field(s) {unknown}")
    config = dataclasses.replace(config, name=_custom_name(config.name, overrides), **overrides)
  return CaptionedScenes(data_dir=data_dir, config=config)


def prepare(b: CaptionedScenes) -> None:
  """Generates the dataset unless it is already there; never touches the network."""
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def as_numpy(b: CaptionedScenes, split: str) -> Iterator[dict[str, Any]]:
  """The split's examples as numpy dicts, in index order."""
  ds = b.as_dataset(split=split, shuffle_files=False,
                    read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
  return iter(tfds.as_numpy(ds))


def scene_graphs(source_info: dict[str, Any], split: str, indices: Any) -> list[dict[str, Any]] | None:
  """Ground-truth scene graphs of records (their ``index`` within ``split``), regenerated from the seed.

  ``source_info`` is the records manifest's "source"; None when the records are not captioned scenes of a
  named config (e.g. COCO), so evaluators skip the scene-world metrics.
  """
  if source_info.get("name") != "scenes" or source_info.get("config") not in CaptionedScenes.builder_configs:
    return None
  cfg = CaptionedScenes.builder_configs[source_info["config"]].scene_config()
  return [scenes.sample_scene(scenes.example_rng(cfg.seed, split, int(i)), cfg) for i in indices]
