"""Plug-ins per data source: what a source adds to the generic evaluators (a world's truth and its readers).

The records manifest names its source (``manifest["source"]``, e.g. ``{"name": "scenes", "config": "demo"}``).
``plugin(source_info)`` looks the plug-in up by that name in a registry that worlds enter themselves into
(``register``): the first lookup of a name imports ``bigen_jax.worlds.<name>.plugin``, which registers its
factory. A source without one (COCO) gets None, and the evaluators report the generic metrics only. The
evaluators never import a world: what they score beyond the generic metrics comes through here.
"""

import importlib
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

_FACTORIES: dict[str, Callable[[Mapping[str, Any]], Any]] = {}


class ImageReader(Protocol):
  """Reads images [N, H, W, 3] uint8 back (``generation``): a feature space for FID and per-image outputs
  from which the world scores captions."""
  feature_name: str  # the FID metric in its feature space, e.g. "fid_recognizer"

  def features(self, images: np.ndarray) -> np.ndarray:
    """Features [N, D] of ``images``."""

  def read(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image outputs (arrays [N, ...]); gathered across processes before scoring."""

  def semantic_accuracy(self, outputs: Mapping[str, np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Whether image i shows ``captions[i]``, from the gathered ``read`` outputs."""

  def caption_scorer(self, outputs: Mapping[str, np.ndarray]) -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
    """The R-precision ranker of the gathered ``read`` outputs of N images: ``score(index, captions) -> [K]``,
    the agreement of image ``index[k]`` with ``captions[k]``."""


class SourcePlugin(Protocol):
  """What a data source's world adds to ``captioning`` and ``generation``."""

  def caption_metrics(self, captions: Sequence[str], *, split: str, indices: Sequence[int]) -> dict[str, float]:
    """Truth of generated captions of the records ``indices`` of ``split`` ({} when the world cannot tell)."""

  def token_drawer(self, cfg: Any, *, codebook: np.ndarray, layer: str
                   ) -> Callable[[np.ndarray], np.ndarray] | None:
    """Cluster ids [N, M] -> pictures [N, H, W, 3] drawn by the world (None: the patch preview draws).
    ``cfg``: the ``generation`` evaluator's config; ``layer``: the records' feature layer."""

  def image_reader(self, cfg: Any, *, workdir: str) -> ImageReader | None:
    """The reader of drawn images, loaded (never trained here); None when the world has none for these
    records."""

  def hard_negatives(self, *, split: str, indices: Sequence[int]) -> tuple[Callable, Sequence[Any]]:
    """(negatives_fn, contexts) of ``r_precision.hard`` for the records ``indices`` of ``split``."""

  def answer_table(self) -> tuple[Sequence[str], Sequence[str]] | None:
    """(answers, question types) when the world's questions have a fixed answer table (the QA head's classes:
    ``bigen_jax.data.answers``), else None (the table is counted from the answers)."""


def register(name: str, factory: Callable[[Mapping[str, Any]], SourcePlugin | None]) -> None:
  """Enters ``factory(source_info) -> plug-in or None`` for the source ``name``."""
  _FACTORIES[name] = factory


def plugin(source_info: Mapping[str, Any]) -> SourcePlugin | None:
  """The plug-in of the records' source (the manifest's "source"), or None when the source has none."""
  name = source_info.get("name")
  if not isinstance(name, str) or not name.isidentifier():
    return None
  if name not in _FACTORIES:
    module = f"bigen_jax.worlds.{name}.plugin"
    try:
      importlib.import_module(module)  # registers the world's factory
    except ModuleNotFoundError as e:
      if e.name not in (module, f"bigen_jax.worlds.{name}"):
        raise
      return None
  factory = _FACTORIES.get(name)
  return factory(source_info) if factory else None
