"""2-D convolution that sidesteps XLA:CPU's slow convolution shapes; a drop-in Flax layer.

Usage sketch::

  from vq.models import conv

  y = conv.conv2d(x, kernel, strides=(2, 2), padding='SAME')   # NHWC x, HWIO kernel
  layer = conv.Conv(128, (3, 3))          # same params as flax.linen.Conv(128, (3, 3))
  variables = layer.init(rng, x)
  y = layer.apply(variables, x)

Three implementations give the same numbers as `lax.conv_general_dilated`:
- 'xla': `lax.conv_general_dilated` itself.
- 'im2col': gather the kh*kw shifted (strided) input slices, concatenate them on channels
  and do one matmul; a 1x1 convolution is a plain matmul. Blocks of images (or of output
  rows) go through a `lax.scan` so the kh*kw-times larger im2col buffer stays in cache,
  with a custom VJP that rebuilds each block's buffer for both gradients.
- 'mixed': XLA's convolution and input gradient, the kernel gradient as blocked im2col.
Where `vq.cpu.native` runs (CPU, float32, AVX-512, a C++ compiler; see `native.py`), every
kernel gradient of 'mixed' and 'im2col' comes from its native kernel instead, which reads
x and dy in place: 15.4 against 29 ms for taming's 3x3 64->64 conv at 32x32 (batch 32,
one core), and 'auto' routes XLA's convolutions through 'mixed' to use it too.

XLA:CPU's convolution runs near its matmul speed for most shapes but collapses on some: a
3x3 conv with a 2x2 output, or an input gradient whose output is at most 3 pixels wide, is
15-80x slower than the same work as a matmul; 1x1 convs, unpadded stride-2 convs (taming's
Downsample) and kernel gradients at 16x16 and up are 1.1-3.8x slower. `impl='auto'` (see
`select_impl`) routes exactly those shapes around it on CPU and keeps XLA's convolution
elsewhere, and always on GPU/TPU, and on CPU too with `VQ_CPU_FAST_PATHS=0` (the switch
for every CPU fast path, `vq.cpu.fast_paths`). `benchmarks/conv_layers.py` measures each
per layer.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence, Union

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp

from vq.cpu import fast_paths
from vq.cpu import native

Array = jax.Array
Dtype = Any
Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]

IMPLS = ('auto', 'xla', 'im2col', 'mixed')
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def select_impl(impl: str, kernel_shape: Sequence[int], strides: Sequence[int],
                pads: Sequence[tuple[int, int]], out_hw: Sequence[int],
                dtype: Dtype = jnp.float32, backend: str | None = None,
                native_kernel_grad: bool | None = None) -> str:
  """The implementation `conv2d` runs for one convolution: 'xla', 'im2col' or 'mixed'.

  `impl='auto'` leaves XLA's convolution only where it was measured to lose on CPU
  (benchmarks/conv_layers.py: gradient w.r.t. input and kernel, batch 64, f32, 2 shared
  x86 cores, xla and im2col interleaved, medians):
  - 1x1 kernels -> 'im2col' (a plain matmul): gradient 1.3-3.8x faster.
  - outputs at most 3 pixels high or wide -> 'im2col': XLA:CPU's convolution or its input
    gradient falls off a cliff there (3x3 512->512 at 2x2: gradient 3.3 s vs 64 ms; the
    gradient of a 3x3 stride-2 conv from 5x5 to 2x2: 310 ms vs 20 ms).
  - strided convolutions without padding (taming's Downsample: pad (0, 1) then 3x3 stride
    2 'VALID') -> 'im2col': 1.1-2.6x faster forward and gradient. In bfloat16, where the
    im2col gather and matmul are slower, -> 'mixed' (gradient 1.1-1.8x faster).
  - stride-1 convolutions with outputs of at least 16x16 and at least 64 input and output
    channels -> 'mixed' (XLA's forward and input gradient, im2col kernel gradient): XLA's
    kernel gradient slows down with spatial size; gradient 1.1-1.6x faster, measured before
    `weight_grad_t` transposed the kernel-gradient matmul, which made the kernel gradient
    alone 1.6-1.9x faster again (3x3 at batch 32, one core: 64->64 at 32x32 34 vs 74 ms
    for XLA's, 128->128 at 16x16 24 vs 41 ms). At 8x8 the two are equal (5.4-5.5 ms).
  Everything else (3x3 convs at 8x8, 4x4 stride-2 'SAME' convs, convs with few input or
  output channels) stays on XLA's convolution, which beat im2col there by up to 4x; but
  where the native kernel gradient runs (`vq.cpu.native`: CPU, float32, a multiple of 16
  output channels, AVX-512, a C++ compiler) those become 'mixed' too, which then means
  XLA's forward and input gradient and the native kernel gradient: it beat XLA's own on
  every shape measured (batch 32, one core: 3x3 128->128 at 8x8 4.0 vs 5.0 ms, PatchGAN's
  4x4 stride-2 64->128 3.7 vs 4.7 ms and 128->256 13.0 vs 15.3 ms).
  On GPU/TPU the vendor convolutions are fast, so 'auto' is always 'xla'; with
  `VQ_CPU_FAST_PATHS=0` it is 'xla' on CPU too (the program a GPU/TPU runs).

  Args:
    impl: 'auto', 'xla', 'im2col' or 'mixed'.
    kernel_shape: (kh, kw, cin, cout).
    strides: (sh, sw).
    pads: ((lo, hi), (lo, hi)) explicit padding.
    out_hw: (oh, ow) output size.
    dtype: computation dtype.
    backend: backend name; defaults to `jax.default_backend()`.
    native_kernel_grad: whether the native kernel gradient runs for this convolution;
      default: ask `vq.cpu.native` (CPU only).

  Returns:
    'xla', 'im2col' or 'mixed'.
  """
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}; use impl='auto' "
                     'unless you are benchmarking.')
  if impl != 'auto':
    return impl
  backend = jax.default_backend() if backend is None else backend
  if backend != 'cpu' or not fast_paths.enabled():
    return 'xla'
  kh, kw, cin, cout = kernel_shape
  if (kh, kw) == (1, 1) or min(out_hw) <= 3:
    return 'im2col'
  if max(strides) > 1 and not any(lo or hi for lo, hi in pads):
    return 'im2col' if jnp.dtype(dtype).itemsize >= 4 else 'mixed'
  if max(strides) == 1 and min(out_hw) >= 16 and min(cin, cout) >= 64:
    return 'mixed'
  if native_kernel_grad is None:
    native_kernel_grad = native.kernel_grad_supported(dtype, cout, backend)
  return 'mixed' if native_kernel_grad else 'xla'


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


# Target size of one block's im2col buffer. A whole batch's buffer is kh*kw times the input
# (151 MB for a 3x3 conv over 64x32x32x64); on XLA:CPU writing and re-reading it costs more
# than the matmul (page faults on fresh allocations, DRAM bandwidth), while blocks this size
# stay in cache. Measured on the gradient of 3x3 convs at batch 64: 0.5-8 MiB blocks were
# within noise of each other, one unblocked buffer was 1.2-1.9x slower. Once the kernel
# gradient's matmul was transposed (`weight_grad_t`), 1 MiB beat 2 MiB on all six taming
# CIFAR shapes that use blocks (gradient w.r.t. input and kernel, batch 32, one core, 9
# interleaved runs): 333 vs 349 ms in total, 0.5 MiB 340, 4 MiB 352.
_BLOCK_BYTES = 2**20


class _Geometry(NamedTuple):
  """Static shape facts of one im2col convolution (hashable: a custom_vjp argument)."""
  kh: int
  kw: int
  sh: int
  sw: int
  oh: int
  ow: int
  block_n: int      # Images per block.
  block_rows: int   # Output rows per block.


def _largest_divisor_at_most(n: int, limit: int) -> int:
  limit = max(1, min(n, limit))
  return max(d for d in range(1, limit + 1) if n % d == 0)


def _geometry(xp_shape: Sequence[int], kernel_shape: Sequence[int],
              strides: tuple[int, int], itemsize: int) -> _Geometry:
  n, hp, wp, _ = xp_shape
  kh, kw, cin, _ = kernel_shape
  sh, sw = strides
  oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  row_bytes = ow * kh * kw * cin * itemsize
  image_bytes = oh * row_bytes
  if image_bytes <= _BLOCK_BYTES:
    block_n, block_rows = _largest_divisor_at_most(n, _BLOCK_BYTES // image_bytes), oh
  else:
    # Big images: one image per block, split into bands of output rows.
    block_n, block_rows = 1, _largest_divisor_at_most(oh, _BLOCK_BYTES // row_bytes)
  return _Geometry(kh, kw, sh, sw, oh, ow, block_n, block_rows)


def _num_blocks(n: int, g: _Geometry) -> tuple[int, int]:
  return n // g.block_n, g.oh // g.block_rows


def _block_input(xp: Array, index: Array, g: _Geometry) -> Array:
  """Input window of block `index`: block_n images, the rows its output band reads."""
  _, num_row_blocks = _num_blocks(xp.shape[0], g)
  b, r = index // num_row_blocks, index % num_row_blocks
  rows = (g.block_rows - 1) * g.sh + g.kh
  start = (b * g.block_n, r * g.block_rows * g.sh, 0, 0)
  return jax.lax.dynamic_slice(xp, start, (g.block_n, rows) + xp.shape[2:])


def _cols(xb: Array, g: _Geometry) -> Array:
  """[n, rows, wp, cin] window -> [n * block_rows * ow, kh * kw * cin] im2col matrix."""
  n, _, _, cin = xb.shape
  # Taps in (i, j) row-major order, channels innermost, to match kernel.reshape(-1, cout).
  taps = [
      jax.lax.slice(xb, (0, i, j, 0),
                    (n, i + g.sh * (g.block_rows - 1) + 1, j + g.sw * (g.ow - 1) + 1, cin),
                    (1, g.sh, g.sw, 1))
      for i in range(g.kh) for j in range(g.kw)
  ]
  cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return cols.reshape(n * g.block_rows * g.ow, g.kh * g.kw * cin)


def _acc_dtype(dtype: Dtype) -> Dtype | None:
  # Low-precision inputs accumulate in float32, as XLA's convolution does.
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def _blocks_to_image(yb: Array, n: int, g: _Geometry) -> Array:
  """[num_blocks, block_n * block_rows * ow, c] -> [n, oh, ow, c]."""
  num_b, num_r = _num_blocks(n, g)
  y = yb.reshape(num_b, num_r, g.block_n, g.block_rows, g.ow, yb.shape[-1])
  return y.transpose(0, 2, 1, 3, 4, 5).reshape(n, g.oh, g.ow, yb.shape[-1])


def _image_to_blocks(y: Array, g: _Geometry) -> Array:
  """Inverse of `_blocks_to_image`."""
  n = y.shape[0]
  num_b, num_r = _num_blocks(n, g)
  y = y.reshape(num_b, g.block_n, num_r, g.block_rows, g.ow, y.shape[-1])
  return y.transpose(0, 2, 1, 3, 4, 5).reshape(num_b * num_r, -1, y.shape[-1])


def weight_grad_t(x: Array, dy: Array, precision=None) -> Array:
  """dy^T x for rows x [P, K] and dy [P, N]: the transposed weight gradient [N, K], float32.

  The gradient of `x @ w` with respect to w is x^T dy; this returns its transpose. XLA:CPU's
  matmul is 2.5x faster with the few output channels as rows: contracting 32768 pixels,
  [64, 576] took 18 ms against 47 ms for [576, 64] on one core (the im2col kernel gradient
  of taming's 3x3 64->64 conv at 32x32, batch 32); and for x^T dy it may transpose x in a
  loop fused with whatever produced x (see `nets.dense_dot_general`).
  """
  return jax.lax.dot_general(dy, x, (((0,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blocked_im2col(xp: Array, wm: Array, g: _Geometry) -> Array:
  """Convolution of the padded input `xp` with the [kh*kw*cin, cout] matrix `wm`."""
  return _blocked_im2col_fwd(xp, wm, g)[0]


def _blocked_im2col_fwd(xp: Array, wm: Array, g: _Geometry):
  acc = _acc_dtype(xp.dtype)

  def block(index):
    y = jnp.dot(_cols(_block_input(xp, index, g), g), wm, preferred_element_type=acc)
    return y.astype(xp.dtype)

  num_b, num_r = _num_blocks(xp.shape[0], g)
  # A scan keeps one block's im2col buffer alive at a time; its autodiff would stack
  # every block's buffer as residuals, hence the custom_vjp.
  _, yb = jax.lax.scan(lambda c, i: (c, block(i)), None, jnp.arange(num_b * num_r))
  return _blocks_to_image(yb, xp.shape[0], g), (xp, wm)


def _blocked_im2col_bwd(g: _Geometry, residuals, dy: Array):
  xp, wm = residuals
  acc = _acc_dtype(xp.dtype)
  num_b, num_r = _num_blocks(xp.shape[0], g)
  dyb = _image_to_blocks(dy.astype(xp.dtype), g)
  # The native kernel gradient reads xp and dy in place; the blocks then only carry dx.
  use_native = native.kernel_grad_supported(xp.dtype, wm.shape[1])

  def block(dw_sum, index, dy_block):
    """(dw_sum plus this block's kernel gradient unless native, this block's dx)."""
    xb = _block_input(xp, index, g)
    cols, cols_vjp = jax.vjp(lambda xb: _cols(xb, g), xb)
    if not use_native:
      dw_sum = dw_sum + weight_grad_t(cols, dy_block)
    dcols = jnp.dot(dy_block, wm.T, preferred_element_type=acc).astype(xp.dtype)
    return dw_sum, cols_vjp(dcols)[0]

  if num_r == 1:
    # Blocks are whole images and do not overlap: stack the input gradients.
    def body(dw_sum, inputs):
      return block(dw_sum, *inputs)
    dw, dxb = jax.lax.scan(body, jnp.zeros(wm.shape[::-1], jnp.float32),
                           (jnp.arange(num_b), dyb))
    dxp = dxb.reshape((xp.shape[0],) + dxb.shape[2:])
    # Trailing rows that no output window reaches get no gradient.
    dxp = jnp.pad(dxp, ((0, 0), (0, xp.shape[1] - dxp.shape[1]), (0, 0), (0, 0)))
  else:
    # Row bands share kh - sh halo rows, so their input gradients are added in place.
    def body(carry, inputs):
      dw_sum, dxp = carry
      index = inputs[0]
      dw_sum, dxb = block(dw_sum, *inputs)
      start = (index // num_r * g.block_n, index % num_r * g.block_rows * g.sh, 0, 0)
      dxp = jax.lax.dynamic_update_slice(
          dxp, jax.lax.dynamic_slice(dxp, start, dxb.shape) + dxb, start)
      return (dw_sum, dxp), None
    (dw, dxp), _ = jax.lax.scan(
        body, (jnp.zeros(wm.shape[::-1], jnp.float32), jnp.zeros_like(xp)),
        (jnp.arange(num_b * num_r), dyb))
  if use_native:
    dw = native.conv_kernel_grad(xp, dy.astype(xp.dtype), (g.kh, g.kw), (g.sh, g.sw))
    return dxp, dw.reshape(wm.shape).astype(wm.dtype)
  return dxp, dw.T.astype(wm.dtype)


_blocked_im2col.defvjp(_blocked_im2col_fwd, _blocked_im2col_bwd)


def _pad(x: Array, pads: Sequence[tuple[int, int]]) -> Array:
  # lax.pad also crops for negative padding, like the convolution does.
  return jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))


def _lax_conv(x: Array, kernel: Array, strides: tuple[int, int],
              pads: tuple[tuple[int, int], ...]) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, strides, pads,
                                      dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed_conv(x: Array, kernel: Array, strides: tuple[int, int],
                pads: tuple[tuple[int, int], ...]) -> Array:
  """XLA's convolution and input gradient; the kernel gradient as blocked im2col."""
  return _lax_conv(x, kernel, strides, pads)


def _mixed_conv_fwd(x, kernel, strides, pads):
  return _lax_conv(x, kernel, strides, pads), (x, kernel)


def _mixed_conv_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  from vq.models import conv_transpose  # pylint: disable=g-import-not-at-top (it imports us)
  if conv_transpose.strided_input_grad_applies(kernel.shape, strides, pads, x.shape):
    dx = conv_transpose.strided_input_grad(dy.astype(x.dtype), kernel)  # 4x4/2: its phases
  else:
    dx = jax.vjp(lambda x: _lax_conv(x, kernel, strides, pads), x)[1](dy)[0]
  if native.kernel_grad_supported(x.dtype, kernel.shape[-1]):
    dw = native.conv_kernel_grad(x, dy.astype(x.dtype), kernel.shape[:2], strides,
                                 (pads[0][0], pads[1][0]))
    return dx, dw.astype(kernel.dtype)
  xp = _pad(x, pads)
  g = _geometry(xp.shape, kernel.shape, strides, jnp.dtype(x.dtype).itemsize)
  num_b, num_r = _num_blocks(xp.shape[0], g)

  def body(dw_sum, inputs):
    index, dy_block = inputs
    cols = _cols(_block_input(xp, index, g), g)
    return dw_sum + weight_grad_t(cols, dy_block), None

  dw_t_shape = (kernel.shape[-1], g.kh * g.kw * x.shape[-1])
  dw_t, _ = jax.lax.scan(body, jnp.zeros(dw_t_shape, jnp.float32),
                         (jnp.arange(num_b * num_r), _image_to_blocks(dy.astype(x.dtype), g)))
  return dx, dw_t.T.reshape(kernel.shape).astype(kernel.dtype)


_mixed_conv.defvjp(_mixed_conv_fwd, _mixed_conv_bwd)


@jax.custom_vjp
def _pixel_matmul(x: Array, w: Array) -> Array:
  """x [P, Cin] @ w [Cin, Cout]: a 1x1 convolution over P pixels, in x's dtype."""
  return jnp.dot(x, w, preferred_element_type=_acc_dtype(x.dtype)).astype(x.dtype)


def _pixel_matmul_fwd(x, w):
  return _pixel_matmul(x, w), (x, w)


def _pixel_matmul_bwd(residuals, dy):
  # XLA's own gradient computes x^T dy, a [Cin, Cout] matmul contracting all pixels, at a
  # third of the rate of dy^T x (`weight_grad_t`): 128->64 at 32x32, batch 32, one core:
  # 51 ms against 4.3 ms for the native kernel gradient.
  x, w = residuals
  dx = jnp.dot(dy, w.T, preferred_element_type=_acc_dtype(x.dtype)).astype(x.dtype)
  if native.kernel_grad_supported(x.dtype, w.shape[1]):
    dw = native.conv_kernel_grad(x[None, None], dy.astype(x.dtype)[None, None], (1, 1))
    return dx, dw.reshape(w.shape).astype(w.dtype)
  return dx, weight_grad_t(x, dy.astype(x.dtype)).T.astype(w.dtype)


_pixel_matmul.defvjp(_pixel_matmul_fwd, _pixel_matmul_bwd)


def _im2col_conv(x: Array, kernel: Array, strides: tuple[int, int],
                 pads: tuple[tuple[int, int], ...]) -> Array:
  kh, kw, cin, cout = kernel.shape
  dtype = x.dtype
  x = _pad(x, pads)
  if kh == kw == 1:
    # A 1x1 convolution is a matmul over (strided) pixels.
    x = x[:, ::strides[0], ::strides[1], :]
    y = _pixel_matmul(x.reshape(-1, cin), kernel.reshape(cin, cout))
    return y.reshape(x.shape[:3] + (cout,))
  g = _geometry(x.shape, kernel.shape, strides, jnp.dtype(dtype).itemsize)
  return _blocked_im2col(x, kernel.reshape(kh * kw * cin, cout), g)


def conv2d(x: Array, kernel: Array, *, strides: Sequence[int] = (1, 1),
           padding: Padding = 'SAME', impl: str = 'auto') -> Array:
  """2-D convolution, NHWC input and HWIO kernel; equals `lax.conv_general_dilated`.

  Args:
    x: [N, H, W, Cin] input.
    kernel: [kh, kw, Cin, Cout] kernel.
    strides: (sh, sw) window strides.
    padding: 'SAME', 'VALID', an int, or ((lo, hi), (lo, hi)) explicit padding.
    impl: 'xla' (lax convolution), 'im2col' (slices + one matmul), 'mixed' (lax
      convolution and input gradient, im2col kernel gradient), or 'auto' (picks per
      shape and backend; see `select_impl`).

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
  out_hw = tuple((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s
                 in zip(x.shape[1:3], pads, kernel.shape[:2], strides))
  if min(out_hw) <= 0:
    raise ValueError(f'conv2d output would be empty: input {x.shape[1:3]} padded by {pads} '
                     f'is smaller than the kernel {kernel.shape[:2]}; pad more or use a '
                     'smaller kernel.')
  dtype = jnp.result_type(x.dtype, kernel.dtype)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  impl = select_impl(impl, kernel.shape, strides, pads, out_hw, dtype)
  if impl == 'xla':
    return _lax_conv(x, kernel, strides, pads)
  if impl == 'mixed':
    return _mixed_conv(x, kernel, strides, pads)
  return _im2col_conv(x, kernel, strides, pads)


class Conv(nn.Module):
  """Drop-in for `flax.linen.Conv` (2-D, NHWC) that can run as im2col + matmul.

  Parameters are named, shaped and initialised as in `nn.Conv` ('kernel' HWIO with
  lecun_normal, 'bias' zeros), so parameter trees are interchangeable.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw), or an int for both.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', an int, or ((lo, hi), (lo, hi)).
    use_bias: add a learned per-channel bias.
    dtype: computation dtype (default: promoted from input and parameters, as in nn.Conv).
    param_dtype: dtype of the parameters.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
    impl: 'auto', 'xla', 'im2col' or 'mixed' (see `conv2d`).
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
    # As in nn.Conv, an int kernel_size is a 1-D kernel and an int stride is broadcast.
    kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    strides = ((self.strides,) * len(kernel_size) if isinstance(self.strides, int)
               else tuple(self.strides))
    if len(kernel_size) != 2 or len(strides) != 2:
      raise ValueError(f'vq.models.conv.Conv is 2-D only: got kernel_size={self.kernel_size}, '
                       f'strides={self.strides}; use flax.linen.Conv for other ranks.')
    if x.ndim != 4:
      raise ValueError(f'vq.models.conv.Conv expects NHWC input, got shape {x.shape}.')
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
