"""The matmul rate one process reaches here: a yardstick for a step's FLOP/s.

  taskset -c 0 python -m benchmarks.matmul_peak            # one core, as profile_step runs

Times square float32 matmuls (`--sizes`, best of `--repeats` after one warm-up) with numpy
(its BLAS) and with XLA (`jnp.dot` jitted on one CPU device), and the same products with
bfloat16 inputs summed in float32 with XLA ('xla_bf16': what `prior.matmul_dtype='bfloat16'`
runs); prints one JSON line with GFLOP/s = 2 n^3 / seconds for each (`best_gflops` is the
float32 figure, `best_bf16_gflops` the bfloat16 one). On the AVX512-BF16 dev CPU XLA:CPU's
bfloat16 matmul ran at twice its float32 rate, but only with a float32 result and neither
operand transposed in memory (vq.generation.transformer.bf16_dot_general arranges both).
Run it with the same cores as the step it is compared with (`taskset`; numpy's BLAS and XLA
take the cores they are given). A training step whose convolutions and matmuls are counted
the same way (benchmarks/flops.py) cannot run faster than this rate for long, so
`flops_per_s` of benchmarks/train_step.py divided by the best figure
here says how much of the arithmetic rate a step already uses.
"""

import json
import time

from absl import app
from absl import flags
import numpy as np

_SIZES = flags.DEFINE_list('sizes', ['1024', '2048'], 'Matrix sides n (n x n times n x n).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed products per size (best one counted).')


def matmul_flops(n: int) -> float:
  """2 n^3: one multiply and one add per term of an n x n by n x n product."""
  return 2.0 * float(n) ** 3


def best_seconds(fn, repeats: int) -> float:
  """The fastest of `repeats` calls of `fn` after one untimed call."""
  fn()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def measure(sizes, repeats: int) -> dict:
  """{'numpy'|'xla'|'xla_bf16': {n: GFLOP/s}, 'best_gflops': float32's best,
  'best_bf16_gflops'}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dot = jax.jit(jnp.dot)
  dot_bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  out = {'numpy': {}, 'xla': {}, 'xla_bf16': {}}
  for n in sizes:
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    out['numpy'][n] = matmul_flops(n) / best_seconds(lambda: a @ b, repeats) / 1e9
    out['xla'][n] = matmul_flops(n) / best_seconds(
        lambda: dot(ja, jb).block_until_ready(), repeats) / 1e9
    ha, hb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    out['xla_bf16'][n] = matmul_flops(n) / best_seconds(
        lambda: dot_bf16(ha, hb).block_until_ready(), repeats) / 1e9
  out['best_gflops'] = max(max(v.values()) for v in (out['numpy'], out['xla']))
  out['best_bf16_gflops'] = max(out['xla_bf16'].values())
  return out


def main(argv):
  del argv
  import os  # pylint: disable=g-import-not-at-top
  result = measure([int(s) for s in _SIZES.value], _REPEATS.value)
  result['cores'] = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  print(json.dumps(result, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
