"""Tests for vq.models.discriminator: topology, parameter count, per-example logits."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.models import discriminator as disc_lib


def _images(seed, shape):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _numpy_variables(model, x, seed):
  """Variables of `model` filled from numpy, without running its initialisers.

  On XLA:CPU every new parameter shape costs a PRNG compile of seconds; one
  real init (the `patchgan` fixture) is enough to test the initialisers.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == 'scale':
      return 1 + 0.1 * noise
    if name == 'bias':
      return 0.1 * noise
    return noise / np.sqrt(np.prod(leaf.shape[:-1]))

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _conv_out(size, kernel, stride, pad):
  return (size + 2 * pad - kernel) // stride + 1


def _expected_patchgan_side(size, n_layers):
  # taming: n_layers stride-2 convs, then two stride-1 convs; all 4x4, pad 1.
  for _ in range(n_layers):
    size = _conv_out(size, 4, 2, 1)
  for _ in range(2):
    size = _conv_out(size, 4, 1, 1)
  return size


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('n_layers', [2, 3])
def test_patchgan_output_shape(size, n_layers):
  model = disc_lib.PatchGANDiscriminator(ndf=8, n_layers=n_layers)
  x = jnp.zeros((2, size, size, 3))
  side = _expected_patchgan_side(size, n_layers)
  # Shapes only: the real run of these sizes is covered below at 32 px.
  out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x))
  assert out.shape == (2, side, side, 1)
  assert out.dtype == jnp.float32
  assert (size, n_layers, side) in {(32, 2, 6), (32, 3, 2), (64, 2, 14),
                                    (64, 3, 6)}


def test_patchgan_param_count_and_shapes_match_taming():
  ndf, c = 64, 3
  model = disc_lib.PatchGANDiscriminator(ndf=ndf, n_layers=3)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, c)))
  chans = [c, ndf, 2 * ndf, 4 * ndf, 8 * ndf, 1]
  kernels = sum(16 * cin * cout for cin, cout in zip(chans[:-1], chans[1:]))
  biases = ndf + 1  # only the first and the last conv; the others feed a norm
  norms = 2 * (2 * ndf + 4 * ndf + 8 * ndf)  # scale and bias per channel
  assert kernels + biases + norms == 2_765_633  # taming NLayerDiscriminator()
  assert _count(variables['params']) == kernels + biases + norms

  params = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  kernel_shapes = [v.shape for k, v in params.items() if k.endswith('kernel')]
  assert sorted(kernel_shapes) == sorted(
      (4, 4, cin, cout) for cin, cout in zip(chans[:-1], chans[1:]))
  assert sum(k.endswith('bias') and k.startswith('Conv') for k in params) == 2


def test_patchgan_without_norm_keeps_conv_biases():
  model = disc_lib.PatchGANDiscriminator(ndf=8, n_layers=2, norm='none')
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))['params']
  assert sorted(params) == [f'Conv_{i}' for i in range(4)]
  assert all('bias' in p for p in params.values())


# One small PatchGAN shared by several tests: on XLA:CPU each new shape costs a
# compile, which dominates the runtime of this file.
_X = _images(0, (4, 32, 32, 3))


@pytest.fixture(scope='module')
def patchgan():
  model = disc_lib.PatchGANDiscriminator(ndf=8, n_layers=2)
  return model, jax.jit(model.init)(jax.random.key(1), _X)


@pytest.mark.parametrize('norm', ['group', 'layer', 'none'])
def test_no_batch_stats_and_examples_are_independent(norm, patchgan):
  model = disc_lib.PatchGANDiscriminator(ndf=8, n_layers=2, norm=norm)
  variables = patchgan[1] if norm == 'group' else _numpy_variables(
      model, _X, 1)
  assert set(variables) == {'params'}
  batched = model.apply(variables, _X)
  chex.assert_shape(batched, (4, 6, 6, 1))
  chex.assert_tree_all_finite(batched)
  for i in range(2):
    alone = model.apply(variables, _X[i:i + 1])
    np.testing.assert_allclose(alone[0], batched[i], rtol=1e-5, atol=1e-6)
  # Different images must give different logits, or the check above is empty.
  assert np.abs(batched[0] - batched[1]).max() > 1e-3


def test_patchgan_init_follows_taming(patchgan):
  params = patchgan[1]['params']
  big = np.asarray(params['Conv_2']['kernel'])  # 4*4*16*32 weights
  assert big.shape == (4, 4, 16, 32)
  assert abs(big.std() - 0.02) < 0.001 and abs(big.mean()) < 0.001
  scale = np.concatenate([np.asarray(params[k]['scale']).ravel()
                          for k in params if 'Norm' in k])
  assert scale.size == 16 + 32
  assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
  for k in params:
    if 'bias' in params[k]:
      np.testing.assert_array_equal(params[k]['bias'], 0.0)


def test_group_norm_groups_and_layer_norm_statistics():
  assert disc_lib._norm_layer('group', 64, jnp.float32).num_groups == 32
  assert disc_lib._norm_layer('group', 48, jnp.float32).num_groups == 16
  assert disc_lib._norm_layer('group', 8, jnp.float32).num_groups == 8
  # 'layer' normalises over H, W and C of each example: compare with numpy.
  x = _images(3, (2, 3, 3, 4)) * 5 + 1
  layer = disc_lib._norm_layer('layer', 4, jnp.float32)
  variables = layer.init(jax.random.key(0), x)
  out = layer.apply(variables, x)
  x64 = x.astype(np.float64)
  mean = x64.mean(axis=(1, 2, 3), keepdims=True)
  var = x64.var(axis=(1, 2, 3), keepdims=True)
  expected = ((x64 - mean) / np.sqrt(var + 1e-5) *
              np.asarray(variables['params']['scale']))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits(patchgan):
  model, variables = patchgan
  bf16 = disc_lib.PatchGANDiscriminator(ndf=8, n_layers=2, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), _X)
  for leaf in jax.tree_util.tree_leaves(shapes):
    assert leaf.dtype == jnp.float32
  out = bf16.apply(variables, _X)
  assert out.dtype == jnp.float32
  ref = model.apply(variables, _X)
  np.testing.assert_allclose(out, ref, atol=0.05 * np.abs(ref).max())


def test_pmap_matches_single_device(patchgan):
  model, variables = patchgan
  n = jax.local_device_count()
  assert n >= 2 and len(_X) % n == 0, 'conftest should force 4 CPU devices'
  single = model.apply(variables, _X)
  sharded = jax.pmap(model.apply, in_axes=(None, 0))(
      variables, _X.reshape(n, -1, 32, 32, 3))
  np.testing.assert_allclose(
      np.asarray(sharded).reshape(single.shape), single, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- StyleGAN


@pytest.mark.parametrize('size,mults', [(32, (1, 2)), (64, (1, 2, 2))])
def test_stylegan_shapes_and_independence(size, mults):
  model = disc_lib.StyleGANDiscriminator(ndf=8, channel_multipliers=mults)
  x = _images(6, (3, size, size, 3))
  variables = _numpy_variables(model, x, 2)
  assert set(variables) == {'params'}
  out = model.apply(variables, x)
  chex.assert_shape(out, (3, 1, 1, 1))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(
      model.apply(variables, x[1:2])[0], out[1], rtol=1e-5, atol=1e-6)
  # The dense head sees ndf * mults[-1] channels at size / 2**len(mults).
  side = size // 2**len(mults)
  dense = variables['params']['Dense_0']['kernel']
  assert dense.shape == (side * side * 8 * mults[-1], 8 * mults[-1])


def test_minibatch_std_matches_numpy():
  x = _images(7, (4, 2, 2, 3))
  out = np.asarray(disc_lib._minibatch_std(jnp.asarray(x), group_size=2))
  chex.assert_shape(out, (4, 2, 2, 4))
  np.testing.assert_array_equal(out[..., :3], x)
  # Groups of 2 are examples {0, 2} and {1, 3} (StyleGAN's [G, M] reshape).
  for members in ([0, 2], [1, 3]):
    g = x[members].astype(np.float64)
    expected = np.sqrt(g.var(axis=0) + 1e-8).mean()
    np.testing.assert_allclose(out[members, ..., 3], expected, rtol=1e-5)
  with pytest.raises(ValueError, match='not divisible'):
    disc_lib._minibatch_std(jnp.zeros((3, 2, 2, 1)), group_size=2)


def test_stylegan_with_minibatch_std_sees_the_batch():
  model = disc_lib.StyleGANDiscriminator(ndf=8, channel_multipliers=(1, 2),
                                         mbstd_group_size=2)
  x = _images(8, (2, 32, 32, 3))
  variables = _numpy_variables(model, x, 3)
  out = model.apply(variables, x)
  chex.assert_shape(out, (2, 1, 1, 1))
  swapped_partner = x.copy()
  swapped_partner[1] = _images(9, (32, 32, 3))
  assert abs(model.apply(variables, swapped_partner)[0] - out[0]).max() > 1e-6


def test_blur_downsample_preserves_constants():
  x = jnp.full((1, 8, 8, 2), 3.0)
  out = np.asarray(disc_lib._blur_downsample(x))
  chex.assert_shape(out, (1, 4, 4, 2))
  # The filter sums to one; only the zero-padded border loses mass.
  np.testing.assert_allclose(out[:, 1:-1, 1:-1], 3.0, rtol=1e-6)


# --------------------------------------------------------- errors, factory


def test_build_discriminator():
  model = disc_lib.build_discriminator('patchgan', ndf=16, n_layers=2)
  assert isinstance(model, disc_lib.PatchGANDiscriminator)
  assert (model.ndf, model.n_layers) == (16, 2)
  model = disc_lib.build_discriminator('stylegan', ndf=16)
  assert isinstance(model, disc_lib.StyleGANDiscriminator)
  with pytest.raises(ValueError, match=r"'biggan'.*patchgan, stylegan"):
    disc_lib.build_discriminator('biggan')
  with pytest.raises(ValueError, match=r"\['filters'\].*ndf, n_layers, norm"):
    disc_lib.build_discriminator('patchgan', filters=8)
  with pytest.raises(ValueError, match=r"\['norm'\].*ndf, channel_multipliers"):
    disc_lib.build_discriminator('stylegan', norm='group')


def test_bad_settings_raise_value_errors():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"'batch'.*group, layer, none"):
    disc_lib.PatchGANDiscriminator(norm='batch').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='n_layers=0'):
    disc_lib.PatchGANDiscriminator(n_layers=0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='NHWC'):
    disc_lib.PatchGANDiscriminator().init(jax.random.key(0), x[0])
  with pytest.raises(ValueError, match=r'divisible by 8.*\(1, 36, 36, 3\)'):
    disc_lib.StyleGANDiscriminator(ndf=4).init(
        jax.random.key(0), jnp.zeros((1, 36, 36, 3)))
