"""Token-level editing on tiny priors: known tokens never change, GPT completion and the
sliding window against the ordinary sampler, MaskGIT windows, the masked metrics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.core import metrics
from vq.generation import edit_eval
from vq.generation import editing
from vq.generation import large
from vq.generation import priors
from vq.generation import sampling
from vq.generation import transformer

LAYOUT = priors.TokenLayout(num_codes=16, num_classes=3, grid=(4, 4))


@functools.lru_cache(maxsize=None)
def _prior(kind):
  model = priors.build_model(kind, LAYOUT, width=32, depth=1, num_heads=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, LAYOUT.length + 1), jnp.int32))
  # Larger weights than the N(0, 0.02) init, so that logits differ clearly between
  # positions and contexts (a window read at the wrong place would show).
  params = jax.tree.map(lambda x: x * 8.0, params['params'])
  return model, params


@functools.lru_cache(maxsize=None)
def _apply(model):
  """The full (teacher-forced) pass, jitted once."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x))


def _keys(n, seed=0):
  return sampling.row_keys(jax.random.PRNGKey(seed), n)


def _random_tokens(n, seed=0):
  return np.random.default_rng(seed).integers(0, LAYOUT.num_codes, (n, LAYOUT.length)
                                              ).astype(np.int32)


def test_maskgit_completion_never_changes_tokens_outside_the_region():
  model, params = _prior('maskgit')
  tokens = _random_tokens(6)
  region = np.random.default_rng(1).random((6, LAYOUT.length)) < 0.4
  region[:, 0] = True
  labels = np.array([0, 1, 2, -1, 0, 1], np.int32)
  settings = sampling.Settings(num_iterations=3, guidance=2.0, temperature=0.7)
  out = np.asarray(jax.jit(lambda p, t, r: editing.complete_tokens(
      'maskgit', model, p, LAYOUT, labels, _keys(6), settings, t, r))(params, tokens, region))
  np.testing.assert_array_equal(out[~region], tokens[~region])
  assert out.min() >= 0 and out.max() < LAYOUT.num_codes
  assert np.any(out[region] != tokens[region])


def test_gpt_completion_with_nothing_known_is_the_ordinary_sampler():
  model, params = _prior('gpt')
  labels = jnp.array([0, 2, -1, 1], jnp.int32)
  for settings in (sampling.Settings(), sampling.Settings(guidance=3.0, top_k=5)):
    ordinary = sampling.sample_gpt(model, params, LAYOUT, labels, _keys(4), settings)
    completed = editing.complete_gpt(model, params, LAYOUT, labels, _keys(4), settings,
                                     jnp.zeros((4, LAYOUT.length), jnp.int32),
                                     jnp.zeros((4, LAYOUT.length), bool))
    np.testing.assert_array_equal(completed, ordinary)


def test_gpt_completion_of_a_suffix_keeps_the_prefix_and_conditions_on_it():
  model, params = _prior('gpt')
  tokens = _random_tokens(4, seed=3)
  region = np.zeros((4, LAYOUT.length), bool)
  region[:, 9:] = True
  labels = np.array([0, 1, 2, 0], np.int32)
  out = np.asarray(editing.complete_tokens('gpt', model, params, LAYOUT, labels, _keys(4),
                                           sampling.Settings(temperature=1e-4), tokens,
                                           region))
  np.testing.assert_array_equal(out[:, :9], tokens[:, :9])
  # Near-zero temperature: position 9 is the argmax of the causal pass over the prefix.
  inputs = priors.gpt_inputs(LAYOUT, jnp.asarray(out), jnp.asarray(labels))
  logits = np.asarray(_apply(model)(params, inputs))
  np.testing.assert_array_equal(out[:, 9:], np.argmax(logits[:, 9:], axis=-1))


def _kv_cache_logits(model, params, tokens, labels):
  """The ordinary sampler's logits: one position per call through the key/value cache."""
  decoder = model.clone(decode=True)
  cache = transformer.init_cache(decoder, tokens.shape[0])
  previous = LAYOUT.class_tokens(labels)
  out = []
  for i in range(tokens.shape[1]):
    logits, updates = decoder.apply({'params': params, 'cache': cache}, previous[:, None],
                                    mutable=['cache'])
    cache = updates['cache']
    out.append(np.asarray(logits[:, 0]))
    previous = tokens[:, i]
  return np.stack(out, axis=1)


def test_sliding_window_on_the_training_grid_gives_the_ordinary_logits_and_samples():
  model, params = _prior('gpt')
  tokens = jnp.asarray(_random_tokens(3, seed=5))
  labels = jnp.array([2, 0, 1], jnp.int32)
  sliding = np.asarray(large.sliding_window_logits(model, params, LAYOUT, labels, tokens,
                                                   LAYOUT.grid))
  np.testing.assert_allclose(sliding, _kv_cache_logits(model, params, tokens, labels),
                             rtol=1e-4, atol=1e-4)
  settings = sampling.Settings(guidance=2.0)
  np.testing.assert_array_equal(
      large.sample_gpt_sliding(model, params, LAYOUT, labels, _keys(3), settings, LAYOUT.grid),
      sampling.sample_gpt(model, params, LAYOUT, labels, _keys(3), settings))


def _taming_local(i, size, window):
  """taming-transformers' sample_conditional.py rule, as written there (even windows)."""
  half = window // 2
  if i <= half:
    return i
  if size - i < half:
    return window - (size - i)
  return half


def test_sliding_window_on_a_larger_grid_reads_taming_windows():
  model, params = _prior('gpt')
  big = (6, 7)
  tokens = np.random.default_rng(7).integers(0, 16, (2, 6 * 7)).astype(np.int32)
  labels = jnp.array([1, -1], jnp.int32)
  sliding = np.asarray(large.sliding_window_logits(model, params, LAYOUT, labels,
                                                   jnp.asarray(tokens), big))
  grid = tokens.reshape(2, 6, 7)
  for p in range(6 * 7):
    i, j = divmod(p, 7)
    li, lj = _taming_local(i, 6, 4), _taming_local(j, 7, 4)
    window = grid[:, i - li:i - li + 4, j - lj:j - lj + 4].reshape(2, 16)
    inputs = jnp.concatenate([LAYOUT.class_tokens(labels)[:, None], window[:, :-1]], axis=1)
    want = np.asarray(_apply(model)(params, inputs))[:, li * 4 + lj]
    np.testing.assert_allclose(sliding[:, p], want, rtol=1e-4, atol=1e-4, err_msg=f'p={p}')
  out = large.sample_gpt_sliding(model, params, LAYOUT, labels, _keys(2), sampling.Settings(),
                                 big)
  assert out.shape == (2, 42) and 0 <= int(out.min()) and int(out.max()) < 16


def test_maskgit_windows_cover_the_grid_and_keep_what_earlier_windows_drew():
  assert large.window_origins(16, 8, 4) == [0, 4, 8]
  assert large.window_origins(10, 4, 4) == [0, 4, 6]
  assert large.window_origins(4, 4, 2) == [0]
  model, params = _prior('maskgit')
  labels = jnp.array([0, 2], jnp.int32)
  settings = sampling.Settings(num_iterations=4)
  out = np.asarray(large.sample_maskgit_windows(model, params, LAYOUT, labels, _keys(2),
                                                settings, (6, 6))).reshape(2, 6, 6)
  assert out.max() < LAYOUT.num_codes and out.min() >= 0
  first_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(_keys(2))
  first = np.asarray(sampling.sample_maskgit(model, params, LAYOUT, labels, first_keys,
                                             settings)).reshape(2, 4, 4)
  np.testing.assert_array_equal(out[:, :4, :4], first)
  with pytest.raises(ValueError, match='at least the prior'):
    large.check_grid((3, 8), (4, 4))


def test_nested_edit_regions_take_round_r_times_the_candidates():
  ratios = np.array([0.0, 0.25, 0.5, 1.0])
  candidates = np.zeros((3, 4, 4), bool)
  candidates[:, 1:3] = True                      # 8 candidate tokens per image
  regions = editing.nested_edit_regions(3, (4, 4), ratios, seed=0, candidates=candidates)
  np.testing.assert_array_equal(regions.sum(axis=(2, 3)), [[0, 2, 4, 8]] * 3)
  assert not regions[:, :, [0, 3]].any()
  assert np.all(regions[:, 1] <= regions[:, 2]) and np.all(regions[:, 2] <= regions[:, 3])
  with pytest.raises(ValueError, match='fractions in'):
    editing.check_ratios([0.5, 1.5])


def test_masked_psnr_with_a_full_mask_is_the_image_psnr():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
  b = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
  np.testing.assert_allclose(edit_eval.masked_psnr(a, b, np.ones((3, 8, 8), bool)),
                             metrics.psnr(a.astype(np.float32), b.astype(np.float32)),
                             rtol=1e-5)
  m = np.zeros((3, 8, 8), bool)
  m[:, :2, :3] = True                            # 6 pixels, 18 values
  want = [10 * np.log10(255 ** 2 / np.mean(np.square(a[i, :2, :3].astype(float)
                                                     - b[i, :2, :3]))) for i in range(3)]
  np.testing.assert_allclose(edit_eval.masked_psnr(a, b, m), want, rtol=1e-12)


def test_masked_lpips_with_a_full_mask_is_lpips():
  from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
  want = jax.jit(lpips.LPIPS().apply)({'params': lpips.load_pretrained_params()},
                                      a / 127.5 - 1.0, b / 127.5 - 1.0)
  fn = edit_eval.MaskedLPIPS(batch_size=2)
  np.testing.assert_allclose(fn(a, b), want, rtol=1e-4)
  same_left = b.copy()
  same_left[:, :, :16] = a[:, :, :16]
  right = np.zeros((2, 32, 32), bool)
  right[:, :, 16:] = True
  left_only = fn(a, same_left, ~right)
  assert np.all(left_only < fn(a, same_left, right))


def test_level_weights_are_the_masked_fraction_of_each_cell():
  m = np.zeros((1, 4, 4), np.float32)
  m[0, 0, :3] = 1.0
  np.testing.assert_allclose(edit_eval.level_weights(jnp.asarray(m), (2, 2))[0],
                             [[0.5, 0.25], [0.0, 0.0]])


def test_markdown_table_shows_each_prior_and_the_baselines_once():
  scores = lambda x: {'psnr_masked': x, 'lpips_masked': x / 100, 'fd_vgg': x * 10,
                      'num_images': 2}
  maskgit = {'objective': 'maskgit', 'step': 9, 'center': {
      'pixel_fraction': 0.25, 'prior': scores(20), 'opencv_telea': scores(15)}}
  gpt = {'objective': 'gpt', 'step': 7, 'center': {
      'pixel_fraction': 0.25, 'prior_not_applicable': 'no', 'opencv_telea': scores(15)},
         'bottom': {'pixel_fraction': 0.5, 'prior': scores(12), 'opencv_telea': scores(13)}}
  assert edit_eval.markdown_table([maskgit, gpt]).splitlines()[2:] == [
      '| center | maskgit (step 9) | 20.00 | 0.200 | 200.0 |',
      '| center | opencv_telea | 15.00 | 0.150 | 150.0 |',
      '| bottom | gpt (step 7) | 12.00 | 0.120 | 120.0 |',
      '| bottom | opencv_telea | 13.00 | 0.130 | 130.0 |']
