"""Speed of `vq.norms.GroupNorm` against `flax.linen.GroupNorm`, each followed by swish.

  python -m benchmarks.group_norm --reps=9
  python -m benchmarks.group_norm --shapes=imagenet256 --dtype=bfloat16   # on a GPU

Times jit(vjp) of swish(GroupNorm(32)(x)) (the value and the gradient with respect to x,
scale and bias for a random cotangent) and the forward alone, at the shapes of taming's
CIFAR network on one of two CPU devices (--shapes=cifar, batch 32: 32x32x64, 16x16x128,
8x8x128) or of the 256x256 network on one accelerator (--shapes=imagenet256, batch 16:
256x256x128 down to 16x16x512), the two implementations interleaved. Prints one JSON line per shape (median ms) with the max
relative difference of their outputs and gradients.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vq import norms

_SHAPES = flags.DEFINE_enum('shapes', 'cifar', ['cifar', 'imagenet256'],
                            "Which config's GroupNorm inputs to time.")
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None,
                                   'Images per call (default: 32 cifar, 16 imagenet256).')
_REPS = flags.DEFINE_integer('reps', 9, 'Timed runs per implementation (median is kept).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Input dtype.')
SHAPES = {  # (size, channels)
    'cifar': ((32, 64), (16, 128), (8, 128)),
    'imagenet256': ((256, 128), (128, 128), (64, 256), (32, 256), (16, 512)),
}


def _layers(dtype):
  return {'flax': nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype),
          'vq': norms.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype)}


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  dtype = jnp.dtype(_DTYPE.value)
  batch_size = _BATCH_SIZE.value or (32 if _SHAPES.value == 'cifar' else 16)
  for size, channels in SHAPES[_SHAPES.value]:
    shape = (batch_size, size, size, channels)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 0.5, dtype)
    cot = jnp.asarray(rng.normal(size=shape), dtype)
    params = {'scale': jnp.asarray(1 + 0.1 * rng.normal(size=channels), jnp.float32),
              'bias': jnp.asarray(0.1 * rng.normal(size=channels), jnp.float32)}
    fns, results = {}, {}
    for name, layer in _layers(dtype).items():
      def apply(x, p, layer=layer):
        return nn.swish(layer.apply({'params': p}, x))
      def value_and_grads(x, p, cot, apply=apply):
        out, vjp = jax.vjp(apply, x, p)
        return out, vjp(cot)
      fns[name] = {'fwd': jax.jit(apply), 'fwd_bwd': jax.jit(value_and_grads)}
      results[name] = value_and_grads(x, params, cot)
    flat = [jax.tree.leaves(results[name]) for name in ('flax', 'vq')]
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                     / jnp.max(jnp.abs(a.astype(jnp.float32)))) for a, b in zip(*flat))
    args = {'fwd': (x, params), 'fwd_bwd': (x, params, cot)}
    times = {(name, kind): [] for name in fns for kind in args}
    for fn_pair in fns.values():
      for kind, fn in fn_pair.items():
        for _ in range(2):
          jax.block_until_ready(fn(*args[kind]))
    for rep in range(_REPS.value):
      for name in (('flax', 'vq') if rep % 2 == 0 else ('vq', 'flax')):
        for kind, fn in fns[name].items():
          start = time.perf_counter()
          jax.block_until_ready(fn(*args[kind]))
          times[(name, kind)].append(time.perf_counter() - start)
    print(json.dumps({
        'shape': list(shape), 'dtype': _DTYPE.value,
        **{f'{kind}_ms_{name}': round(1e3 * statistics.median(t), 2)
           for (name, kind), t in times.items()},
        'max_rel_diff': diff, 'device_kind': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  app.run(main)
