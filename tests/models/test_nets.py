"""Encoder/decoder shapes, parameter counts and sown intermediates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.models import nets


@pytest.mark.parametrize('resolution,ch_mult,tokens', [(32, (1, 2, 2), 8), (64, (1, 2, 2), 16),
                                                       (256, (1, 1, 2, 2, 4), 16)])
def test_taming_shapes(resolution, ch_mult, tokens):
  enc = nets.TamingEncoder(ch=32, ch_mult=ch_mult, num_res_blocks=1,
                           attn_resolutions=(tokens,), z_channels=8, resolution=resolution)
  dec = nets.TamingDecoder(ch=32, ch_mult=ch_mult, num_res_blocks=1,
                           attn_resolutions=(tokens,), resolution=resolution)
  x = jnp.zeros((1, resolution, resolution, 3))
  z = jax.eval_shape(lambda: enc.apply(enc.init(jax.random.PRNGKey(0), x), x))
  assert z.shape == (1, tokens, tokens, 8)
  zz = jnp.zeros(z.shape)
  y = jax.eval_shape(lambda: dec.apply(dec.init(jax.random.PRNGKey(0), zz), zz))
  assert y.shape == (1, resolution, resolution, 3)


def test_sonnet_shapes_and_parameter_count():
  enc, dec = nets.SonnetEncoder(), nets.SonnetDecoder()
  x = jnp.zeros((2, 32, 32, 3))
  pe = jax.eval_shape(lambda: enc.init(jax.random.PRNGKey(0), x))
  z = jax.eval_shape(lambda: enc.apply(enc.init(jax.random.PRNGKey(0), x), x))
  assert z.shape == (2, 8, 8, 64)
  pd = jax.eval_shape(lambda: dec.init(jax.random.PRNGKey(0), jnp.zeros(z.shape)))
  count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))
  # Hand count of the VQ-VAE paper's CIFAR net (weights + biases).
  enc_expected = ((4 * 4 * 3 * 64 + 64) + (4 * 4 * 64 * 128 + 128) + (3 * 3 * 128 * 128 + 128)
                  + 2 * ((3 * 3 * 128 * 32 + 32) + (32 * 128 + 128)) + (128 * 64 + 64))
  dec_expected = ((3 * 3 * 64 * 128 + 128) + 2 * ((3 * 3 * 128 * 32 + 32) + (32 * 128 + 128))
                  + (4 * 4 * 128 * 64 + 64) + (4 * 4 * 64 * 3 + 3))
  assert count(pe) == enc_expected
  assert count(pd) == dec_expected


def test_decoders_sow_the_input_of_their_last_layer():
  dec = nets.SonnetDecoder(hidden=16, res_hidden=4, num_res_layers=1)
  z = jnp.ones((1, 4, 4, 8))
  params = dec.init(jax.random.PRNGKey(0), z)
  out, inter = dec.apply(params, z, mutable=['intermediates'])
  h = inter['intermediates']['conv_out_input'][0]
  again = nets.output_layer('sonnet', 3).apply({'params': params['params']['conv_out']}, h)
  np.testing.assert_allclose(again, out, rtol=1e-6, atol=1e-6)


def _numpy_upsample_conv(x, k):
  """float64 oracle: nearest x2 upsampling, zero padding 1, 3x3 cross-correlation."""
  x = np.repeat(np.repeat(np.asarray(x, np.float64), 2, axis=1), 2, axis=2)
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, k.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += np.einsum('nhwi,io->nhwo', padded[:, dy:dy + h, dx:dx + w], k[dy, dx])
  return out


@pytest.mark.parametrize('impl', ['repeat', 'phases'])
@pytest.mark.parametrize('hw', [(1, 1), (3, 5), (4, 4)])
def test_upsample_conv_matches_numpy(impl, hw):
  rng = np.random.default_rng(hw[0] * 10 + hw[1])
  x = rng.normal(size=(2, *hw, 3)).astype(np.float32)
  k = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  out = nets.upsample_conv(jnp.asarray(x), jnp.asarray(k), impl=impl)
  assert out.shape == (2, 2 * hw[0], 2 * hw[1], 4)
  np.testing.assert_allclose(out, _numpy_upsample_conv(x, k.astype(np.float64)),
                             rtol=1e-5, atol=1e-5)


def test_upsample_conv_phases_gradients_equal_repeat():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 5, 3)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, 8, 12, 3)), jnp.float32)
  grads = {impl: jax.grad(lambda x, k, impl=impl: jnp.sum(
      nets.upsample_conv(x, k, impl=impl) * cot), argnums=(0, 1))(x, k)
           for impl in ('repeat', 'phases')}
  for a, b in zip(grads['phases'], grads['repeat']):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_upsample_module_params_and_impls_agree():
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 4, 4, 8)), jnp.float32)
  variables = nets.Upsample(impl='repeat').init(jax.random.PRNGKey(0), x)
  shapes = jax.tree.map(jnp.shape, variables['params'])
  assert shapes == {'conv': {'kernel': (3, 3, 8, 8), 'bias': (8,)}}  # as conv.Conv's
  outs = [nets.Upsample(impl=impl).apply(variables, x) for impl in ('repeat', 'phases')]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  bf16 = nets.Upsample(jnp.bfloat16, impl='phases').apply(variables, x)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16.astype(jnp.float32), outs[0], rtol=0.05, atol=0.05)
  with pytest.raises(ValueError, match='impl'):
    nets.upsample_conv(x, variables['params']['conv']['kernel'], impl='fast')


def test_taming_decoder_upsample_impls_agree():
  """`model.upsample_impl` only picks how the decoder computes the same function."""
  dec = {impl: nets.TamingDecoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                  resolution=8, upsample_impl=impl)
         for impl in ('repeat', 'phases')}
  z = jnp.asarray(np.random.default_rng(9).normal(size=(2, 4, 4, 8)), jnp.float32)
  variables = dec['repeat'].init(jax.random.PRNGKey(0), z)
  outs = [dec[impl].apply(variables, z) for impl in ('repeat', 'phases')]
  assert outs[0].shape == (2, 8, 8, 3)
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
  convs = {impl: str(jax.make_jaxpr(dec[impl].apply)(variables, z)).count('conv_general_dilated')
           for impl in dec}
  assert convs['phases'] == convs['repeat'] + 3  # the one upsampling conv became four


@pytest.mark.parametrize('x_shape', [(5, 7), (2, 6, 7)])
def test_dense_dot_general_values_and_gradients_equal_lax(x_shape):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=x_shape[:-1] + (3,)), jnp.float32)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  ours = jax.vjp(lambda x, w: nets.dense_dot_general(x, w, dims), x, w)
  ref = jax.vjp(lambda x, w: jax.lax.dot_general(x, w, dims), x, w)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6, atol=1e-6)
  for a, b in zip(ours[1](cot), ref[1](cot)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Independent oracle for the weight gradient: sum over rows of x_i^T g_i in float64.
  dw = np.float64(x).reshape(-1, 7).T @ np.float64(cot).reshape(-1, 3)
  np.testing.assert_allclose(ours[1](cot)[1], dw, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='x \\[..., K\\] times w \\[K, N\\] only'):
    nets.dense_dot_general(x, w.T, (((0,), (1,)), ((), ())))


def test_attention_block_gradients_equal_plain_dense():
  """AttnBlock's Dense layers with dense_dot_general give flax Dense's gradients."""
  x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 4, 4, 32)), jnp.float32)
  block = nets.AttnBlock()
  params = block.init(jax.random.PRNGKey(0), x)
  assert set(params['params']) == {'norm', 'qkv', 'proj_out'}

  class PlainAttn(nets.AttnBlock):  # the same block with lax.dot_general in its Dense layers
    @nn.compact
    def __call__(self, x):
      n, h, w, c = x.shape
      y = nets._group_norm('norm', self.dtype)(x)
      qkv = nn.Dense(3 * c, name='qkv')(y.reshape(n, h * w, c))
      q, k, v = jnp.split(qkv, 3, axis=-1)
      attn = jax.nn.softmax(jnp.einsum('nqc,nkc->nqk', q, k) * (c ** -0.5), axis=-1)
      y = nn.Dense(c, name='proj_out')(jnp.einsum('nqk,nkc->nqc', attn, v))
      return x + y.reshape(n, h, w, c)

  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  ours = jax.grad(loss(block), argnums=(0, 1))(params, x)
  ref = jax.grad(loss(PlainAttn()), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, ref)
