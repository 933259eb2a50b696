"""Data parallelism: the only module that knows `jax.pmap`, meshes and `shard_map`.

Usage sketch::

  par = parallel.get(config.train.parallel)       # 'pmap' or 'jit'
  p_step = par.step(functools.partial(train_step.train_step, settings=settings))
  state, rng = par.replicate(state), par.replicate(rng)
  state, metrics = p_step(state, par.shard(host_batch), rng)
  host_metrics = jax.device_get(par.unreplicate(metrics))
  host_state = par.to_host(state)                 # numpy, for checkpoints and pictures

The step functions only know the axis name 'batch' (`lax.pmean`, `psum`, `axis_index`,
`all_gather`); the two implementations run the same function:

* 'pmap' (default): `jax.pmap` over the local devices; every array carries a leading
  device axis, state and metrics included (one identical copy per device).
* 'jit': `jax.jit` of `jax.shard_map` over a 1-D `Mesh(('batch',))` of all devices of all
  processes. The state and the metrics are single global arrays replicated on every
  device (`P()`), the batch is split over devices (`P('batch')`), the state is donated.
  `shard_map` runs with `check_vma=False`, as pmap itself does: the steps are written
  for pmap's semantics, where the gradient of replicated parameters is per-device and
  the step's own `pmean` averages it. Under `check_vma=True` shard_map's autodiff would
  already sum it over devices (the transpose of broadcasting a replicated value), and
  the `pmean` would then leave a gradient `devices` times too large.

Both take the host batch the data pipeline produces, `[local_devices, per_device, ...]`
per process; under 'jit' the processes' slices form one global array
`[all_devices, per_device, ...]` (process-major, as `data.train_batches` orders rows), and
the step sees `[per_device, ...]` on each device exactly as under pmap.

On several CPU devices every mapped step returns only once it has run (`one_at_a_time`).
With steps dispatched ahead, XLA:CPU (jaxlib 0.10.2) can deadlock: a later step's launch on
one device holds that device's execution slot while it waits for the earlier step's output,
and the earlier step's launch on that device waits for the slot while the other devices
wait for it in an all-reduce (gdb: `Semaphore::ScopedAcquire` in
`CpuPjRtRawLoadedExecutable::Execute` against `InProcessCommunicator::AllReduce`; a loop of
250 tiny pmapped steps on 4 CPU devices hung this way on a busy 2-core machine; so did a
`tree_map` of `x[0]` over a stacked state, each a program on every device). The input
pipeline still prepares the next batch in its own thread, so a step waits only for itself.
GPU and TPU steps, and one CPU device, dispatch ahead as usual.

Module-level `pmap_train_step`, `replicate`, `shard`, `unreplicate` and `to_host` are the
'pmap' implementation, kept for callers that predate `get`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = 'batch'
KINDS = ('pmap', 'jit')
PyTree = Any


def local_device_count() -> int:
  return jax.local_device_count()


def one_at_a_time(fn: Callable, devices: Sequence[jax.Device] | None = None) -> Callable:
  """`fn`, waiting for its outputs when `devices` are several CPU devices (module docstring).

  Elsewhere `fn` itself is returned, unchanged. The wrapper keeps `fn.lower`.
  """
  devices = list(devices) if devices is not None else jax.local_devices()
  if len(devices) < 2 or any(d.platform != 'cpu' for d in devices):
    return fn

  def call(*args, **kwargs):
    return jax.block_until_ready(fn(*args, **kwargs))

  call.lower = getattr(fn, 'lower', None)
  call.__wrapped__ = fn
  return call


# --- pmap --------------------------------------------------------------------------------


def pmap_train_step(step_fn: Callable, devices=None) -> Callable:
  """pmap over 'batch' (all local devices by default), donating the state (argument 0)."""
  return one_at_a_time(
      jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,), devices=devices), devices)


def pmap_eval_step(eval_fn: Callable, devices=None) -> Callable:
  return one_at_a_time(jax.pmap(eval_fn, axis_name=AXIS, devices=devices), devices)


def _stacked_sharding(devices) -> NamedSharding:
  # pmap (JAX >= 0.8) produces and accepts arrays sharded on a 1-D mesh over the
  # leading axis; putting inputs there up front avoids a reshard on the first call.
  # With several processes pmap turns these process-local arrays into global ones.
  return NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P(AXIS))


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


def _first_block(x):
  """The first device's block [1, ...] of a stacked leaf, without a multi-device program.

  Indexing the stacked array (`x[0]`) would run a program on every device holding it, and
  on several CPU devices chains of those deadlock like steps dispatched ahead (module
  docstring); the block is already on its device.
  """
  return x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x)[:1]


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of every leaf (they are equal after a pmapped step)."""
  return jax.tree.map(lambda x: _first_block(x)[0], tree)


def to_host(tree: PyTree) -> PyTree:
  """The first device's copy of every leaf, as numpy (copied, never computed on device)."""
  return jax.tree.map(lambda x: np.asarray(_first_block(x))[0], tree)


# --- The interface both implementations offer -------------------------------------------


class Parallel(Protocol):
  """How steps are mapped over devices and how arrays get there and back."""
  kind: str

  def step(self, step_fn: Callable) -> Callable:
    """(state, batch, rng) -> (state, metrics) over all devices; donates the state."""

  def eval_step(self, eval_fn: Callable) -> Callable:
    """(*replicated_args, batch) -> outputs replicated over 'batch' (psum / all_gather)."""

  def replicate(self, tree: PyTree) -> PyTree:
    """Host (or single-device) values -> the layout `step` takes for state and rng."""

  def shard(self, batch: PyTree) -> PyTree:
    """A host batch [local_devices, per_device, ...] -> the layout `step` takes."""

  def unreplicate(self, tree: PyTree) -> PyTree:
    """A replicated step output -> one device-resident copy on this process."""

  def to_host(self, tree: PyTree) -> PyTree:
    """A replicated step output -> numpy on this process."""


class PmapParallel:
  """`jax.pmap` over this process's devices (collectives span all processes' devices)."""
  kind = 'pmap'

  def step(self, step_fn: Callable) -> Callable:
    return pmap_train_step(step_fn)

  def eval_step(self, eval_fn: Callable) -> Callable:
    return pmap_eval_step(eval_fn)

  def replicate(self, tree: PyTree) -> PyTree:
    return replicate(tree)

  def shard(self, batch: PyTree) -> PyTree:
    return shard(batch)

  def unreplicate(self, tree: PyTree) -> PyTree:
    return unreplicate(tree)

  def to_host(self, tree: PyTree) -> PyTree:
    return to_host(tree)


def global_devices() -> list[jax.Device]:
  """All devices, process-major and in `jax.local_devices()` order within a process.

  This is pmap's multi-process device order, and it makes each process's rows of a
  global batch one contiguous block, the layout `data.train_batches` produces.
  """
  return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]


class JitParallel:
  """`jax.jit(jax.shard_map(...))` over a 1-D mesh 'batch' of all devices of all processes."""
  kind = 'jit'

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    self.mesh = Mesh(np.asarray(list(devices) if devices else global_devices()), (AXIS,))
    self._replicated = NamedSharding(self.mesh, P())
    self._split = NamedSharding(self.mesh, P(AXIS))
    self._num_processes = len({d.process_index for d in self.mesh.devices.flat})

  def _map(self, fn: Callable, in_specs: tuple, donate: tuple[int, ...]) -> Callable:
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=P(),
                           check_vma=False)  # pmap semantics; see the module docstring
    return one_at_a_time(jax.jit(mapped, donate_argnums=donate),
                         [d for d in self.mesh.devices.flat if d.process_index ==
                          jax.process_index()])

  def step(self, step_fn: Callable) -> Callable:
    def per_device(state, batch, rng):
      # Each device holds [1, per_device, ...] of the [devices, per_device, ...] batch;
      # the step expects pmap's per-device view.
      return step_fn(state, jax.tree.map(lambda x: x[0], batch), rng)

    return self._map(per_device, (P(), P(AXIS), P()), donate=(0,))

  def eval_step(self, eval_fn: Callable) -> Callable:
    """Every argument but the last is replicated; the last is the sharded batch."""
    cache = {}

    def call(*args):
      n = len(args)
      if n not in cache:
        def per_device(*a):
          return eval_fn(*a[:-1], jax.tree.map(lambda x: x[0], a[-1]))
        cache[n] = self._map(per_device, (P(),) * (n - 1) + (P(AXIS),), donate=())
      return cache[n](*args)

    return call

  def replicate(self, tree: PyTree) -> PyTree:
    def put(x):
      if isinstance(x, jax.Array) and x.sharding == self._replicated:
        return x
      # Every process passes the same value; each places it on its own devices.
      return jax.make_array_from_process_local_data(self._replicated, np.asarray(x))
    return jax.tree.map(put, tree)

  def shard(self, batch: PyTree) -> PyTree:
    def put(x):
      x = np.asarray(x)
      global_shape = (x.shape[0] * self._num_processes,) + x.shape[1:]
      return jax.make_array_from_process_local_data(self._split, x, global_shape)
    return jax.tree.map(put, batch)

  def unreplicate(self, tree: PyTree) -> PyTree:
    # A replicated global array may span other processes' devices; any local copy is it.
    return jax.tree.map(lambda x: x.addressable_data(0), tree)

  def to_host(self, tree: PyTree) -> PyTree:
    return jax.device_get(self.unreplicate(tree))


def get(kind: str) -> Parallel:
  """The implementation named by `config.train.parallel`: 'pmap' or 'jit'."""
  if kind == 'pmap':
    return PmapParallel()
  if kind == 'jit':
    return JitParallel()
  raise ValueError(f'train.parallel={kind!r} is unknown; use one of '
                   f'{", ".join(map(repr, KINDS))} (e.g. --config.train.parallel=jit).')
