"""The Sonnet decoder's 4x4 stride-2 transposed convolution against flax's ConvTranspose."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.cpu import native
from vq.models import conv_transpose


# (2, 5, 6, 7): odd sizes and a channel count the native kernel gradient does not take;
# (2, 4, 3, 16): a multiple of 16 input channels, so 'adjoint' uses it where it runs;
# 16 features: 'adjoint' computes its value as four phase convolutions.
@pytest.mark.parametrize('impl', ['subpixel', 'adjoint'])
@pytest.mark.parametrize('shape,features', [((2, 5, 6, 7), 3), ((2, 4, 3, 16), 5),
                                            ((2, 3, 4, 5), 16)])
def test_equals_flax_conv_transpose(impl, shape, features):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  layer = conv_transpose.ConvTranspose4x4(features, impl=impl)
  params = layer.init(jax.random.PRNGKey(1), x)
  # Non-zero bias and a kernel with no symmetry, so a wrong tap, flip or phase shows.
  params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
  reference = nn.ConvTranspose(features, (4, 4), (2, 2))
  np.testing.assert_allclose(layer.apply(params, x), reference.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  # Gradients too (w.r.t. input, kernel and bias).
  loss = lambda m: lambda p, v: jnp.sum(jnp.sin(m.apply(p, v)))
  ours = jax.grad(loss(layer), argnums=(0, 1))(params, x)
  ref = jax.grad(loss(reference), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), ours, ref)


def test_adjoint_uses_the_native_kernel_gradient_where_it_runs():
  x = jnp.ones((1, 4, 4, 16))
  kernel = jnp.ones((4, 4, 16, 8))
  grad = jax.grad(lambda k: jnp.sum(conv_transpose.conv_transpose_4x4s2(x, k, impl='adjoint')))
  hlo = jax.jit(grad).lower(kernel).as_text()
  assert ('vq_conv_kernel_grad' in hlo) == native.kernel_grad_supported(jnp.float32, 16)


def test_select_impl():
  assert conv_transpose.select_impl('auto', backend='cpu') == 'adjoint'
  assert conv_transpose.select_impl('auto', backend='gpu') == 'subpixel'
  assert conv_transpose.select_impl('auto', backend='tpu') == 'subpixel'
  assert conv_transpose.select_impl('subpixel', backend='cpu') == 'subpixel'
  with pytest.raises(ValueError, match="impl must be one of"):
    conv_transpose.select_impl('fast')


@pytest.mark.parametrize('shape', [(2, 6, 8, 16), (2, 7, 8, 16)])  # 7: odd, XLA's gradient
def test_strided_conv_input_gradient_equals_xla(shape):
  from vq.models import conv  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 16, 24))
  pads = ((1, 1), (1, 1))
  assert conv_transpose.strided_input_grad_applies(kernel.shape, (2, 2), pads, shape) == (
      shape[1] % 2 == 0)
  ours = lambda x: conv.conv2d(x, kernel, strides=(2, 2), padding=pads, impl='mixed')
  ref = lambda x: jax.lax.conv_general_dilated(x, kernel, (2, 2), pads,
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ct = jax.random.normal(jax.random.PRNGKey(2), ref(x).shape)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * ct))(x)
  np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-4, atol=1e-4)
