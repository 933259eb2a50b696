"""Tests for the codebook options of VectorQuantizer and EMAVectorQuantizer.

Factorised l2 lookup, entropy penalty, rotation trick and codebook upkeep (`maintain`),
each against an oracle written here in numpy (float64): the rotation matrix built
explicitly, cosine similarities of hand-projected inputs, the entropy formula, the EMA
update with reset statistics, and cluster means of well-separated synthetic clusters.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq import quantizers
from tests import train_util

K = 8  # codebook size
D = 4  # code dimension
BETA = 0.25
STATS = quantizers.STATS
CLASSES = [quantizers.VectorQuantizer, quantizers.EMAVectorQuantizer]


# ---------------------------------------------------------------------------------------
# Numpy oracles and helpers.


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_sq_dist(x, codebook):
  x = np.asarray(x, np.float64)
  codebook = np.asarray(codebook, np.float64)
  return np.sum((x[:, None, :] - codebook[None, :, :]) ** 2, axis=-1)


def _np_entropy(p):
  p = p[p > 0]
  return -np.sum(p * np.log(p))


def _np_entropy_loss(x, codebook, temperature):
  """mean_m H(softmax(-d_m / T)) - H(mean_m softmax(-d_m / T)), in float64."""
  logits = -_np_sq_dist(x, codebook) / temperature
  p = np.exp(logits - logits.max(axis=-1, keepdims=True))
  p /= p.sum(axis=-1, keepdims=True)
  return np.mean([_np_entropy(row) for row in p]) - _np_entropy(p.mean(axis=0))


def _np_rotation_jacobian(z, e):
  """lambda * (I - 2 r r^T + 2 q u^T), the matrix written out."""
  z = np.asarray(z, np.float64)
  e = np.asarray(e, np.float64)
  u = z / np.linalg.norm(z)
  q = e / np.linalg.norm(e)
  r = (u + q) / np.linalg.norm(u + q)
  rotation = np.eye(len(z)) - 2.0 * np.outer(r, r) + 2.0 * np.outer(q, u)
  return np.linalg.norm(e) / np.linalg.norm(z) * rotation


def _codebook(seed, k=K, d=D):
  return np.random.default_rng(seed).normal(size=(k, d)).astype(np.float32)


def _vars_for(cls, codebook, steps=0):
  if cls is quantizers.VectorQuantizer:
    return {'params': {'codebook': jnp.asarray(codebook)}}
  return {STATS: {'codebook': jnp.asarray(codebook),
                  'ema_counts': jnp.zeros((K,), jnp.float32),
                  'ema_sums': jnp.zeros(codebook.shape, jnp.float32),
                  'ema_steps': jnp.asarray(steps, jnp.int32)}}


def _codebook_of(variables):
  if STATS in variables:
    return np.asarray(variables[STATS]['codebook'])
  return np.asarray(variables['params']['codebook'])


_apply = train_util.jit_apply


@functools.partial(jax.jit, static_argnames=('module',))
def _train(module, variables, z):
  out, mutated = module.apply(variables, z, train=True, mutable=[STATS, 'intermediates'])
  return out, mutated


@functools.partial(jax.jit, static_argnames=('module', 'train'))
def _init(module, z, train=False):
  return module.init(jax.random.key(0), z, train=train)


@functools.partial(jax.jit, static_argnames=('module',))
def _maintain(module, variables, z, dead, kmeans_now, key):
  return module.apply(variables, z, dead, kmeans_now, method='maintain',
                      mutable=['params', STATS], rngs={'codebook': key})


def _merge(variables, mutated):
  return {**variables, **{k: v for k, v in mutated.items() if k != 'intermediates'}}


def _require_devices(n):
  count = jax.local_device_count()
  assert count >= n, (
      f'need >= {n} local devices, found {count}; tests/conftest.py must set '
      'XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts.')


# ---------------------------------------------------------------------------------------
# 1. Rotation trick.


def test_rotate_to_forward_is_code_and_jacobian_is_scaled_rotation():
  rng = np.random.default_rng(0)
  rotate = jax.jit(lambda z, e: quantizers.rotate_to(z[None], e[None])[0])
  jacobian = jax.jit(jax.jacobian(rotate))
  for _ in range(3):
    z = rng.normal(size=D).astype(np.float32)
    e = (3.0 * rng.normal(size=D)).astype(np.float32)
    np.testing.assert_allclose(rotate(z, e), e, rtol=0, atol=1e-6 * np.abs(e).max())
    jac = jacobian(z, e)
    expected = _np_rotation_jacobian(z, e)
    np.testing.assert_allclose(jac, expected, rtol=1e-5, atol=1e-5)
    # Not the straight-through identity, and an isometry up to the scale lambda.
    assert np.max(np.abs(expected - np.eye(D))) > 0.1
    scale = np.linalg.norm(e) / np.linalg.norm(z)
    np.testing.assert_allclose(jac.T @ jac / scale ** 2, np.eye(D), atol=1e-4)


def test_rotate_to_degenerate_inputs_stay_finite():
  e = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  grad_fn = jax.jit(jax.jacobian(lambda v: quantizers.rotate_to(v[None], e[None])[0]))
  # Antipodal z: the guard uses the reflection I - 2 q q^T, which still maps u onto q.
  z = -0.5 * e
  jac = np.asarray(grad_fn(jnp.asarray(z)))
  q = e / np.linalg.norm(e)
  reflection = np.eye(D) - 2.0 * np.outer(q, q)
  np.testing.assert_allclose(jac, np.linalg.norm(e) / np.linalg.norm(z) * reflection,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(quantizers.rotate_to(z[None], e[None])[0], e, atol=1e-6)
  # z = 0: straight-through identity.
  jac0 = np.asarray(grad_fn(jnp.zeros(D)))
  np.testing.assert_allclose(jac0, np.eye(D), atol=1e-6)


@pytest.mark.parametrize('cls', CLASSES)
def test_rotation_gradient_through_module_and_losses_unchanged(cls):
  cb = _codebook(1)
  z = np.random.default_rng(2).normal(size=(1, D)).astype(np.float32)
  ste = cls(num_codes=K, code_dim=D, beta=BETA)
  rot = cls(num_codes=K, code_dim=D, beta=BETA, gradient='rotation')
  variables = _vars_for(cls, cb)
  idx = int(np.argmin(_np_sq_dist(z, cb)))

  out = _apply(rot, variables, z)
  assert int(out.indices[0]) == idx
  np.testing.assert_allclose(out.quantized[0], cb[idx], rtol=0, atol=1e-6)
  ste_out = _apply(ste, variables, z)
  for name in ('commitment_loss', 'codebook_loss', 'loss'):
    np.testing.assert_array_equal(getattr(out, name), getattr(ste_out, name), err_msg=name)

  jac = jax.jit(jax.jacobian(lambda v: rot.apply(variables, v[None]).quantized[0]))(z[0])
  np.testing.assert_allclose(jac, _np_rotation_jacobian(z[0], cb[idx]), rtol=1e-5, atol=1e-5)
  if cls is quantizers.VectorQuantizer:
    # As with straight-through, the output sends no gradient to the codebook.
    g = jax.jit(jax.grad(lambda p: jnp.sum(rot.apply({'params': p}, z).quantized)))(
        variables['params'])
    np.testing.assert_array_equal(g['codebook'], 0.0)


# ---------------------------------------------------------------------------------------
# 2. Factorised l2 lookup.


def _projected(params, z):
  """Hand-written Dense + l2 normalisation in float64."""
  kernel = np.asarray(params['lookup_in']['kernel'], np.float64)
  bias = np.asarray(params['lookup_in']['bias'], np.float64)
  return _np_normalize(np.asarray(z, np.float64).reshape(-1, D) @ kernel + bias)


def _decoded(params, codes):
  kernel = np.asarray(params['lookup_out']['kernel'], np.float64)
  bias = np.asarray(params['lookup_out']['bias'], np.float64)
  return codes @ kernel + bias


@pytest.mark.parametrize('cls', CLASSES)
def test_factorised_l2_lookup_picks_highest_cosine_similarity(cls):
  lookup_dim = 3
  module = cls(num_codes=K, code_dim=D, beta=BETA, lookup_dim=lookup_dim, l2_normalize=True)
  z = np.random.default_rng(3).normal(size=(2, 5, D)).astype(np.float32)
  variables = _init(module, z)
  params = variables['params']
  cb = _codebook_of(variables)
  chex.assert_shape(cb, (K, lookup_dim))
  chex.assert_shape([params['lookup_in']['kernel'], params['lookup_out']['kernel']],
                    [(D, lookup_dim), (lookup_dim, D)])
  if cls is quantizers.EMAVectorQuantizer:
    np.testing.assert_allclose(np.linalg.norm(cb, axis=-1), 1.0, rtol=1e-6)

  x = _projected(params, z)
  cos = x @ _np_normalize(cb).T
  top2 = np.sort(cos, axis=-1)[:, -2:]
  assert np.min(top2[:, 1] - top2[:, 0]) > 1e-4, 'near-tie in test data; change the seed'
  expected = np.argmax(cos, axis=-1)

  out = _apply(module, variables, z)
  np.testing.assert_array_equal(out.indices.reshape(-1), expected)
  np.testing.assert_array_equal(_apply(module, variables, z, method='encode_to_indices'),
                                out.indices)
  codes = _np_normalize(cb)[expected]
  mse = np.mean((x - codes) ** 2)
  np.testing.assert_allclose(out.commitment_loss, mse, rtol=1e-5)
  if cls is quantizers.VectorQuantizer:
    np.testing.assert_allclose(out.codebook_loss, mse, rtol=1e-5)
  decoded = _decoded(params, codes).reshape(z.shape)
  np.testing.assert_allclose(out.quantized, decoded, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_apply(module, variables, out.indices, method='lookup'),
                             decoded, rtol=1e-5, atol=1e-5)


def test_ema_l2_update_averages_normalised_vectors_and_normalises_codebook():
  decay, epsilon = 0.8, 1e-3
  module = quantizers.EMAVectorQuantizer(num_codes=K, code_dim=D, decay=decay,
                                         epsilon=epsilon, l2_normalize=True)
  cb = _np_normalize(_codebook(5)).astype(np.float32)
  rng = np.random.default_rng(6)
  assign = np.concatenate([np.arange(K), rng.integers(0, K, 8)])
  z = (3.0 * (cb[assign] + 0.05 * rng.normal(size=(len(assign), D)))).astype(np.float32)
  out, mutated = _train(module, _vars_for(quantizers.EMAVectorQuantizer, cb), z)

  x = _np_normalize(z)
  idx = np.argmax(x @ cb.T, axis=-1)
  np.testing.assert_array_equal(out.indices, idx)
  n = np.bincount(idx, minlength=K).astype(np.float64)
  s = np.zeros((K, D))
  np.add.at(s, idx, x)
  stats = mutated[STATS]
  np.testing.assert_allclose(stats['ema_sums'], (1 - decay) * s, rtol=1e-5, atol=1e-6)
  # First step: the debiased averages are this batch's n and s.
  total = n.sum()
  smoothed = (n + epsilon) / (total + K * epsilon) * total
  np.testing.assert_allclose(stats['codebook'], _np_normalize(s / smoothed[:, None]),
                             rtol=1e-5, atol=1e-6)
  # What the step gathers: the lookup-space inputs, without gradient.
  np.testing.assert_allclose(mutated['intermediates']['lookup_input'][0], x, rtol=1e-5,
                             atol=1e-6)


# ---------------------------------------------------------------------------------------
# 3. Entropy penalty.


@pytest.mark.parametrize('cls', CLASSES)
def test_entropy_penalty_matches_numpy_and_enters_loss(cls):
  temperature, weight = 0.7, 0.3
  module = cls(num_codes=K, code_dim=D, beta=BETA, entropy_weight=weight,
               entropy_temperature=temperature)
  cb = _codebook(7)
  z = np.random.default_rng(8).normal(size=(3, 5, D)).astype(np.float32)
  out = _apply(module, _vars_for(cls, cb), z)
  expected = _np_entropy_loss(z.reshape(-1, D), cb, temperature)
  assert abs(expected) > 0.1  # not a vacuous comparison
  np.testing.assert_allclose(out.entropy_loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      out.loss, out.codebook_loss + BETA * out.commitment_loss + weight * expected,
      rtol=1e-5)
  # Off by default: zero, and not part of the loss.
  plain = _apply(cls(num_codes=K, code_dim=D, beta=BETA), _vars_for(cls, cb), z)
  assert float(plain.entropy_loss) == 0.0
  np.testing.assert_allclose(plain.loss, out.loss - weight * expected, rtol=1e-5)


def test_entropy_penalty_gradient_finite_when_probabilities_underflow():
  # Far from every code at T = 0.01: most softmax entries are exactly 0 in float32.
  cb = _codebook(9)
  z = (20.0 * np.random.default_rng(10).normal(size=(6, D))).astype(np.float32)
  module = quantizers.VectorQuantizer(num_codes=K, code_dim=D, entropy_weight=1.0)
  grad_fn = jax.grad(lambda p, z: module.apply({'params': p}, z).entropy_loss, argnums=(0, 1))
  grads = jax.jit(grad_fn)({'codebook': jnp.asarray(cb)}, jnp.asarray(z))
  chex.assert_tree_all_finite(grads)


def test_entropy_penalty_under_pmap_equals_single_device():
  num_devices = 4
  _require_devices(num_devices)
  kwargs = dict(num_codes=K, code_dim=D, entropy_weight=1.0, entropy_temperature=0.5)
  single = quantizers.VectorQuantizer(**kwargs)
  sharded = quantizers.VectorQuantizer(axis_name='batch', **kwargs)
  cb = _codebook(11)
  z = np.random.default_rng(12).normal(size=(num_devices, 3, D)).astype(np.float32)

  def entropy(module, params, z):
    return module.apply({'params': params}, z).entropy_loss

  def per_device(params, z):
    value, grad = jax.value_and_grad(functools.partial(entropy, sharded))(params, z)
    return value, jax.lax.pmean(grad, 'batch')  # as the train step averages gradients

  params = {'codebook': jnp.asarray(cb)}
  replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_devices,) + x.shape), params)
  values, grads = jax.pmap(per_device, axis_name='batch', devices=jax.local_devices()[:4])(
      replicated, z)
  flat = z.reshape(-1, D)
  value_1, grad_1 = jax.value_and_grad(functools.partial(entropy, single))(params, flat)
  expected = _np_entropy_loss(flat, cb, 0.5)
  for device in range(num_devices):
    np.testing.assert_allclose(values[device], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads['codebook'][device], grad_1['codebook'], rtol=1e-4,
                               atol=1e-6)
  np.testing.assert_allclose(value_1, expected, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(grad_1['codebook'])) > 1e-3


# ---------------------------------------------------------------------------------------
# 4. Codebook upkeep: restarts and k-means.


def _np_ema_step(counts, sums, steps, z, codebook, decay, epsilon):
  """One EMA update from given hidden statistics (the numpy twin of the docstring)."""
  z = np.asarray(z, np.float64)
  idx = np.argmin(_np_sq_dist(z, codebook), axis=-1)
  n = np.bincount(idx, minlength=K)
  s = np.zeros_like(sums)
  np.add.at(s, idx, z)
  counts = decay * counts + (1 - decay) * n
  sums = decay * sums + (1 - decay) * s
  debias = 1 - decay ** (steps + 1)
  avg_counts, avg_sums = counts / debias, sums / debias
  total = avg_counts.sum()
  smoothed = (avg_counts + epsilon) / (total + K * epsilon) * total
  return counts, sums, avg_sums / smoothed[:, None]


@pytest.mark.parametrize('cls', CLASSES)
def test_restart_replaces_exactly_dead_rows_with_rows_of_z(cls):
  decay, epsilon = 0.9, 1e-3
  kwargs = dict(decay=decay, epsilon=epsilon) if cls is quantizers.EMAVectorQuantizer else {}
  module = cls(num_codes=K, code_dim=D, **kwargs)
  rng = np.random.default_rng(13)
  cb = _codebook(14)
  variables = _vars_for(cls, cb)
  # Two EMA steps first, so the statistics being reset are not trivially zero.
  for _ in range(2):
    _, mutated = _train(module, variables, rng.normal(size=(12, D)).astype(np.float32))
    variables = _merge(variables, mutated)
  before = jax.device_get(variables)

  z = (5.0 + rng.normal(size=(20, D))).astype(np.float32)  # far from the old codes
  dead = np.zeros(K, bool)
  dead[[1, 4, 6]] = True
  changed, updates = _maintain(module, variables, z, dead, False, jax.random.key(15))
  np.testing.assert_array_equal(changed, dead)
  after = _merge(variables, updates)
  new_cb = _codebook_of(after)
  old_cb = _codebook_of(before)
  np.testing.assert_array_equal(new_cb[~dead], old_cb[~dead])  # bitwise
  picked = [int(np.flatnonzero(np.all(z == row, axis=-1))[0]) for row in new_cb[dead]]
  assert len(set(picked)) == dead.sum(), f'restarts reused a row of z: {picked}'

  if cls is quantizers.VectorQuantizer:
    assert set(updates) == {'params'}
    # A following call reads the written codebook: each new code quantizes to itself.
    out = _apply(module, after, new_cb[dead])
    np.testing.assert_array_equal(out.indices, np.flatnonzero(dead))
    return

  stats, old = jax.device_get(after[STATS]), before[STATS]
  assert int(stats['ema_steps']) == 2
  weight = 1 - decay ** 2  # one vector after zero-debiasing at t = 2
  np.testing.assert_array_equal(stats['ema_counts'][~dead], old['ema_counts'][~dead])
  np.testing.assert_array_equal(stats['ema_sums'][~dead], old['ema_sums'][~dead])
  np.testing.assert_allclose(stats['ema_counts'][dead], weight, rtol=1e-6)
  np.testing.assert_allclose(stats['ema_sums'][dead], new_cb[dead] * weight, rtol=1e-6)

  # The next EMA update continues from the reset statistics: vectors near one restarted
  # code, plus some near an untouched one; the other restarted codes get nothing.
  z_next = np.concatenate([new_cb[4] + 0.01 * rng.normal(size=(3, D)),
                           old_cb[0] + 0.01 * rng.normal(size=(3, D))]).astype(np.float32)
  _, mutated = jax.device_get(_train(module, after, z_next))
  counts, sums, expected_cb = _np_ema_step(
      stats['ema_counts'].astype(np.float64), stats['ema_sums'].astype(np.float64), 2,
      z_next, new_cb, decay, epsilon)
  np.testing.assert_allclose(mutated[STATS]['ema_counts'], counts, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mutated[STATS]['codebook'], expected_cb, rtol=1e-4, atol=1e-5)
  # An unassigned restarted code keeps (to the Laplace smoothing) the vector it was given.
  np.testing.assert_allclose(mutated[STATS]['codebook'][[1, 6]], new_cb[[1, 6]], rtol=1e-2)


def _clusters(seed, spherical):
  """K well-separated clusters of different sizes: (points [N, D], means [K, D], sizes)."""
  rng = np.random.default_rng(seed)
  centres = 10.0 * np.eye(K, D) if K <= D else 10.0 * rng.normal(size=(K, D))
  sizes = np.arange(1, K + 1)
  points = np.concatenate([c + 0.05 * rng.normal(size=(n, D)) for c, n in zip(centres, sizes)])
  if spherical:
    points = _np_normalize(points)
  labels = np.repeat(np.arange(K), sizes)
  means = np.stack([points[labels == k].mean(0) for k in range(K)])
  if spherical:
    means = _np_normalize(means)
  return points.astype(np.float32), means, sizes


@pytest.mark.parametrize('cls,l2', [(quantizers.VectorQuantizer, False),
                                    (quantizers.EMAVectorQuantizer, False),
                                    (quantizers.EMAVectorQuantizer, True)])
def test_kmeans_now_sets_codebook_to_cluster_means(cls, l2):
  decay = 0.9
  kwargs = dict(decay=decay) if cls is quantizers.EMAVectorQuantizer else {}
  module = cls(num_codes=K, code_dim=D, l2_normalize=l2, kmeans_iters=10, **kwargs)
  points, means, sizes = _clusters(16, spherical=l2)
  variables = _vars_for(cls, _codebook(17), steps=1)
  changed, updates = _maintain(module, variables, points, np.zeros(K, bool), True,
                               jax.random.key(18))
  np.testing.assert_array_equal(changed, True)
  new_cb = _codebook_of(_merge(variables, updates))
  # Match each centroid to its cluster (k-means may order them in any way).
  order = np.argmin(_np_sq_dist(new_cb, means), axis=-1)
  np.testing.assert_array_equal(np.sort(order), np.arange(K))
  np.testing.assert_allclose(new_cb, means[order], rtol=1e-4, atol=1e-5)
  if cls is quantizers.EMAVectorQuantizer:
    stats = updates[STATS]
    debias = 1 - decay
    np.testing.assert_allclose(stats['ema_counts'], sizes[order] * debias, rtol=1e-5)
    np.testing.assert_allclose(stats['ema_sums'],
                               new_cb * (sizes[order] * debias)[:, None], rtol=1e-5)


@pytest.mark.parametrize('cls', CLASSES)
def test_maintain_under_pmap_gives_identical_codebooks_equal_to_one_device(cls):
  num_devices = 4
  _require_devices(num_devices)
  extra = dict(lookup_dim=3, l2_normalize=True) if cls is quantizers.EMAVectorQuantizer else {}
  single = cls(num_codes=K, code_dim=D, **extra)
  sharded = cls(num_codes=K, code_dim=D, axis_name='batch', **extra)
  key = jax.random.key(19)
  z_e = np.random.default_rng(20).normal(size=(num_devices, 6, D)).astype(np.float32)
  variables = _init(single, z_e[0])
  dead = np.zeros(K, bool)
  dead[[0, 5]] = True

  def step(module, variables, z_e, kmeans_now, gather):
    # Different z_e per device; the EMA statistics and the gathered rows are global.
    _, mutated = module.apply(variables, z_e, train=True, mutable=[STATS, 'intermediates'])
    z = gather(mutated['intermediates']['lookup_input'][0])
    variables = _merge(variables, mutated)
    changed, updates = module.apply(variables, z, dead, kmeans_now, method='maintain',
                                    mutable=['params', STATS], rngs={'codebook': key})
    return _merge(variables, updates), changed

  p_step = jax.pmap(
      functools.partial(step, sharded, gather=lambda x: jax.lax.all_gather(x, 'batch',
                                                                           tiled=True)),
      axis_name='batch', devices=jax.local_devices()[:num_devices])
  s_step = jax.jit(functools.partial(step, single, gather=lambda x: x))
  replicated = jax.tree.map(lambda x: np.broadcast_to(x, (num_devices,) + x.shape), variables)
  single_vars = variables
  for kmeans_now in (False, True):
    flags = np.full((num_devices,), kmeans_now)
    replicated, changed = p_step(replicated, z_e, flags)
    single_vars, changed_1 = s_step(single_vars, z_e.reshape(-1, D), kmeans_now)
    np.testing.assert_array_equal(changed_1, True if kmeans_now else dead)
    host = jax.device_get(replicated)
    for path, leaf in jax.tree_util.tree_leaves_with_path(host):
      for device in range(1, num_devices):
        np.testing.assert_array_equal(leaf[device], leaf[0], err_msg=str(path))
    for device in range(num_devices):
      np.testing.assert_array_equal(changed[device], changed_1)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], host), single_vars,
                                rtol=1e-5, atol=1e-5)


def test_gradient_codebook_maintain_writes_params_read_back_in_same_apply():
  module = quantizers.VectorQuantizer(num_codes=K, code_dim=D)
  z = (4.0 + np.random.default_rng(22).normal(size=(10, D))).astype(np.float32)
  dead = np.zeros(K, bool)
  dead[3] = True

  def maintain_then_lookup(m, z, dead):
    changed = m.maintain(z, dead, jnp.asarray(False))
    return changed, m.lookup(jnp.arange(K))

  apply = jax.jit(functools.partial(module.apply, method=maintain_then_lookup,
                                    mutable=['params']))
  (changed, codes), updates = apply(_vars_for(quantizers.VectorQuantizer, _codebook(23)), z,
                                    dead, rngs={'codebook': jax.random.key(24)})
  np.testing.assert_array_equal(changed, dead)
  np.testing.assert_array_equal(codes, updates['params']['codebook'])
  assert np.any(np.all(z == np.asarray(codes[3]), axis=-1))


# ---------------------------------------------------------------------------------------
# 5. Sown lookup inputs, properties, errors.


@pytest.mark.parametrize('cls', CLASSES)
def test_lookup_input_sown_only_in_training(cls):
  module = cls(num_codes=K, code_dim=D)
  z = np.random.default_rng(25).normal(size=(2, 3, D)).astype(np.float32)
  variables = _init(module, z, train=True)
  assert 'intermediates' not in variables
  _, mutated = _train(module, variables, z)
  np.testing.assert_array_equal(mutated['intermediates']['lookup_input'][0],
                                z.reshape(-1, D))
  _, mutated = jax.jit(functools.partial(module.apply, mutable=['intermediates']))(variables, z)
  assert 'intermediates' not in mutated


@pytest.mark.parametrize('cls', CLASSES)
def test_token_properties_on_unbound_module(cls):
  module = cls(num_codes=512, code_dim=D)
  assert (module.vocab_size, module.index_depth, module.usage_size) == (512, 1, 512)
  assert module.bits_per_token == 9.0


@pytest.mark.parametrize('cls', CLASSES)
def test_bad_options_raise_value_errors(cls):
  z = jnp.zeros((2, D))
  with pytest.raises(ValueError, match=r"gradient='rotate'"):
    cls(num_codes=K, code_dim=D, gradient='rotate').init(jax.random.key(0), z)
  with pytest.raises(ValueError, match=r'lookup_dim=-1'):
    cls(num_codes=K, code_dim=D, lookup_dim=-1).init(jax.random.key(0), z)
  module = cls(num_codes=K, code_dim=D, lookup_dim=3)
  variables = _init(module, z)
  with pytest.raises(ValueError, match=r'\[N, 3\].*\(5, 4\)'):
    _maintain(module, variables, jnp.zeros((5, D)), jnp.zeros(K, bool), False,
              jax.random.key(1))


# ---------------------------------------------------------------------------------------
# 6. Where beta goes (taming's legacy placement, for converted checkpoints).


@pytest.mark.parametrize('beta_on', ['commitment', 'codebook'])
def test_beta_on_weighs_the_named_term_in_loss_and_gradients(beta_on):
  cb = _codebook(5)
  z = np.random.default_rng(6).normal(size=(6, D)).astype(np.float32)
  module = quantizers.VectorQuantizer(num_codes=K, code_dim=D, beta=BETA, beta_on=beta_on)
  params = {'codebook': jnp.asarray(cb)}
  idx = np.argmin(_np_sq_dist(z, cb), axis=1)
  diff = z.astype(np.float64) - cb[idx].astype(np.float64)
  mse = np.mean(diff ** 2)  # both terms have this value; only their gradients differ
  w_code, w_commit = (BETA, 1.0) if beta_on == 'codebook' else (1.0, BETA)
  out = _apply(module, {'params': params}, z)
  np.testing.assert_allclose(out.loss, (w_code + w_commit) * mse, rtol=1e-6)
  loss = lambda p, x: module.apply({'params': p}, x).loss
  g_codebook, g_z = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, z)
  # d/dz of w_commit * mean((z - sg e)^2); d/de of w_code * mean((sg z - e)^2), summed per row.
  np.testing.assert_allclose(g_z, w_commit * 2 * diff / diff.size, rtol=1e-5, atol=1e-7)
  want = np.zeros_like(cb, np.float64)
  np.add.at(want, idx, -w_code * 2 * diff / diff.size)
  np.testing.assert_allclose(g_codebook['codebook'], want, rtol=1e-5, atol=1e-7)


def test_unknown_beta_on_is_a_value_error():
  with pytest.raises(ValueError, match=r"beta_on='encoder' is unknown"):
    quantizers.VectorQuantizer(num_codes=K, code_dim=D, beta_on='encoder').init(
        jax.random.key(0), jnp.zeros((2, D)))
