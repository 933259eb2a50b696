"""Convolutional encoders and decoders for image tokenizers.

Usage sketch::

  enc = TamingEncoder(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                      z_channels=64, resolution=32)
  dec = TamingDecoder(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                      out_channels=3, resolution=32)
  # 32x32x3 images -> 8x8x64 latents -> 32x32x3 images

Two families:
- `TamingEncoder` / `TamingDecoder`: the taming-transformers (VQGAN) network: ResNet blocks
  with GroupNorm and swish, strided-conv downsampling, nearest-neighbour upsampling,
  optional single-head self-attention at chosen resolutions. Works from 32x32 up to 256x256.
- `SonnetEncoder` / `SonnetDecoder`: the compact CIFAR network of the VQ-VAE paper as in
  DeepMind's Sonnet example (two stride-2 4x4 convs, a 3x3 conv, a residual stack; mirrored
  decoder with two stride-2 4x4 transposed convs, `vq.models.conv_transpose`).

Convolutions go through `vq.models.conv.Conv` (same parameters as `nn.Conv`), which picks an
im2col + matmul formulation on CPU where XLA's own convolution gradient is slow.

Every decoder names its final layer `conv_out` and records the input of that layer with
`self.sow('intermediates', 'conv_out_input', h)`; the VQ-GAN adaptive weight needs the
gradient with respect to that layer.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq.models import conv
from vq.models import conv_transpose
from vq.models import norms

Dtype = Any


def _group_norm(name: str, dtype: Dtype, swish: bool = False) -> norms.GroupNorm:
  # taming: 32 groups, eps 1e-6; statistics in float32 even in bfloat16 nets. With swish,
  # the activation after it (one native kernel on CPU, see norms.group_norm_swish).
  return norms.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                         swish=swish, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm -> swish -> conv3x3, twice, with a 1x1 shortcut when channels change."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _group_norm('norm1', self.dtype, swish=True)(x)
    h = conv.Conv(self.out_channels, (3, 3), dtype=self.dtype, name='conv1')(h)
    h = _group_norm('norm2', self.dtype, swish=True)(h)
    h = conv.Conv(self.out_channels, (3, 3), dtype=self.dtype, name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = conv.Conv(self.out_channels, (1, 1), dtype=self.dtype, name='nin_shortcut')(x)
    return x + h


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, precision) -> jax.Array:
  return jnp.dot(x, w, precision=precision)


def _matmul_fwd(x, w, precision):
  return _matmul(x, w, precision), (x, w)


def _matmul_bwd(precision, residuals, g):
  x, w = residuals
  # The weight gradient as g^T x ([N, K], rows first) rather than x^T g: XLA:CPU otherwise
  # transposes x in a loop fused with everything that produced it (the GroupNorm before
  # the attention's qkv projection: about 13 ms per block at 8x8x128, batch 32).
  dw_t = conv.weight_grad_t(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), precision)
  return jnp.dot(g, w.T, precision=precision), dw_t.T.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(x: jax.Array, w: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> jax.Array:
  """`nn.Dense`'s `dot_general` (x [..., K] times w [K, N]) with a CPU-friendly gradient.

  The same values and gradients as `lax.dot_general`; only the weight gradient is
  computed transposed (see `_matmul_bwd`). On one core, batch 32, the taming CIFAR
  VQ-VAE step's five attention blocks went from 167 to 86 ms and the step from 2.54 to
  2.45 s (jax.profiler traces, back to back; `benchmarks/profile_step.py` reports the
  'attention' category the same way).
  """
  ((x_contract,), (w_contract,)), batch = dimension_numbers
  if x_contract != x.ndim - 1 or w_contract != 0 or batch != ((), ()) or w.ndim != 2:
    raise ValueError(f'dense_dot_general handles x [..., K] times w [K, N] only; got '
                     f'dimension_numbers={dimension_numbers!r} for shapes {x.shape}, {w.shape}.')
  if preferred_element_type is not None:
    x, w = x.astype(preferred_element_type), w.astype(preferred_element_type)
  return _matmul(x, w, precision)


class AttnBlock(nn.Module):
  """Single-head self-attention over all spatial positions (taming's AttnBlock)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    y = _group_norm('norm', self.dtype)(x)
    qkv = nn.Dense(3 * c, dtype=self.dtype, dot_general=dense_dot_general,
                   name='qkv')(y.reshape(n, h * w, c))
    q, k, v = jnp.split(qkv, 3, axis=-1)
    logits = jnp.einsum('nqc,nkc->nqk', q, k).astype(jnp.float32) * (c ** -0.5)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum('nqk,nkc->nqc', attn, v)
    y = nn.Dense(c, dtype=self.dtype, dot_general=dense_dot_general, name='proj_out')(y)
    return x + y.reshape(n, h, w, c)


class Downsample(nn.Module):
  """Stride-2 3x3 conv with taming's asymmetric (0, 1) padding."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding='VALID', dtype=self.dtype,
                   name='conv')(x)


# Nearest x2 upsampling then a 3x3 'SAME' conv, per output parity a (rows; b for columns):
# the taps at high-res offsets (-1, 0, +1) read low-res rows (i-1, i, i) for a = 0 and
# (i, i, i+1) for a = 1, so each parity is a 2x2 conv of the low-res input whose taps are
# sums of the 3x3 taps: rows (k0, k1 + k2) for a = 0 and (k0 + k1, k2) for a = 1.
_UPSAMPLE_TAPS = ((1., 0., 0.), (0., 1., 1.)), ((1., 1., 0.), (0., 0., 1.))  # [a, r, y]
_UPSAMPLE_PADS = ((1, 0), (0, 1))  # low-res rows (i-1, i) for a = 0, (i, i+1) for a = 1


def upsample_conv(x: jax.Array, kernel: jax.Array, *, impl: str = 'auto') -> jax.Array:
  """conv3x3_same(nearest_upsample_x2(x), kernel), without bias: [N, 2H, 2W, Cout].

  impl 'repeat' upsamples and convolves; 'phases' computes the four output parities as
  2x2 convolutions of the low-res input with summed taps, the same function with 2.25x
  fewer multiply-adds (taps are summed in float32 before the cast to x.dtype; float
  rounding differs at ~1e-6 relative). 'auto' picks 'phases' on CPU, where it is faster
  (benchmarks/upsample_conv.py: value and gradient at batch 64, 128 channels, 2 cores:
  246 vs 392 ms for 16 -> 32, 43 vs 93 ms for 8 -> 16), and 'repeat' elsewhere, where it
  has not been measured.
  """
  if impl == 'auto':
    impl = 'phases' if jax.default_backend() == 'cpu' else 'repeat'
  if impl == 'repeat':
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv.conv2d(x, kernel.astype(x.dtype), padding='SAME')
  if impl != 'phases':
    raise ValueError(f"upsample_conv impl must be 'auto', 'repeat' or 'phases'; got {impl!r}.")
  n, h, w, _ = x.shape
  taps = jnp.asarray(_UPSAMPLE_TAPS, jnp.float32)
  phase_kernels = jnp.einsum('ary,bsx,yxio->abrsio', taps, taps,
                             kernel.astype(jnp.float32)).astype(x.dtype)
  rows = []
  for a in (0, 1):
    cols = [conv.conv2d(x, phase_kernels[a, b], padding=(_UPSAMPLE_PADS[a], _UPSAMPLE_PADS[b]))
            for b in (0, 1)]
    rows.append(jnp.stack(cols, axis=3))                      # [N, H, W, b, C]
  return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, -1)  # [N, H, a, W, b, C]


class _UpsampleConv(nn.Module):
  """The 3x3 conv of `Upsample`, with `conv.Conv`'s parameters ('kernel' HWIO, 'bias')."""
  features: int
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return (upsample_conv(x.astype(self.dtype), kernel, impl=self.impl)
            + bias.astype(self.dtype))


class Upsample(nn.Module):
  """Nearest-neighbour x2 then conv3x3 (computed per output parity on CPU: `upsample_conv`)."""
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _UpsampleConv(x.shape[-1], self.dtype, self.impl, name='conv')(x)


class TamingEncoder(nn.Module):
  """taming-transformers Encoder (double_z=False): image -> [N, H/f, W/f, z_channels].

  Attributes:
    ch: base channel count.
    ch_mult: channel multiplier per level; len(ch_mult) - 1 stride-2 downsamplings.
    num_res_blocks: ResNet blocks per level.
    attn_resolutions: feature-map sizes (e.g. 8) at which self-attention is applied.
    z_channels: output channels.
    resolution: input image size, used to place attention.
    dtype: compute dtype (parameters stay float32).
  """
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (8,)
  z_channels: int = 64
  resolution: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    h = conv.Conv(self.ch, (3, 3), dtype=self.dtype, name='conv_in')(x)
    res = self.resolution
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.dtype, name=f'down{level}_block{i}')(h)
        if res in self.attn_resolutions:
          h = AttnBlock(self.dtype, name=f'down{level}_attn{i}')(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(self.dtype, name=f'down{level}_downsample')(h)
        res //= 2
    h = ResnetBlock(h.shape[-1], self.dtype, name='mid_block1')(h)
    h = AttnBlock(self.dtype, name='mid_attn')(h)
    h = ResnetBlock(h.shape[-1], self.dtype, name='mid_block2')(h)
    h = _group_norm('norm_out', self.dtype, swish=True)(h)
    return conv.Conv(self.z_channels, (3, 3), dtype=self.dtype, name='conv_out')(h)


class TamingDecoder(nn.Module):
  """taming-transformers Decoder: [N, H/f, W/f, z] -> image [N, H, W, out_channels]."""
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (8,)
  out_channels: int = 3
  resolution: int = 32
  dtype: Dtype = jnp.float32
  upsample_impl: str = 'auto'  # `upsample_conv`'s impl: the same function either way

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    z = z.astype(self.dtype)
    res = self.resolution // 2 ** (len(self.ch_mult) - 1)
    block_in = self.ch * self.ch_mult[-1]
    h = conv.Conv(block_in, (3, 3), dtype=self.dtype, name='conv_in')(z)
    h = ResnetBlock(block_in, self.dtype, name='mid_block1')(h)
    h = AttnBlock(self.dtype, name='mid_attn')(h)
    h = ResnetBlock(block_in, self.dtype, name='mid_block2')(h)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[level], self.dtype,
                        name=f'up{level}_block{i}')(h)
        if res in self.attn_resolutions:
          h = AttnBlock(self.dtype, name=f'up{level}_attn{i}')(h)
      if level != 0:
        h = Upsample(self.dtype, self.upsample_impl, name=f'up{level}_upsample')(h)
        res *= 2
    h = _group_norm('norm_out', self.dtype, swish=True)(h)
    self.sow('intermediates', 'conv_out_input', h)
    out = output_layer('taming', self.out_channels, self.dtype)(h)
    return out.astype(jnp.float32)


class ResidualStack(nn.Module):
  """Sonnet's residual stack: (relu, 3x3 -> hidden, relu, 1x1 -> channels, add) x n, relu."""
  num_layers: int = 2
  hidden: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      h = conv.Conv(self.hidden, (3, 3), dtype=self.dtype, name=f'res{i}_conv3')(nn.relu(x))
      h = conv.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name=f'res{i}_conv1')(nn.relu(h))
      x = x + h
    return nn.relu(x)


class SonnetEncoder(nn.Module):
  """VQ-VAE paper CIFAR encoder: 4x4/2, 4x4/2, 3x3, residual stack, 1x1 -> z_channels."""
  hidden: int = 128
  res_hidden: int = 32
  num_res_layers: int = 2
  z_channels: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    h = nn.relu(conv.Conv(self.hidden // 2, (4, 4), (2, 2), dtype=self.dtype, name='conv1')(x))
    h = nn.relu(conv.Conv(self.hidden, (4, 4), (2, 2), dtype=self.dtype, name='conv2')(h))
    h = conv.Conv(self.hidden, (3, 3), dtype=self.dtype, name='conv3')(h)
    h = ResidualStack(self.num_res_layers, self.res_hidden, self.dtype, name='res_stack')(h)
    return conv.Conv(self.z_channels, (1, 1), dtype=self.dtype, name='conv_out')(h)


class SonnetDecoder(nn.Module):
  """Mirror of `SonnetEncoder`: 3x3, residual stack, 4x4/2 transposed conv twice."""
  hidden: int = 128
  res_hidden: int = 32
  num_res_layers: int = 2
  out_channels: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    z = z.astype(self.dtype)
    h = conv.Conv(self.hidden, (3, 3), dtype=self.dtype, name='conv_in')(z)
    h = ResidualStack(self.num_res_layers, self.res_hidden, self.dtype, name='res_stack')(h)
    h = conv_transpose.ConvTranspose4x4(self.hidden // 2, self.dtype, name='deconv1')(h)
    h = nn.relu(h)
    self.sow('intermediates', 'conv_out_input', h)
    out = output_layer('sonnet', self.out_channels, self.dtype)(h)
    return out.astype(jnp.float32)


def output_layer(arch: str, out_channels: int, dtype: Dtype = jnp.float32) -> nn.Module:
  """The decoder's last layer, named `conv_out`, as a standalone module.

  The VQ-GAN step re-applies it to the sown `conv_out_input` to get gradients with
  respect to this layer alone (taming's adaptive weight) without a second backward pass.
  """
  if arch == 'sonnet':
    return conv_transpose.ConvTranspose4x4(out_channels, dtype, name='conv_out')
  return conv.Conv(out_channels, (3, 3), dtype=dtype, name='conv_out')


def downsample_factor(arch: str, ch_mult: Sequence[int] = ()) -> int:
  """Spatial reduction of an encoder: 4 for Sonnet, 2^(len(ch_mult)-1) for taming."""
  if arch == 'sonnet':
    return 4
  return 2 ** (len(ch_mult) - 1)
