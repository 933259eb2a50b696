"""GroupNorm with `flax.linen.GroupNorm`'s parameters, written to be fast on XLA:CPU.

Usage sketch::

  from vq.models import norms

  layer = norms.GroupNorm(num_groups=32, epsilon=1e-6)   # params 'scale' [C], 'bias' [C]
  y = layer.apply(layer.init(rng, x), x)                 # x: [N, ..., C]
  y = norms.group_norm(x, scale, bias, num_groups=32, epsilon=1e-6)

The same function as `flax.linen.GroupNorm` (with a two-pass variance, where flax by
default uses E[x^2] - E[x]^2), computed so that XLA:CPU emits only simple loops:
- statistics are reduced over the spatial axes per channel first ([N, C]), then per group
  by a matmul with the 0/1 group-membership matrix, and spread back to channels by
  another; XLA fuses the naive reshape-to-groups broadcasts into every elementwise
  consumer as per-element index arithmetic, and reduces over split channel axes slowly;
- the normalisation is one multiply-add per element, `x * a + b`, with per-example,
  per-channel `a = scale * rstd` and `b = bias - mean * a`.
On one core (batch 32, float32; value and gradient of GroupNorm(32) then swish,
`taskset -c 0 python -m benchmarks.group_norm`) this took 13.6 ms against flax's 28.9 ms at
32x32x64, 4.1 against 7.0 ms at 16x16x128 and 0.95 against 1.74 ms at 8x8x128. On an H200
(bfloat16, batch 16, the 256x256 network's maps) the two were within 0.12 ms of each other
per layer (`--shapes=imagenet256`; docs/accelerator.md). Statistics are float32 for
any input dtype.

On CPU, for float32, `GroupNorm` (and `group_norm_swish`) run a native kernel instead
(`vq.cpu.native`, `native/group_norm.cc`), with the swish that follows fused in when
`swish=True`: value and gradient 6.8-9.1 vs 9.8-14.9 ms at 32x32x64 against `group_norm`
+ swish (two runs of `taskset -c 0 python -m benchmarks.group_norm`, batch 32).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq.cpu import native

Dtype = Any


def _membership(num_groups: int, channels: int) -> jax.Array:
  """[G, C] 0/1 matrix: row g has ones at the channels of group g."""
  return jnp.repeat(jnp.eye(num_groups, dtype=jnp.float32), channels // num_groups, axis=1)


def group_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, *,
               num_groups: int, epsilon: float = 1e-6) -> jax.Array:
  """Normalises each example of x [N, ..., C] over its spatial axes and channel groups.

  Returns float32 (cast as needed): (x - mean) / sqrt(var + epsilon) * scale + bias, with
  mean and (biased) var over the spatial axes and the C / num_groups channels of a group.
  """
  channels = x.shape[-1]
  if channels % num_groups:
    raise ValueError(f'GroupNorm: {channels} channels do not split into {num_groups} groups; '
                     'use a channel count divisible by num_groups.')
  axes = tuple(range(1, x.ndim - 1))
  per_group = jnp.float32(channels // num_groups)
  member = _membership(num_groups, channels)

  def group_mean(per_channel):  # [N, C] channel means -> [N, G] group means
    return jnp.dot(per_channel, member.T, precision=jax.lax.Precision.HIGHEST) / per_group

  def to_channels(per_group_value):  # [N, G] -> [N, C], each channel its group's value
    return jnp.dot(per_group_value, member, precision=jax.lax.Precision.HIGHEST)

  x32 = x.astype(jnp.float32)
  spread = (slice(None),) + (None,) * len(axes) + (slice(None),)  # [N, C] -> [N, 1.., C]
  mean = to_channels(group_mean(jnp.mean(x32, axis=axes)))
  var = group_mean(jnp.mean(jnp.square(x32 - mean[spread]), axis=axes))
  rstd = to_channels(jax.lax.rsqrt(var + epsilon))
  a = rstd if scale is None else rstd * scale.astype(jnp.float32)
  b = -mean * a
  if bias is not None:
    b = b + bias.astype(jnp.float32)
  return x32 * a[spread] + b[spread]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _native_group_norm(x, scale, bias, num_groups, epsilon, swish):
  return native.group_norm_fwd(x, scale, bias, num_groups=num_groups, epsilon=epsilon,
                               swish=swish)[0]


def _native_group_norm_fwd(x, scale, bias, num_groups, epsilon, swish):
  y, mean, rstd = native.group_norm_fwd(x, scale, bias, num_groups=num_groups,
                                        epsilon=epsilon, swish=swish)
  return y, (x, scale, bias, mean, rstd)


def _native_group_norm_bwd(num_groups, epsilon, swish, residuals, dy):
  del epsilon  # in rstd already
  x, scale, bias, mean, rstd = residuals
  dx, dscale, dbias = native.group_norm_bwd(x, scale, bias, mean, rstd, dy,
                                            num_groups=num_groups, swish=swish)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_native_group_norm.defvjp(_native_group_norm_fwd, _native_group_norm_bwd)


def group_norm_swish(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, *,
                     num_groups: int, epsilon: float = 1e-6, swish: bool = False,
                     dtype: Dtype = jnp.float32) -> jax.Array:
  """`group_norm` cast to `dtype`, then swish if asked: one native call on CPU where it runs.

  On CPU with float32 input and output, channels a multiple of 16, and `vq.cpu.native` loaded,
  this is a native kernel with a native gradient (`native/group_norm.cc`): the same
  function with sums in double, value and gradient in three and two passes over x
  (bfloat16 is left to XLA: it is what GPUs and TPUs run).
  Elsewhere (GPU/TPU, bfloat16, or no native kernel) it is `group_norm` then `nn.swish`.
  """
  channels = x.shape[-1]
  if (jnp.dtype(dtype) == jnp.float32
      and native.group_norm_supported(x.dtype, channels, num_groups)):
    ones = jnp.ones((channels,), jnp.float32)
    scale = ones if scale is None else scale.astype(jnp.float32)
    bias = jnp.zeros_like(ones) if bias is None else bias.astype(jnp.float32)
    return _native_group_norm(x, scale, bias, num_groups, float(epsilon), bool(swish))
  y = group_norm(x, scale, bias, num_groups=num_groups, epsilon=epsilon).astype(dtype)
  return nn.swish(y) if swish else y


class GroupNorm(nn.Module):
  """`flax.linen.GroupNorm` (feature axis -1, per-example statistics), see `group_norm`.

  Attributes:
    num_groups: channel groups; must divide the channel count.
    epsilon: added to the variance.
    dtype: output dtype (statistics and normalisation are float32).
    param_dtype: dtype of 'scale' and 'bias'.
    use_scale, use_bias: whether to learn them.
    scale_init, bias_init: their initialisers (ones, zeros).
    swish: apply swish to the output (fused into the native kernel where it runs).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  swish: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = (self.param('scale', self.scale_init, (channels,), self.param_dtype)
             if self.use_scale else None)
    bias = (self.param('bias', self.bias_init, (channels,), self.param_dtype)
            if self.use_bias else None)
    return group_norm_swish(x, scale, bias, num_groups=self.num_groups,
                            epsilon=self.epsilon, swish=self.swish, dtype=self.dtype)
