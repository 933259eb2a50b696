"""Speed of `vq.nets.upsample_conv`: nearest x2 + 3x3 conv, 'repeat' vs 'phases'.

  python -m benchmarks.upsample_conv --reps=7

Times jit(value_and_grad(sum(upsample_conv(x, k) ** 2))) with respect to (x, k) at the
shapes of taming's CIFAR decoder (batch 64, 128 channels, 8 -> 16 and 16 -> 32), the two
impls interleaved, and prints one JSON line per shape (median ms) with the max relative
difference of their outputs.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vq import nets

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per call.')
_REPS = flags.DEFINE_integer('reps', 7, 'Timed runs per impl (median is kept).')
IMPLS = ('repeat', 'phases')


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  for size, channels in ((8, 128), (16, 128)):
    x = jnp.asarray(rng.normal(size=(_BATCH_SIZE.value, size, size, channels)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, channels, channels)) * 0.05, jnp.float32)
    outs = {impl: nets.upsample_conv(x, k, impl=impl) for impl in IMPLS}
    diff = float(jnp.max(jnp.abs(outs['phases'] - outs['repeat']))
                 / jnp.max(jnp.abs(outs['repeat'])))
    fns = {impl: jax.jit(jax.value_and_grad(
        lambda x, k, impl=impl: jnp.sum(nets.upsample_conv(x, k, impl=impl) ** 2),
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
        'shape': f'{size}->{2 * size}, {channels} channels', 'batch_size': _BATCH_SIZE.value,
        **{f'grad_ms_{impl}': round(1e3 * statistics.median(t), 1) for impl, t in times.items()},
        'max_rel_diff': diff, 'backend': jax.default_backend()}))


if __name__ == '__main__':
  app.run(main)
