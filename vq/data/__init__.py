"""Data: dataset specs opened as random-access image sources, and the batches made from them.

Usage sketch::

  from vq import data

  train = data.open_source('tfds:cifar10:train')  # or 'npz:/x.npz', 'folder:/imgs'
  batches = data.train_batches(train, global_batch_size=64, num_local_devices=D, seed=0,
                               start_step=step)
  for batch in data.eval_batches(data.take(test, 1000), global_batch_size=64,
                                 num_local_devices=D):
    ...

- `sources`: `ImageSource` (uint8 images + labels by index), `take`, `in_memory` (decoded
  once, then served from memory).
- `readers`: the specs `tfds:NAME:SPLIT`, `npz:PATH`, `folder:PATH` and `open_source`.
- `batches`: `train_batches` (a pure function of seed and step: exact resume),
  `eval_batches` (padded, masked: every example once), `to_float` / `to_uint8`.

Imports: nothing from vq.
"""

from vq.data.batches import default_num_threads
from vq.data.batches import eval_batches
from vq.data.batches import num_eval_batches
from vq.data.batches import to_float
from vq.data.batches import to_uint8
from vq.data.batches import train_batches
from vq.data.readers import DatasetSpec
from vq.data.readers import open_source
from vq.data.readers import parse_spec
from vq.data.sources import ImageSource
from vq.data.sources import in_memory
from vq.data.sources import take

__all__ = [
    'DatasetSpec',
    'ImageSource',
    'default_num_threads',
    'eval_batches',
    'in_memory',
    'num_eval_batches',
    'open_source',
    'parse_spec',
    'take',
    'to_float',
    'to_uint8',
    'train_batches',
]
