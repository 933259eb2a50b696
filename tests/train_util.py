"""Shared test helpers: pmapped train steps of a config, jitted quantizer apply/train calls."""

import functools

import jax

from vq.runtime import parallel
from vq import quantizers
from vq.runtime import state as ts
from vq.training import step as steps


def run_steps(config, devices, images_per_step, state=None):
  """len(images_per_step) pmapped steps on `devices` from `state` (fresh, seed 0, if None).

  Returns the replicated state after the last step and the host metrics of every step.
  """
  if state is None:
    state = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  settings = steps.StepSettings.from_config(config)
  p_step = parallel.pmap_train_step(functools.partial(steps.train_step, settings=settings),
                                    devices=devices)
  p_state = parallel.replicate(state, devices)
  p_rng = parallel.replicate(jax.random.PRNGKey(1), devices)
  n = len(devices)
  history = []
  for images in images_per_step:
    batch = {'image': images.reshape((n, -1) + images.shape[1:])}
    p_state, m = p_step(p_state, parallel.shard(batch, devices), p_rng)
    history.append(jax.device_get(parallel.unreplicate(m)))
  return p_state, history


# Modules are hashable dataclasses, so they can be static jit arguments: one compilation
# per (module, shape), shared by all tests and hypothesis examples.
@functools.partial(jax.jit, static_argnames=('module', 'method', 'train'))
def jit_apply(module, variables, x, method='__call__', train=None):
  """`module.apply(variables, x, method=method)`, jitted; `train` is passed when given.

  `train=True` computes the training-only terms (the entropy penalty); it updates no
  statistics here, so use it for quantizers without EMA statistics (or `jit_train`).
  """
  kwargs = {} if train is None else {'train': train}
  return module.apply(variables, x, method=method, **kwargs)


@functools.partial(jax.jit, static_argnames=('module',))
def jit_train(module, variables, z):
  """One `train=True` call updating the quantizer statistics: (output, mutated)."""
  return module.apply(variables, z, train=True, mutable=[quantizers.STATS])
