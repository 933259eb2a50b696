"""Tests for vq.evaluation.fid and vq.perceptual.inception against closed forms and numpy reference implementations."""

import sys
import types

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.evaluation import fid
from vq.perceptual import inception
from vq.core import weights

_BN_EPS = 1e-3


def _rng(seed):
  return np.random.default_rng(seed)


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _fd_by_eigh(mu1, s1, mu2, s2):
  """FD with Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): eigh instead of sqrtm."""
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(root @ s2 @ root)
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()


# --- Fréchet distance ---


def test_fd_of_identical_statistics_is_zero():
  x = _rng(0).normal(size=(300, 24)) * 3 + 1
  mu, sigma = fid.feature_statistics(x)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.parametrize('seed', range(4))
def test_fd_diagonal_gaussians_closed_form(seed):
  rng = _rng(seed)
  d = 10
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((mu1 - mu2)**2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert isinstance(got, float)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def _fd_2x2(mu1, s1, mu2, s2):
  # A 2x2 matrix A with positive eigenvalues has sqrt(A) = (A + sqrt(det A) I) / t with
  # t = sqrt(tr A + 2 sqrt(det A)) (Cayley-Hamilton), so Tr sqrt(A) = t.
  a = s1 @ s2
  tr_sqrt = np.sqrt(np.trace(a) + 2 * np.sqrt(np.linalg.det(a)))
  return np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


def test_fd_known_non_diagonal_value():
  s1 = np.array([[2.0, 1.0], [1.0, 2.0]])
  s2 = np.array([[1.0, 0.0], [0.0, 4.0]])
  mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
  # S1 S2 = [[2, 4], [1, 8]]: trace 10, det 12.
  expected = 5.0 + 4.0 + 5.0 - 2 * np.sqrt(10 + 2 * np.sqrt(12))
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-12)
  np.testing.assert_allclose(expected, 5.7712206, rtol=1e-7)  # 14 - 2 sqrt(16.9282032).


@pytest.mark.parametrize('seed', range(4))
def test_fd_random_2x2_explicit_sqrtm(seed):
  rng = _rng(seed + 10)
  mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
  s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), _fd_2x2(mu1, s1, mu2, s2),
                             rtol=1e-9)


@pytest.mark.parametrize('n', [200, 6])  # Full-rank, and singular covariances (6 < 16 points).
def test_fd_matches_eigh_route(n):
  rng = _rng(n)
  x = rng.normal(size=(n, 16)) @ rng.normal(size=(16, 16))
  y = rng.normal(size=(n, 16)) @ rng.normal(size=(16, 16)) + 0.5
  a, b = fid.feature_statistics(x), fid.feature_statistics(y)
  got = fid.frechet_distance(*a, *b)
  np.testing.assert_allclose(got, _fd_by_eigh(*a, *b), rtol=1e-6)
  np.testing.assert_allclose(fid.frechet_distance(*b, *a), got, rtol=1e-6)


def test_fd_retries_with_diagonal_offset_when_sqrtm_fails(monkeypatch):
  rng = _rng(3)
  mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
  s1, s2 = _random_spd(rng, 4), _random_spd(rng, 4)
  real_sqrtm = fid.linalg.sqrtm
  calls = []

  def flaky_sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(fid.linalg, 'sqrtm', flaky_sqrtm)
  eps = 0.5  # Large, so that the offset visibly changes the value.
  got = fid.frechet_distance(mu1, s1, mu2, s2, eps=eps)
  assert len(calls) == 2
  off = eps * np.eye(4)
  # pytorch-fid offsets only the square-root term; the traces stay those of the inputs.
  expected = (_fd_by_eigh(mu1, s1 + off, mu2, s2 + off) - 2 * 4 * eps)
  np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_fd_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='sigma2'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_fd_rejects_invalid_covariance():
  with pytest.raises(ValueError, match='imaginary'):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_feature_statistics_formula():
  x = _rng(5).normal(size=(40, 6)) + 7
  mu, sigma = fid.feature_statistics(jnp.asarray(x, jnp.float32))
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  centred = x - x.sum(axis=0) / 40
  np.testing.assert_allclose(mu, x.sum(axis=0) / 40, rtol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 39, rtol=1e-10)
  assert mu.dtype == sigma.dtype == np.float64
  with pytest.raises(ValueError, match='at least 2'):
    fid.feature_statistics(x[:1])


def test_stats_accumulator_matches_np_cov():
  rng = _rng(7)
  acc = fid.StatsAccumulator(4)
  kept = []
  for b, size in enumerate([6, 1, 0, 11, 8]):
    x = rng.normal(size=(size, 4)) @ rng.normal(size=(4, 4)) + 1e4
    # First batch entirely padding: the shift must come from real rows.
    mask = np.zeros(size, bool) if b == 0 else rng.uniform(size=size) < 0.7
    if b % 2:  # Also take jax arrays (float32: the reference sees the same rounded values).
      x = np.asarray(jnp.asarray(x), np.float64)
      acc.add(jnp.asarray(x, jnp.float32), mask.astype(np.int32) if b == 3 else mask)
    else:
      acc.add(x, mask)
    kept.append(x[mask])
  tail = rng.normal(size=(3, 4)) + 1e4
  acc.add(tail)  # No mask: every row counts.
  rows = np.concatenate(kept + [tail])
  mu, sigma = acc.statistics()
  assert acc.count == rows.shape[0]
  np.testing.assert_allclose(mu, np.mean(rows, axis=0), rtol=1e-14)
  np.testing.assert_allclose(sigma, np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-9)


def test_stats_accumulator_errors():
  acc = fid.StatsAccumulator(3)
  with pytest.raises(ValueError, match='dimension 4'):
    acc.add(np.zeros((2, 4)))
  with pytest.raises(ValueError, match='mask shape'):
    acc.add(np.zeros((2, 3)), np.ones(3, bool))
  acc.add(np.zeros((1, 3)))
  with pytest.raises(ValueError, match='1 feature vectors'):
    acc.statistics()


# --- Inception: numpy reference of torchvision's BasicConv2d and pytorch-fid's blocks ---


def _np_conv(x, w, stride=1, pad=(0, 0)):
  """NHWC x, OIHW torch weight -> NHWC, by explicit window slices and one einsum."""
  ph, pw = pad
  x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  _, _, kh, kw = w.shape
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = 0
  for a in range(kh):
    for b in range(kw):
      window = x[:, a:a + stride * (oh - 1) + 1:stride, b:b + stride * (ow - 1) + 1:stride]
      out = out + window @ w[:, :, a, b].T
  return out


def _np_basic(sd, name, x, kernel=1, stride=1, pad=0):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  pad = (pad, pad) if isinstance(pad, int) else pad
  w = sd[f'{name}.conv.weight']
  assert w.shape[2:] == kernel
  y = _np_conv(x, w, stride, pad)
  g, b, m, v = (sd[f'{name}.bn.{k}'] for k in ('weight', 'bias', 'running_mean', 'running_var'))
  return np.maximum((y - m) / np.sqrt(v + _BN_EPS) * g + b, 0.0)


def _np_avg_pool_exclude_pad(x):
  """3x3, stride 1, padding 1, count_include_pad=False: the mean over in-image pixels only."""
  _, h, w, _ = x.shape
  out = np.empty_like(x)
  for i in range(h):
    for j in range(w):
      out[:, i, j] = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean(axis=(1, 2))
  return out


def _np_max_pool(x, stride, pad):
  """3x3 max pool; torch pads with -inf, i.e. windows are clipped to the image."""
  _, h, w, _ = x.shape
  oh, ow = (h + 2 * pad - 3) // stride + 1, (w + 2 * pad - 3) // stride + 1
  out = np.empty((x.shape[0], oh, ow, x.shape[3]))
  for i in range(oh):
    for j in range(ow):
      r, c = i * stride - pad, j * stride - pad
      out[:, i, j] = x[:, max(r, 0):r + 3, max(c, 0):c + 3].max(axis=(1, 2))
  return out


def _np_block_a(sd, p, x):
  b1 = _np_basic(sd, f'{p}branch1x1', x)
  b5 = _np_basic(sd, f'{p}branch5x5_2', _np_basic(sd, f'{p}branch5x5_1', x), 5, pad=2)
  bd = _np_basic(sd, f'{p}branch3x3dbl_1', x)
  bd = _np_basic(sd, f'{p}branch3x3dbl_2', bd, 3, pad=1)
  bd = _np_basic(sd, f'{p}branch3x3dbl_3', bd, 3, pad=1)
  bp = _np_basic(sd, f'{p}branch_pool', _np_avg_pool_exclude_pad(x))
  return np.concatenate([b1, b5, bd, bp], axis=-1)


def _np_block_b(sd, p, x):
  b3 = _np_basic(sd, f'{p}branch3x3', x, 3, stride=2)
  bd = _np_basic(sd, f'{p}branch3x3dbl_1', x)
  bd = _np_basic(sd, f'{p}branch3x3dbl_2', bd, 3, pad=1)
  bd = _np_basic(sd, f'{p}branch3x3dbl_3', bd, 3, stride=2)
  return np.concatenate([b3, bd, _np_max_pool(x, 2, 0)], axis=-1)


def _np_block_c(sd, p, x):
  row, col = dict(kernel=(1, 7), pad=(0, 3)), dict(kernel=(7, 1), pad=(3, 0))
  b1 = _np_basic(sd, f'{p}branch1x1', x)
  b7 = _np_basic(sd, f'{p}branch7x7_1', x)
  b7 = _np_basic(sd, f'{p}branch7x7_2', b7, **row)
  b7 = _np_basic(sd, f'{p}branch7x7_3', b7, **col)
  bd = _np_basic(sd, f'{p}branch7x7dbl_1', x)
  for i, kind in zip(range(2, 6), (col, row, col, row)):
    bd = _np_basic(sd, f'{p}branch7x7dbl_{i}', bd, **kind)
  bp = _np_basic(sd, f'{p}branch_pool', _np_avg_pool_exclude_pad(x))
  return np.concatenate([b1, b7, bd, bp], axis=-1)


def _np_block_d(sd, p, x):
  b3 = _np_basic(sd, f'{p}branch3x3_2', _np_basic(sd, f'{p}branch3x3_1', x), 3, stride=2)
  b7 = _np_basic(sd, f'{p}branch7x7x3_1', x)
  b7 = _np_basic(sd, f'{p}branch7x7x3_2', b7, (1, 7), pad=(0, 3))
  b7 = _np_basic(sd, f'{p}branch7x7x3_3', b7, (7, 1), pad=(3, 0))
  b7 = _np_basic(sd, f'{p}branch7x7x3_4', b7, 3, stride=2)
  return np.concatenate([b3, b7, _np_max_pool(x, 2, 0)], axis=-1)


def _np_block_e(sd, p, x, pool):
  row, col = dict(kernel=(1, 3), pad=(0, 1)), dict(kernel=(3, 1), pad=(1, 0))
  b1 = _np_basic(sd, f'{p}branch1x1', x)
  b3 = _np_basic(sd, f'{p}branch3x3_1', x)
  b3 = [_np_basic(sd, f'{p}branch3x3_2a', b3, **row), _np_basic(sd, f'{p}branch3x3_2b', b3, **col)]
  bd = _np_basic(sd, f'{p}branch3x3dbl_1', x)
  bd = _np_basic(sd, f'{p}branch3x3dbl_2', bd, 3, pad=1)
  bd = [_np_basic(sd, f'{p}branch3x3dbl_3a', bd, **row),
        _np_basic(sd, f'{p}branch3x3dbl_3b', bd, **col)]
  pooled = _np_avg_pool_exclude_pad(x) if pool == 'avg' else _np_max_pool(x, 1, 1)
  bp = _np_basic(sd, f'{p}branch_pool', pooled)
  return np.concatenate([b1, *b3, *bd, bp], axis=-1)


def _np_inception(sd, x):
  """pytorch-fid InceptionV3 (FID variant) from the stem to pool3, without the resize."""
  x = _np_basic(sd, 'Conv2d_1a_3x3', x, 3, stride=2)
  x = _np_basic(sd, 'Conv2d_2a_3x3', x, 3)
  x = _np_basic(sd, 'Conv2d_2b_3x3', x, 3, pad=1)
  x = _np_max_pool(x, 2, 0)
  x = _np_basic(sd, 'Conv2d_3b_1x1', x)
  x = _np_basic(sd, 'Conv2d_4a_3x3', x, 3)
  x = _np_max_pool(x, 2, 0)
  for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
    x = _np_block_a(sd, f'{name}.', x)
  x = _np_block_b(sd, 'Mixed_6a.', x)
  for name in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
    x = _np_block_c(sd, f'{name}.', x)
  x = _np_block_d(sd, 'Mixed_7a.', x)
  x = _np_block_e(sd, 'Mixed_7b.', x, 'avg')
  x = _np_block_e(sd, 'Mixed_7c.', x, 'max')
  return x.mean(axis=(1, 2))


def _random_torch_weights(shapes, seed):
  """A torch-style state dict with He-scaled kernels and non-trivial batch-norm statistics."""
  rng = _rng(seed)
  sd = {}
  for key, shape in shapes.items():
    if key.endswith('conv.weight'):
      sd[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith('bn.weight'):
      sd[key] = rng.uniform(0.5, 1.5, shape)
    elif key.endswith('bn.running_var'):
      sd[key] = rng.uniform(0.5, 2.0, shape)
    else:  # bn.bias, bn.running_mean, fc.*
      sd[key] = rng.normal(size=shape) * 0.2
    sd[key] = sd[key].astype(np.float32)
  return sd


def _fold_block(sd):
  """Our params for one block from its torch-style state dict (BN folded, OIHW -> HWIO)."""
  flat = {}
  for key in sd:
    if key.endswith('.conv.weight'):
      p = key[:-len('.conv.weight')]
      g, b, m, v = (sd[f'{p}.bn.{k}'].astype(np.float64)
                    for k in ('weight', 'bias', 'running_mean', 'running_var'))
      scale = g / np.sqrt(v + _BN_EPS)
      flat[f'{p}/kernel'] = sd[key].transpose(2, 3, 1, 0)
      flat[f'{p}/scale'] = scale.astype(np.float32)
      flat[f'{p}/shift'] = (b - m * scale).astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


def _block_torch_shapes(module, x):
  tree = jax.eval_shape(module.init, jax.random.key(0), x)['params']
  shapes = {}
  for key, leaf in traverse_util.flatten_dict(tree, sep='.').items():
    if key.endswith('.kernel'):
      kh, kw, cin, cout = leaf.shape
      p = key[:-len('.kernel')]
      shapes[f'{p}.conv.weight'] = (cout, cin, kh, kw)
      shapes.update({f'{p}.bn.{k}': (cout,)
                     for k in ('weight', 'bias', 'running_mean', 'running_var')})
  return shapes


def _assert_close_to_reference(got, ref):
  got = np.asarray(got, np.float64)
  # float32 network against a float64 reference: relative to the output's scale.
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# vq.models.conv's 'auto' runs convs on maps at most 3 pixels wide as im2col + matmul and larger ones
# with XLA's convolution, so the sizes pick the path: both are checked.
@pytest.mark.parametrize('block,size,reference', [
    (inception.FIDInceptionA(pool_features=8), 6, lambda sd, x: _np_block_a(sd, '', x)),
    (inception.FIDInceptionC(channels_7x7=16), 5, lambda sd, x: _np_block_c(sd, '', x)),
    (inception.FIDInceptionE(pool='avg'), 3, lambda sd, x: _np_block_e(sd, '', x, 'avg')),
    (inception.FIDInceptionE(pool='max'), 4, lambda sd, x: _np_block_e(sd, '', x, 'max')),
])
def test_blocks_match_numpy_reference(block, size, reference):
  x = _rng(8).normal(size=(2, size, size, 12)).astype(np.float32)
  sd = _random_torch_weights(_block_torch_shapes(block, x), seed=9)
  got = jax.jit(block.apply)({'params': _fold_block(sd)}, x)
  ref = reference({k: v.astype(np.float64) for k, v in sd.items()}, x.astype(np.float64))
  chex.assert_shape(got, ref.shape)
  _assert_close_to_reference(got, ref)


@pytest.fixture(scope='module')
def torch_sd():
  return _random_torch_weights(inception.torch_state_dict_shapes(), seed=11)


@pytest.fixture(scope='module')
def params(torch_sd):
  return inception.convert_torch_state_dict(torch_sd)


def test_network_matches_numpy_reference(torch_sd, params):
  # 75x75 without resizing (the smallest input) keeps the float64 reference fast; it runs every
  # layer, the converter's transposes and the batch-norm folding, and uint8 scaling.
  x = _rng(12).integers(0, 256, size=(2, 75, 75, 3), dtype=np.uint8)
  got = jax.jit(inception.InceptionV3FID(resize_input=False).apply)({'params': params}, x)
  ref = _np_inception({k: v.astype(np.float64) for k, v in torch_sd.items()},
                      x / 255.0 * 2 - 1)  # pytorch-fid: ToTensor, then 2x - 1.
  chex.assert_shape(got, (2, inception.FEATURE_DIM))
  assert got.dtype == jnp.float32
  assert np.abs(ref).max() > 1e-2  # The random weights must not have silenced the network.
  _assert_close_to_reference(got, ref)


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_network_resizes_to_299(params, dtype):
  # Shapes only (compiling the 299x299 graph takes longer than this whole file should); the
  # numbers are covered by the 75x75 test above and the resize tests below.
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), dtype)
  out, state = jax.eval_shape(
      lambda p, x: inception.InceptionV3FID().apply({'params': p}, x, capture_intermediates=True),
      params, x)
  chex.assert_shape(out, (2, inception.FEATURE_DIM))
  assert out.dtype == jnp.float32
  # The first conv saw 299x299 images; the last block runs at 8x8.
  chex.assert_shape(state['intermediates']['Conv2d_1a_3x3']['__call__'][0], (2, 149, 149, 32))
  chex.assert_shape(state['intermediates']['Mixed_7c']['__call__'][0], (2, 8, 8, 2048))


def test_network_rejects_bad_inputs(params):
  with pytest.raises(ValueError, match='RGB'):
    inception.InceptionV3FID().apply({'params': params}, np.zeros((1, 32, 32, 1), np.float32))
  with pytest.raises(ValueError, match='75'):
    inception.InceptionV3FID(resize_input=False).apply({'params': params},
                                                       np.zeros((1, 32, 32, 3), np.float32))


# --- Resize and pools ---


def _np_bilinear(x, out_h, out_w):
  """torch F.interpolate(mode='bilinear', align_corners=False), one output pixel at a time."""
  n, h, w, c = x.shape

  def taps(dst, in_size, out_size):
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    lo = int(src)
    return lo, min(lo + 1, in_size - 1), src - lo

  out = np.zeros((n, out_h, out_w, c))
  for i in range(out_h):
    r0, r1, fr = taps(i, h, out_h)
    for j in range(out_w):
      c0, c1, fc = taps(j, w, out_w)
      out[:, i, j] = ((1 - fr) * ((1 - fc) * x[:, r0, c0] + fc * x[:, r0, c1])
                      + fr * ((1 - fc) * x[:, r1, c0] + fc * x[:, r1, c1]))
  return out


@pytest.mark.parametrize('in_hw,out_hw', [((5, 7), (13, 11)), ((17, 13), (6, 9)), ((4, 4), (4, 4))])
def test_resize_matches_torch_bilinear_reference(in_hw, out_hw):
  x = _rng(14).normal(size=(2, *in_hw, 3)).astype(np.float32)
  got = inception.resize_bilinear(jnp.asarray(x), out_hw)
  np.testing.assert_allclose(got, _np_bilinear(x.astype(np.float64), *out_hw), atol=1e-5)
  if out_hw[0] >= in_hw[0] and out_hw[1] >= in_hw[1]:
    # Upsampling needs no antialiasing, where jax.image.resize agrees with torch.
    other = jax.image.resize(x, (2, *out_hw, 3), 'linear', antialias=False)
    np.testing.assert_allclose(got, other, atol=1e-5)


def test_resize_known_values():
  # torch: F.interpolate(tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4), mode='bilinear').
  x = jnp.asarray([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
  expected = [[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5],
              [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]]
  np.testing.assert_allclose(inception.resize_bilinear(x, (4, 4))[0, :, :, 0], expected,
                             atol=1e-6)


def test_pools_match_loops():
  x = _rng(15).normal(size=(2, 7, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(inception.avg_pool_3x3_exclude_pad(x),
                             _np_avg_pool_exclude_pad(x.astype(np.float64)), atol=1e-6)
  # Corners average 4 pixels, edges 6: e.g. the top-left output of a ones-image is exactly 1.
  np.testing.assert_allclose(inception.avg_pool_3x3_exclude_pad(np.ones((1, 3, 3, 1))), 1.0)
  np.testing.assert_allclose(inception.max_pool_3x3(-np.abs(x), 1, 1),
                             _np_max_pool(-np.abs(x).astype(np.float64), 1, 1), atol=0)
  np.testing.assert_allclose(inception.max_pool_3x3(x, 2, 0),
                             _np_max_pool(x.astype(np.float64), 2, 0), atol=0)


# --- Converter and weights files ---


def test_state_dict_table_matches_torchvision_parameter_count():
  shapes = inception.torch_state_dict_shapes()
  # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, aux head). The
  # aux head has 1x1 768->128 and 5x5 128->768 convs with BN and a 768x1000 fc: 3,326,696; the
  # 2048x1000 fc has 2,049,000. The 94 BasicConv2d layers (conv + BN weight and bias) hold the
  # remaining 21,785,568.
  convs = [k for k in shapes if k.endswith('.conv.weight')]
  learned = [k for k in shapes if k.endswith(('.conv.weight', '.bn.weight', '.bn.bias'))]
  assert len(convs) == 94
  assert sum(int(np.prod(shapes[k])) for k in learned) == 27_161_264 - 3_326_696 - 2_049_000
  assert shapes['Mixed_7c.branch_pool.conv.weight'] == (192, 2048, 1, 1)
  assert shapes['fc.weight'] == (1008, 2048)


def test_converter_output_fits_the_module(params):
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  expected = jax.eval_shape(inception.InceptionV3FID().init, jax.random.key(0), x)['params']
  chex.assert_trees_all_equal_shapes_and_dtypes(params, expected)


def test_converter_tolerates_num_batches_tracked(torch_sd, params):
  sd = dict(torch_sd)
  sd['Mixed_6a.branch3x3.bn.num_batches_tracked'] = np.array(0, np.int64)
  chex.assert_trees_all_equal(inception.convert_torch_state_dict(sd), params)


@pytest.mark.parametrize('edit,key', [
    ('delete', 'Mixed_5c.branch5x5_2.bn.running_var'),
    ('add', 'AuxLogits.conv0.conv.weight'),
    ('reshape', 'Mixed_7b.branch3x3_2a.conv.weight'),
    ('reshape', 'fc.bias'),
])
def test_converter_strict_checks(torch_sd, edit, key):
  sd = dict(torch_sd)
  if edit == 'delete':
    del sd[key]
  elif edit == 'add':
    sd[key] = np.zeros((128, 768, 1, 1), np.float32)
  else:
    sd[key] = sd[key].reshape(1, -1)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    inception.convert_torch_state_dict(sd)


def test_missing_weights_raise_helpful_error(tmp_path, monkeypatch):
  monkeypatch.setenv('VQ_CACHE_DIR', str(tmp_path))
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  with pytest.raises(inception.InceptionWeightsMissing) as info:
    inception.load_params()
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert '\n' not in message
  for part in (str(tmp_path / 'inception_fid.npz'), 'python -m vq.perceptual.inception --convert',
               'pt_inception-2015-12-05-6726825d.pth', 'VQ_INCEPTION_WEIGHTS'):
    assert part in message
  monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / 'elsewhere.npz'))
  with pytest.raises(inception.InceptionWeightsMissing, match='elsewhere.npz'):
    inception.load_params()


def test_load_params_from_cache_env_and_raw_state_dict(tmp_path, monkeypatch, torch_sd, params):
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  monkeypatch.setenv('VQ_CACHE_DIR', str(tmp_path))
  weights.save_npz(tmp_path / 'inception_fid.npz', weights.flatten_tree(params))
  chex.assert_trees_all_equal(inception.load_params(), params)
  raw = tmp_path / 'raw_state_dict.npz'
  weights.save_npz(raw, torch_sd)
  monkeypatch.setenv(inception.WEIGHTS_ENV, str(raw))
  chex.assert_trees_all_equal(inception.load_params(), params)
  # A truncated params file is named as such, not silently accepted.
  flat = weights.flatten_tree(params)
  del flat['Mixed_5b/branch1x1/shift']
  weights.save_npz(tmp_path / 'partial.npz', flat)
  with pytest.raises(ValueError, match='Mixed_5b/branch1x1/shift'):
    inception.load_params(tmp_path / 'partial.npz')


def test_load_params_refuses_pickles(tmp_path):
  path = tmp_path / 'inception_fid.npz'
  path.write_bytes(b'\x80\x04K\x01.')  # A pickle of the int 1.
  with pytest.raises(ValueError, match='pickle'):
    inception.load_params(path)
  pth = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  pth.write_bytes(b'PK\x03\x04')
  with pytest.raises(ValueError, match='python -m vq.perceptual.inception --convert'):
    inception.load_params(pth)


def test_convert_cli_uses_torch_weights_only(tmp_path, monkeypatch, torch_sd, params):
  calls = []

  class FakeTensor:

    def __init__(self, array):
      self.array = array

    def detach(self):
      return self

    def cpu(self):
      return self

    def numpy(self):
      return self.array

  def fake_load(path, map_location=None, weights_only=False):
    calls.append((str(path), map_location, weights_only))
    return {k: FakeTensor(v) for k, v in torch_sd.items()}

  monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(load=fake_load))
  pth = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  pth.write_bytes(b'not really a checkpoint')
  monkeypatch.setenv('VQ_CACHE_DIR', str(tmp_path / 'cache'))
  inception.main(['--convert', str(pth)])
  assert calls == [(str(pth), 'cpu', True)]
  chex.assert_trees_all_equal(inception.load_params(tmp_path / 'cache' / 'inception_fid.npz'),
                              params)
  with pytest.raises(SystemExit):
    inception.main(['--convert', str(tmp_path / 'missing.pth')])
