"""Tests for vq.quantizers against numpy oracles, finite differences and hypothesis.

Every expected value is computed here in numpy (float64 where it matters): brute-force
distances, argmin assignments, the straight-through gradients written out by hand, and a
numpy re-implementation of the zero-debiased, Laplace-smoothed EMA codebook update.
"""


import chex
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq import quantizers
from tests import train_util

K = 8  # codebook size used throughout
D = 4  # code dimension
BETA = 0.25
STATS = quantizers.STATS
QUANTIZER_CLASSES = [quantizers.VectorQuantizer, quantizers.EMAVectorQuantizer]


# ---------------------------------------------------------------------------------------
# Numpy oracles and helpers.


def _np_sq_dist(z, codebook):
  """Brute-force ||z - e||^2 in float64 by broadcasting: [M, D] x [K, D] -> [M, K]."""
  codebook = np.asarray(codebook, np.float64)
  z = np.asarray(z, np.float64).reshape(-1, codebook.shape[-1])
  return np.sum((z[:, None, :] - codebook[None, :, :]) ** 2, axis=-1)


def _np_nearest(z, codebook):
  return np.argmin(_np_sq_dist(z, codebook), axis=-1)


def _np_perplexity(counts):
  p = np.asarray(counts, np.float64) / np.sum(counts)
  p = p[p > 0]
  return np.exp(-np.sum(p * np.log(p)))


def _assert_clear_winner(z, codebook, margin):
  """Precondition on test data: no near-ties, so float32 and float64 argmins must agree."""
  d = np.sort(_np_sq_dist(z, codebook), axis=-1)
  gap = np.min(d[:, 1] - d[:, 0])
  assert gap > margin, f'test data has a near-tie (gap {gap}); choose another seed'


def _codebook(seed, k=K, d=D):
  return np.random.default_rng(seed).normal(size=(k, d)).astype(np.float32)


def _points_near(codebook, assign, noise, seed):
  """Encoder outputs scattered around the given codes: [len(assign), D] float32."""
  rng = np.random.default_rng(seed)
  z = codebook[assign] + noise * rng.normal(size=(len(assign), codebook.shape[1]))
  return z.astype(np.float32)


def _vq_vars(codebook):
  return {'params': {'codebook': jnp.asarray(codebook, jnp.float32)}}


def _ema_vars(codebook):
  return {STATS: {
      'codebook': jnp.asarray(codebook, jnp.float32),
      'ema_counts': jnp.zeros((K,), jnp.float32),
      'ema_sums': jnp.zeros((K, D), jnp.float32),
      'ema_steps': jnp.zeros((), jnp.int32),
  }}


def _vars_for(cls, codebook):
  return _vq_vars(codebook) if cls is quantizers.VectorQuantizer else _ema_vars(codebook)


def _codebook_of(variables):
  if 'params' in variables:
    return np.asarray(variables['params']['codebook'])
  return np.asarray(variables[STATS]['codebook'])


_apply = train_util.jit_apply


_train = train_util.jit_train


class _NumpyEMA:
  """Reference EMA codebook: zero-debiased moving averages plus Laplace smoothing."""

  def __init__(self, codebook, decay, epsilon):
    self.codebook = np.asarray(codebook, np.float64)
    self.decay = decay
    self.epsilon = epsilon
    self.hidden_counts = np.zeros(K)
    self.hidden_sums = np.zeros((K, D))
    self.steps = 0

  def update(self, z):
    flat = np.asarray(z, np.float64).reshape(-1, D)
    idx = _np_nearest(flat, self.codebook)
    n = np.bincount(idx, minlength=K).astype(np.float64)
    s = np.zeros((K, D))
    np.add.at(s, idx, flat)
    d = self.decay
    self.steps += 1
    self.hidden_counts = d * self.hidden_counts + (1 - d) * n
    self.hidden_sums = d * self.hidden_sums + (1 - d) * s
    avg_counts = self.hidden_counts / (1 - d ** self.steps)
    avg_sums = self.hidden_sums / (1 - d ** self.steps)
    total = avg_counts.sum()
    smoothed = (avg_counts + self.epsilon) / (total + K * self.epsilon) * total
    self.codebook = avg_sums / smoothed[:, None]
    return idx, n


# ---------------------------------------------------------------------------------------
# 1. Distances, assignments, straight-through forward value.


def test_squared_distances_match_brute_force_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(37, D)).astype(np.float32)
  cb = _codebook(1)
  got = jax.jit(quantizers.squared_distances)(z, cb)
  chex.assert_shape(got, (37, K))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_sq_dist(z, cb), rtol=1e-5, atol=1e-5)


def test_nearest_codes_match_numpy_argmin():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(64, D)).astype(np.float32)
  cb = _codebook(3)
  _assert_clear_winner(z, cb, margin=1e-4)
  got = jax.jit(quantizers.nearest_codes)(z, cb)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, _np_nearest(z, cb))


@pytest.mark.parametrize('cls', QUANTIZER_CLASSES)
def test_indices_and_forward_value_match_numpy(cls):
  rng = np.random.default_rng(4)
  z = rng.normal(size=(2, 3, 5, D)).astype(np.float32)
  cb = _codebook(5)
  _assert_clear_winner(z, cb, margin=1e-4)
  module = cls(num_codes=K, code_dim=D, beta=BETA)
  variables = _vars_for(cls, cb)
  expected_idx = _np_nearest(z, cb).reshape(2, 3, 5)

  out = _apply(module, variables, z)
  chex.assert_shape(out.indices, (2, 3, 5))
  assert out.indices.dtype == jnp.int32
  np.testing.assert_array_equal(out.indices, expected_idx)
  np.testing.assert_array_equal(_apply(module, variables, z, method='encode_to_indices'),
                                expected_idx)
  # Forward value of z + sg(e - z) is e, up to one rounding of the addition.
  chex.assert_shape(out.quantized, z.shape)
  np.testing.assert_allclose(out.quantized, cb[expected_idx], rtol=0, atol=1e-6)
  mse = np.mean((z.astype(np.float64) - cb[expected_idx]) ** 2)
  np.testing.assert_allclose(out.commitment_loss, mse, rtol=1e-5)


def test_init_shapes_and_scale():
  z = jnp.zeros((2, 3, D))
  vq_vars = quantizers.VectorQuantizer(num_codes=K, code_dim=D).init(jax.random.key(0), z)
  cb = vq_vars['params']['codebook']
  chex.assert_shape(cb, (K, D))
  # variance_scaling(1, fan_out, uniform): U(-sqrt(3/D), sqrt(3/D)).
  assert np.all(np.abs(cb) <= np.sqrt(3.0 / D)) and np.std(cb) > 0

  ema = quantizers.EMAVectorQuantizer(num_codes=K, code_dim=D)
  ema_vars = ema.init(jax.random.key(0), z, train=True)
  assert set(ema_vars) == {STATS}, 'the EMA codebook must not be a trainable param'
  stats = ema_vars[STATS]
  chex.assert_shape([stats['codebook'], stats['ema_counts'], stats['ema_sums']],
                    [(K, D), (K,), (K, D)])
  assert int(stats['ema_steps']) == 0  # init with train=True must not count as a step
  np.testing.assert_array_equal(stats['ema_counts'], 0)
  np.testing.assert_array_equal(stats['ema_sums'], 0)


# ---------------------------------------------------------------------------------------
# 2. Gradients of the gradient-learned VectorQuantizer.


def _grad_case(seed):
  rng = np.random.default_rng(seed)
  cb = _codebook(seed + 100)
  z = _points_near(cb, rng.integers(0, K, 18), 0.1, seed).reshape(2, 3, 3, D)
  w = rng.normal(size=z.shape).astype(np.float32)
  return cb, z, w


@pytest.mark.parametrize('beta', [0.25, 2.0])
def test_vector_quantizer_gradients_match_numpy_formulas(beta):
  cb, z, w = _grad_case(seed=6)
  _assert_clear_winner(z, cb, margin=1e-2)
  module = quantizers.VectorQuantizer(num_codes=K, code_dim=D, beta=beta)

  def objective(params, z):
    out = module.apply({'params': params}, z)
    return jnp.sum(w * out.quantized) + out.loss

  g_params, g_z = jax.jit(jax.grad(objective, argnums=(0, 1)))({'codebook': cb}, z)

  idx = _np_nearest(z, cb)
  flat = z.reshape(-1, D).astype(np.float64)
  e = cb[idx].astype(np.float64)
  numel = z.size
  # Codebook: only the codebook term ||sg[z] - e||^2 (weight 1, never beta) reaches it.
  expected_cb = np.zeros((K, D))
  np.add.at(expected_cb, idx, 2.0 * (e - flat) / numel)
  # Encoder output: straight-through identity (w) plus beta times the commitment term.
  expected_z = w + (2.0 * beta * (flat - e) / numel).reshape(z.shape)
  np.testing.assert_allclose(g_params['codebook'], expected_cb, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_z, expected_z, rtol=1e-5, atol=1e-7)

  out = _apply(module, _vq_vars(cb), z)
  mse = np.mean((flat - e) ** 2)
  np.testing.assert_allclose(out.codebook_loss, mse, rtol=1e-5)
  np.testing.assert_allclose(out.commitment_loss, mse, rtol=1e-5)
  np.testing.assert_allclose(out.loss, (1.0 + beta) * mse, rtol=1e-5)


def test_straight_through_output_sends_no_gradient_to_codebook():
  cb, z, w = _grad_case(seed=7)
  module = quantizers.VectorQuantizer(num_codes=K, code_dim=D)
  grad = jax.grad(lambda p: jnp.sum(w * module.apply({'params': p}, z).quantized))
  np.testing.assert_array_equal(grad({'codebook': cb})['codebook'], 0.0)


def test_vector_quantizer_gradients_match_finite_differences():
  """Autodiff vs central differences of the loss terms that carry gradient.

  The losses are quadratic in the codebook and in z, so central differences are exact up
  to float32 rounding, provided no perturbation changes an assignment (checked).
  The codebook's gradient must equal d(codebook_loss)/d(codebook) alone, and z's gradient
  minus the straight-through w must equal d(beta * commitment_loss)/dz alone.
  """
  cb, z, w = _grad_case(seed=8)
  _assert_clear_winner(z, cb, margin=0.2)
  module = quantizers.VectorQuantizer(num_codes=K, code_dim=D, beta=BETA)

  def objective(cb, z):
    out = module.apply(_vq_vars(cb), z)
    return jnp.sum(w * out.quantized) + out.loss

  g_cb, g_z = jax.jit(jax.grad(objective, argnums=(0, 1)))(cb, z)

  def terms(cb, z):
    out = module.apply(_vq_vars(cb), z)
    return out.codebook_loss, BETA * out.commitment_loss, out.indices

  eps = 1e-2
  batched = jax.jit(jax.vmap(terms, in_axes=(0, 0)))

  def central_difference(x, make_args, which):
    bumps = eps * np.eye(x.size, dtype=np.float32).reshape((x.size,) + x.shape)
    plus = batched(*make_args(x[None] + bumps))
    minus = batched(*make_args(x[None] - bumps))
    for indices in (plus[2], minus[2]):
      assert np.all(indices == _np_nearest(z, cb).reshape(z.shape[:-1])), 'assignment moved'
    return ((np.asarray(plus[which], np.float64) - np.asarray(minus[which], np.float64))
            / (2 * eps)).reshape(x.shape)

  tile = lambda a, n: np.broadcast_to(a, (n,) + a.shape)
  fd_cb = central_difference(cb, lambda cbs: (cbs, tile(z, cb.size)), which=0)
  fd_z = central_difference(z, lambda zs: (tile(cb, z.size), zs), which=1)
  np.testing.assert_allclose(g_cb, fd_cb, rtol=0, atol=5e-5)
  np.testing.assert_allclose(np.asarray(g_z) - w, fd_z, rtol=0, atol=5e-5)
  assert np.max(np.abs(fd_cb)) > 1e-3  # the check is not vacuous


# ---------------------------------------------------------------------------------------
# 3. EMAVectorQuantizer.


def test_ema_update_matches_numpy_reference_over_three_steps():
  decay, epsilon = 0.8, 0.1  # large epsilon so that missing smoothing would show
  module = quantizers.EMAVectorQuantizer(num_codes=K, code_dim=D, beta=BETA, decay=decay,
                                         epsilon=epsilon)
  cb0 = 2.0 * _codebook(9)
  variables = _ema_vars(cb0)
  ref = _NumpyEMA(cb0, decay, epsilon)
  rng = np.random.default_rng(10)
  assignments = [
      np.concatenate([np.arange(K), rng.integers(0, K, 16)]),
      np.concatenate([np.arange(K), rng.integers(0, K, 16)]),
      # Last code unused in step 3: its statistics must only decay.
      np.concatenate([np.arange(K - 1), rng.integers(0, K - 1, 17)]),
  ]
  for step, assign in enumerate(assignments, start=1):
    z = _points_near(ref.codebook, rng.permutation(assign), 0.05, seed=step)
    z = z.reshape(2, 3, 4, D)
    _assert_clear_winner(z, ref.codebook, margin=1e-2)
    old_codebook = ref.codebook.copy()
    idx, n = ref.update(z)

    out, updates = _train(module, variables, z)
    variables = updates
    stats = variables[STATS]
    np.testing.assert_array_equal(out.indices.reshape(-1), idx)
    np.testing.assert_array_equal(out.counts, n)
    # The output is quantized with the codebook from before this step's update.
    np.testing.assert_allclose(out.quantized.reshape(-1, D), old_codebook[idx], atol=1e-5)
    assert int(stats['ema_steps']) == step
    np.testing.assert_allclose(stats['ema_counts'], ref.hidden_counts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['ema_sums'], ref.hidden_sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats['codebook'], ref.codebook, rtol=1e-5, atol=1e-5)


def test_ema_statistics_unchanged_without_train():
  module = quantizers.EMAVectorQuantizer(num_codes=K, code_dim=D, decay=0.8)
  z = np.random.default_rng(11).normal(size=(2, 3, D)).astype(np.float32)
  _, variables = _train(module, _ema_vars(_codebook(12)), z)  # non-trivial statistics
  z2 = np.random.default_rng(13).normal(size=(2, 3, D)).astype(np.float32)
  _, after = module.apply(variables, z2, train=False, mutable=[STATS])
  chex.assert_trees_all_equal(after, variables)


def test_ema_codebook_gets_no_gradient_and_zero_codebook_loss():
  rng = np.random.default_rng(14)
  cb = _codebook(15)
  z = rng.normal(size=(2, 3, 3, D)).astype(np.float32)
  w = rng.normal(size=z.shape).astype(np.float32)
  module = quantizers.EMAVectorQuantizer(num_codes=K, code_dim=D, beta=BETA)

  stats = _ema_vars(cb)[STATS]

  def objective(codebook, z):
    out = module.apply({STATS: {**stats, 'codebook': codebook}}, z)
    return jnp.sum(w * out.quantized) + out.loss

  g_cb, g_z = jax.jit(jax.grad(objective, argnums=(0, 1)))(stats['codebook'], z)
  np.testing.assert_array_equal(g_cb, 0.0)

  idx = _np_nearest(z, cb)
  diff = z.reshape(-1, D).astype(np.float64) - cb[idx]
  expected_z = w + (2.0 * BETA * diff / z.size).reshape(z.shape)
  np.testing.assert_allclose(g_z, expected_z, rtol=1e-5, atol=1e-7)

  out = _apply(module, {STATS: stats}, z)
  assert float(out.codebook_loss) == 0.0
  np.testing.assert_allclose(out.commitment_loss, np.mean(diff ** 2), rtol=1e-5)
  np.testing.assert_allclose(out.loss, BETA * np.mean(diff ** 2), rtol=1e-5)


def test_ema_under_pmap_equals_single_device_on_concatenated_batch():
  num_devices = jax.local_device_count()
  assert num_devices >= 2, (
      f'need >= 2 local devices for the pmap test, found {num_devices}; tests/conftest.py '
      'must set XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts.')
  kwargs = dict(num_codes=K, code_dim=D, beta=BETA, decay=0.8, epsilon=0.1)
  single = quantizers.EMAVectorQuantizer(**kwargs)
  sharded = quantizers.EMAVectorQuantizer(axis_name='batch', **kwargs)
  p_train = jax.pmap(lambda v, z: sharded.apply(v, z, train=True, mutable=[STATS]),
                     axis_name='batch')

  single_vars = _ema_vars(_codebook(16))
  replicated = jax.tree.map(lambda x: np.broadcast_to(x, (num_devices,) + x.shape),
                            single_vars)
  rng = np.random.default_rng(17)
  for _ in range(2):
    z = rng.normal(size=(num_devices, 2, 3, D)).astype(np.float32)
    out_p, replicated = p_train(replicated, z)
    out_s, single_vars = _train(single, single_vars, z.reshape(num_devices * 2, 3, D))
    stats_p = jax.device_get(replicated[STATS])
    for name, value in stats_p.items():
      for device in range(1, num_devices):  # bit-identical everywhere, not just close
        np.testing.assert_array_equal(value[device], value[0], err_msg=name)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], stats_p), single_vars[STATS],
                                rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_p.indices.reshape(-1),
                                  np.asarray(out_s.indices).reshape(-1))
    for device in range(num_devices):
      np.testing.assert_array_equal(out_p.counts[device], out_s.counts)
      np.testing.assert_allclose(out_p.perplexity[device], out_s.perplexity, rtol=1e-6)


def test_vector_quantizer_counts_sum_over_pmap_axis():
  num_devices = jax.local_device_count()
  assert num_devices >= 2, f'need >= 2 local devices for the pmap test, found {num_devices}'
  module = quantizers.VectorQuantizer(num_codes=K, code_dim=D, axis_name='batch')
  cb = _codebook(18)
  z = np.random.default_rng(19).normal(size=(num_devices, 5, D)).astype(np.float32)
  variables = jax.tree.map(lambda x: np.broadcast_to(x, (num_devices,) + x.shape),
                           _vq_vars(cb))
  out = jax.pmap(lambda v, z: module.apply(v, z), axis_name='batch')(variables, z)
  expected = np.bincount(_np_nearest(z, cb), minlength=K)
  for device in range(num_devices):
    np.testing.assert_array_equal(out.counts[device], expected)
    np.testing.assert_allclose(out.perplexity[device], _np_perplexity(expected), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# 4. Hypothesis properties (fixed shapes: one compilation per module).

_VALUES = st.floats(-3.0, 3.0, width=32, allow_subnormal=False)  # XLA:CPU flushes subnormals
_SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


@pytest.mark.parametrize('cls', QUANTIZER_CLASSES)
@_SETTINGS
@hypothesis.given(z=hnp.arrays(np.float32, (2, 5, D), elements=_VALUES),
                  cb=hnp.arrays(np.float32, (K, D), elements=_VALUES))
def test_property_output_is_nearest_code(cls, z, cb):
  module = cls(num_codes=K, code_dim=D)
  out = _apply(module, _vars_for(cls, cb), z)
  idx = np.asarray(out.indices).reshape(-1)
  dist = _np_sq_dist(z, cb)
  chosen = dist[np.arange(len(idx)), idx]
  # Slack for float32 rounding in the expanded ||z||^2 - 2 z.e + ||e||^2 form.
  scale = 1.0 + np.sum(z.reshape(-1, D).astype(np.float64) ** 2, -1) + np.max(
      np.sum(cb.astype(np.float64) ** 2, -1))
  assert np.all(chosen <= dist.min(axis=-1) + 1e-5 * scale)
  # Straight-through forward value is exactly (to one rounding) the chosen code.
  np.testing.assert_allclose(out.quantized, cb[idx].reshape(z.shape), rtol=0, atol=2e-6)
  np.testing.assert_array_equal(_apply(module, _vars_for(cls, cb), z,
                                       method='encode_to_indices'), out.indices)


@pytest.mark.parametrize('cls', QUANTIZER_CLASSES)
@_SETTINGS
@hypothesis.given(indices=hnp.arrays(np.int32, (2, 5), elements=st.integers(0, K - 1)),
                  seed=st.integers(0, 2**31 - 1))
def test_property_indices_round_trip(cls, indices, seed):
  cb = _codebook(seed)
  module = cls(num_codes=K, code_dim=D)
  variables = _vars_for(cls, cb)
  codes = _apply(module, variables, indices, method='decode_from_indices')
  chex.assert_shape(codes, (2, 5, D))
  np.testing.assert_array_equal(codes, cb[indices])
  np.testing.assert_array_equal(_apply(module, variables, indices, method='lookup'),
                                cb[indices])
  # Codes quantize to themselves; only exact duplicate rows could make the index ambiguous.
  hypothesis.assume(np.min(_np_sq_dist(cb, cb) + np.eye(K) * 1e9) > 1e-2)
  np.testing.assert_array_equal(_apply(module, variables, codes, method='encode_to_indices'),
                                indices)
  out = _apply(module, variables, codes)
  np.testing.assert_array_equal(out.indices, indices)
  np.testing.assert_array_equal(out.quantized, codes)


_EMA_BY_DECAY = {d: quantizers.EMAVectorQuantizer(num_codes=K, code_dim=D, decay=d,
                                                  epsilon=1e-3)
                 for d in (0.5, 0.9, 0.99)}


@_SETTINGS
@hypothesis.given(decay=st.sampled_from(sorted(_EMA_BY_DECAY)),
                  seed=st.integers(0, 2**31 - 1),
                  num_steps=st.integers(1, 4),
                  spread=st.floats(0.01, 3.0))
def test_property_ema_counts_positive_and_conserve_total(decay, seed, num_steps, spread):
  module = _EMA_BY_DECAY[decay]
  rng = np.random.default_rng(seed)
  variables = _ema_vars(_codebook(seed))
  num_vectors = 2 * 6
  for step in range(1, num_steps + 1):
    # Small spreads put every vector on a few codes, leaving the others unused.
    z = (spread * rng.normal(size=(2, 6, D))).astype(np.float32)
    _, variables = _train(module, variables, z)
    stats = jax.device_get(variables[STATS])
    assert int(stats['ema_steps']) == step
    assert np.all(stats['ema_counts'] >= 0)
    debias = 1.0 - decay ** step
    avg_counts = stats['ema_counts'].astype(np.float64) / debias
    avg_sums = stats['ema_sums'].astype(np.float64) / debias
    total = avg_counts.sum()
    # Zero-debiasing makes the average of a constant batch size equal that size.
    np.testing.assert_allclose(total, num_vectors, rtol=1e-4)
    smoothed = (avg_counts + 1e-3) / (total + K * 1e-3) * total
    assert np.all(smoothed > 0)
    np.testing.assert_allclose(smoothed.sum(), total, rtol=1e-6)
    # The stored codebook is the average sum divided by those smoothed counts.
    np.testing.assert_allclose(stats['codebook'] * smoothed[:, None], avg_sums,
                               rtol=1e-4, atol=1e-4 * spread)


# ---------------------------------------------------------------------------------------
# 5. Usage counts and perplexity.


@pytest.mark.parametrize('cls', QUANTIZER_CLASSES)
def test_counts_and_perplexity_match_numpy(cls):
  cb = _codebook(20)
  module = cls(num_codes=K, code_dim=D)
  variables = _vars_for(cls, cb)

  z = np.random.default_rng(21).normal(size=(3, 4, D)).astype(np.float32)
  out = _apply(module, variables, z)
  counts = np.bincount(_np_nearest(z, cb), minlength=K)
  assert out.counts.dtype == jnp.float32
  np.testing.assert_array_equal(out.counts, counts)
  np.testing.assert_allclose(out.perplexity, _np_perplexity(counts), rtol=1e-5)

  # Known values: one code for everything gives 1; every code equally often gives K.
  collapsed = np.broadcast_to(cb[3], (3, 4, D)).copy()
  np.testing.assert_allclose(_apply(module, variables, collapsed).perplexity, 1.0, rtol=1e-6)
  uniform = np.concatenate([cb, cb[::-1], cb[::2], cb[1::2]]).reshape(3, 8, D)
  out = _apply(module, variables, uniform)
  np.testing.assert_array_equal(out.counts, 3.0)
  np.testing.assert_allclose(out.perplexity, K, rtol=1e-5)


@pytest.mark.parametrize('cls', QUANTIZER_CLASSES)
def test_bfloat16_input_keeps_float32_losses_and_statistics(cls):
  cb = _codebook(22)
  z = np.random.default_rng(23).normal(size=(2, 3, D)).astype(np.float32)
  module = cls(num_codes=K, code_dim=D)
  out = _apply(module, _vars_for(cls, cb), jnp.asarray(z, jnp.bfloat16))
  assert out.quantized.dtype == jnp.bfloat16
  for value in (out.codebook_loss, out.commitment_loss, out.loss, out.perplexity, out.counts):
    assert value.dtype == jnp.float32
  if cls is quantizers.EMAVectorQuantizer:
    _, updates = _train(module, _vars_for(cls, cb), jnp.asarray(z, jnp.bfloat16))
    for name in ('codebook', 'ema_counts', 'ema_sums'):
      assert updates[STATS][name].dtype == jnp.float32, name


def _dot_precisions(fn, *args):
  """Precisions of every dot_general in fn's jaxpr, sub-jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append(eqn.params['precision'])
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          if hasattr(sub, 'eqns'):
            walk(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_codebook_distances_and_ema_sums_run_at_highest_precision(monkeypatch):
  # On CPU every precision gives float32 results, so check what the program asks for:
  # TPU (bf16 passes) and GPU (TF32) defaults would otherwise round these products. The
  # program they run: the CPU one sums the EMA statistics without a matmul.
  monkeypatch.setattr(quantizers.base, 'cpu_fast_path', lambda backend=None: False)
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  cb = _codebook(24)
  z = np.random.default_rng(25).normal(size=(2, 3, D)).astype(np.float32)
  assert _dot_precisions(quantizers.squared_distances, z.reshape(-1, D), cb) == [highest]
  module = quantizers.EMAVectorQuantizer(num_codes=K, code_dim=D)
  variables = _vars_for(quantizers.EMAVectorQuantizer, cb)
  precisions = _dot_precisions(lambda z: _train(module, variables, z), z)
  assert len(precisions) == 2 and all(p == highest for p in precisions), precisions


# ---------------------------------------------------------------------------------------
# 6. Errors.


@pytest.mark.parametrize('cls', QUANTIZER_CLASSES)
def test_wrong_last_axis_raises_value_error_naming_code_dim_and_shape(cls):
  module = cls(num_codes=K, code_dim=D)
  variables = _vars_for(cls, _codebook(24))
  with pytest.raises(ValueError, match=r'code_dim is 4') as info:
    module.apply(variables, jnp.zeros((2, 3, D + 1)))
  assert '(2, 3, 5)' in str(info.value)
  with pytest.raises(ValueError, match=r'code_dim'):
    module.init(jax.random.key(0), jnp.zeros((2, D - 1)))


# `encode_to_indices` is the public token API: a wrong last axis must give the same
# one-line ValueError as `__call__`, not jnp.reshape's TypeError.
@pytest.mark.parametrize('cls', QUANTIZER_CLASSES)
def test_encode_to_indices_wrong_last_axis_raises_value_error(cls):
  module = cls(num_codes=K, code_dim=D)
  variables = _vars_for(cls, _codebook(25))
  with pytest.raises(ValueError, match=r'code_dim') as info:
    module.apply(variables, jnp.zeros((2, 3, D + 1)), method='encode_to_indices')
  assert '(2, 3, 5)' in str(info.value)
