"""Deterministic, resumable training batches and padded evaluation batches.

Usage sketch::

  from vq import data

  batches = data.train_batches(
      train, global_batch_size=64, num_local_devices=jax.local_device_count(),
      seed=0, start_step=step, process_index=jax.process_index(),
      process_count=jax.process_count())
  batch = next(batches)  # {'image': f32 [D, b, H, W, 3] in [-1, 1], 'label': i32 [D, b]}

  test = data.take(data.open_source('tfds:cifar10:test'), 1000)  # first 1000 only
  for batch in data.eval_batches(test, global_batch_size=64, num_local_devices=D):
    ...  # weight per-example metrics by batch['mask']; padding rows are zeros

Batches are float32 in [-1, 1] (`to_float`, `to_uint8`). The training order is a pure
function of (seed, step), so resuming with `start_step=k` replays exactly the batches
k, k+1, ... of an uninterrupted run and no iterator state needs checkpointing.
"""

import collections
from collections.abc import Iterator
from concurrent import futures
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from vq.data.sources import ImageSource

# eval_batches has no tuning arguments; these keep it as quick as the training path.
_EVAL_PREFETCH = 2
_EVAL_THREADS = 4


def to_float(images_uint8):
  """Maps uint8 [0, 255] to float32 [-1, 1] as x / 127.5 - 1 (numpy or jax arrays)."""
  xp = jnp if isinstance(images_uint8, jax.Array) else np
  x = xp.asarray(images_uint8)
  if x.dtype != np.uint8:
    raise ValueError(f'to_float expects uint8 images; saw dtype {x.dtype}. Use to_uint8 '
                     'first, or pass the raw uint8 pixels.')
  return x.astype(np.float32) / np.float32(127.5) - np.float32(1)


def to_uint8(images_float):
  """Inverse of `to_float`: rounds (x + 1) * 127.5 and clips to [0, 255]; NaN -> 0."""
  xp = jnp if isinstance(images_float, jax.Array) else np
  x = xp.asarray(images_float, dtype=np.float32)
  x = xp.rint((xp.nan_to_num(x, nan=-1.0) + 1) * np.float32(127.5))
  return xp.clip(x, 0, 255).astype(np.uint8)


def check_layout(global_batch_size: int, num_local_devices: int, process_index: int,
                  process_count: int) -> int:
  """Validates the batch layout and returns the per-process batch size."""
  for field, value in (('global_batch_size', global_batch_size),
                       ('num_local_devices', num_local_devices),
                       ('process_count', process_count)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{field} must be a positive int; saw {value!r}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is outside [0, process_count='
                     f'{process_count}); pass jax.process_index() and jax.process_count().')
  shards = process_count * num_local_devices
  if global_batch_size % shards:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by process_count * '
        f'num_local_devices = {process_count} * {num_local_devices} = {shards}; use a '
        f'multiple of {shards}, e.g. {math.ceil(global_batch_size / shards) * shards}.')
  return global_batch_size // process_count


def default_num_threads() -> int:
  """One decoding thread per two CPU cores, at least 1 and at most 4.

  Decoding shares the cores with XLA's own threads, and on small images most of it is
  Python holding the GIL: on 2 cores, CIFAR-10 from tfds loads at 7,400-7,900 images/s
  with 1 thread and 6,700-7,400 with 2 (4,800-5,000 vs 3,800-4,000 without OpenCV;
  benchmarks/input_pipeline.py). Large JPEGs decode outside the GIL, so bigger hosts get
  more threads.
  """
  return max(1, min(4, (os.cpu_count() or 1) // 2))


def train_batches(source: ImageSource, *, global_batch_size: int, num_local_devices: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, prefetch: int = 2,
                  num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields training batches forever, starting at `start_step`.

  Step s is position s % (N // B) of epoch s // (N // B), where epoch e visits the whole
  dataset in the order `np.random.default_rng((seed, e)).permutation(N)`; the last
  N % B examples of each epoch's order are dropped. Process p takes rows
  [p * B / P, (p + 1) * B / P) of each global batch.

  Args:
    source: the dataset.
    global_batch_size: B, examples per step over all processes.
    num_local_devices: D, devices on this process (leading axis of every array).
    seed: non-negative int fixing the order of every epoch.
    start_step: first step to yield (resuming at k reproduces steps k, k+1, ...).
    process_index: this process, in [0, process_count).
    process_count: P, number of processes.
    prefetch: batches decoded ahead of the consumer in background threads.
    num_threads: decoding threads; None: `default_num_threads()`.

  Yields:
    {'image': float32 [D, B / (P * D), H, W, 3] in [-1, 1], 'label': int32 [D, B / (P * D)]}.
    The iterator is a generator: `close()` it (or drop it) to stop its threads.

  Raises:
    ValueError: a batch layout that does not divide, or B larger than the dataset.
  """
  per_process = check_layout(global_batch_size, num_local_devices, process_index,
                              process_count)
  n = len(source)
  if global_batch_size > n:
    raise ValueError(f'global_batch_size={global_batch_size} exceeds the {n} examples of '
                     f'{source.description}, so no full training batch exists; lower it or '
                     'use a larger split.')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int; saw {seed!r}.')
  if not isinstance(start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(f'start_step must be a non-negative int; saw {start_step!r}.')
  num_threads = default_num_threads() if num_threads is None else num_threads
  _check_threads(prefetch, num_threads)
  plans = train_plan(n, global_batch_size, seed=seed, start_step=start_step,
                     process_index=process_index, per_process=per_process)
  return _load_batches(source, plans, per_process, num_local_devices, prefetch=prefetch,
                       num_threads=num_threads, with_mask=False)


def train_plan(n: int, global_batch_size: int, *, seed: int, start_step: int,
               process_index: int, per_process: int) -> Iterator[np.ndarray]:
  """Example indices of this process's rows at steps start_step, start_step + 1, ...

  The order `train_batches` documents: epoch e visits `default_rng((seed, e)).permutation(n)`
  in global batches, the last n % B dropped; process p takes rows [p * b, (p + 1) * b).
  Every data pipeline that must resume exactly (images, token grids) draws from it.
  """
  steps_per_epoch = n // global_batch_size
  lo = process_index * per_process
  epoch, order = None, None
  step = start_step
  while True:
    e, pos = divmod(step, steps_per_epoch)
    if e != epoch:
      epoch, order = e, np.random.default_rng((seed, e)).permutation(n)
    begin = pos * global_batch_size + lo
    yield order[begin:begin + per_process]
    step += 1


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Number of `eval_batches` batches: ceil(num_examples / global_batch_size)."""
  if num_examples < 0 or global_batch_size < 1:
    raise ValueError(f'Need num_examples >= 0 and global_batch_size >= 1; saw '
                     f'{num_examples} and {global_batch_size}.')
  return -(-num_examples // global_batch_size)


def eval_batches(source: ImageSource, *, global_batch_size: int, num_local_devices: int,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Yields one in-order pass over `source`, padded so every example counts once.

  Global batch j holds examples [j * B, (j + 1) * B); process p takes rows
  [p * B / P, (p + 1) * B / P) of it. Rows past the end are zero with mask False, so all
  processes yield `num_eval_batches(N, B)` batches (some may be fully masked), as
  collectives need.

  Args:
    source: the dataset.
    global_batch_size: B, examples per batch over all processes.
    num_local_devices: D, devices on this process.
    process_index: this process, in [0, process_count).
    process_count: P, number of processes.

  Yields:
    {'image': float32 [D, b, H, W, 3], 'label': int32 [D, b], 'mask': bool [D, b]} with
    b = B / (P * D).

  Raises:
    ValueError: a batch layout that does not divide.
  """
  per_process = check_layout(global_batch_size, num_local_devices, process_index,
                              process_count)
  n = len(source)
  lo = process_index * per_process

  def plans():
    for j in range(num_eval_batches(n, global_batch_size)):
      begin = j * global_batch_size + lo
      yield np.arange(begin, min(begin + per_process, n))

  return _load_batches(source, plans(), per_process, num_local_devices,
                       prefetch=_EVAL_PREFETCH, num_threads=_EVAL_THREADS, with_mask=True)


def _check_threads(prefetch: int, num_threads: int) -> None:
  if not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
    raise ValueError(f'prefetch must be an int >= 0; saw {prefetch!r}.')
  if not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
    raise ValueError(f'num_threads must be an int >= 1; saw {num_threads!r}.')


def _fill(source: ImageSource, indices: np.ndarray, images: np.ndarray,
          labels: np.ndarray) -> None:
  """Decodes `indices` into the preallocated `images`/`labels` slices (a worker job)."""
  examples = source._get_many(indices)  # pylint: disable=protected-access
  pixels = np.empty(images.shape, np.uint8)
  for row, (image, label) in enumerate(examples):
    if image.shape != source.image_shape or image.dtype != np.uint8:
      raise ValueError(f'Example {indices[row]} of {source.description} has shape '
                       f'{image.shape} and dtype {image.dtype}, expected '
                       f'{source.image_shape} uint8.')
    pixels[row] = image
    labels[row] = label
  # One vectorised conversion per chunk (per image, numpy's call overhead cost ~35 us of
  # a CIFAR image's ~200 us), written in place: x / 127.5 - 1, exactly as to_float.
  np.divide(pixels, np.float32(127.5), out=images, dtype=np.float32)
  np.subtract(images, np.float32(1), out=images)


def _load_batches(source: ImageSource, plans: Iterator[np.ndarray], per_process: int,
                  num_local_devices: int, *, prefetch: int, num_threads: int,
                  with_mask: bool) -> Iterator[dict[str, np.ndarray]]:
  """Turns index arrays (a prefix of each batch's rows; the rest is padding) into batches.

  Each batch is split into `num_threads` contiguous chunks that worker threads decode
  straight into the batch's preallocated arrays; up to `prefetch` batches are in flight
  beyond the one being consumed.
  """
  h, w, c = source.image_shape
  per_device = per_process // num_local_devices

  def submit(executor, indices):
    images = np.zeros((per_process, h, w, c), np.float32)
    labels = np.zeros((per_process,), np.int32)
    bounds = np.linspace(0, len(indices), min(num_threads, len(indices)) + 1).astype(int)
    jobs = [executor.submit(_fill, source, indices[a:b], images[a:b], labels[a:b])
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    batch = {'image': images.reshape(num_local_devices, per_device, h, w, c),
             'label': labels.reshape(num_local_devices, per_device)}
    if with_mask:
      batch['mask'] = (np.arange(per_process) < len(indices)).reshape(
          num_local_devices, per_device)
    return jobs, batch

  def finish(pending):
    jobs, batch = pending
    for job in jobs:
      job.result()  # re-raises a worker's error here, in the consumer.
    return batch

  # A generator, so close() (or garbage collection) runs the finally and stops the
  # workers; queued jobs are cancelled, so interpreter exit never waits on a dataset.
  def generate():
    executor = futures.ThreadPoolExecutor(num_threads, thread_name_prefix='vq-data')
    queue = collections.deque()
    try:
      for indices in plans:
        queue.append(submit(executor, indices))
        if len(queue) > prefetch:
          yield finish(queue.popleft())
      while queue:
        yield finish(queue.popleft())
    finally:
      executor.shutdown(wait=False, cancel_futures=True)

  return generate()
