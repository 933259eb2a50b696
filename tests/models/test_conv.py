"""Tests for vq.models.conv against a float64 numpy convolution and lax.conv_general_dilated."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.models import conv
from vq.cpu import native

_DN = ('NHWC', 'HWIO', 'NHWC')


def _rand(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _same_pads(in_hw, kernel_hw, strides):
  # XLA's SAME rule, written out independently of lax.padtype_to_pads.
  pads = []
  for n, k, s in zip(in_hw, kernel_hw, strides):
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def _numpy_conv(x, kernel, strides, pads):
  """Direct float64 convolution: sum over kernel taps of strided windows times the tap."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0),) + tuple(pads) + ((0, 0),))
  kernel = np.asarray(kernel, np.float64)
  kh, kw, _, cout = kernel.shape
  sh, sw = strides
  oh = (x.shape[1] - kh) // sh + 1
  ow = (x.shape[2] - kw) // sw + 1
  out = np.zeros((x.shape[0], oh, ow, cout))
  for i in range(kh):
    for j in range(kw):
      window = x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
      out += window @ kernel[i, j]
  return out


def _lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN,
                                      precision=jax.lax.Precision.HIGHEST)


# (name, input [N, H, W, Cin], kernel [kh, kw, Cin, Cout], strides, padding); the layers
# of vq/models/nets.py in miniature, plus odd sizes and tiny outputs.
_CASES = [
    ('3x3_same', (2, 8, 8, 5), (3, 3, 5, 7), (1, 1), 'SAME'),
    ('4x4_stride2_same', (2, 8, 8, 3), (4, 4, 3, 6), (2, 2), 'SAME'),
    ('1x1', (2, 6, 6, 8), (1, 1, 8, 4), (1, 1), 'SAME'),
    ('1x1_stride2', (2, 7, 6, 8), (1, 1, 8, 4), (2, 2), 'VALID'),
    ('taming_downsample', (2, 8, 8, 6), (3, 3, 6, 6), (2, 2), ((0, 1), (0, 1))),
    ('subpixel_3x3', (2, 6, 6, 8), (3, 3, 8, 12), (1, 1), 'SAME'),
    ('odd_7x5_stride2_same', (3, 7, 5, 4), (3, 3, 4, 5), (2, 2), 'SAME'),
    ('odd_7x5_4x4_stride2_same', (3, 7, 5, 4), (4, 4, 4, 5), (2, 2), 'SAME'),
    ('odd_7x5_valid_stride_2x1', (2, 7, 5, 4), (3, 2, 4, 5), (2, 1), 'VALID'),
    ('tiny_2x2_output', (2, 2, 2, 16), (3, 3, 16, 8), (1, 1), 'SAME'),
    ('explicit_asymmetric', (2, 6, 7, 3), (3, 3, 3, 4), (1, 2), ((2, 0), (1, 3))),
    # Multiples of 16 output channels: the native kernel gradient's shapes (vq/cpu/native.py).
    ('3x3_same_cout16', (2, 8, 8, 5), (3, 3, 5, 16), (1, 1), 'SAME'),
    ('1x1_cout32', (2, 6, 6, 8), (1, 1, 8, 32), (1, 1), 'SAME'),
    ('taming_downsample_cout16', (2, 8, 8, 6), (3, 3, 6, 16), (2, 2), ((0, 1), (0, 1))),
    ('odd_7x5_4x4_stride2_same_cout48', (3, 7, 5, 4), (4, 4, 4, 48), (2, 2), 'SAME'),
    ('tiny_2x2_output_cout80', (2, 2, 2, 16), (3, 3, 16, 80), (1, 1), 'SAME'),
    ('explicit_asymmetric_cout16', (2, 6, 7, 3), (3, 3, 3, 16), (1, 2), ((2, 0), (1, 3))),
]


def _native_or_fallback(monkeypatch, use_native):
  """Runs the test with vq.cpu.native's kernel gradient (where it loads) or with it off."""
  if use_native:
    reason = native.unavailable_reason()
    if reason is not None and not native_expected_here():
      pytest.skip(f'no native kernel on this machine: {reason}')
    assert reason is None, reason
  else:
    monkeypatch.setattr(native, 'kernel_grad_supported', lambda *a, **k: False)


def native_expected_here():
  """Whether this machine should build the native kernel: a C++ compiler and AVX-512."""
  import shutil  # pylint: disable=g-import-not-at-top
  try:
    with open('/proc/cpuinfo') as f:
      avx512 = ' avx512f' in f.read()
  except OSError:
    avx512 = False
  return avx512 and shutil.which('c++') is not None


def _explicit(padding, x_shape, k_shape, strides):
  if padding == 'SAME':
    return _same_pads(x_shape[1:3], k_shape[:2], strides)
  if padding == 'VALID':
    return ((0, 0), (0, 0))
  return padding


@pytest.mark.parametrize('use_native', [True, False], ids=['native', 'xla_only'])
@pytest.mark.parametrize('name,x_shape,k_shape,strides,padding', _CASES,
                         ids=[c[0] for c in _CASES])
def test_matches_numpy_forward_and_lax_gradients(name, x_shape, k_shape, strides, padding,
                                                 use_native, monkeypatch):
  del name
  _native_or_fallback(monkeypatch, use_native)
  x, kernel = _rand(0, x_shape), _rand(1, k_shape)
  expected = _numpy_conv(x, kernel, strides, _explicit(padding, x_shape, k_shape, strides))
  cotangent = _rand(2, expected.shape)

  def value_and_grads(fn):
    loss = lambda x, k: jnp.sum(fn(x, k) * cotangent)
    return jax.value_and_grad(lambda x, k: (loss(x, k), fn(x, k)), (0, 1), has_aux=True)

  def ours(impl):
    return lambda x, k: conv.conv2d(x, k, strides=strides, padding=padding, impl=impl)

  (_, expected_y), expected_grads = jax.jit(value_and_grads(
      lambda x, k: _lax_conv(x, k, strides, padding)))(x, kernel)
  for impl in ('im2col', 'mixed', 'auto'):
    (_, y), grads = jax.jit(value_and_grads(ours(impl)))(x, kernel)
    chex.assert_shape(y, expected.shape)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-4)
  # The oracles agree with each other, so a shared mistake cannot hide.
  np.testing.assert_allclose(expected_y, expected, rtol=1e-5, atol=1e-5)


def test_blocked_im2col_matches_lax(monkeypatch):
  # Small blocks force the scan over single images (stride 2 'VALID') and over bands of 3
  # or 2 output rows whose input gradients overlap in the halo rows (the other two).
  monkeypatch.setattr(conv, '_BLOCK_BYTES', 3100)
  x, kernel = _rand(5, (3, 9, 7, 4)), _rand(6, (3, 3, 4, 5))
  for strides, padding in [((1, 1), 'SAME'), ((2, 2), 'VALID'), ((2, 1), ((0, 1), (1, 1)))]:
    out_shape = jax.eval_shape(lambda: _lax_conv(x, kernel, strides, padding)).shape
    cotangent = _rand(7, out_shape)

    def fn(x, k, impl, strides=strides, padding=padding):
      if impl == 'lax':
        return _lax_conv(x, k, strides, padding)
      return conv.conv2d(x, k, strides=strides, padding=padding, impl=impl)

    def value_and_vjp(x, k, g, impl):
      y, pullback = jax.vjp(lambda x, k: fn(x, k, impl), x, k)
      return y, pullback(g)

    run = jax.jit(value_and_vjp, static_argnums=3)
    expected = run(x, kernel, cotangent, 'lax')
    for impl in ('im2col', 'mixed'):
      got = run(x, kernel, cotangent, impl)
      chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-4)


def test_negative_padding_crops_like_lax():
  x, kernel = _rand(8, (2, 9, 8, 3)), _rand(9, (3, 3, 3, 4))
  padding = ((2, -1), (-1, 1))
  expected = _lax_conv(x, kernel, (2, 1), padding)
  got = conv.conv2d(x, kernel, strides=(2, 1), padding=padding, impl='im2col')
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k_shape,strides', [((3, 3, 8, 6), (1, 1)), ((4, 4, 8, 6), (2, 2)),
                                             ((1, 1, 8, 6), (1, 1))])
def test_bfloat16_inputs_match_float32_oracle(k_shape, strides):
  # 8x8 spatial, 72-128 products per output: bf16 accumulation would lose ~1e-2 relative.
  x = jnp.asarray(_rand(10, (2, 8, 8, 8)), jnp.bfloat16)
  kernel = jnp.asarray(_rand(11, k_shape), jnp.bfloat16)
  pads = _same_pads((8, 8), k_shape[:2], strides)
  expected = _numpy_conv(np.asarray(x, np.float32), np.asarray(kernel, np.float32), strides,
                         pads)
  y = jax.jit(lambda x, k: conv.conv2d(x, k, strides=strides, padding='SAME',
                                       impl='im2col'))(x, kernel)
  assert y.dtype == jnp.bfloat16
  # Only the final rounding to bfloat16 (8 bits of mantissa) is allowed.
  np.testing.assert_allclose(np.asarray(y, np.float64), expected,
                             rtol=2**-8, atol=2**-8 * np.abs(expected).max())

  cotangent = jnp.asarray(_rand(12, expected.shape), jnp.bfloat16)

  def loss(fn):
    return lambda x, k: jnp.sum(fn(x, k).astype(jnp.float32) * cotangent)

  f32 = lambda a: a.astype(jnp.float32)
  expected_grads = jax.jit(jax.grad(loss(lambda x, k: _lax_conv(
      f32(x), f32(k), strides, 'SAME')), (0, 1)))(x, kernel)
  for impl in ('im2col', 'mixed'):
    grads = jax.jit(jax.grad(loss(lambda x, k, impl=impl: conv.conv2d(
        x, k, strides=strides, padding='SAME', impl=impl)), (0, 1)))(x, kernel)
    for got, want in zip(grads, expected_grads):
      assert got.dtype == jnp.bfloat16
      scale = float(jnp.abs(want).max())
      np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2**-7 * scale)


def _params_like(shapes, seed):
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(_rand(seed + i, leaf.shape), leaf.dtype) for i, leaf in enumerate(leaves)])


@pytest.mark.parametrize('kwargs', [
    dict(features=7, kernel_size=(3, 3)),
    dict(features=6, kernel_size=(4, 4), strides=(2, 2)),
    dict(features=5, kernel_size=(1, 1), use_bias=False),
    dict(features=4, kernel_size=(3, 3), strides=2, padding='VALID'),
    dict(features=4, kernel_size=(3, 3), padding=((0, 1), (0, 1)), strides=2),
    dict(features=4, kernel_size=(3, 3), padding='CIRCULAR'),
    dict(features=4, kernel_size=(3, 3), padding=1),
])
def test_conv_module_is_drop_in_for_flax(kwargs):
  x = jnp.asarray(_rand(13, (2, 9, 8, 3)))
  rng = jax.random.key(0)
  ours = conv.Conv(**kwargs, impl='im2col')
  # Same parameter names, shapes and dtypes (abstract init: no compile needed).
  flax_shapes = jax.eval_shape(nn.Conv(**kwargs).init, rng, x)
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(ours.init, rng, x),
                                                flax_shapes)
  variables = _params_like(flax_shapes, seed=20)
  expected = nn.Conv(**kwargs, precision=jax.lax.Precision.HIGHEST).apply(variables, x)
  chex.assert_trees_all_close(jax.jit(ours.apply)(variables, x), expected, rtol=1e-5,
                              atol=1e-5)


def test_conv_module_initialises_like_flax():
  x = jnp.zeros((1, 5, 5, 3))
  rng = jax.random.key(3)
  chex.assert_trees_all_close(conv.Conv(4, (3, 3)).init(rng, x),
                              nn.Conv(4, (3, 3)).init(rng, x))


def test_conv_module_bfloat16_dtype():
  x = jnp.asarray(_rand(14, (2, 8, 8, 4)))
  layer = conv.Conv(6, (3, 3), dtype=jnp.bfloat16, impl='im2col')
  variables = _params_like(jax.eval_shape(layer.init, jax.random.key(1), x), seed=30)
  assert variables['params']['kernel'].dtype == jnp.float32
  y = jax.jit(layer.apply)(variables, x)
  assert y.dtype == jnp.bfloat16
  expected = nn.Conv(6, (3, 3), dtype=jnp.bfloat16).apply(variables, x)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(expected, np.float32),
                             atol=2e-2 * float(jnp.abs(expected.astype(jnp.float32)).max()))


@pytest.mark.parametrize('backend,kernel_shape,strides,pads,out_hw,dtype,expected', [
    ('cpu', (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)), (8, 8), jnp.float32, 'xla'),
    ('cpu', (4, 4, 64, 128), (2, 2), ((1, 1), (1, 1)), (16, 16), jnp.float32, 'xla'),
    ('cpu', (3, 3, 64, 12), (1, 1), ((1, 1), (1, 1)), (16, 16), jnp.float32, 'xla'),
    ('cpu', (3, 3, 3, 64), (1, 1), ((1, 1), (1, 1)), (32, 32), jnp.float32, 'xla'),
    ('cpu', (3, 3, 64, 128), (1, 1), ((1, 1), (1, 1)), (16, 16), jnp.float32, 'mixed'),
    ('cpu', (1, 1, 32, 128), (1, 1), ((0, 0), (0, 0)), (8, 8), jnp.float32, 'im2col'),
    ('cpu', (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), (2, 2), jnp.float32, 'im2col'),
    ('cpu', (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), (3, 32), jnp.float32, 'im2col'),
    ('cpu', (3, 3, 64, 64), (2, 2), ((0, 0), (0, 0)), (16, 16), jnp.float32, 'im2col'),
    ('cpu', (3, 3, 64, 64), (2, 2), ((0, 0), (0, 0)), (16, 16), jnp.bfloat16, 'mixed'),
    ('cpu', (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), (2, 2), jnp.bfloat16, 'im2col'),
    ('gpu', (1, 1, 8, 8), (1, 1), ((0, 0), (0, 0)), (2, 2), jnp.float32, 'xla'),
    ('tpu', (3, 3, 64, 64), (2, 2), ((0, 0), (0, 0)), (16, 16), jnp.float32, 'xla'),
])
def test_auto_rule(backend, kernel_shape, strides, pads, out_hw, dtype, expected):
  args = (kernel_shape, strides, pads, out_hw, dtype, backend)
  assert conv.select_impl('auto', *args, native_kernel_grad=False) == expected
  for impl in ('xla', 'im2col', 'mixed'):
    assert conv.select_impl(impl, *args, native_kernel_grad=False) == impl
    assert conv.select_impl(impl, *args, native_kernel_grad=True) == impl
  # With the native kernel gradient, XLA's convolutions on CPU take it through 'mixed'.
  with_native = 'mixed' if (backend, expected) == ('cpu', 'xla') else expected
  assert conv.select_impl('auto', *args, native_kernel_grad=True) == with_native


def test_auto_rule_asks_native_only_on_cpu(monkeypatch):
  asked = []
  monkeypatch.setattr(native, 'kernel_grad_supported',
                      lambda dtype, cout, backend=None: asked.append((cout, backend)) or True)
  args = ((3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)), (8, 8), jnp.float32)
  assert conv.select_impl('auto', *args, 'gpu') == 'xla'
  assert not asked
  assert conv.select_impl('auto', *args, 'cpu') == 'mixed'
  assert asked == [(128, 'cpu')]


def test_bad_arguments_raise_value_error():
  x, kernel = jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2))
  with pytest.raises(ValueError, match='impl'):
    conv.conv2d(x, kernel, impl='fast')
  with pytest.raises(ValueError, match='channels'):
    conv.conv2d(jnp.zeros((1, 4, 4, 5)), kernel)
  with pytest.raises(ValueError, match='padding'):
    conv.conv2d(x, kernel, padding='FULL')
  with pytest.raises(ValueError, match='empty'):
    conv.conv2d(jnp.zeros((1, 2, 2, 3)), kernel, padding='VALID')
  with pytest.raises(ValueError, match='2-D'):
    conv.Conv(2, 3).init(jax.random.key(0), jnp.zeros((1, 4, 3)))
