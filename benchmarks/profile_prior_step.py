"""Where a token prior's train step (or sampler) spends its time on one CPU device: ms per JAX op.

  python -m benchmarks.profile_prior_step --config=experiments/gpt_cifar.py --per_device_batch=32
  python -m benchmarks.profile_prior_step --what=sample --per_device_batch=32   # the sampler

The prior's step (`vq.generation.trainer.train_step`, pmapped on one CPU device as run.py
sets it up) on random 8x8 grids of 512 codes and 10 classes, compiled, warmed up and timed;
then `--traced` steps under `jax.profiler`, each XLA thunk mapped back to its JAX operation
(benchmarks/xla_trace.py). Prints one JSON line: the
median step, tokens/s, the step's model FLOPs (benchmarks/flops.py: 2 per multiply-add of its
matmuls, backward included) and FLOP/s, and milliseconds per step by the last part of the
op_name (`dot_general`, `tanh`, `reduce_max`, ...) and by the `--top` costliest thunks.
Compare `flops_per_s` with `python -m benchmarks.matmul_peak` on the same cores.

`--what=sample` profiles the config's sampler instead (`vq.generation.sampling.sample_gpt`
or `sample_maskgit` with the config's sample settings, jitted on one device) drawing
`--per_device_batch` grids per call from random parameters: `sample_s_median` and
`images_per_s` in place of the step's figures (no FLOP count).
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
_WHAT = flags.DEFINE_enum('what', 'step', ['step', 'sample'],
                          "'step': the train step; 'sample': the sampler.")


def _summary(per_op, top, total, names) -> dict:
  return {'traced_ms_per_call': total,
          'ms_per_op': {k: round(v, 2) for k, v in per_op.most_common()},
          'share_per_op': {k: round(v / total, 3) for k, v in per_op.most_common(8)},
          'top_thunks': [{'thunk': t, 'ms': round(v, 2), 'op_name': names.get(t, '')}
                         for t, v in top.most_common(_TOP.value)]}


def _profile_sampler(config, model, layout, params, batch: int) -> dict:
  """The config's sampler on `batch` grids: median seconds per call and where they go."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vq.generation import generator as gen_lib  # pylint: disable=g-import-not-at-top
  from vq.generation import sampling  # pylint: disable=g-import-not-at-top
  settings = gen_lib.settings_from(config)
  sample = sampling.sample_gpt if config.objective == 'gpt' else sampling.sample_maskgit
  labels = jnp.arange(batch, dtype=jnp.int32) % layout.num_classes
  keys = sampling.row_keys(jax.random.PRNGKey(1), batch)
  # time_and_trace threads a state through each call; the parameters stand in for it.
  compiled = jax.jit(lambda p, labels, keys: (
      p, sample(model, p, layout, labels, keys, settings))).lower(params, labels, keys).compile()
  times, per_thunk, names = xla_trace.time_and_trace(
      compiled, params, (labels, keys), warmup=1, steps=_STEPS.value, traced=_TRACED.value)
  sample_s = float(np.median(times))
  return {'objective': config.objective, 'what': 'sample', 'grids': batch,
          'sample_s_median': sample_s, 'images_per_s': batch / sample_s,
          'network_evaluations': sampling.network_evaluations(config.objective, layout,
                                                               settings),
          **_summary(*xla_trace.per_op(per_thunk, names, _TRACED.value), names)}


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
  if _WHAT.value == 'sample':
    print(json.dumps(_profile_sampler(config, model, layout, state.params, batch)))
    return
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
  step_s = float(np.median(times))
  print(json.dumps({
      'objective': config.objective, 'what': 'step', 'per_device_batch': batch,
      'step_s_median': step_s, 'tokens_per_s': batch * layout.length / step_s,
      'flops_per_step': step_flops, 'flops_per_s': step_flops / step_s,
      **_summary(*xla_trace.per_op(per_thunk, names, _TRACED.value), names)}))


if __name__ == '__main__':
  app.run(main)
