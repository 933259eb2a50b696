"""Throughput of `vq.data.train_batches`: decoded, converted images per second.

Usage (from the repository root; reads the prepared copy under $TFDS_DATA_DIR):

  TFDS_DATA_DIR=/path/to/tfds python -m benchmarks.input_pipeline --batch_size=64

Prints one JSON line: {"images_per_s", "batches", "batch_size", "dataset", ...}. Only the
host pipeline is timed (no device transfer), after `--warmup` batches have filled the
prefetch queue and the thread pool.
"""

import json
import time

from absl import app
from absl import flags

from vq import data

_DATASET = flags.DEFINE_string('dataset', 'tfds:cifar10:train', 'Dataset spec to read.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 200, 'Batches timed after warm-up.')
_WARMUP = flags.DEFINE_integer('warmup', 20, 'Batches read before timing starts.')
_NUM_DEVICES = flags.DEFINE_integer('num_devices', 1, 'Leading device axis of batches.')
_NUM_THREADS = flags.DEFINE_integer('num_threads', None,
                                    'Decoding threads (default: data.default_num_threads()).')
_PREFETCH = flags.DEFINE_integer('prefetch', 2, 'Batches decoded ahead.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data dir (default $TFDS_DATA_DIR).')


def main(argv):
  del argv
  source = data.open_source(_DATASET.value, data_dir=_DATA_DIR.value, download=False)
  num_threads = _NUM_THREADS.value or data.default_num_threads()
  batches = data.train_batches(
      source, global_batch_size=_BATCH_SIZE.value, num_local_devices=_NUM_DEVICES.value,
      seed=0, prefetch=_PREFETCH.value, num_threads=num_threads)
  for _ in range(_WARMUP.value):
    next(batches)
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    next(batches)
  seconds = time.perf_counter() - start
  batches.close()
  print(json.dumps({
      'images_per_s': round(_NUM_BATCHES.value * _BATCH_SIZE.value / seconds, 1),
      'batches': _NUM_BATCHES.value,
      'batch_size': _BATCH_SIZE.value,
      'dataset': _DATASET.value,
      'num_threads': num_threads,
      'prefetch': _PREFETCH.value,
      'seconds': round(seconds, 3),
  }))


if __name__ == '__main__':
  app.run(main)
