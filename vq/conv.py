"""2-D convolution that is fast on XLA:CPU: im2col + one matmul, with a drop-in Flax layer.

Usage sketch::

  from vq import conv

  y = conv.conv2d(x, kernel, strides=(2, 2), padding='SAME')   # NHWC x, HWIO kernel
  layer = conv.Conv(128, (3, 3))          # same params as flax.linen.Conv(128, (3, 3))
  variables = layer.init(rng, x)
  y = layer.apply(variables, x)

Why: XLA:CPU's convolution, and above all its gradient, runs far below the speed of its
matmul (the gradient of a 3x3 128->256 conv at 8x8, batch 64, runs at ~70 GFLOP/s against
~470 GFLOP/s for a matmul on the same cores). Gathering the kh*kw shifted (strided) input
slices, concatenating them on channels and doing one matmul turns forward and both
gradients into large matmuls plus cheap slicing, which XLA:CPU does well. On GPU and TPU
the vendor convolutions are fast, so `impl='auto'` keeps `lax.conv_general_dilated` there.
`benchmarks/conv_layers.py` measures both paths per layer shape.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]

IMPLS = ('auto', 'xla', 'im2col')
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """Maps `impl` to the implementation actually run: 'xla' or 'im2col'.

  `'auto'` picks im2col on the CPU backend, where it beat XLA's convolution on the forward
  and gradient of every layer shape of the Sonnet and taming networks (see
  `benchmarks/conv_layers.py`), and lax convolutions on GPU/TPU, whose cuDNN/TPU kernels
  are fast and which would otherwise pay the memory of the kh*kw-times larger im2col
  buffer.

  Args:
    impl: 'auto', 'xla' or 'im2col'.
    backend: backend name; defaults to `jax.default_backend()`.

  Returns:
    'xla' or 'im2col'.
  """
  if impl not in IMPLS:
    raise ValueError(f'conv impl must be one of {IMPLS}, got {impl!r}; pass e.g. '
                     "impl='auto'.")
  if impl != 'auto':
    return impl
  backend = jax.default_backend() if backend is None else backend
  return 'im2col' if backend == 'cpu' else 'xla'


def _explicit_padding(padding: Padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
                      strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """'SAME' / 'VALID' / ints / pairs -> ((lo, hi), (lo, hi)) exactly as lax would pad."""
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"conv2d padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)), "
                       f'got {padding!r}.')
    # lax's own rule (SAME: total = max((ceil(n/s)-1)*s + k - n, 0), lo = total // 2).
    return tuple(jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f'conv2d explicit padding must be two (lo, hi) pairs, got {padding!r}.')
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def _matmul(a: Array, b: Array, out_dtype: Dtype) -> Array:
  # Low-precision inputs accumulate in float32, like the convolution would.
  acc = jnp.float32 if jnp.dtype(out_dtype).itemsize < 4 else None
  return jnp.dot(a, b, preferred_element_type=acc).astype(out_dtype)


def _im2col_conv(x: Array, kernel: Array, strides: tuple[int, int],
                 pads: tuple[tuple[int, int], ...]) -> Array:
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  x = x.astype(out_dtype)
  kernel = kernel.astype(out_dtype)
  if any(lo < 0 or hi < 0 for lo, hi in pads):
    # Negative padding crops; lax.pad handles both signs.
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
  elif any(lo or hi for lo, hi in pads):
    x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),))
  n, hp, wp, _ = x.shape
  oh = (hp - kh) // sh + 1
  ow = (wp - kw) // sw + 1
  if oh <= 0 or ow <= 0:
    raise ValueError(f'conv2d output would be empty: padded input {hp}x{wp} is smaller '
                     f'than the {kh}x{kw} kernel; pad more or use a smaller kernel.')
  if kh == kw == 1 and sh == sw == 1:
    cols = x
  else:
    # Taps in (i, j) row-major order, channels innermost: matches kernel.reshape(-1, cout).
    taps = [
        jax.lax.slice(x, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1,
                                         cin), (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]
    cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  y = _matmul(cols.reshape(n * oh * ow, kh * kw * cin), kernel.reshape(kh * kw * cin, cout),
              out_dtype)
  return y.reshape(n, oh, ow, cout)


def conv2d(x: Array, kernel: Array, *, strides: Sequence[int] = (1, 1),
           padding: Padding = 'SAME', impl: str = 'auto') -> Array:
  """2-D convolution, NHWC input and HWIO kernel; equals `lax.conv_general_dilated`.

  Args:
    x: [N, H, W, Cin] input.
    kernel: [kh, kw, Cin, Cout] kernel.
    strides: (sh, sw) window strides.
    padding: 'SAME', 'VALID', an int, or ((lo, hi), (lo, hi)) explicit padding.
    impl: 'xla' (lax convolution), 'im2col' (slices + one matmul), or 'auto' (im2col on
      CPU, xla elsewhere; see `resolve_impl`).

  Returns:
    [N, H', W', Cout] output in the promoted dtype of `x` and `kernel`.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f'conv2d expects NHWC x and HWIO kernel (4-D each), got shapes '
                     f'{x.shape} and {kernel.shape}.')
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'conv2d input has {x.shape[-1]} channels but the kernel expects '
                     f'{kernel.shape[2]} (kernel shape {kernel.shape}); fix either.')
  strides = tuple(int(s) for s in strides)
  if len(strides) != 2 or min(strides) < 1:
    raise ValueError(f'conv2d strides must be two positive ints, got {strides}.')
  pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  if resolve_impl(impl) == 'xla':
    return jax.lax.conv_general_dilated(x, kernel, strides, pads,
                                        dimension_numbers=_DIMENSION_NUMBERS)
  return _im2col_conv(x, kernel, strides, pads)


class Conv(nn.Module):
  """Drop-in for `flax.linen.Conv` (2-D, NHWC) that can run as im2col + matmul.

  Parameters are named, shaped and initialised as in `nn.Conv` ('kernel' HWIO with
  lecun_normal, 'bias' zeros), so parameter trees are interchangeable.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw), or an int for a square kernel.
    strides: (sh, sw), or an int.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', an int, or ((lo, hi), (lo, hi)).
    use_bias: add a learned per-channel bias.
    dtype: computation dtype (default: promoted from input and parameters, as in nn.Conv).
    param_dtype: dtype of the parameters.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
    impl: 'auto', 'xla' or 'im2col' (see `conv2d`).
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = 'SAME'
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Array] = nn.initializers.zeros_init()
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel_size = ((self.kernel_size,) * 2 if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    if len(kernel_size) != 2 or len(strides) != 2:
      raise ValueError(f'vq.conv.Conv is 2-D only: got kernel_size={self.kernel_size}, '
                       f'strides={self.strides}; use flax.linen.Conv for other ranks.')
    if x.ndim != 4:
      raise ValueError(f'vq.conv.Conv expects NHWC input, got shape {x.shape}.')
    padding = self.padding
    if isinstance(padding, str) and padding.upper() in ('CIRCULAR', 'REFLECT'):
      mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding.upper()]
      x = jnp.pad(x, ((0, 0),) + tuple(((k - 1) // 2, k // 2) for k in kernel_size)
                  + ((0, 0),), mode=mode)
      padding = 'VALID'
    kernel = self.param('kernel', self.kernel_init,
                        kernel_size + (x.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, strides=strides, padding=padding, impl=self.impl)
    if bias is not None:
      y = y + bias
    return y
