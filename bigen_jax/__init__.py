"""bigen_jax: captions of images and images of captions, one transformer (README). ``bigen_jax.Pipeline``
(``bigen_jax.pipeline``) is imported on first use, so that ``import bigen_jax`` stays light."""

__all__ = ["Pipeline"]


def __getattr__(name: str):
  if name == "Pipeline":
    from bigen_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
    return Pipeline
  raise AttributeError(f"module 'bigen_jax' has no attribute {name!r}")
