"""Samplers against independent oracles: greedy decoding, numpy filters, the cosine schedule."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.generation import priors
from vq.generation import sampling

LAYOUT = priors.TokenLayout(num_codes=12, num_classes=3, grid=(2, 3))


@functools.lru_cache(maxsize=None)
def _prior(kind):
  model = priors.build_model(kind, LAYOUT, width=32, depth=2, num_heads=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, LAYOUT.length + 1), jnp.int32))
  return model, params['params']


def _sample(kind, labels, key, **settings):
  model, params = _prior(kind)
  fn = sampling.sample_gpt if kind == 'gpt' else sampling.sample_maskgit
  s = sampling.Settings(**settings)
  keys = sampling.row_keys(key, len(labels))
  return np.asarray(jax.jit(lambda p, l, k: fn(model, p, LAYOUT, l, k, s))(
      params, jnp.asarray(labels), keys))


def test_guidance_scale_one_is_the_conditional_logits():
  c, u = np.random.default_rng(0).normal(size=(2, 4, 7)).astype(np.float32)
  np.testing.assert_array_equal(sampling.guided(c, u, 1.0), c)
  np.testing.assert_array_equal(sampling.guided(c, u, 0.0), u)
  np.testing.assert_allclose(sampling.guided(c, u, 3.0), u + 3 * (c - u), rtol=1e-6)


def _numpy_filter(logits, top_k, top_p):
  """Top-k, then the nucleus of the distribution renormalised over the top k (as HF does)."""
  out = logits.copy()
  for row in out:
    order = np.argsort(-row, kind='stable')
    keep = np.zeros(row.shape, bool)
    k = top_k or len(row)
    keep[order[:k]] = True
    probs = np.where(keep, np.exp(row - row.max()), 0.0)
    probs /= probs.sum()
    mass = 0.0
    nucleus = np.zeros(row.shape, bool)
    for i in order:
      nucleus[i] = True
      mass += probs[i]
      if mass >= top_p:
        break
    row[~(keep & (nucleus if top_p < 1 else True))] = -np.inf
  return out


@pytest.mark.parametrize('top_k,top_p', [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.8), (1, 1.0)])
def test_filter_logits_matches_a_numpy_oracle(top_k, top_p):
  logits = np.random.default_rng(top_k).normal(size=(5, 9)).astype(np.float32) * 2
  got = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, top_p))
  want = _numpy_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(want), got > -1e30)
  np.testing.assert_array_equal(got[np.isfinite(want)], want[np.isfinite(want)])


@pytest.mark.parametrize('kind', ['gpt', 'maskgit'])
def test_sampling_is_a_function_of_the_key(kind):
  labels = [0, 1, 2, -1, 0, 1]
  a = _sample(kind, labels, jax.random.PRNGKey(1))
  b = _sample(kind, labels, jax.random.PRNGKey(1))
  c = _sample(kind, labels, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.shape == (6, LAYOUT.length) and a.min() >= 0 and a.max() < LAYOUT.num_codes


@pytest.mark.parametrize('kind', ['gpt', 'maskgit'])
def test_a_row_does_not_depend_on_its_batch(kind):
  key = jax.random.PRNGKey(3)
  labels = [2, 0, 1, 1]
  together = _sample(kind, labels, key, guidance=2.0)
  model, params = _prior(kind)
  fn = sampling.sample_gpt if kind == 'gpt' else sampling.sample_maskgit
  s = sampling.Settings(guidance=2.0)
  alone = np.asarray(fn(model, params, LAYOUT, jnp.asarray(labels[2:3]),
                        sampling.row_keys(key, 1, offset=2), s))
  np.testing.assert_array_equal(together[2:3], alone)


def test_greedy_kv_cached_gpt_equals_greedy_decoding_with_the_full_model():
  model, params = _prior('gpt')
  labels = np.array([0, 2, -1])
  got = _sample('gpt', labels, jax.random.PRNGKey(0), top_k=1)
  # Oracle: no cache, the whole prefix re-run at every position, argmax taken in numpy.
  tokens = np.zeros((3, LAYOUT.length), np.int32)
  apply = jax.jit(lambda x: model.apply({'params': params}, x))
  for i in range(LAYOUT.length):
    inputs = np.asarray(priors.gpt_inputs(LAYOUT, jnp.asarray(tokens), jnp.asarray(labels)))
    logits = np.asarray(apply(jnp.asarray(inputs)))
    tokens[:, i] = logits[:, i].argmax(-1)
  np.testing.assert_array_equal(got, tokens)


def test_guided_greedy_gpt_uses_the_guided_logits():
  model, params = _prior('gpt')
  labels = np.array([1, 2])
  s = 3.0
  got = _sample('gpt', labels, jax.random.PRNGKey(0), top_k=1, guidance=s)
  tokens = np.zeros((2, LAYOUT.length), np.int32)
  apply = jax.jit(lambda x: model.apply({'params': params}, x))
  for i in range(LAYOUT.length):
    cond = np.asarray(apply(priors.gpt_inputs(LAYOUT, jnp.asarray(tokens), jnp.asarray(labels))))
    uncond = np.asarray(apply(priors.gpt_inputs(LAYOUT, jnp.asarray(tokens),
                                                jnp.full((2,), -1))))
    tokens[:, i] = (uncond[:, i] + s * (cond[:, i] - uncond[:, i])).argmax(-1)
  np.testing.assert_array_equal(got, tokens)


def _cosine_oracle(n0, iterations):
  """Masked counts after each iteration, from the schedule's definition."""
  counts, unknown = [], n0
  for t in range(iterations):
    if t == iterations - 1 or unknown == 0:
      n = 0
    else:
      n = math.floor(n0 * math.cos(math.pi / 2 * (t + 1) / iterations))
      n = max(1, min(unknown - 1, n))
    counts.append(n)
    unknown = n
  return counts


@pytest.mark.parametrize('iterations', [1, 3, 6])
def test_maskgit_follows_the_cosine_schedule_and_never_changes_fixed_tokens(iterations):
  model, params = _prior('maskgit')
  labels = jnp.asarray([0, 1, 2, -1])
  mask = LAYOUT.mask_token
  # Row 0 starts all masked, row 1 with two known tokens, row 2 with one masked, row 3 none.
  start = np.full((4, LAYOUT.length), mask, np.int32)
  start[1, [0, 4]] = [3, 7]
  start[2] = [1, 2, 3, 4, mask, 5]
  start[3] = [0, 1, 2, 3, 4, 5]
  settings = sampling.Settings(num_iterations=iterations, guidance=1.5)
  keys = sampling.row_keys(jax.random.PRNGKey(4), 4)
  first, copies = sampling._with_uncond(LAYOUT, labels, settings.guidance)  # pylint: disable=protected-access
  num_start = jnp.sum(jnp.asarray(start) == mask, axis=1)
  step = jax.jit(lambda t, x: sampling.maskgit_iteration(model, params, LAYOUT, first, copies,
                                                         keys, num_start, settings, t, x))
  tokens = start
  oracles = [_cosine_oracle(int(n), iterations) for n in np.asarray(num_start)]
  for t in range(iterations):
    new = np.asarray(step(t, jnp.asarray(tokens)))
    known = tokens != mask
    np.testing.assert_array_equal(new[known], tokens[known])   # fixed tokens never change
    for row in range(4):
      assert (new[row] == mask).sum() == oracles[row][t], (row, t)
    tokens = new
  assert not (tokens == mask).any()                           # the last iteration leaves none
  whole = np.asarray(sampling.sample_maskgit(model, params, LAYOUT, labels, keys, settings,
                                             tokens=jnp.asarray(start)))
  np.testing.assert_array_equal(whole, tokens)


def test_network_evaluations_count():
  s = sampling.Settings(num_iterations=8)
  assert sampling.network_evaluations('gpt', LAYOUT, s) == 6
  assert sampling.network_evaluations('maskgit', LAYOUT, s) == 8
  assert sampling.network_evaluations('maskgit', LAYOUT, s._replace(guidance=2.0)) == 16
