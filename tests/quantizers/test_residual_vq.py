"""Tests for vq.quantizers.residual.ResidualVQ against a numpy greedy residual quantizer.

The oracle quantizes level by level in float64 numpy with brute-force distances, sums
the per-level losses and gradients written out by hand, and replays one EMA update of
every level's codebook on the residuals it saw.
"""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import vqvae_cifar
from vq import quantizers
from vq.config import builders
from vq.config import validation as config_validation
from vq.quantizers import residual as residual_vq
from vq.models import tokenizer
from tests import train_util
from tests.quantizers import test_rotation

K = 8  # codes per level
D = 3  # code dimension
DEPTH = 3
BETA = 0.25
STATS = quantizers.STATS
ResidualVQ = residual_vq.ResidualVQ


_apply = train_util.jit_apply


_train = train_util.jit_train


def _codebooks(seed, depth=DEPTH):
  """Per-level codebooks shrinking with depth, like the residuals they quantize."""
  rng = np.random.default_rng(seed)
  return [(0.5**l * rng.normal(size=(K, D))).astype(np.float32) for l in range(depth)]


def _variables(base, codebooks):
  if base == 'vq':
    return {'params': {f'levels_{l}': {'codebook': jnp.asarray(cb)}
                       for l, cb in enumerate(codebooks)}}
  return {STATS: {f'levels_{l}': {'codebook': jnp.asarray(cb),
                                  'ema_counts': jnp.zeros((K,)),
                                  'ema_sums': jnp.zeros((K, D)),
                                  'ema_steps': jnp.zeros((), jnp.int32)}
                  for l, cb in enumerate(codebooks)}}


def _np_residual_vq(z, codebooks, margin=1e-4):
  """Greedy residual assignment in float64: indices [M, depth], residuals, codes."""
  residual = np.asarray(z, np.float64).reshape(-1, D)
  indices, residuals, codes = [], [], []
  for cb in codebooks:
    d = np.sum((residual[:, None, :] - np.asarray(cb, np.float64)[None]) ** 2, axis=-1)
    gap = np.min(np.diff(np.sort(d, axis=-1)[:, :2], axis=-1))
    assert gap > margin, f'test data has a near-tie (gap {gap}); choose another seed'
    idx = np.argmin(d, axis=-1)
    residuals.append(residual)
    codes.append(np.asarray(cb, np.float64)[idx])
    indices.append(idx)
    residual = residual - codes[-1]
  return np.stack(indices, axis=-1), residuals, codes


def _np_perplexity(counts):
  p = np.asarray(counts, np.float64) / np.sum(counts)
  p = p[p > 0]
  return np.exp(-np.sum(p * np.log(p)))


@pytest.mark.parametrize('base', ['ema', 'vq'])
def test_forward_indices_losses_and_counts_match_numpy(base):
  codebooks = _codebooks(0)
  z = np.random.default_rng(1).normal(size=(2, 4, 5, D)).astype(np.float32)
  module = ResidualVQ(num_codes=K, code_dim=D, depth=DEPTH, base=base, beta=BETA)
  variables = _variables(base, codebooks)
  idx, residuals, codes = _np_residual_vq(z, codebooks)

  out = _apply(module, variables, z)
  chex.assert_shape([out.quantized, out.indices, out.counts], [z.shape, (2, 4, 5, DEPTH),
                                                               (DEPTH * K,)])
  assert out.indices.dtype == jnp.int32
  np.testing.assert_array_equal(out.indices.reshape(-1, DEPTH), idx)
  np.testing.assert_allclose(out.quantized.reshape(-1, D), sum(codes), atol=1e-5)
  np.testing.assert_array_equal(_apply(module, variables, z, method='encode_to_indices'),
                                out.indices)
  np.testing.assert_allclose(_apply(module, variables, out.indices, method='lookup'),
                             out.quantized, atol=1e-5)

  per_level = [np.mean((r - c) ** 2) for r, c in zip(residuals, codes)]
  commitment = sum(per_level)
  codebook = commitment if base == 'vq' else 0.0
  np.testing.assert_allclose(out.commitment_loss, commitment, rtol=1e-5)
  np.testing.assert_allclose(out.codebook_loss, codebook, rtol=1e-5)
  np.testing.assert_allclose(out.loss, codebook + BETA * commitment, rtol=1e-5)
  assert float(out.entropy_loss) == 0.0

  counts = np.concatenate([np.bincount(idx[:, l], minlength=K) for l in range(DEPTH)])
  np.testing.assert_array_equal(out.counts, counts)
  np.testing.assert_allclose(out.perplexity, _np_perplexity(counts), rtol=1e-5)


def test_gradients_straight_through_on_total_and_per_level_losses():
  codebooks = _codebooks(2)
  rng = np.random.default_rng(4)
  z = rng.normal(size=(12, D)).astype(np.float32)
  w = rng.normal(size=(12, D)).astype(np.float32)
  module = ResidualVQ(num_codes=K, code_dim=D, depth=DEPTH, base='vq', beta=BETA)
  variables = _variables('vq', codebooks)
  idx, residuals, codes = _np_residual_vq(z, codebooks)
  n = z.size

  st_grad = jax.jit(jax.grad(lambda z: jnp.sum(w * module.apply(variables, z).quantized)))(z)
  np.testing.assert_array_equal(st_grad, w)

  # Each level's commitment term reaches z through its residual only (the codes above it
  # are constants): d/dz = beta * sum_l 2 (r_l - e_l) / n.
  z_grad = jax.jit(jax.grad(lambda z: module.apply(variables, z).loss))(z)
  expected = BETA * sum(2 * (r - c) / n for r, c in zip(residuals, codes))
  np.testing.assert_allclose(z_grad, expected, rtol=1e-4, atol=1e-6)

  # Level l's codebook term ||sg(r_l) - e||^2 moves only the codes it chose.
  p_grad = jax.jit(jax.grad(lambda v: module.apply(v, z).loss))(variables)['params']
  for l in range(DEPTH):
    expected = np.zeros((K, D))
    np.add.at(expected, idx[:, l], 2 * (codes[l] - residuals[l]) / n)
    np.testing.assert_allclose(p_grad[f'levels_{l}']['codebook'], expected, rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize('base', ['ema', 'vq'])
def test_rotation_gradient_composes_each_levels_rotation(base):
  codebooks = _codebooks(2)
  rng = np.random.default_rng(4)
  z = rng.normal(size=(12, D)).astype(np.float32)
  w = rng.normal(size=(12, D)).astype(np.float32)
  ste = ResidualVQ(num_codes=K, code_dim=D, depth=DEPTH, base=base, beta=BETA)
  rot = ResidualVQ(num_codes=K, code_dim=D, depth=DEPTH, base=base, beta=BETA,
                   gradient='rotation')
  variables = _variables(base, codebooks)
  idx, residuals, codes = _np_residual_vq(z, codebooks)

  out, ste_out = _apply(rot, variables, z), _apply(ste, variables, z)
  np.testing.assert_array_equal(out.indices, idx)
  np.testing.assert_allclose(out.quantized, sum(codes), rtol=1e-6, atol=1e-6)
  for name in ('commitment_loss', 'codebook_loss', 'loss', 'counts'):
    np.testing.assert_array_equal(getattr(out, name), getattr(ste_out, name), err_msg=name)

  # Oracle: level l's surrogate is lambda_l R_l (R_l, built from the angle's cos and sin,
  # turns r_l onto e_l in their plane; lambda_l = |e_l| / |r_l|); the decoder input is
  # z - s_depth with s_{l+1} = (I - lambda_l R_l) s_l, so its Jacobian is
  # I - prod_l (I - lambda_l R_l), last level leftmost.
  grad = jax.jit(jax.grad(lambda z: jnp.sum(w * rot.apply(variables, z).quantized)))(z)
  for m in range(len(z)):
    remainder = np.eye(D)
    for r, e in zip(residuals, codes):
      rotation = test_rotation.np_plane_rotation(r[m], e[m])
      np.testing.assert_allclose(rotation @ r[m] / np.linalg.norm(r[m]),
                                 e[m] / np.linalg.norm(e[m]), atol=1e-12)
      remainder = (np.eye(D) - np.linalg.norm(e[m]) / np.linalg.norm(r[m]) * rotation) @ remainder
    jacobian = np.eye(D) - remainder
    np.testing.assert_allclose(grad[m], jacobian.T @ w[m], rtol=1e-4, atol=1e-5)
  # Not the straight-through gradient (which is w itself).
  assert np.max(np.abs(np.asarray(grad) - w)) > 0.1
  # The losses still reach z through r_l alone, as with straight-through.
  z_grad = jax.jit(jax.grad(lambda z: rot.apply(variables, z).loss))(z)
  ste_grad = jax.jit(jax.grad(lambda z: ste.apply(variables, z).loss))(z)
  np.testing.assert_array_equal(z_grad, ste_grad)


def test_rotation_at_depth_one_is_the_single_quantizers_rotation():
  codebook = _codebooks(3, depth=1)
  z = np.random.default_rng(5).normal(size=(6, D)).astype(np.float32)
  rvq = ResidualVQ(num_codes=K, code_dim=D, depth=1, base='vq', gradient='rotation')
  single = quantizers.VectorQuantizer(num_codes=K, code_dim=D, gradient='rotation')
  jac = lambda m, v: jax.jit(jax.jacfwd(lambda z: m.apply(v, z).quantized))(z)
  np.testing.assert_allclose(
      jac(rvq, _variables('vq', codebook)),
      jac(single, {'params': {'codebook': jnp.asarray(codebook[0])}}), rtol=1e-5, atol=1e-6)


def test_config_gradient_reaches_rvq_and_is_validated():
  config = vqvae_cifar.get_config('smoke')
  config.update_from_flattened_dict({'quantizer.kind': 'rvq', 'quantizer.init': 'random',
                                     'quantizer.restart_after': 0,
                                     'quantizer.gradient': 'rotation'})
  config_validation.validate(config, num_devices=4)
  assert builders.build_quantizer(config.quantizer).gradient == 'rotation'
  config.quantizer.gradient = 'rotate'
  with pytest.raises(ValueError, match=r"quantizer.gradient='rotate' is unknown"):
    config_validation.validate(config, num_devices=4)
  with pytest.raises(ValueError, match=r"ResidualVQ gradient='rotate' is unknown"):
    ResidualVQ(num_codes=K, code_dim=D, depth=2, gradient='rotate')


def test_one_ema_step_updates_every_level_from_its_own_residuals():
  decay, eps = 0.9, 1e-5
  codebooks = _codebooks(4, depth=2)
  z = np.random.default_rng(5).normal(size=(30, D)).astype(np.float32)
  module = ResidualVQ(num_codes=K, code_dim=D, depth=2, base='ema', decay=decay, epsilon=eps)
  variables = _variables('ema', codebooks)
  idx, residuals, _ = _np_residual_vq(z, codebooks)

  _, updates = _train(module, variables, z)
  for l in range(2):
    n = np.bincount(idx[:, l], minlength=K).astype(np.float64)
    s = np.zeros((K, D))
    np.add.at(s, idx[:, l], residuals[l])
    # After one step the zero-debiased averages are this step's counts and sums.
    smoothed = (n + eps) / (n.sum() + K * eps) * n.sum()
    stats = updates[STATS][f'levels_{l}']
    assert int(stats['ema_steps']) == 1
    np.testing.assert_allclose(stats['ema_counts'], (1 - decay) * n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats['codebook'], s / smoothed[:, None], rtol=1e-4,
                               atol=1e-5)


def test_reconstruction_error_non_increasing_with_depth_after_ema_training():
  depth = 4
  z = np.random.default_rng(6).normal(size=(256, D)).astype(np.float32)
  module = ResidualVQ(num_codes=K, code_dim=D, depth=depth, base='ema', decay=0.5)
  variables = jax.jit(module.init)(jax.random.key(0), z)
  for _ in range(8):
    _, updates = _train(module, variables, z)
    variables = updates
  idx = np.asarray(_apply(module, variables, z).indices)
  books = [np.asarray(variables[STATS][f'levels_{l}']['codebook'], np.float64)
           for l in range(depth)]
  errors = [np.linalg.norm(z)]
  partial = np.zeros_like(z, np.float64)
  for l in range(depth):
    partial = partial + books[l][idx[:, l]]
    errors.append(np.linalg.norm(z - partial))
  assert all(b <= a for a, b in zip(errors, errors[1:])), f'errors by depth: {errors}'
  assert errors[-1] < 0.6 * errors[1], f'deeper levels barely help: {errors}'


def test_properties_and_errors():
  rvq = ResidualVQ(num_codes=256, code_dim=4, depth=3)
  assert (rvq.vocab_size, rvq.index_depth, rvq.usage_size, rvq.bits_per_token) == (
      256, 3, 768, 24.0)
  with pytest.raises(ValueError, match="base='kmeans'"):
    ResidualVQ(num_codes=8, code_dim=4, depth=2, base='kmeans')
  with pytest.raises(ValueError, match='depth must be'):
    ResidualVQ(num_codes=8, code_dim=4, depth=0)
  module = ResidualVQ(num_codes=K, code_dim=D, depth=2, base='vq')
  variables = _variables('vq', _codebooks(7, depth=2))
  with pytest.raises(ValueError, match='last axis must hold the 2 levels'):
    module.apply(variables, jnp.zeros((4, 3), jnp.int32), method='lookup')
  with pytest.raises(ValueError, match='code_dim is 3'):
    module.apply(variables, jnp.zeros((4, 5)))


def test_ema_under_pmap_equals_single_device_on_concatenated_batch():
  n = jax.local_device_count()
  assert n >= 2, f'need >= 2 local devices for the pmap test, found {n}; see tests/conftest.py'
  z = np.random.default_rng(8).normal(size=(4 * n, 5, D)).astype(np.float32)
  single = ResidualVQ(num_codes=K, code_dim=D, depth=DEPTH, base='ema', decay=0.8)
  sharded = ResidualVQ(num_codes=K, code_dim=D, depth=DEPTH, base='ema', decay=0.8,
                       axis_name='batch')
  variables = _variables('ema', _codebooks(9))
  ref, ref_updates = _train(single, variables, z)

  replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), variables)
  p_train = jax.pmap(lambda v, x: sharded.apply(v, x, train=True, mutable=[STATS]),
                     axis_name='batch')
  out, updates = p_train(replicated, z.reshape((n, -1) + z.shape[1:]))
  np.testing.assert_array_equal(out.indices.reshape(ref.indices.shape), ref.indices)
  np.testing.assert_allclose(out.quantized.reshape(z.shape), ref.quantized, atol=1e-6)
  np.testing.assert_allclose(np.mean(out.loss), ref.loss, rtol=1e-5)
  for name in ('counts', 'perplexity'):
    got = np.asarray(getattr(out, name))
    for d in range(1, n):
      np.testing.assert_array_equal(got[d], got[0], err_msg=name)
    np.testing.assert_allclose(got[0], getattr(ref, name), rtol=1e-5, err_msg=name)
  for d in range(1, n):  # every device ends with the same codebooks ...
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[d], updates),
                                jax.tree.map(lambda x: x[0], updates))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], updates), ref_updates,
                              rtol=1e-5, atol=1e-6)  # ... as one device on the whole batch


class _TinyEncoder(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Conv(D, (2, 2), strides=(2, 2))(x)


class _TinyDecoder(nn.Module):

  @nn.compact
  def __call__(self, z):
    return nn.ConvTranspose(3, (2, 2), strides=(2, 2), name='conv_out')(z)


def test_works_inside_vq_tokenizer():
  model = tokenizer.VQTokenizer(
      encoder=_TinyEncoder(), decoder=_TinyDecoder(),
      quantizer=ResidualVQ(num_codes=K, code_dim=D, depth=DEPTH, base='ema'))
  images = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.key(0), images)
  recon, q = model.apply(variables, images)
  tokens = model.apply(variables, images, method=tokenizer.VQTokenizer.tokenize)
  chex.assert_shape([recon, tokens], [images.shape, (2, 2, 2, DEPTH)])
  np.testing.assert_array_equal(tokens, q.indices)
  again = model.apply(variables, tokens, method=tokenizer.VQTokenizer.detokenize)
  np.testing.assert_allclose(again, recon, atol=1e-5)
