"""Evaluators by name, big_vision style: ``bigen_jax.eval.<name>`` exposes ``Evaluator``.

An evaluator is built once from the training context (``bigen_jax.experiment.Context``: config, model, frozen
inputs, mesh, tokenizer) and ``run(params, *, step) -> dict[str, float]`` is called periodically by the
trainer and by ``bigen_jax.evaluate``. Metric names are prefixed with the evaluator's name.
"""

import importlib

from bigen_jax import errors


def create(name: str, ctx):
  """The evaluator ``name`` (a module of ``bigen_jax.eval``) for the training context ``ctx``."""
  try:
    module = importlib.import_module(f"bigen_jax.eval.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"bigen_jax.eval.{name}":
      raise
    raise errors.ConfigError(f"config.eval.evaluators names {name!r}, but there is no module "
                             f"bigen_jax/eval/{name}.py") from e
  if not hasattr(module, "Evaluator"):
    raise ValueError(f"bigen_jax/eval/{name}.py has no Evaluator class")
  return module.Evaluator(ctx)
