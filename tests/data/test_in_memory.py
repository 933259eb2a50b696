"""sources.in_memory: decoded once, then read from memory, with the same examples."""

import numpy as np

from vq import data
from vq.data import sources


class _CountingSource(sources.ImageSource):
  """Random images; counts how often each example is read (a stand-in for a decoder)."""

  def __init__(self, n=40, shape=(4, 5, 3)):
    super().__init__(description='counting', image_shape=shape, num_classes=10)
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    self.labels = rng.integers(0, 10, n)
    self.reads = np.zeros(n, int)

  def __len__(self):
    return len(self.images)

  def _get_many(self, indices):
    for i in indices:
      self.reads[i] += 1
    return [(self.images[i].copy(), int(self.labels[i])) for i in indices]


def test_each_example_is_read_from_the_base_once():
  base = _CountingSource()
  cached = data.in_memory(base, max_bytes=10**6)
  assert isinstance(cached, sources.InMemory) and len(cached) == 40
  for indices in ([3, 1, 3], [0, 1, 2, 39], list(range(40)), [5]):
    images, labels = cached.get_many(indices)
    np.testing.assert_array_equal(images, base.images[indices])
    np.testing.assert_array_equal(labels, base.labels[indices])
  np.testing.assert_array_equal(base.reads, np.ones(40))
  assert cached[7]['label'] == base.labels[7]


def test_training_batches_are_those_of_the_base():
  base = _CountingSource()
  kwargs = dict(global_batch_size=8, num_local_devices=2, seed=3, num_threads=2)
  expected = data.train_batches(_CountingSource(), **kwargs)
  got = data.train_batches(data.in_memory(base, max_bytes=10**6), **kwargs)
  for _ in range(12):  # two and a half epochs of 5 batches
    a, b = next(expected), next(got)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert base.reads.max() == 1


def test_only_sources_that_fit_are_cached():
  base = _CountingSource()  # 40 x 4 x 5 x 3 = 2400 bytes
  assert sources.nbytes(base) == 2400
  assert data.in_memory(base, max_bytes=2400) is not base
  assert data.in_memory(base, max_bytes=2399) is base
  assert data.in_memory(base, max_bytes=0) is base
  in_ram = sources.ArraySource(base.images, base.labels, description='npz', num_classes=10)
  assert data.in_memory(in_ram, max_bytes=10**6) is in_ram
