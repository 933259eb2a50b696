"""Tests for vq.training.losses against numpy formulas and finite differences."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.training import losses


def _rand(seed, shape, scale=2.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(
      np.float32)


def _softplus(x):
  return np.logaddexp(0.0, x.astype(np.float64))


# ---------------------------------------------------------- reconstruction


def test_l1_and_l2_match_numpy():
  p, t = _rand(0, (2, 5, 4, 3)), _rand(1, (2, 5, 4, 3))
  l1 = losses.l1_loss(p, t)
  l2 = losses.l2_loss(p, t)
  chex.assert_shape([l1, l2], p.shape)
  np.testing.assert_allclose(l1, np.abs(p.astype(np.float64) - t), rtol=1e-6)
  # No 0.5 factor: the mean is the MSE.
  np.testing.assert_allclose(l2, (p.astype(np.float64) - t)**2, rtol=1e-5)


@pytest.mark.parametrize('kind,oracle', [
    ('l1', lambda p, t: np.abs(p - t)),
    ('l2', lambda p, t: (p - t)**2),
])
def test_reconstruction_loss_dispatch(kind, oracle):
  p, t = _rand(2, (3, 4)), _rand(3, (3, 4))
  np.testing.assert_allclose(
      losses.reconstruction_loss(p, t, kind=kind),
      oracle(p.astype(np.float64), t), rtol=1e-5)


def test_reconstruction_loss_unknown_kind_lists_choices():
  with pytest.raises(ValueError, match=r"'l3'.*l1, l2"):
    losses.reconstruction_loss(np.zeros(2), np.zeros(2), kind='l3')


def test_bfloat16_inputs_give_float32_losses():
  p = jnp.asarray(_rand(4, (4,)), jnp.bfloat16)
  t = jnp.zeros((4,), jnp.bfloat16)
  out = losses.l2_loss(p, t)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.asarray(p, np.float32)**2, rtol=1e-6)


_TWO_ARG = [
    losses.l1_loss,
    losses.l2_loss,
    lambda a, b: losses.reconstruction_loss(a, b, kind='l1'),
    losses.hinge_discriminator_loss,
    losses.nonsaturating_discriminator_loss,
    lambda a, b: losses.discriminator_loss(a, b, kind='hinge'),
    lambda a, b: losses.lecam_regularizer(a, b, 0.0, 0.0),
]


@pytest.mark.parametrize('fn', _TWO_ARG)
def test_shape_mismatch_raises(fn):
  with pytest.raises(ValueError, match=r'same shape.*\(2, 3\).*\(3, 2\)'):
    fn(np.zeros((2, 3)), np.zeros((3, 2)))
  # Broadcastable shapes are rejected too: a silent broadcast hides bugs.
  with pytest.raises(ValueError, match='same shape'):
    fn(np.zeros((2, 3)), np.zeros((1, 3)))


# ----------------------------------------------------------------- adversarial


def test_hinge_losses_match_numpy():
  real, fake = _rand(5, (2, 3, 3, 1)), _rand(6, (2, 3, 3, 1))
  np.testing.assert_allclose(
      losses.hinge_discriminator_loss(real, fake),
      np.maximum(0, 1 - real) + np.maximum(0, 1 + fake), rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_generator_loss(fake), -fake)


def test_nonsaturating_losses_match_numpy():
  # Large logits check that softplus neither overflows nor underflows.
  real = np.concatenate([_rand(7, (10,)), [80.0, -80.0]]).astype(np.float32)
  fake = np.concatenate([_rand(8, (10,)), [-80.0, 80.0]]).astype(np.float32)
  np.testing.assert_allclose(
      losses.nonsaturating_discriminator_loss(real, fake),
      _softplus(-real) + _softplus(fake), rtol=1e-5)
  np.testing.assert_allclose(
      losses.nonsaturating_generator_loss(fake), _softplus(-fake), rtol=1e-5)
  # -log(sigmoid(x)) from its definition, where it is representable.
  x = _rand(9, (10,)).astype(np.float64)
  np.testing.assert_allclose(
      losses.nonsaturating_generator_loss(x), -np.log(1 / (1 + np.exp(-x))),
      rtol=1e-5)


@pytest.mark.parametrize('kind', ['hinge', 'nonsaturating'])
def test_gan_dispatch(kind):
  real, fake = _rand(10, (4, 2)), _rand(11, (4, 2))
  if kind == 'hinge':
    d = np.maximum(0, 1 - real) + np.maximum(0, 1 + fake)
    g = -fake
  else:
    d = _softplus(-real) + _softplus(fake)
    g = _softplus(-fake)
  np.testing.assert_allclose(
      losses.discriminator_loss(real, fake, kind=kind), d, rtol=1e-5)
  np.testing.assert_allclose(
      losses.generator_loss(fake, kind=kind), g, rtol=1e-5)


def test_gan_unknown_kind_lists_choices():
  with pytest.raises(ValueError, match=r"'wgan'.*hinge, nonsaturating"):
    losses.discriminator_loss(np.zeros(2), np.zeros(2), kind='wgan')
  with pytest.raises(ValueError, match=r"'wgan'.*hinge, nonsaturating"):
    losses.generator_loss(np.zeros(2), kind='wgan')


def test_lecam_matches_numpy_and_stops_gradient_to_anchors():
  real, fake = _rand(12, (3, 4, 4, 1)), _rand(13, (3, 4, 4, 1))
  ema_real, ema_fake = np.float32(0.3), np.float32(-0.4)
  expected = (np.maximum(0, real - ema_fake)**2 +
              np.maximum(0, ema_real - fake)**2)
  out = losses.lecam_regularizer(real, fake, ema_real, ema_fake)
  chex.assert_shape(out, real.shape)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
  # Both relu branches must be exercised for the comparison to mean anything.
  assert (real < ema_fake).any() and (real > ema_fake).any()
  assert (fake < ema_real).any() and (fake > ema_real).any()

  grad_anchors = jax.grad(
      lambda a, b: losses.lecam_regularizer(real, fake, a, b).sum(),
      argnums=(0, 1))(ema_real, ema_fake)
  np.testing.assert_array_equal(grad_anchors, [0.0, 0.0])
  grad_real = jax.grad(
      lambda r: losses.lecam_regularizer(r, fake, ema_real, ema_fake).sum())(
          real)
  np.testing.assert_allclose(
      grad_real, 2 * np.maximum(0, real - ema_fake), rtol=1e-5)


def test_lecam_rejects_non_scalar_anchor():
  with pytest.raises(ValueError, match='ema_real_mean must be a scalar'):
    losses.lecam_regularizer(np.zeros(3), np.zeros(3), np.zeros(3), 0.0)


# ----------------------------------------------------------------- R1


def test_r1_linear_discriminator_closed_form():
  # D(x) = flatten(x) @ W gives patch logits whose summed gradient is W @ 1.
  w = _rand(14, (4 * 4 * 2, 4), scale=0.5)

  def disc(x):
    return (x.reshape(x.shape[0], -1) @ w).reshape(x.shape[0], 2, 2, 1)

  images = _rand(15, (3, 4, 4, 2))
  r1 = losses.r1_penalty(disc, images)
  chex.assert_shape(r1, (3,))
  expected = np.sum(w.astype(np.float64).sum(axis=1)**2)
  np.testing.assert_allclose(r1, np.full(3, expected), rtol=1e-5)


def test_r1_matches_finite_differences():
  w = _rand(16, (4 * 4 * 2, 4), scale=0.3)

  def disc(x):
    h = x.reshape(x.shape[0], -1) @ w
    return (jnp.tanh(h) + 0.1 * h**2).reshape(x.shape[0], 2, 2, 1)

  images = _rand(17, (3, 4, 4, 2), scale=0.5)
  per_example_sum = jax.jit(lambda x: disc(x).reshape(x.shape[0], -1).sum(1))
  eps = 1e-2
  flat = images.reshape(3, -1)
  fd_grads = np.zeros(flat.shape, np.float64)
  for p in range(flat.shape[1]):
    delta = np.zeros_like(flat)
    delta[:, p] = eps  # each example's own pixel p; examples don't interact
    plus = per_example_sum((flat + delta).reshape(images.shape))
    minus = per_example_sum((flat - delta).reshape(images.shape))
    fd_grads[:, p] = (np.asarray(plus, np.float64) - minus) / (2 * eps)
  np.testing.assert_allclose(
      losses.r1_penalty(disc, images), (fd_grads**2).sum(axis=1), rtol=2e-3)


def test_r1_requires_batch_dimension():
  with pytest.raises(ValueError, match='leading batch dimension'):
    losses.r1_penalty(lambda x: x, np.zeros((5,)))


# --------------------------------------------------------- adaptive weight


def _grads(seed, scale):
  return {'conv_out': {'kernel': _rand(seed, (3, 3, 4, 2), scale),
                       'bias': _rand(seed + 1, (2,), scale)}}


def _np_global_norm(tree):
  return np.sqrt(sum(np.sum(np.asarray(leaf, np.float64)**2)
                     for leaf in jax.tree_util.tree_leaves(tree)))


def test_adaptive_weight_matches_numpy():
  rec, gen = _grads(18, 0.3), _grads(20, 0.1)
  expected = _np_global_norm(rec) / (_np_global_norm(gen) + 1e-4)
  weight = losses.adaptive_generator_weight(rec, gen)
  chex.assert_shape(weight, ())
  np.testing.assert_allclose(weight, expected, rtol=1e-5)
  np.testing.assert_allclose(
      losses.adaptive_generator_weight(rec, gen, eps=0.5),
      _np_global_norm(rec) / (_np_global_norm(gen) + 0.5), rtol=1e-5)


def test_adaptive_weight_clipping():
  rec = _grads(22, 1.0)
  zeros = jax.tree_util.tree_map(np.zeros_like, rec)
  # Vanishing generator gradients: norm / eps is huge, clipped to max_weight.
  assert _np_global_norm(rec) / 1e-4 > 1e4
  np.testing.assert_allclose(losses.adaptive_generator_weight(rec, zeros), 1e4)
  np.testing.assert_allclose(
      losses.adaptive_generator_weight(rec, rec, max_weight=0.5), 0.5)
  # Lower end of the clip: zero reconstruction gradients give weight 0.
  np.testing.assert_allclose(losses.adaptive_generator_weight(zeros, rec), 0.0)


def test_adaptive_weight_is_stop_gradiented():
  rec, gen = _grads(24, 0.3), _grads(26, 0.1)
  d_rec, d_gen = jax.grad(losses.adaptive_generator_weight, argnums=(0, 1))(
      rec, gen)
  for leaf in jax.tree_util.tree_leaves((d_rec, d_gen)):
    np.testing.assert_array_equal(leaf, 0.0)


def test_adaptive_weight_structure_mismatch_raises():
  with pytest.raises(ValueError, match='same pytree structure'):
    losses.adaptive_generator_weight({'a': np.ones(2)}, {'b': np.ones(2)})
