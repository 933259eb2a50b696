"""Speed of `vq.models.nets.upsample_conv`: nearest x2 + 3x3 conv, 'repeat' vs 'phases'.

  python -m benchmarks.upsample_conv --reps=7
  python -m benchmarks.upsample_conv --shapes=imagenet256 --dtype=bfloat16  # on a GPU

Times jit(value_and_grad(sum(upsample_conv(x, k) ** 2))) with respect to (x, k) at the
shapes of a taming decoder's upsampling layers, the two impls interleaved, and prints one
JSON line per shape (median ms) with the max relative difference of their outputs.
--shapes=cifar: experiments/vqgan_cifar.py (batch 64, 128 channels, 8 -> 16, 16 -> 32);
imagenet256: experiments/vqgan_imagenet256.py (batch 16; 512 channels 16 -> 32, 256 at
32 -> 64 and 64 -> 128, 128 at 128 -> 256).
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vq.models import nets

_SHAPES = flags.DEFINE_enum('shapes', 'cifar', ['cifar', 'imagenet256'],
                            "Which config's upsampling layers to time.")
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None,
                                   'Images per call (default: 64 cifar, 16 imagenet256).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype of x.')
_REPS = flags.DEFINE_integer('reps', 7, 'Timed runs per impl (median is kept).')
IMPLS = ('repeat', 'phases')
SHAPES = {  # (low-res size, channels) per upsampling layer
    'cifar': ((8, 128), (16, 128)),
    'imagenet256': ((16, 512), (32, 256), (64, 256), (128, 128)),
}


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  batch_size = _BATCH_SIZE.value or (64 if _SHAPES.value == 'cifar' else 16)
  for size, channels in SHAPES[_SHAPES.value]:
    x = jnp.asarray(rng.normal(size=(batch_size, size, size, channels)), _DTYPE.value)
    k = jnp.asarray(rng.normal(size=(3, 3, channels, channels)) * 0.05, jnp.float32)
    outs = {impl: nets.upsample_conv(x, k, impl=impl) for impl in IMPLS}
    diff = float(jnp.max(jnp.abs(outs['phases'].astype(jnp.float32) - outs['repeat']))
                 / jnp.max(jnp.abs(outs['repeat'].astype(jnp.float32))))
    fns = {impl: jax.jit(jax.value_and_grad(
        lambda x, k, impl=impl: jnp.sum(
            nets.upsample_conv(x, k, impl=impl).astype(jnp.float32) ** 2),
        argnums=(0, 1))) for impl in IMPLS}
    for fn in fns.values():
      for _ in range(2):
        jax.block_until_ready(fn(x, k))
    times = {impl: [] for impl in IMPLS}
    for rep in range(_REPS.value):
      for impl in (IMPLS if rep % 2 == 0 else IMPLS[::-1]):
        start = time.perf_counter()
        jax.block_until_ready(fns[impl](x, k))
        times[impl].append(time.perf_counter() - start)
    print(json.dumps({
        'shape': f'{size}->{2 * size}, {channels} channels', 'batch_size': batch_size,
        'dtype': _DTYPE.value,
        **{f'grad_ms_{impl}': round(1e3 * statistics.median(t), 1) for impl, t in times.items()},
        'max_rel_diff': diff, 'device_kind': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  app.run(main)
