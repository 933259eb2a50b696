"""Data parallelism: the only module that knows about `jax.pmap`.

Usage sketch::

  p_step = pmap_train_step(functools.partial(train_step.train_step, settings=settings))
  state = replicate(state)                      # one copy per local device
  state, metrics = p_step(state, batch, replicate(rng))
  host_state = unreplicate(state)

The step functions only know the axis name 'batch'; moving to `jax.jit` with a mesh or
`shard_map` later changes this file alone.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

AXIS = 'batch'
PyTree = Any


def local_device_count() -> int:
  return jax.local_device_count()


def pmap_train_step(step_fn: Callable, devices=None) -> Callable:
  """pmap over 'batch' (all local devices by default), donating the state (argument 0)."""
  return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,), devices=devices)


def pmap_eval_step(eval_fn: Callable, devices=None) -> Callable:
  return jax.pmap(eval_fn, axis_name=AXIS, devices=devices)


def _stacked_sharding(devices) -> jax.sharding.NamedSharding:
  # pmap (JAX >= 0.8) produces and accepts arrays sharded on a 1-D mesh over the
  # leading axis; putting inputs there up front avoids a reshard on the first call.
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree: PyTree, devices=None) -> PyTree:
  """Copy every leaf to each local device, stacked on a new leading axis."""
  devices = devices or jax.local_devices()
  sharding = _stacked_sharding(devices)
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def shard(batch: PyTree, devices=None) -> PyTree:
  """Put a host batch already shaped [local_devices, per_device, ...] on the devices."""
  devices = devices or jax.local_devices()
  sharding = _stacked_sharding(devices)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of every leaf (they are equal after a pmapped step)."""
  return jax.tree.map(lambda x: x[0], tree)


def to_host(tree: PyTree) -> PyTree:
  return jax.device_get(unreplicate(tree))
