"""Where a token prior's train step spends its time on one CPU device: ms per JAX op.

  python -m benchmarks.profile_prior_step --config=experiments/gpt_cifar.py --per_device_batch=32

The prior's step (`vq.generation.trainer.train_step`, pmapped on one CPU device as run.py
sets it up) on random 8x8 grids of 512 codes and 10 classes, compiled, warmed up and timed;
then `--traced` steps under `jax.profiler`, each XLA thunk mapped back to its JAX operation
(benchmarks/xla_trace.py). Prints one JSON line: the
median step, tokens/s, the step's model FLOPs (benchmarks/flops.py: 2 per multiply-add of its
matmuls, backward included) and FLOP/s, and milliseconds per step by the last part of the
op_name (`dot_general`, `tanh`, `reduce_max`, ...) and by the `--top` costliest thunks.
Compare `flops_per_s` with `python -m benchmarks.matmul_peak` on the same cores.
"""

import collections
import functools
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import flops
from benchmarks import xla_trace

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/gpt_cifar.py',
                                          'A prior config.', lock_config=False)
_PER_DEVICE_BATCH = flags.DEFINE_integer('per_device_batch', 32, 'Token grids in the step.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (median reported).')
_TRACED = flags.DEFINE_integer('traced', 2, 'Steps recorded by the profiler (averaged).')
_TOP = flags.DEFINE_integer('top', 10, 'Costliest thunks to list.')


def main(argv):
  del argv
  from vq.cpu import devices as cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.set_cpu_devices(1)  # before JAX starts
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vq.generation import generator as gen_lib  # pylint: disable=g-import-not-at-top
  from vq.generation import priors  # pylint: disable=g-import-not-at-top
  from vq.generation import trainer  # pylint: disable=g-import-not-at-top
  from vq.runtime import parallel  # pylint: disable=g-import-not-at-top

  config, batch = _CONFIG.value, _PER_DEVICE_BATCH.value
  config.data.num_classes = 10
  layout = priors.TokenLayout(num_codes=512, num_classes=10, grid=(8, 8))
  model = gen_lib.build_model(config, layout)
  state = gen_lib.create_state(config, model, layout, jax.random.PRNGKey(0))
  par = parallel.get('pmap')
  step_fn = functools.partial(trainer.train_step, kind=config.objective, model=model,
                              layout=layout, class_dropout=config.prior.class_dropout)
  p_step = par.step(step_fn)
  rng = np.random.default_rng(0)
  host_batch = {'tokens': rng.integers(0, 512, (batch, 64)).astype(np.int32),
                'label': rng.integers(0, 10, (batch,)).astype(np.int32)}
  step_flops = flops.count(step_fn, state, host_batch, jax.random.PRNGKey(0),
                           axis_env=[(parallel.AXIS, 1)])
  p_batch = par.shard({k: v[None] for k, v in host_batch.items()})
  p_state, p_rng = par.replicate(state), par.replicate(jax.random.PRNGKey(0))
  compiled = p_step.lower(p_state, p_batch, p_rng).compile()

  times, per_thunk, names = xla_trace.time_and_trace(
      compiled, p_state, (p_batch, p_rng), warmup=2, steps=_STEPS.value, traced=_TRACED.value)
  scale = 1e-3 / _TRACED.value  # microseconds over the traced steps -> ms per step
  per_op = collections.Counter()
  for thunk, us in per_thunk.items():
    name = names.get(thunk, '')
    per_op[name.rsplit('/', 1)[-1] if name else thunk] += us * scale
  total = sum(per_op.values())
  top = collections.Counter({t: us * scale for t, us in per_thunk.items()})
  step_s = float(np.median(times))
  print(json.dumps({
      'objective': config.objective, 'per_device_batch': batch, 'step_s_median': step_s,
      'tokens_per_s': batch * layout.length / step_s, 'flops_per_step': step_flops,
      'flops_per_s': step_flops / step_s, 'traced_ms_per_step': total,
      'ms_per_op': {k: round(v, 2) for k, v in per_op.most_common()},
      'share_per_op': {k: round(v / total, 3) for k, v in per_op.most_common(8)},
      'top_thunks': [{'thunk': t, 'ms': round(v, 2), 'op_name': names.get(t, '')}
                     for t, v in top.most_common(_TOP.value)]}))


if __name__ == '__main__':
  app.run(main)
