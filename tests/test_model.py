"""The unified LXMERT model: shapes, dtypes, sizes, layouts (scan/remat), dropout, sharding names, inputs.

Compilation dominates on a small CPU: graphs are compiled once per module (fixtures) at XLA optimisation
level 0, and most models have one layer per stack.
"""

import contextlib
import functools
import importlib.util
import io
import os
import re

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from bigen_jax import parallel
from bigen_jax.models import flops
from bigen_jax.models import heads
from bigen_jax.models import layers as layers_lib
from bigen_jax.models import lxmert
from bigen_jax.tasks import layouts
from configs import base

ONE_LAYER = dict(num_language_layers=1, num_vision_layers=1, num_cross_layers=1)


def model_config(name, **overrides):
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "model.py")
  spec = importlib.util.spec_from_file_location("configs_model", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(name)
  config.update(overrides)
  return config


def layout_config(**mesh):
  """The training config's mesh (``configs/base.py``, axis sizes ``mesh``) and logical-axis rules."""
  config = base.get_config("tiny")
  config.mesh.update(mesh)
  return config


def jit(fn, **kwargs):
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def _inputs(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, config.vocab_size, (batch, config.max_len)).astype(np.int32)
  mask = np.ones((batch, config.max_len), np.int32)
  mask[0, -2:] = 0
  return dict(text_ids=ids, text_mask=mask,
              visual_feats=rng.normal(size=(batch, config.num_cells, config.visual_feat_dim)).astype(np.float32),
              boxes=rng.uniform(size=(batch, config.num_cells, 4)).astype(np.float32))


def _init(config, seed=0):
  """Model and random params of its shapes, drawn with numpy (compiling ``init`` costs seconds here)."""
  model = lxmert.build_model(config)
  rng = np.random.default_rng(seed)
  abstract = nn.unbox(lxmert.abstract_params(model, config))
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), abstract)
  return model, params


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def one_layer():
  """(config, model, params, jitted apply(params, inputs, heads=False)) of a 1/1/1-layer tiny model; with
  ``heads`` it returns (outputs with text and image logits, match logits, text logits of position 1)."""
  config = model_config("tiny", **ONE_LAYER)
  model, params = _init(config)

  @functools.partial(jit, static_argnames="heads")
  def apply(p, inputs, heads=False):
    if not heads:
      return model.apply({"params": p}, **inputs)
    out = model.apply({"params": p}, **inputs, text_logits=True, image_logits=True)
    return (out, model.apply({"params": p}, out.pooled, method="predict_match"),
            model.apply({"params": p}, out.language[:, 1], method="predict_text"))
  return config, model, params, apply


def test_shapes_and_heads(one_layer):
  config, _, params, apply = one_layer
  out, match, text_1 = apply(params, _inputs(config), heads=True)
  b, length, m, h = 2, config.max_len, config.num_cells, config.hidden_size
  assert out.language.shape == out.language_encoder.shape == (b, length, h)
  assert out.vision.shape == out.vision_encoder.shape == (b, m, h)
  assert out.pooled.shape == (b, h)
  assert out.text_logits.shape == (b, length, config.vocab_size) and out.text_logits.dtype == jnp.float32
  assert out.image_logits.shape == (b, m, config.num_clusters)
  assert match.shape == (b, 2)
  _close(text_1, out.text_logits[:, 1])
  plain = apply(params, _inputs(config))
  assert plain.text_logits is None and plain.image_logits is None


@pytest.mark.slow  # ~60 s: bf16 compiles of the one-layer model; bench_train --dtype bfloat16 runs the bf16 step
def test_bfloat16_compute_float32_params(one_layer):
  config, _, params, apply = one_layer
  bf16 = lxmert.build_model(model_config("tiny", dtype="bfloat16", **ONE_LAYER))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = jit(lambda p, x: bf16.apply({"params": p}, **x, text_logits=True))(params, _inputs(config))
  assert out.language.dtype == jnp.bfloat16 and out.vision.dtype == jnp.bfloat16
  assert out.text_logits.dtype == jnp.float32
  ref = apply(params, _inputs(config))
  np.testing.assert_allclose(np.asarray(out.language, np.float32), ref.language, atol=0.1)


def test_param_counts():
  paper = lxmert.count_params(model_config("paper"))
  two = lxmert.count_params(model_config("two_model"))
  print(f"paper: {paper / 1e6:.1f}M parameters (paper reports 228M); two-model: {two / 1e6:.1f}M (456M)")
  assert abs(paper - 228e6) / 228e6 < 0.05
  assert two == 2 * paper


def test_scan_and_remat_match_loop():
  """Values and gradients: (scan, remat) == (loop, no remat); params convert with stack_layers."""
  layers = dict(num_language_layers=2, num_vision_layers=1, num_cross_layers=1)
  config = model_config("tiny", **layers)
  model, params = _init(config)
  scan_config = model_config("tiny", scan_layers=True, remat=True, **layers)
  scan_model = lxmert.build_model(scan_config)
  scan_params = lxmert.stack_layers(params)
  expected = jax.tree.map(lambda x: x.shape, nn.unbox(lxmert.abstract_params(scan_model, scan_config)))
  assert jax.tree.map(lambda x: x.shape, scan_params) == expected
  inputs = _inputs(config)

  def loss(m):
    def fn(p):
      out = m.apply({"params": p}, **inputs)
      return jnp.mean(out.language ** 2) + jnp.mean(out.vision ** 2)
    return jit(jax.value_and_grad(fn))

  value, grads = loss(model)(params)
  scan_value, scan_grads = loss(scan_model)(scan_params)
  _close(value, scan_value)
  _close(lxmert.stack_layers(grads), scan_grads)
  _close(lxmert.unstack_layers(scan_params), params, tol=0)


def _saved_elements(fn, *args) -> int:
  """Elements of the residuals ``jax.grad(fn)`` keeps from its forward pass (from ``print_saved_residuals``)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  shapes = re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M)
  return sum(int(np.prod([int(d) for d in shape.split(",") if d])) for shape in shapes)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])  # ~25 s each
def test_remat_policies_match_plain_and_save_what_they_say(scan):
  """Each ``model.remat_policy``: loss and gradients (with dropout, one key) equal the model without remat
  (1e-6), and the policies keep different residuals for the backward pass: "nothing" fewest, "dots_all" most."""
  layers = dict(num_language_layers=1, num_vision_layers=1, num_cross_layers=1)
  config = model_config("tiny", scan_layers=scan, **layers)
  model, params = _init(config)
  inputs = _inputs(config)

  def loss(m):
    def fn(p):
      out = m.apply({"params": p}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
      return jnp.mean(out.language ** 2) + jnp.mean(out.vision ** 2)
    return fn

  value, grads = jit(jax.value_and_grad(loss(model)))(params)
  saved = {}
  for policy in layers_lib.REMAT_POLICIES:
    remat_model = lxmert.build_model(model_config("tiny", scan_layers=scan, remat=True, remat_policy=policy,
                                                  **layers))
    remat_value, remat_grads = jit(jax.value_and_grad(loss(remat_model)))(params)
    _close(value, remat_value, tol=1e-6)
    _close(grads, remat_grads, tol=1e-6)
    saved[policy] = _saved_elements(loss(remat_model), params)
  assert saved["nothing"] < saved["dots"] < saved["dots_all"], saved


def _dot_count(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_fused_projections_match_plain():
  """``model.fused_projections``: the same parameter tree and initial values, and loss and gradients (with
  dropout, one key) equal to the unfused model's within 1e-5, with fewer matmuls (q, k, v of a self-attention
  in one; k, v of a cross-attention in one)."""
  config = model_config("tiny", **ONE_LAYER)
  model, params = _init(config)
  fused_model, fused_params = _init(model_config("tiny", fused_projections=True, **ONE_LAYER))
  jax.tree.map(np.testing.assert_array_equal, params, fused_params)
  inputs = _inputs(config)

  def loss(m):
    def fn(p):
      out = m.apply({"params": p}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
      return jnp.mean(out.language ** 2) + jnp.mean(out.vision ** 2 * jnp.arange(out.vision.shape[-1]))
    return fn

  value, grads = jit(jax.value_and_grad(loss(model)))(params)
  fused_value, fused_grads = jit(jax.value_and_grad(loss(fused_model)))(params)
  _close(value, fused_value, tol=1e-5)
  _close(grads, fused_grads, tol=1e-5)
  assert _dot_count(loss(fused_model), params) < _dot_count(loss(model), params)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_xla():
  """``model.attention="cudnn"`` (flash attention, bf16) gives the XLA path's outputs within bf16's precision."""
  layers = dict(num_language_layers=1, num_vision_layers=1, num_cross_layers=1)
  config = model_config("tiny", dtype="bfloat16", hidden_size=64, num_heads=2, **layers)
  model, params = _init(config)
  flash = lxmert.build_model(model_config("tiny", dtype="bfloat16", hidden_size=64, num_heads=2,
                                         attention="cudnn", **layers))
  inputs = _inputs(config)
  ref = jit(lambda p: model.apply({"params": p}, **inputs).language)(params)
  out = jit(lambda p: flash.apply({"params": p}, **inputs).language)(params)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.05)


def test_dropout_determinism():
  config = model_config("tiny", scan_layers=True, remat=True, **ONE_LAYER)
  model, params = _init(config)
  inputs = _inputs(config)

  @functools.partial(jit, static_argnames="deterministic")
  def run(seed, deterministic=False):
    return model.apply({"params": params}, **inputs, deterministic=deterministic,
                       rngs={"dropout": jax.random.key(seed)}).language

  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0, deterministic=True), run(1, deterministic=True))


@pytest.mark.parametrize("impl", ["threefry", "rbg"])
def test_dropout_rng_draws_seeded_masks_at_the_rate_and_the_same_on_any_mesh(impl):
  """``model.dropout_rng``: masks at the configured rate, a function of the key alone (same key, same output;
  another key, another output), and the same on 8 devices (data, fsdp, tensor = 2) as on one."""
  from bigen_jax.models import apply as apply_lib  # pylint: disable=g-import-not-at-top
  keep = jax.random.bernoulli(apply_lib.dropout_key(jax.random.key(0), impl), 0.9, (200_000,))
  assert abs(float(keep.mean()) - 0.9) < 0.005
  config = model_config("tiny", **ONE_LAYER, dropout_rng=impl)
  model, params = _init(config)
  inputs = _inputs(config, batch=4)

  def run(p, x, seed):
    head = lambda module, out: out.language  # noqa: E731
    return apply_lib.apply_model(model, p, task="i2t", rng=jax.random.key(seed), head=head, **x)

  single = jit(run, static_argnums=2)(params, inputs, 0)
  np.testing.assert_array_equal(single, jit(run, static_argnums=2)(params, inputs, 0))
  assert not np.allclose(single, jit(run, static_argnums=2)(params, inputs, 1))
  layout = layout_config(data=2, fsdp=2, tensor=2)
  mesh, rules = parallel.make_mesh(layout), parallel.axis_rules(layout)
  sharded = jax.device_put(params, parallel.logical_shardings(lxmert.abstract_params(model, config), mesh, rules))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jit(run, static_argnums=2)(sharded, jax.device_put(inputs, parallel.data_sharding(mesh)), 0)
  np.testing.assert_allclose(out, single, atol=1e-5)


def test_logical_axis_names_on_every_param():
  for scan in (False, True):
    config = model_config("tiny", scan_layers=scan)
    boxed = lxmert.abstract_params(lxmert.build_model(config), config)
    known = {name for name, _ in parallel.axis_rules(layout_config())}
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
      assert isinstance(leaf, nn.Partitioned), leaf
      assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def test_sharded_forward_matches_single_device(one_layer):
  config, model, params, apply = one_layer
  layout = layout_config(data=2, fsdp=2, tensor=2)
  mesh, rules = parallel.make_mesh(layout), parallel.axis_rules(layout)
  shardings = parallel.logical_shardings(lxmert.abstract_params(model, config), mesh, rules)
  sharded = jax.device_put(params, shardings)
  kernel = sharded["cross"]["layers_0"]["lang_ffn"]["intermediate"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  inputs = _inputs(config, batch=4)
  batch = jax.device_put(inputs, parallel.data_sharding(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jit(lambda p, x: model.apply({"params": p}, **x))(sharded, batch)
  assert out.language.sharding.spec[0] == ("data", "fsdp")
  _close(out, apply(params, inputs), tol=1e-5)


def test_make_mesh_infers_size():
  mesh = parallel.make_mesh(layout_config(data=-1, fsdp=2, tensor=1))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="devices"):
    parallel.mesh_shape(layout_config(data=3, fsdp=1, tensor=1), 8)


def test_cluster_ids_equal_dense_centroids(one_layer):
  config, model, params, apply = one_layer
  inputs = _inputs(config)
  codebook = np.random.default_rng(1).normal(size=(config.num_clusters, config.visual_feat_dim)).astype(np.float32)
  ids = np.random.default_rng(2).integers(0, config.num_clusters, (2, config.num_cells))
  discrete = dict(inputs, visual_feats=None, cluster_ids=ids, codebook=codebook)
  _close(apply(params, dict(inputs, visual_feats=codebook[ids])), apply(params, discrete))

  def feats(c):
    return model.apply({"params": params}, method="visual_features", visual_feats=None, cluster_ids=ids,
                       codebook=c, visual_mask=None)
  assert not np.any(jax.grad(lambda c: jnp.sum(feats(c)))(jnp.asarray(codebook)))  # the codebook is frozen
  with pytest.raises(ValueError, match="exactly one"):
    model.apply({"params": params}, **dict(discrete, visual_feats=codebook[ids]))


def test_visual_mask_uses_mask_feature(one_layer):
  config, model, params, _ = one_layer
  params = dict(params, visual_mask_feature=jnp.arange(config.visual_feat_dim, dtype=jnp.float32) / 10)
  feats = _inputs(config)["visual_feats"]
  cells = np.zeros((2, config.num_cells), bool)
  cells[:, :5] = True
  out = model.apply({"params": params}, method="visual_features", visual_feats=feats, cluster_ids=None,
                    codebook=None, visual_mask=cells)
  np.testing.assert_allclose(out[:, :5], np.broadcast_to(params["visual_mask_feature"], (2, 5, feats.shape[-1])))
  np.testing.assert_allclose(out[:, 5:], feats[:, 5:])


def test_i2t_layout_hides_later_words(one_layer):
  config, model, params, _ = one_layer
  inputs = _inputs(config)
  l = np.array([3, 4])
  layout = layouts.i2t_inputs(text_ids=inputs["text_ids"], positions=l, mask_id=4, pad_id=0,
                            text_mask=inputs["text_mask"])
  run = jit(lambda ids, text_mask, attention: model.apply(
      {"params": params}, **dict(inputs, text_ids=ids, text_mask=text_mask), text_attention=attention))
  attention = np.broadcast_to(np.asarray(layout.text_mask, bool)[:, None, :], (2, config.max_len, config.max_len))
  base = run(layout.text_ids, layout.text_mask, attention)
  later = np.arange(config.max_len)[None] > l[:, None]
  # Later words changed, and given as real tokens in text_mask: the [B, L, L] layout alone must hide them.
  changed = run(np.where(later, 7, layout.text_ids), inputs["text_mask"], attention)
  for b in range(2):
    _close(base.language[b, : l[b] + 1], changed.language[b, : l[b] + 1])
  _close(base.vision, changed.vision)
  _close(base.pooled, changed.pooled)
  # The key mask alone gives the same layout.
  _close(run(layout.text_ids, layout.text_mask, np.ones_like(attention)), base)


def test_image_head_from_codebook(one_layer):
  config, model, params, _ = one_layer
  codebook = np.random.default_rng(0).normal(size=(config.num_clusters, config.visual_feat_dim)).astype(np.float32)
  params = heads.init_image_head_from_codebook(params, codebook)
  np.testing.assert_allclose(params["image_head"]["classifier"]["kernel"], codebook.T)
  logits, state = model.apply({"params": params}, jnp.ones((2, config.hidden_size)), method="predict_image",
                              capture_intermediates=True, mutable=["intermediates"])
  feat = state["intermediates"]["image_head"]["feat_proj"]["__call__"][0]
  np.testing.assert_allclose(logits, feat @ codebook.T, atol=1e-5)  # logit k = <predicted feature, centroid k>
  boxed = jax.eval_shape(lambda: lxmert.init_params(model, config, jax.random.key(0)))
  boxed = heads.init_image_head_from_codebook(boxed, codebook)
  assert isinstance(boxed["image_head"]["classifier"]["kernel"], nn.Partitioned)
  with pytest.raises(ValueError, match="codebook"):
    heads.init_image_head_from_codebook(params, codebook[:, :3])
  scaled = codebook * np.arange(1, config.visual_feat_dim + 1) + 3.0  # columns of different scales and means
  kernel = np.asarray(heads.init_image_head_from_codebook(params, scaled, std=0.3)["image_head"]["classifier"]["kernel"])
  np.testing.assert_allclose(kernel.mean(1), 0.0, atol=1e-5)
  np.testing.assert_allclose(kernel.std(1), 0.3, rtol=1e-4)
  np.testing.assert_allclose(kernel, 0.3 * ((codebook - codebook.mean(0)) / codebook.std(0)).T, rtol=1e-3, atol=1e-4)


def test_two_model_variant(one_layer):
  config, _, params, apply = one_layer
  model = lxmert.build_model(model_config("tiny", two_model=True, **ONE_LAYER))
  two_params = {"i2t": params, "t2i": jax.tree.map(lambda x: x * 0.5, params)}
  abstract = nn.unbox(lxmert.abstract_params(model, model_config("tiny", two_model=True, **ONE_LAYER)))
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, two_params)
  inputs = _inputs(config)
  _close(jit(lambda p, x: model.apply({"params": p}, **x, task="t2i"))(two_params, inputs),
         apply(two_params["t2i"], inputs))


def test_unshared_cross_attention(one_layer):
  """``shared_cross_attention=False`` gives cells -> words a module of its own: with a copy of the shared one it
  computes exactly the shared model; changing it moves the cells' outputs and leaves the words' first reading of
  the cells alone."""
  config, _, params, apply = one_layer
  unshared_config = model_config("tiny", shared_cross_attention=False, **ONE_LAYER)
  model = lxmert.build_model(unshared_config)
  layer = dict(params["cross"]["layers_0"])
  layer["vision_cross_attention"] = layer["cross_attention"]
  unshared = dict(params, cross=dict(params["cross"], layers_0=layer))
  abstract = nn.unbox(lxmert.abstract_params(model, unshared_config))
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, unshared)
  forward = jit(lambda p, x: model.apply({"params": p}, **x))
  inputs = _inputs(config)
  _close(forward(unshared, inputs), apply(params, inputs))
  layer = dict(layer, vision_cross_attention=jax.tree.map(lambda x: x * 0.5, layer["vision_cross_attention"]))
  moved = forward(dict(unshared, cross=dict(unshared["cross"], layers_0=layer)), inputs)
  before = forward(unshared, inputs)
  assert np.abs(np.asarray(moved.vision) - np.asarray(before.vision)).max() > 1e-3
  _close(moved.language, before.language)  # one cross layer: the words read the cells before they changed


def test_caption_to_cells_reads_only_the_words_cells_may_see():
  """``caption_to_cells``: the vision encoder (before any cross layer) then depends on the caption, but only on
  words the visual queries may see: in I2T's causal layout ([CLS] only, causal words) no later word reaches it."""
  config = model_config("tiny", caption_to_cells=True, **ONE_LAYER)
  model, params = _init(config)
  forward = jit(lambda p, x: model.apply({"params": p}, **x).vision_encoder)
  inputs = _inputs(config)
  other = dict(inputs, text_ids=inputs["text_ids"].copy())
  other["text_ids"][:, 3] = (other["text_ids"][:, 3] + 1 - 5) % (config.vocab_size - 5) + 5
  assert np.abs(np.asarray(forward(params, other)) - np.asarray(forward(params, inputs))).max() > 1e-3
  causal = dict(vision_text_mask=np.eye(1, config.max_len, dtype=np.int32).repeat(2, 0),  # [CLS] only
                text_attention=np.tril(np.ones((2, config.max_len, config.max_len), bool)))
  _close(forward(params, dict(other, **causal)), forward(params, dict(inputs, **causal)))
  plain_model, plain_params = _init(model_config("tiny", **ONE_LAYER))
  plain = jit(lambda p, x: plain_model.apply({"params": p}, **x).vision_encoder)
  _close(plain(plain_params, other), plain(plain_params, inputs))  # LXMERT: the vision encoder reads no words


def test_flops_match_xla_cost_analysis():
  config = model_config("tiny", hidden_size=128, mlp_dim=512, visual_feat_dim=256, **ONE_LAYER)
  model, params = _init(config)
  inputs = _inputs(config, batch=1)
  cost = jit(lambda p, x: model.apply({"params": p}, **x)).lower(params, inputs).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]  # matmuls plus elementwise work
  assert 0.85 < flops.forward_flops(config) / xla < 1.0
  assert flops.train_flops(config) == 3 * flops.forward_flops(config)
