"""Tests for vq.quantizers.usage against a numpy re-implementation and hand-worked edges.

The oracle for `update` is a plain numpy loop over steps; window and dead-code edges
use tracker states written out by hand, with the expected answers counted by hand; the
histogram is decoded pixel by pixel with the documented log10 scale.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.quantizers import usage as cu

V = 10


def _tracker(last_used, counts_ema=None):
  last_used = jnp.asarray(last_used, jnp.int32)
  if counts_ema is None:
    counts_ema = jnp.zeros(last_used.shape, jnp.float32)
  return {'last_used': last_used, 'last_refreshed': jnp.zeros_like(last_used),
          'counts_ema': jnp.asarray(counts_ema, jnp.float32)}


def test_init():
  usage = cu.init(V)
  chex.assert_shape([usage['last_used'], usage['counts_ema']], (V,))
  assert usage['last_used'].dtype == jnp.int32
  assert usage['counts_ema'].dtype == jnp.float32
  assert not np.any(usage['last_used']) and not np.any(usage['counts_ema'])
  with pytest.raises(ValueError, match='size'):
    cu.init(0)


def test_update_matches_numpy_loop():
  rng = np.random.default_rng(0)
  steps = 6
  decay = 0.9
  counts = rng.integers(0, 5, size=(steps, V)).astype(np.float32)
  counts[:, 3] = 0.0  # a code never chosen
  counts[2:, 7] = 0.0  # a code abandoned after step 2
  last_used = np.zeros(V, np.int64)
  ema = np.zeros(V, np.float64)
  update = jax.jit(lambda u, c, s: cu.update(u, c, s, decay=decay))
  usage = cu.init(V)
  for step in range(steps):
    steps_done = step + 1
    last_used = np.where(counts[step] > 0, steps_done, last_used)
    ema = decay * ema + (1 - decay) * counts[step] / counts[step].sum()
    usage = update(usage, counts[step], jnp.int32(steps_done))
  np.testing.assert_array_equal(usage['last_used'], last_used)
  assert usage['last_used'][3] == 0 and usage['last_used'][7] == 2
  np.testing.assert_allclose(usage['counts_ema'], ema, rtol=1e-5, atol=1e-7)
  # Not debiased: the frequencies sum to 1 - decay**t.
  np.testing.assert_allclose(np.sum(usage['counts_ema']), 1 - decay**steps, rtol=1e-5)
  assert usage['last_used'].dtype == jnp.int32


def test_update_with_all_zero_counts_only_decays():
  usage = _tracker([0, 3, 5], [0.0, 0.2, 0.4])
  new = cu.update(usage, jnp.zeros(3), 6, decay=0.5)
  np.testing.assert_array_equal(new['last_used'], [0, 3, 5])
  np.testing.assert_allclose(new['counts_ema'], [0.0, 0.1, 0.2])


def test_update_rejects_wrong_shape():
  with pytest.raises(ValueError, match='shape'):
    cu.update(cu.init(V), jnp.ones(V + 1), 1)


def test_window_usage_edges():
  # idle steps at steps_done=10: never, 9, 5, 1, 0.
  usage = _tracker([0, 1, 5, 9, 10])
  expected = {1: 1 / 5, 2: 2 / 5, 5: 2 / 5, 6: 3 / 5, 9: 3 / 5, 10: 4 / 5, 1000: 4 / 5}
  for window, fraction in expected.items():
    got = cu.window_usage(usage, jnp.int32(10), window)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, fraction, err_msg=f'window={window}')
  with pytest.raises(ValueError, match='window'):
    cu.window_usage(usage, 10, 0)


def test_idle_and_dead_mask_edges():
  usage = _tracker([0, 1, 5, 9, 10])
  idle = cu.idle_steps(usage, jnp.int32(10))
  np.testing.assert_array_equal(idle, [10, 9, 5, 1, 0])
  assert idle.dtype == jnp.int32
  np.testing.assert_array_equal(cu.dead_mask(usage, 10, 5), [True, True, True, False, False])
  np.testing.assert_array_equal(cu.dead_mask(usage, 10, 10), [True, False, False, False, False])
  np.testing.assert_array_equal(cu.dead_mask(usage, 10, 11), [False] * 5)
  np.testing.assert_array_equal(cu.dead_mask(usage, 10, 1), [True, True, True, True, False])
  # A code never chosen is dead exactly when restart_after steps have been done.
  np.testing.assert_array_equal(cu.dead_mask(cu.init(2), 4, 5), [False, False])
  np.testing.assert_array_equal(cu.dead_mask(cu.init(2), 5, 5), [True, True])
  with pytest.raises(ValueError, match='restart_after'):
    cu.dead_mask(usage, 10, 0)


def test_mark_restarted():
  usage = _tracker([0, 1, 5, 9, 10], [0.0, 0.1, 0.2, 0.3, 0.4])
  dead = cu.dead_mask(usage, 10, 5)
  new = cu.mark_restarted(usage, dead, jnp.int32(10))
  # Restarted, not used: last_used is unchanged, so window usage does not count them.
  np.testing.assert_array_equal(new['last_used'], usage['last_used'])
  np.testing.assert_array_equal(new['last_refreshed'], [10, 10, 10, 0, 0])
  np.testing.assert_array_equal(new['counts_ema'], usage['counts_ema'])
  assert cu.window_usage(new, 10, 5) == cu.window_usage(usage, 10, 5)
  assert not np.any(cu.dead_mask(new, 10, 5))
  # ...and a restarted code that stays unused is dead again restart_after steps later.
  np.testing.assert_array_equal(cu.dead_mask(new, 15, 5), [True, True, True, True, True])


def test_works_under_pmap():
  n_dev = 4
  assert jax.local_device_count() >= n_dev, 'needs 4 devices; run via tests/conftest.py'

  def step(usage, counts, steps_done):
    counts = jax.lax.psum(counts, 'batch')
    usage = cu.update(usage, counts, steps_done)
    return usage, cu.window_usage(usage, steps_done, 1)

  per_device = np.zeros((n_dev, V), np.float32)
  per_device[np.arange(n_dev), np.arange(n_dev)] = 1.0  # device i chooses code i
  usage = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), cu.init(V))
  usage, used = jax.pmap(step, axis_name='batch', in_axes=(0, 0, None))(
      usage, per_device, jnp.int32(1))
  np.testing.assert_array_equal(usage['last_used'],
                                np.tile([1] * n_dev + [0] * (V - n_dev), (n_dev, 1)))
  np.testing.assert_allclose(used, np.full(n_dev, n_dev / V))


def _bar_heights(image, colour):
  """Per-column height of a bar of `colour` standing on the baseline strip."""
  bar_px = image.shape[0] - cu.BASELINE_PX
  is_bar = np.all(image[:bar_px] == np.array(colour, np.uint8), axis=-1)
  top = np.where(is_bar.any(axis=0), np.argmax(is_bar, axis=0), bar_px)
  return bar_px - top


def test_histogram_image_small_vocabulary():
  freq = np.array([0.0, 0.05, 0.5, 0.0, 0.005, 0.3, 0.0, 0.145], np.float32)
  height, max_width = 64, 100
  image = cu.histogram_image(freq, height=height, max_width=max_width)
  per_code = max_width // freq.size
  chex.assert_shape(image, (height, freq.size * per_code, 3))
  assert image.dtype == np.uint8
  columns = image[:, ::per_code]  # one column per code, most used first
  # Baseline strip: red under the three never-used codes (sorted to the right end).
  strip = columns[height - cu.BASELINE_PX:]
  expected_unused = np.sort(freq)[::-1] == 0
  assert np.all(strip[:, expected_unused] == np.array(cu.UNUSED_COLOR, np.uint8))
  assert np.all(strip[:, ~expected_unused] == np.array(cu.USED_COLOR, np.uint8))
  assert cu.UNUSED_COLOR != cu.USED_COLOR
  # Bars: log10 scale over DECADES decades below the largest frequency.
  bar_px = height - cu.BASELINE_PX
  sorted_freq = np.sort(freq.astype(np.float64))[::-1]
  with np.errstate(divide='ignore'):
    rel = (np.log10(sorted_freq) - np.log10(sorted_freq[0]) + cu.DECADES) / cu.DECADES
  expected = np.where(sorted_freq > 0, np.clip(np.round(rel * bar_px), 1, bar_px), 0)
  # The uniform-usage line may cut one pixel off the top of a bar.
  np.testing.assert_allclose(_bar_heights(columns, cu.BAR_COLOR), expected, atol=1)
  assert np.all(np.diff(_bar_heights(columns, cu.BAR_COLOR)) <= 0)
  # The uniform line sits where a bar of frequency 1/V would end.
  row = bar_px - int(np.round((np.log10(1 / freq.size) - np.log10(0.5) + cu.DECADES)
                              / cu.DECADES * bar_px))
  assert np.all(image[row] == np.array(cu.UNIFORM_COLOR, np.uint8))


def test_histogram_image_bins_a_large_vocabulary():
  rng = np.random.default_rng(1)
  freq = rng.pareto(1.5, size=1000)
  freq[rng.permutation(1000)[:300]] = 0.0
  freq /= freq.sum()
  image = cu.histogram_image(freq, height=48, max_width=128)
  chex.assert_shape(image, (48, 128, 3))
  assert image.dtype == np.uint8
  strip = image[-1]
  is_unused = np.all(strip == np.array(cu.UNUSED_COLOR, np.uint8), axis=-1)
  # 300 of 1000 sorted codes are unused: columns whose whole bin lies in the last 30%.
  edges = np.linspace(0, 1000, 129).astype(int)
  np.testing.assert_array_equal(is_unused, edges[:-1] >= 700)
  heights = _bar_heights(image, cu.BAR_COLOR)
  assert np.all(heights[~is_unused] >= 1) and np.all(heights[is_unused] == 0)


def test_histogram_image_before_any_update_is_all_unused():
  image = cu.histogram_image(np.zeros(16), height=32, max_width=64)
  chex.assert_shape(image, (32, 64, 3))
  assert np.all(image[-1] == np.array(cu.UNUSED_COLOR, np.uint8))
  assert np.all(image[:-cu.BASELINE_PX] == np.array(cu.BACKGROUND_COLOR, np.uint8))


@pytest.mark.parametrize('freq, kwargs, message', [
    (np.zeros((2, 3)), {}, 'shape'),
    (np.array([0.5, -0.1]), {}, '>= 0'),
    (np.array([0.5, np.nan]), {}, 'finite'),
    (np.ones(4), {'height': 8}, 'height'),
    (np.ones(4), {'max_width': 0}, 'max_width'),
])
def test_histogram_image_rejects_bad_input(freq, kwargs, message):
  with pytest.raises(ValueError, match=message):
    cu.histogram_image(freq, **kwargs)
