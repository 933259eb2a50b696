"""Speed of `vq.models.norms.GroupNorm` against `flax.linen.GroupNorm`, each followed by swish.

  python -m benchmarks.group_norm --reps=9
  python -m benchmarks.group_norm --shapes=imagenet256 --dtype=bfloat16   # on a GPU

Times jit(vjp) of swish(GroupNorm(32)(x)) (the value and the gradient with respect to x,
scale and bias for a random cotangent) and the forward alone, three ways: flax's
GroupNorm, `vq.models.norms.group_norm` in XLA ('vq_xla'), and `vq.models.norms.GroupNorm(swish=True)`
('vq': on CPU in float32 the native kernel of vq/cpu/native.py, elsewhere the same as vq_xla), at the shapes of taming's
CIFAR network on one of two CPU devices (--shapes=cifar, batch 32: 32x32x64, 16x16x128,
8x8x128) or of the 256x256 network on one accelerator (--shapes=imagenet256, batch 16:
256x256x128 down to 16x16x512), the implementations interleaved. Prints one JSON line per
shape (median ms) with the max relative difference of each vq variant's outputs and
gradients from flax's.
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

from vq.models import norms

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


def _appliers(dtype):
  """name -> apply(x, params): swish(GroupNorm(32)(x)) three ways."""
  flax_layer = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype)
  vq_layer = norms.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, swish=True)
  return {
      'flax': lambda x, p: nn.swish(flax_layer.apply({'params': p}, x)),
      # vq.models.norms.group_norm in XLA (what runs on GPU/TPU, or on CPU without vq.cpu.native).
      'vq_xla': lambda x, p: nn.swish(norms.group_norm(
          x, p['scale'], p['bias'], num_groups=32, epsilon=1e-6).astype(dtype)),
      # The layer the nets use: on CPU in float32 one native call (vq/cpu/native.py).
      'vq': lambda x, p: vq_layer.apply({'params': p}, x),
  }


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
    for name, apply in _appliers(dtype).items():
      def value_and_grads(x, p, cot, apply=apply):
        out, vjp = jax.vjp(apply, x, p)
        return out, vjp(cot)
      fns[name] = {'fwd': jax.jit(apply), 'fwd_bwd': jax.jit(value_and_grads)}
      results[name] = value_and_grads(x, params, cot)
    def max_rel_diff(name, other='flax'):
      flat = [jax.tree.leaves(results[n]) for n in (other, name)]
      return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                       / jnp.max(jnp.abs(a.astype(jnp.float32)))) for a, b in zip(*flat))
    args = {'fwd': (x, params), 'fwd_bwd': (x, params, cot)}
    times = {(name, kind): [] for name in fns for kind in args}
    for fn_pair in fns.values():
      for kind, fn in fn_pair.items():
        for _ in range(2):
          jax.block_until_ready(fn(*args[kind]))
    for rep in range(_REPS.value):
      for name in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
        for kind, fn in fns[name].items():
          start = time.perf_counter()
          jax.block_until_ready(fn(*args[kind]))
          times[(name, kind)].append(time.perf_counter() - start)
    print(json.dumps({
        'shape': list(shape), 'dtype': _DTYPE.value,
        **{f'{kind}_ms_{name}': round(1e3 * statistics.median(t), 2)
           for (name, kind), t in times.items()},
        'max_rel_diff_vq_xla': max_rel_diff('vq_xla'), 'max_rel_diff_vq': max_rel_diff('vq'),
        'device_kind': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  app.run(main)
