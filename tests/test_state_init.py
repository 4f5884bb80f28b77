"""``state.create_state``: the params of ``init_from`` and the codebook reach the init program as arguments,
never as constants compiled into it (0.9 GB of them for the paper model); the state they give is the same."""

import os
import re

import jax
import numpy as np
import pytest

from bigen_jax import experiment
from bigen_jax import optim
from bigen_jax import state as state_lib
from bigen_jax.convert import io as convert_io
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab
from configs import demo
from conftest import write_records

# Splat constants (one value broadcast, e.g. zeros) print as ``dense<0.0> : tensor<64x32xf32>`` and cost nothing;
# a constant with its elements spelled out (``dense<[...]>``, ``dense<"0x...">``, ``dense_resource<...>``) is data.
_CONSTANT = re.compile(r"stablehlo\.constant\s+(dense<(?P<value>.)|dense_resource<)[^:]*:\s*tensor<(?P<shape>[^>]*)>")
MAX_CONSTANT_ELEMENTS = 1024


def _largest_constant(hlo: str) -> int:
  """The element count of the largest non-splat constant in ``hlo`` (StableHLO text)."""
  largest = 0
  for match in _CONSTANT.finditer(hlo):
    if match.group("value") not in ("[", '"', None):
      continue  # a splat
    dims = [d for d in match.group("shape").split("x")[:-1] if d.isdigit()]
    largest = max(largest, int(np.prod([int(d) for d in dims])) if dims else 1)
  return largest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("state_data"))
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  write_records(records_dir, splits={"train": 16, "validation": 8}, dim=32, max_len=6)
  vocab.build_vocab(records_dir, vocab_dir, k=64, iterations=2, sample_size=1000, seed=0)
  vocab_txt = os.path.join(root, "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(200)]) + "\n")
  return {"root": root, "records_dir": records_dir, "vocab_dir": vocab_dir, "tokenizer": vocab_txt}


def _state_fns(data, workdir, **overrides):
  config = demo.get_config("tiny")
  config.data.update(dict(records_dir=data["records_dir"], vocab_dir=data["vocab_dir"], tokenizer=data["tokenizer"]))
  config.mesh.num_devices = 2
  config.update(overrides)
  ctx = experiment.build_context(config, workdir)
  tx, _ = optim.make_optimizer(ctx.config.optimizer, ctx.config.total_steps)
  return ctx, state_lib.create_state(ctx, tx, ctx.vocab.codebook)


def test_codebook_is_an_argument_not_a_constant(data, tmp_path):
  ctx, (_, _, init) = _state_fns(data, str(tmp_path), init_image_head_from_codebook=True)
  assert ctx.vocab.codebook.size > MAX_CONSTANT_ELEMENTS  # 64 x 32: the check below would see it
  assert _largest_constant(init.lower(jax.random.key(0)).as_text()) <= MAX_CONSTANT_ELEMENTS
  state = init(jax.random.key(0))
  codebook, std = np.asarray(ctx.vocab.codebook, np.float64), ctx.config.image_head_codebook_std
  assert std > 0  # the demo's standardised init (a raw codebook when 0)
  expected = std * (codebook - codebook.mean(0)) / codebook.std(0)
  np.testing.assert_allclose(np.asarray(state.params["image_head"]["classifier"]["kernel"]), expected.T,
                             rtol=1e-4, atol=1e-5)


def test_init_from_params_are_arguments_not_constants(data, tmp_path):
  ctx, (abstract, _, init) = _state_fns(data, str(tmp_path / "source"))
  source = jax.device_get(init(jax.random.key(7)).params)
  path = str(tmp_path / "init.npz")
  convert_io.save_params(source, path)
  ctx, (_, shardings, init) = _state_fns(data, str(tmp_path / "run"), init_from=path)
  assert max(x.size for x in jax.tree.leaves(source)) > MAX_CONSTANT_ELEMENTS
  assert _largest_constant(init.lower(jax.random.key(0)).as_text()) <= MAX_CONSTANT_ELEMENTS
  state = init(jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), source)
  assert jax.tree.map(lambda x: x.sharding, state.params) == shardings.params
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract)


def test_the_constant_check_sees_a_closed_over_array():
  """The detector itself: a numpy array closed over by a jitted function is found."""
  table = np.arange(4096, dtype=np.float32).reshape(64, 64)
  assert _largest_constant(jax.jit(lambda x: x @ table).lower(np.ones((2, 64), np.float32)).as_text()) == 4096
  assert _largest_constant(jax.jit(lambda x: x + np.zeros((64, 64), np.float32)).lower(
      np.ones((64, 64), np.float32)).as_text()) <= 1
