"""vq.models.norms.GroupNorm: flax.linen.GroupNorm's function and parameters, checked three ways:
a float64 numpy oracle, flax itself (values and gradients) and finite differences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from vq.cpu import native
from vq.models import norms
from tests.models.test_conv import native_expected_here


def _numpy_group_norm(x, scale, bias, groups, eps):
  """float64 oracle: per example, statistics over spatial axes and the group's channels."""
  x = np.asarray(x, np.float64)
  n, c = x.shape[0], x.shape[-1]
  xg = x.reshape(n, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return y * scale + bias


def _params(rng, c):
  return {'scale': jnp.asarray(1 + 0.3 * rng.normal(size=c), jnp.float32),
          'bias': jnp.asarray(0.3 * rng.normal(size=c), jnp.float32)}


@pytest.mark.parametrize('shape,groups', [((2, 5, 7, 64), 32), ((3, 4, 4, 8), 4),
                                          ((2, 10, 16), 4), ((2, 3, 2, 2, 6), 3),
                                          ((2, 4, 4, 32), 1)])
def test_group_norm_matches_numpy_and_flax(shape, groups):
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
  params = _params(rng, shape[-1])
  ours = norms.GroupNorm(num_groups=groups, epsilon=1e-6)
  out = ours.apply({'params': params}, x)
  want = _numpy_group_norm(x, np.asarray(params['scale']), np.asarray(params['bias']),
                           groups, 1e-6)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  flax_layer = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
  np.testing.assert_allclose(out, flax_layer.apply({'params': params}, x), rtol=1e-5, atol=1e-5)
  # Gradients with respect to x, scale and bias, through a swish as in the networks.
  cot = jnp.asarray(rng.normal(size=shape), jnp.float32)
  def grads(layer):
    return jax.grad(lambda p, x: jnp.sum(nn.swish(layer.apply({'params': p}, x)) * cot),
                    argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               grads(ours), grads(flax_layer))


def test_group_norm_gradients_match_finite_differences():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
  params = _params(rng, 4)
  fn = lambda x, scale, bias: jnp.sin(norms.group_norm(x, scale, bias, num_groups=2))
  check_grads(fn, (x, params['scale'], params['bias']), order=1, modes=('rev',),
              atol=1e-2, rtol=1e-2, eps=1e-3)


def _numpy_group_norm_swish_vjp(x, scale, bias, groups, eps, cot):
  """float64 (dx, dscale, dbias) of sum(cot * swish(GroupNorm(x))), derived by hand.

  With x_hat = (x - mean) / sigma over a group, h = x_hat * scale + bias and
  swish'(h) = s + h s (1 - s), s = sigmoid(h): dh = cot * swish'(h), dscale = sum dh x_hat,
  dbias = sum dh, and dx = (g - mean(g) - x_hat mean(g x_hat)) / sigma with g = dh * scale,
  the means over the group's elements.
  """
  x = np.asarray(x, np.float64)
  n, c = x.shape[0], x.shape[-1]
  xg = x.reshape(n, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  sigma = np.sqrt(((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True) + eps)
  x_hat = ((xg - mean) / sigma).reshape(x.shape)
  h = x_hat * scale + bias
  s = 1 / (1 + np.exp(-h))
  dh = np.asarray(cot, np.float64) * (s + h * s * (1 - s))
  axes = tuple(range(x.ndim - 1))
  g = (dh * scale).reshape(xg.shape)
  xh = x_hat.reshape(xg.shape)
  dx = (g - g.mean(axis=(1, 3), keepdims=True)
        - xh * (g * xh).mean(axis=(1, 3), keepdims=True)) / sigma
  return dx.reshape(x.shape), (dh * x_hat).sum(axis=axes), dh.sum(axis=axes)


def test_group_norm_swish_gradient_on_the_native_path_matches_numpy():
  # 64 float32 channels in 32 groups: the shape the taming networks run, and one the native
  # kernel takes (channels a multiple of 16); 4 channels, as above, never reach it.
  shape, groups, eps = (2, 6, 5, 64), 32, 1e-6
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=shape) * 2 + 0.5, jnp.float32)
  params = _params(rng, shape[-1])
  cot = jnp.asarray(rng.normal(size=shape), jnp.float32)
  scale64, bias64 = np.asarray(params['scale'], np.float64), np.asarray(params['bias'])
  want = _numpy_group_norm_swish_vjp(x, scale64, bias64, groups, eps, cot)

  # The oracle against float64 central differences of the forward, along random directions.
  def loss(x, scale, bias):
    h = _numpy_group_norm(x, scale, bias, groups, eps)
    return np.sum(np.asarray(cot, np.float64) * h / (1 + np.exp(-h)))
  args = (np.asarray(x, np.float64), scale64, bias64)
  for i, grad in enumerate(want):
    v = rng.normal(size=grad.shape)
    step = [a + 1e-6 * v if j == i else a for j, a in enumerate(args)]
    back = [a - 1e-6 * v if j == i else a for j, a in enumerate(args)]
    np.testing.assert_allclose((loss(*step) - loss(*back)) / 2e-6, np.sum(grad * v), rtol=1e-6)

  def grads(fn):
    return jax.jit(jax.grad(lambda x, p: jnp.sum(fn(x, p) * cot), argnums=(0, 1)))(x, params)

  native_fn = lambda x, p: norms.GroupNorm(num_groups=groups, epsilon=eps, swish=True).apply(
      {'params': p}, x)
  xla_fn = lambda x, p: nn.swish(norms.group_norm(x, p['scale'], p['bias'], num_groups=groups,
                                                  epsilon=eps))
  native_path = native.group_norm_supported(jnp.float32, shape[-1], groups)
  if not native_path and not native_expected_here():
    pytest.skip(f'no native kernel on this machine: {native.unavailable_reason()}')
  assert native_path
  lowered = jax.jit(jax.grad(lambda x: jnp.sum(native_fn(x, params)))).lower(x).as_text()
  assert 'vq_group_norm_bwd' in lowered
  for fn in (native_fn, xla_fn):
    dx, dp = grads(fn)
    for got, expected in zip((dx, dp['scale'], dp['bias']), want):
      np.testing.assert_allclose(got, expected, rtol=1e-4,
                                 atol=1e-4 * np.abs(expected).max())


def test_group_norm_params_are_flax_groupnorm_params():
  x = jnp.ones((2, 4, 4, 64))
  ours = norms.GroupNorm(num_groups=32).init(jax.random.PRNGKey(0), x)
  theirs = nn.GroupNorm(num_groups=32).init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  bare = norms.GroupNorm(num_groups=32, use_scale=False, use_bias=False)
  assert not bare.init(jax.random.PRNGKey(0), x)


def test_group_norm_two_pass_variance_survives_a_large_mean():
  # One-pass E[x^2] - E[x]^2 in float32 loses the variance of 1e4 + N(0, 1) entirely.
  rng = np.random.default_rng(4)
  x = jnp.asarray(1e4 + rng.normal(size=(2, 8, 8, 8)), jnp.float32)
  out = norms.group_norm(x, None, None, num_groups=2)
  want = _numpy_group_norm(x, 1.0, 0.0, 2, 1e-6)
  np.testing.assert_allclose(out, want, rtol=0, atol=2e-3)


def test_group_norm_bfloat16_input_uses_float32_statistics():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 64)) * 2 + 50, jnp.bfloat16)
  params = _params(rng, 64)
  out = norms.GroupNorm(num_groups=32, dtype=jnp.bfloat16).apply({'params': params}, x)
  assert out.dtype == jnp.bfloat16
  want = _numpy_group_norm(np.asarray(x.astype(jnp.float32)), np.asarray(params['scale']),
                           np.asarray(params['bias']), 32, 1e-6)
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=0.02, atol=0.02)


def test_group_norm_rejects_channels_not_divisible_by_groups():
  with pytest.raises(ValueError, match='48 channels do not split into 32 groups'):
    norms.GroupNorm(num_groups=32).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 48)))
