"""The layout's import rules, read from the source: the library never imports a world (except the feature
tool's backbone table, which names the world's detector), decoders never import the training tasks, and only
the TFDS builder of a world imports TensorFlow."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "bigen_jax")


def _imports(path: str) -> set[str]:
  """Every module ``path`` imports (at any depth: lazy imports count)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{alias.name}" for alias in node.names)
  return out


def _modules(subdir: str = "") -> dict[str, set[str]]:
  """``{path relative to bigen_jax/: imports}`` of every module under ``bigen_jax/subdir``."""
  out = {}
  for directory, _, files in os.walk(os.path.join(PACKAGE, subdir)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        out[os.path.relpath(path, PACKAGE)] = _imports(path)
  return out


def test_the_library_does_not_import_worlds():
  allowed = {"features/backbones.py"}  # --backbone scenes_detector
  offenders = {path: sorted(m for m in imports if m.startswith("bigen_jax.worlds"))
               for path, imports in _modules().items() if not path.startswith("worlds")}
  assert {p: m for p, m in offenders.items() if m and p not in allowed} == {}


def test_sampling_does_not_import_tasks():
  offenders = {path: sorted(m for m in imports if m.startswith("bigen_jax.tasks"))
               for path, imports in _modules("sampling").items()}
  assert {p: m for p, m in offenders.items() if m} == {}


def test_only_the_world_builder_imports_tensorflow():
  uses = sorted(path for path, imports in _modules("worlds").items()
                if any(m.split(".")[0] in ("tensorflow", "tensorflow_datasets") for m in imports))
  assert uses == ["worlds/scenes/tfds_builder.py"]
