"""The program GPU/TPU users run: every CPU fast path off (VQ_CPU_FAST_PATHS=0), checked
against float64 numpy oracles and flax, and whole train steps against the fast paths'.

The rest of the suite runs the CPU fast paths (native kernels, im2col routing) where this
machine has them; these tests keep the plain XLA path, which accelerators compile, under
test too. Each step is traced afresh after the switch changes (a new pmap each time).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import vqvae_cifar
from tests.models import test_conv as conv_tests
from tests.training import test_vqgan as vqgan_tests
from vq.cpu import fast_paths
from vq.models import conv
from vq.models import norms
from vq.runtime import state as ts


@pytest.fixture
def plain(monkeypatch):
  monkeypatch.setenv(fast_paths.ENV, '0')


def _lowered_text(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


def _numpy_group_norm_swish(x, scale, bias, groups, eps=1e-6):
  x = np.asarray(x, np.float64)
  xg = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  h = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias
  return h / (1 + np.exp(-h))


@pytest.mark.parametrize('shape', [(2, 8, 8, 64), (2, 4, 4, 128)])
def test_group_norm_swish_is_xla_and_matches_numpy_and_flax(plain, shape):
  del plain
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=shape) * 2 + 0.5, jnp.float32)
  params = {'scale': jnp.asarray(1 + 0.2 * rng.normal(size=shape[-1]), jnp.float32),
            'bias': jnp.asarray(0.2 * rng.normal(size=shape[-1]), jnp.float32)}
  cot = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours = norms.GroupNorm(num_groups=32, epsilon=1e-6, swish=True)
  theirs = nn.GroupNorm(num_groups=32, epsilon=1e-6)

  def loss(apply):
    return lambda p, x: jnp.sum(apply(p, x) * cot)
  ours_apply = lambda p, x: ours.apply({'params': p}, x)
  theirs_apply = lambda p, x: nn.swish(theirs.apply({'params': p}, x))
  assert 'custom_call' not in _lowered_text(jax.grad(loss(ours_apply), (0, 1)), params, x)
  np.testing.assert_allclose(jax.jit(ours_apply)(params, x), _numpy_group_norm_swish(
      x, np.asarray(params['scale']), np.asarray(params['bias']), 32), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.jit(jax.grad(loss(ours_apply), (0, 1)))(params, x),
                              jax.jit(jax.grad(loss(theirs_apply), (0, 1)))(params, x),
                              rtol=2e-4, atol=2e-5)


_CONV_CASES = [c for c in conv_tests._CASES  # pylint: disable=protected-access
               if c[0] in ('1x1_cout32', 'taming_downsample_cout16', 'tiny_2x2_output_cout80',
                           '3x3_same_cout16')]


@pytest.mark.parametrize('name,x_shape,k_shape,strides,padding', _CONV_CASES,
                         ids=[c[0] for c in _CONV_CASES])
def test_conv_auto_is_xla_conv_matching_numpy_and_the_fast_path(monkeypatch, name, x_shape,
                                                                 k_shape, strides, padding):
  """'auto' lowers to XLA's convolution only; value = numpy, gradients = the fast path's."""
  del name
  rand = conv_tests._rand  # pylint: disable=protected-access
  x, kernel = rand(0, x_shape), rand(1, k_shape)
  pads = conv_tests._explicit(padding, x_shape, k_shape, strides)  # pylint: disable=protected-access
  expected = conv_tests._numpy_conv(x, kernel, strides, pads)  # pylint: disable=protected-access
  cot = rand(2, expected.shape)

  def value_and_grads():  # a fresh function each time: traced with the switch as it is now
    fn = lambda x, k: conv.conv2d(x, k, strides=strides, padding=padding)
    return jax.value_and_grad(lambda x, k: (jnp.sum(fn(x, k) * cot), fn(x, k)), (0, 1),
                              has_aux=True)

  (_, fast_y), fast_grads = jax.jit(value_and_grads())(x, kernel)
  fast_text = _lowered_text(value_and_grads(), x, kernel)
  monkeypatch.setenv(fast_paths.ENV, '0')
  text = _lowered_text(value_and_grads(), x, kernel)
  assert text != fast_text  # these shapes take a fast path when it is on
  assert 'convolution' in text and 'custom_call' not in text and 'dot_general' not in text
  (_, y), grads = jax.jit(value_and_grads())(x, kernel)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fast_y, expected, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads, fast_grads, rtol=1e-5, atol=1e-4)


def _sgd(state, lr=0.1):
  """The state with plain SGD for the generator (Adam would turn float noise in zero
  gradients into +-lr updates, hiding real differences behind fake ones)."""
  tx = optax.sgd(lr)
  return state.replace(tx=tx, opt_state=tx.init(state.params))


# Random-init codebooks without restarts: k-means and restarts have their own tests, and
# tripled the compile time here. 16x16 images keep every layer kind (3x3 at 16x16 with the
# native kernel gradient, 1x1 im2col, the taming downsample, PatchGAN 4x4 stride 2).
_SMALL = {'quantizer.init': 'random', 'quantizer.restart_after': 0, 'data.image_size': 16}


def _step_both_ways(monkeypatch, config, state):
  images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  devices = jax.local_devices()[:1]
  step = vqgan_tests._step  # pylint: disable=protected-access
  fast, m_fast = step(config, state, images, devices)
  monkeypatch.setenv(fast_paths.ENV, '0')
  plain, m_plain = step(config, state, images, devices)
  chex.assert_trees_all_close(ts.checkpointable(plain), ts.checkpointable(fast),
                              rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(m_plain, m_fast, rtol=2e-4, atol=2e-5)
  return m_plain


def test_vqvae_step_plain_equals_fast_path(monkeypatch):
  config = vqvae_cifar.get_config('smoke')
  config.update_from_flattened_dict(_SMALL)
  state = _sgd(ts.create_train_state(config, ts.init_key(0), (16, 16, 3)))
  metrics = _step_both_ways(monkeypatch, config, state)
  assert np.isfinite(metrics['loss'])


def test_vqgan_step_plain_equals_fast_path(monkeypatch):
  config = vqgan_tests._config(**_SMALL, **{  # pylint: disable=protected-access
      'loss.disc_start': 0, 'loss.disc_warmup': 0, 'model.ch_mult': (1,),
      'model.attn_resolutions': ()})
  state = vqgan_tests._sgd_state(config, lr=0.1)  # pylint: disable=protected-access
  metrics = _step_both_ways(monkeypatch, config, state)
  assert metrics['d_loss'] > 0
