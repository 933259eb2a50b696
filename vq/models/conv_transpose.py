"""The 4x4 stride-2 transposed convolution of the Sonnet decoder, two ways; a Flax layer.

Usage sketch::

  from vq.models import conv_transpose

  y = conv_transpose.conv_transpose_4x4s2(x, kernel)   # [N, H, W, Cin] -> [N, 2H, 2W, Cout]
  layer = conv_transpose.ConvTranspose4x4(64)          # params as nn.ConvTranspose(64, (4, 4), (2, 2))

Both implementations compute `nn.ConvTranspose(features, (4, 4), (2, 2), padding='SAME')`
with its parameters (`kernel` [4, 4, Cin, Cout], `bias`):
- 'subpixel': one 3x3 'SAME' conv with 4 * Cout outputs, then depth-to-space. Each output
  parity sees a 2x2 subset of the 4x4 taps over the input's 3x3 neighbourhood; the other
  5 of 9 taps are zeros, so it does 2.25x the multiply-adds of the transposed conv.
- 'adjoint': the transposed conv as what it is, the adjoint of the 4x4 stride-2 conv C
  (pads 1) with the flipped, in/out-swapped kernel K': the forward is C's input gradient
  (one lhs-dilated XLA convolution), and a custom VJP computes the input gradient as C
  itself (a strided XLA convolution) and the kernel gradient as C's kernel gradient
  (`vq.cpu.native`'s kernel where it runs, else XLA's). JAX's own autodiff of the
  lhs-dilated convolution is what made XLA:CPU slow here (977 vs ~60 ms for a 128->64
  layer at 8x8, batch 64).
`impl='auto'` (`select_impl`) picks 'adjoint' on CPU, where it is faster (value and
gradient, batch 32, one core of the 2-core dev machine, interleaved: 128->64 from 8x8
28 vs 59 ms, 64->3 from 16x16 2.9 vs 9.6 ms; with VQ_NATIVE=0 47 vs 88 and 7.2 vs 13.4 ms),
and 'subpixel' elsewhere, where it has not been measured.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq.cpu import native
from vq.models import conv

Dtype = Any
IMPLS = ('auto', 'subpixel', 'adjoint')
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
_STRIDES = (2, 2)
_PADS = ((1, 1), (1, 1))  # C's padding: 4x4 stride 2 from 2H x 2W down to H x W
# For output parity 0 the taps at input offsets (-1, 0, +1) are (k0, k2, -),
# for parity 1 they are (-, k1, k3); index 4 points at an appended zero tap.
_SUBPIXEL_TAPS = ((0, 2, 4), (4, 1, 3))


def select_impl(impl: str, backend: str | None = None) -> str:
  """'subpixel' or 'adjoint' for `impl` ('auto': 'adjoint' on CPU, else 'subpixel')."""
  if impl not in IMPLS:
    raise ValueError(f'conv_transpose impl must be one of {IMPLS}, got {impl!r}; use '
                     "impl='auto' unless you are benchmarking.")
  if impl != 'auto':
    return impl
  backend = jax.default_backend() if backend is None else backend
  return 'adjoint' if backend == 'cpu' else 'subpixel'


def _conv(u: jax.Array, conv_kernel: jax.Array) -> jax.Array:
  """C: the 4x4 stride-2 conv, [N, 2H, 2W, Cout] -> [N, H, W, Cin] (kernel [4, 4, Cout, Cin])."""
  return jax.lax.conv_general_dilated(u, conv_kernel, _STRIDES, _PADS,
                                      dimension_numbers=_DIMENSION_NUMBERS)


def _conv_kernel(kernel: jax.Array) -> jax.Array:
  """nn.ConvTranspose's [4, 4, Cin, Cout] kernel -> C's [4, 4, Cout, Cin] (flipped, swapped)."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


# Output parity 0 reads input rows (i - 1, i) with taps (k0, k2); parity 1 reads rows
# (i, i + 1) with taps (k1, k3) (nn.ConvTranspose's kernel, not flipped); the same for columns.
_PHASE_TAPS = ((0, 2), (1, 3))
_PHASE_PADS = ((1, 0), (0, 1))
# Below this many output channels the four phase convolutions lose to one lhs-dilated one.
_MIN_PHASE_FEATURES = 16


def _adjoint_value(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """C^T x, from nn.ConvTranspose's kernel: [N, H, W, Cin] -> [N, 2H, 2W, Cout].

  With at least 16 output channels as four stride-1 2x2 convolutions, one per output
  parity, interleaved: XLA:CPU's lhs-dilated convolution runs on a slower path (128->64
  from 8x8, batch 32, one core: 13.2 vs 15.5 ms); with fewer (the 3 output channels of the
  last layer) the phases lose (4.0 vs 1.2 ms) and the lhs-dilated convolution runs.
  """
  n, h, w, _ = x.shape
  cout = kernel.shape[-1]
  if cout < _MIN_PHASE_FEATURES:
    u = jax.ShapeDtypeStruct((n, 2 * h, 2 * w, cout), x.dtype)
    return jax.linear_transpose(lambda v: _conv(v, _conv_kernel(kernel)), u)(x)[0]
  rows = []
  for a in (0, 1):
    taps_a = kernel[jnp.array(_PHASE_TAPS[a])]
    cols = [jax.lax.conv_general_dilated(x, taps_a[:, jnp.array(_PHASE_TAPS[b])], (1, 1),
                                         (_PHASE_PADS[a], _PHASE_PADS[b]),
                                         dimension_numbers=_DIMENSION_NUMBERS)
            for b in (0, 1)]
    rows.append(jnp.stack(cols, axis=3))                         # [N, H, W, b, C]
  return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, cout)   # [N, H, a, W, b, C]


def strided_input_grad_applies(kernel_shape, strides, pads, x_shape) -> bool:
  """Whether `strided_input_grad` computes the input gradient of this convolution: 4x4,
  stride 2, padding 1, even input sides, at least 16 input channels."""
  return (tuple(kernel_shape[:2]) == (4, 4) and tuple(strides) == _STRIDES
          and tuple(map(tuple, pads)) == _PADS and x_shape[1] % 2 == 0
          and x_shape[2] % 2 == 0 and x_shape[3] >= _MIN_PHASE_FEATURES)


def strided_input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
  """The input gradient of the 4x4 stride-2 conv (padding 1) with HWIO `kernel`, given
  its output cotangent dy [N, H, W, Cout]: [N, 2H, 2W, Cin] (see
  `strided_input_grad_applies`). It is that conv's adjoint, so the phase convolutions of
  `_adjoint_value` compute it instead of XLA's lhs-dilated convolution."""
  return _adjoint_value(dy, _conv_kernel(kernel))


@jax.custom_vjp
def _adjoint(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """C^T x: [N, H, W, Cin] -> [N, 2H, 2W, Cout] (nn.ConvTranspose's kernel)."""
  return _adjoint_value(x, kernel)


def _adjoint_fwd(x, kernel):
  return _adjoint_value(x, kernel), (x, kernel)


def _adjoint_bwd(residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  conv_kernel = _conv_kernel(kernel)
  # y = C^T x is linear in x and in K': d/dx = C(dy); d/dK' = C's kernel gradient at
  # input dy with output cotangent x; K' is a permutation of the kernel's entries.
  dx = _conv(dy, conv_kernel)
  if native.kernel_grad_supported(x.dtype, conv_kernel.shape[-1]):
    dk = native.conv_kernel_grad(dy, x, (4, 4), _STRIDES, (1, 1))
  else:
    dk = jax.vjp(lambda k: _conv(dy, k), conv_kernel)[1](x)[0]
  return dx, _conv_kernel(dk).astype(kernel.dtype)


_adjoint.defvjp(_adjoint_fwd, _adjoint_bwd)


def _subpixel(x: jax.Array, kernel: jax.Array) -> jax.Array:
  cin, cout = kernel.shape[2:]
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  phases = [padded[jnp.array(ta)][:, jnp.array(tb)]
            for ta in _SUBPIXEL_TAPS for tb in _SUBPIXEL_TAPS]     # 4 x [3, 3, Cin, Cout]
  k3 = jnp.stack(phases, axis=3).reshape(3, 3, cin, 4 * cout)
  y = conv.conv2d(x, k3, padding='SAME')
  n, h, w, _ = y.shape
  y = y.reshape(n, h, w, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h, 2 * w, cout)


def conv_transpose_4x4s2(x: jax.Array, kernel: jax.Array, *, impl: str = 'auto') -> jax.Array:
  """`nn.ConvTranspose`'s 4x4 stride-2 'SAME' transposed conv without bias.

  Args:
    x: [N, H, W, Cin].
    kernel: [4, 4, Cin, Cout], as nn.ConvTranspose's (not flipped).
    impl: 'auto', 'subpixel' or 'adjoint' (see the module docstring).

  Returns:
    [N, 2H, 2W, Cout] in x's dtype.
  """
  if x.ndim != 4 or kernel.shape[:2] != (4, 4) or kernel.shape[2] != x.shape[-1]:
    raise ValueError(f'conv_transpose_4x4s2 takes NHWC x and a [4, 4, Cin, Cout] kernel '
                     f'with Cin = x channels; got shapes {x.shape} and {kernel.shape}.')
  impl = select_impl(impl)
  kernel = kernel.astype(x.dtype)
  if impl == 'subpixel':
    return _subpixel(x, kernel)
  return _adjoint(x, kernel)


class ConvTranspose4x4(nn.Module):
  """4x4 stride-2 'SAME' transposed conv: `nn.ConvTranspose(features, (4, 4), (2, 2))`.

  Same parameters (`kernel` [4, 4, Cin, Cout], `bias`) and outputs; computed by
  `conv_transpose_4x4s2` with `impl`.
  """
  features: int
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (4, 4, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    y = conv_transpose_4x4s2(x.astype(self.dtype), kernel.astype(self.dtype), impl=self.impl)
    return y + bias.astype(self.dtype)
