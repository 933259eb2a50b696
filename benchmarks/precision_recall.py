"""Time of `vq.evaluation.precision_recall.precision_recall` on random features.

Usage (from the repository root):

  python -m benchmarks.precision_recall --num=10000 --dim=512

Prints one JSON line: {"seconds" (one per repeat), "num", "dim", "batch_size", "k",
"peak_rss_mb", "precision", "recall"}. The features are float32 half-normal vectors, like
pooled ReLU activations; the generated set is a scaled, shifted copy of the real one's law.
"""

import json
import resource
import time

from absl import app
from absl import flags
import numpy as np

from vq.evaluation import precision_recall as pr

_NUM = flags.DEFINE_integer('num', 10000, 'Real and generated vectors (each).')
_DIM = flags.DEFINE_integer('dim', 512, 'Feature dimension.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', pr.DEFAULT_BATCH_SIZE, 'Rows per block.')
_K = flags.DEFINE_integer('k', pr.DEFAULT_K, 'Neighbourhood size.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed calls.')


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  real = np.abs(rng.normal(size=(_NUM.value, _DIM.value))).astype(np.float32)
  fake = np.abs(1.1 * rng.normal(size=(_NUM.value, _DIM.value)) + 0.05).astype(np.float32)
  seconds = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    result = pr.precision_recall(real, fake, k=_K.value, batch_size=_BATCH_SIZE.value)
    seconds.append(round(time.perf_counter() - start, 2))
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.
  print(json.dumps({'seconds': seconds, 'num': _NUM.value, 'dim': _DIM.value,
                    'batch_size': _BATCH_SIZE.value, 'k': _K.value,
                    'peak_rss_mb': round(peak_mb), **result}))


if __name__ == '__main__':
  app.run(main)
