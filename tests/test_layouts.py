"""I2T and T2I input layouts (bigen_jax/tasks/layouts.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigen_jax.tasks import layouts

PAD, CLS, SEP, MASK = 0, 2, 3, 4


def _captions():
  # [CLS] w w w [SEP] pad pad / [CLS] w [SEP] pad ...
  return jnp.array([[CLS, 10, 11, 12, SEP, PAD, PAD], [CLS, 20, SEP, PAD, PAD, PAD, PAD]], jnp.int32)


def test_i2t_inputs_layout():
  ids = _captions()
  out = layouts.i2t_inputs(text_ids=ids, positions=jnp.array([2, 2]), mask_id=MASK, pad_id=PAD)
  np.testing.assert_array_equal(out.text_ids, [[CLS, 10, MASK, PAD, PAD, PAD, PAD],
                                               [CLS, 20, MASK, PAD, PAD, PAD, PAD]])
  np.testing.assert_array_equal(out.targets, [11, SEP])
  # The key mask of every query: exactly the prefix and the [MASK] (bidirectional prefix, later words hidden).
  np.testing.assert_array_equal(out.text_mask, [[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]])


def test_i2t_inputs_respects_padding_and_explicit_mask():
  ids = _captions()
  out = layouts.i2t_inputs(text_ids=ids, positions=jnp.array([4, 1]), mask_id=MASK, pad_id=PAD,
                         text_mask=(ids != PAD).astype(jnp.int32))
  np.testing.assert_array_equal(out.text_ids[0], [CLS, 10, 11, 12, MASK, PAD, PAD])
  np.testing.assert_array_equal(out.targets, [SEP, 20])
  np.testing.assert_array_equal(out.text_mask[1], [1, 1, 0, 0, 0, 0, 0])


def test_i2t_inputs_jit():
  fn = jax.jit(lambda ids, pos: layouts.i2t_inputs(text_ids=ids, positions=pos, mask_id=MASK, pad_id=PAD))
  out = fn(_captions(), jnp.array([1, 2]))
  np.testing.assert_array_equal(out.targets, [10, SEP])


def test_sample_i2t_positions_in_range():
  mask = jnp.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
  pos = layouts.sample_i2t_positions(jax.random.key(0), text_mask=jnp.tile(mask, (200, 1)))
  pos = np.asarray(pos).reshape(200, 3)
  assert pos[:, 0].min() == 1 and pos[:, 0].max() == 4  # words and [SEP], never [CLS]
  assert set(pos[:, 1]) == {1, 2}
  assert set(pos[:, 2]) == {1}


def test_random_cells_mask_exact_counts():
  m = layouts.random_cells_mask(jax.random.key(1), num_masked=jnp.array([0, 5, 64]), batch_size=3, num_cells=64)
  np.testing.assert_array_equal(np.asarray(m).sum(1), [0, 5, 64])


def test_t2i_mask_count_schedule():
  counts = set()
  for seed in range(20):
    m = np.asarray(layouts.t2i_mask(jax.random.key(seed), batch_size=4, min_masked=6, max_masked=64))
    assert m.shape == (4, 64) and m.dtype == bool
    assert len(set(m.sum(1))) == 1  # one count for the whole batch
    counts.add(int(m.sum(1)[0]))
  assert min(counts) >= 6 and max(counts) <= 64 and len(counts) > 5


def test_t2i_mask_ratio_schedule():
  m = np.asarray(layouts.t2i_mask(jax.random.key(0), batch_size=256, schedule="ratio"))
  per_example = m.sum(1)
  assert per_example.min() >= 1 and per_example.max() <= 64
  assert len(set(per_example)) > 20  # a ratio per example
  assert 24 < per_example.mean() < 40  # E[ceil(64 U(0, 1])] = 32.5


def test_t2i_mask_rejects_unknown_schedule():
  with pytest.raises(ValueError, match="schedule"):
    layouts.t2i_mask(jax.random.key(0), batch_size=2, schedule="nope")


def test_t2i_mask_cosine_schedule_favours_full_masks():
  m = np.asarray(layouts.t2i_mask(jax.random.key(0), batch_size=4096, schedule="cosine"))
  per_example = m.sum(1)
  assert per_example.min() >= 1 and per_example.max() == 64
  # P(r > 1/2) = P(u < 2/3) = 2/3 for r = cos(pi u / 2): most examples have more than half the grid masked.
  assert abs((per_example > 32).mean() - 2 / 3) < 0.03
  assert abs(per_example.mean() / 64 - 2 / np.pi) < 0.02  # E[cos(pi u / 2)] = 2 / pi
