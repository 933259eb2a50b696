"""Image discriminators for VQ-GAN training: PatchGAN and StyleGAN-style.

Usage sketch::

  from vq.models import discriminator

  disc = discriminator.build_discriminator('patchgan', ndf=64, n_layers=3)
  params = disc.init(rng, images)['params']   # images: [N, H, W, 3] in [-1, 1]
  logits = disc.apply({'params': params}, images)   # [N, h, w, 1] float32

Neither discriminator has BatchNorm, on purpose. Under `jax.pmap` BatchNorm
normalises with per-device batch statistics, so the discriminator would change
with the number of devices and the per-device batch size; it also needs a
mutable 'batch_stats' collection in the GAN step (which pulls one `jax.vjp`
back twice), behaves differently in train and eval, and, as taming calls the
discriminator separately on real and fake batches, lets it tell the two apart
from batch statistics alone. GroupNorm and LayerNorm normalise each example
on its own, so an example's logits do not depend on the rest of the batch and
the R1 penalty stays per-example.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq.models import norms

NORMS = ('group', 'layer', 'none')
_MAX_GROUPS = 32


def _normal_around_one(stddev: float) -> Callable[..., jax.Array]:
  # Taming's weights_init draws norm scales from N(1, 0.02).
  def init(key, shape, dtype=jnp.float32):
    return 1.0 + stddev * jax.random.normal(key, shape, dtype)
  return init


def _norm_layer(norm: str, channels: int, dtype: Any) -> Callable[..., Any]:
  """Returns a per-example norm for `channels` features, or the identity."""
  common = dict(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                scale_init=_normal_around_one(0.02))
  if norm == 'group':
    # The largest group count <= 32 dividing the channels (ndf may be small).
    return norms.GroupNorm(num_groups=math.gcd(_MAX_GROUPS, channels), **common)
  if norm == 'layer':
    # Statistics over H, W and C of each example (GroupNorm with one group),
    # with a per-channel scale and bias as in the other norms.
    return nn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=-1, **common)
  return lambda x: x


class PatchGANDiscriminator(nn.Module):
  """PatchGAN discriminator of taming-transformers (`NLayerDiscriminator`).

  Topology for input channels `c` (all kernels 4x4, padding 1):
  conv/2 (c -> ndf) + LeakyReLU(0.2); for n in 1..n_layers-1:
  conv/2 (-> ndf * min(2**n, 8), no bias) + norm + LeakyReLU; then
  conv/1 (-> ndf * min(2**n_layers, 8), no bias) + norm + LeakyReLU; then
  conv/1 (-> 1, with bias). An even side `s` becomes s / 2**n_layers - 2.
  Convolutions are initialised N(0, 0.02) with zero biases, norm scales
  N(1, 0.02), as taming's `weights_init`. With `norm='none'` the convolutions
  keep their biases, since no norm follows to supply one.

  Attributes:
    ndf: Channels of the first convolution.
    n_layers: Number of stride-2 convolutions.
    norm: 'group' (GroupNorm, up to 32 groups), 'layer' (per-example over
      H, W, C) or 'none'.
    dtype: Computation dtype; parameters stay float32 and logits are float32.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = 'group'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Maps images [N, H, W, C] in [-1, 1] to patch logits [N, h, w, 1]."""
    if self.norm not in NORMS:
      raise ValueError(f'Unknown norm {self.norm!r}; choose one of '
                       f'{", ".join(NORMS)}.')
    if self.n_layers < 1 or self.ndf < 1:
      raise ValueError(f'ndf and n_layers must be >= 1, got ndf={self.ndf}, '
                       f'n_layers={self.n_layers}.')
    if images.ndim != 4:
      raise ValueError(f'images must be NHWC [N, H, W, C], got shape '
                       f'{images.shape}; add a batch dimension.')
    use_bias = self.norm == 'none'
    conv = functools.partial(
        nn.Conv, kernel_size=(4, 4), padding=((1, 1), (1, 1)), dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02))
    act = functools.partial(nn.leaky_relu, negative_slope=0.2)

    x = act(conv(self.ndf, strides=(2, 2))(images.astype(self.dtype)))
    for n in range(1, self.n_layers + 1):
      features = self.ndf * min(2**n, 8)
      strides = (2, 2) if n < self.n_layers else (1, 1)
      x = conv(features, strides=strides, use_bias=use_bias)(x)
      x = act(_norm_layer(self.norm, features, self.dtype)(x))
    x = conv(1, strides=(1, 1))(x)
    return x.astype(jnp.float32)


def _blur_downsample(x: jax.Array) -> jax.Array:
  """Halves H and W with StyleGAN2's [1, 3, 3, 1] low-pass filter."""
  taps = jnp.array([1.0, 3.0, 3.0, 1.0], x.dtype) / 8.0
  channels = x.shape[-1]
  kernel = jnp.tile(jnp.outer(taps, taps)[:, :, None, None],
                    (1, 1, 1, channels))
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(2, 2), padding=((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)


def _minibatch_std(x: jax.Array, group_size: int) -> jax.Array:
  """Appends StyleGAN's minibatch standard deviation as one extra channel."""
  n, h, w, c = x.shape
  group = min(group_size, n)
  if n % group:
    raise ValueError(f'Batch size {n} is not divisible by the minibatch-std '
                     f'group size {group}; change mbstd_group_size or the '
                     'batch size.')
  y = x.astype(jnp.float32).reshape(group, n // group, h, w, c)
  std = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)  # [n // group, h, w, c]
  std = jnp.mean(std, axis=(1, 2, 3))  # one number per group slot
  # Example i sits in slot i % (n // group) of the reshape above.
  std = jnp.tile(std, group)[:, None, None, None]
  return jnp.concatenate(
      [x, jnp.broadcast_to(std, (n, h, w, 1)).astype(x.dtype)], axis=-1)


class StyleGANDiscriminator(nn.Module):
  """Residual discriminator of StyleGAN2 / MAGVIT for 32 to 256 pixel images.

  A 3x3 stem, then one residual block per channel multiplier (two 3x3 convs,
  blur-downsample by 2, a 1x1 skip, sum scaled by 1/sqrt(2)), an optional
  minibatch-std channel, a 3x3 conv and two dense layers. Inputs must have
  sides divisible by 2**len(channel_multipliers); the dense head is sized for
  the resolution seen at init.

  Attributes:
    ndf: Base channel count (named as in the PatchGAN, so one config field
      serves both discriminators).
    channel_multipliers: One per residual (downsampling) block.
    mbstd_group_size: Group size of the minibatch-std feature; 0 turns it off
      (the default), which keeps every example independent of its batch.
    dtype: Computation dtype; parameters stay float32 and logits are float32.
  """
  ndf: int = 64
  channel_multipliers: Sequence[int] = (2, 4, 4)
  mbstd_group_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Maps images [N, H, W, C] in [-1, 1] to logits [N, 1, 1, 1]."""
    if not self.channel_multipliers:
      raise ValueError('channel_multipliers is empty; give at least one, '
                       'e.g. (2, 4, 4) for 32 pixel images.')
    factor = 2**len(self.channel_multipliers)
    if images.ndim != 4 or images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(
          f'images must be NHWC with H and W divisible by {factor} (2 per '
          f'channel multiplier), got shape {images.shape}; resize the images '
          'or use fewer channel_multipliers.')
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), dtype=self.dtype,
                             param_dtype=jnp.float32)
    act = functools.partial(nn.leaky_relu, negative_slope=0.2)

    x = act(conv(self.ndf)(images.astype(self.dtype)))
    for mult in self.channel_multipliers:
      features = self.ndf * mult
      residual = nn.Conv(features, (1, 1), use_bias=False, dtype=self.dtype,
                         param_dtype=jnp.float32)(_blur_downsample(x))
      y = act(conv(x.shape[-1])(x))
      y = act(conv(features)(_blur_downsample(y)))
      x = (residual + y) / math.sqrt(2.0)
    if self.mbstd_group_size > 0:
      x = _minibatch_std(x, self.mbstd_group_size)
    x = act(conv(features)(x))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32)(x))
    x = nn.Dense(1, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x.astype(jnp.float32).reshape((-1, 1, 1, 1))


_DISCRIMINATORS = {
    'patchgan': PatchGANDiscriminator,
    'stylegan': StyleGANDiscriminator,
}


def build_discriminator(name: str, **fields: Any) -> nn.Module:
  """Builds a discriminator by name.

  Args:
    name: 'patchgan' or 'stylegan'.
    **fields: Attributes of the chosen class (ndf, n_layers, norm, dtype for
      'patchgan'; ndf, channel_multipliers, mbstd_group_size, dtype for
      'stylegan').

  Returns:
    The unbound Flax module.

  Raises:
    ValueError: If the name or a field is unknown.
  """
  if name not in _DISCRIMINATORS:
    raise ValueError(f'Unknown discriminator {name!r}; choose one of '
                     f'{", ".join(_DISCRIMINATORS)}.')
  cls = _DISCRIMINATORS[name]
  known = [f.name for f in dataclasses.fields(cls)
           if f.name not in ('parent', 'name')]
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} for discriminator {name!r}; '
                     f'valid fields are {", ".join(known)}.')
  return cls(**fields)
