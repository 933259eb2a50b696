"""Random-access image sources: what every dataset spec opens to.

Usage sketch::

  from vq.data import sources

  class MySource(sources.ImageSource):       # a new kind of dataset
    def __len__(self): ...
    def _get_many(self, indices): ...        # [(uint8 [H, W, 3], label), ...]

  src[3], src.get_batch([0, 5, 9]), sources.take(src, 100)
  cached = sources.in_memory(src, max_bytes=2**30)  # decoded once, then read from memory

Sources hand out uint8 [H, W, 3] images and integer labels (-1 when unlabelled).
"""

import operator
from collections.abc import Sequence

import numpy as np
from PIL import Image

RESIZE_FIX = 'pass resize=True (config field data.resize)'


class ImageSource:
  """A read-only, random-access image dataset: `source[i] -> {'image', 'label'}`.

  `source[i]['image']` is uint8 with shape `image_shape`; `source[i]['label']` is an
  np.int32, -1 when the dataset has no labels. Reads may happen from several threads.

  Attributes:
    image_shape: (H, W, 3), the same for every example.
    num_classes: the number of classes, or None for unlabeled data.
    skipped: (file, reason) for each file left out at open (folder sources only).
  """

  image_shape: tuple[int, int, int]
  num_classes: int | None
  skipped: list[tuple[str, str]]

  def __init__(self, *, description: str, image_shape: tuple[int, int, int],
               num_classes: int | None, skipped: list[tuple[str, str]] | None = None):
    self.description = description
    self.image_shape = tuple(int(d) for d in image_shape)
    self.num_classes = num_classes
    self.skipped = list(skipped or [])

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    i = operator.index(index)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f'Index {index} is out of range for {self.description} '
                       f'with {n} examples.')
    image, label = self._get_many([i])[0]
    return {'image': image, 'label': np.int32(label)}

  def get_many(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, H, W, 3], int32 labels [n]) of valid, non-negative `indices`."""
    pairs = self._get_many([operator.index(i) for i in indices])
    if not pairs:
      return np.zeros((0,) + self.image_shape, np.uint8), np.zeros((0,), np.int32)
    return (np.stack([image for image, _ in pairs]),
            np.asarray([label for _, label in pairs], np.int32))

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.description}, n={len(self)}, '
            f'image_shape={self.image_shape}, num_classes={self.num_classes})')

  def _get_many(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """Returns (uint8 image, label) for valid, non-negative indices."""
    raise NotImplementedError


class ArraySource(ImageSource):
  """Images held in memory (npz files)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None, **kwargs):
    super().__init__(image_shape=images.shape[1:], **kwargs)
    self._images = images
    self._labels = labels

  def __len__(self) -> int:
    return len(self._images)

  def _get_many(self, indices):
    return [(self._images[i], -1 if self._labels is None else int(self._labels[i]))
            for i in indices]


class Prefix(ImageSource):
  """The first `n` examples of another source."""

  def __init__(self, base: ImageSource, n: int):
    super().__init__(description=f'{base.description}[:{n}]', image_shape=base.image_shape,
                     num_classes=base.num_classes, skipped=base.skipped)
    self._base = base
    self._n = n

  def __len__(self) -> int:
    return self._n

  def _get_many(self, indices):
    return self._base._get_many(indices)  # pylint: disable=protected-access


class InMemory(ImageSource):
  """Another source with every example kept in memory once read (decoded uint8 pixels).

  The first read of an example goes to `base`; later reads are copies out of one
  preallocated [N, H, W, 3] array, so an epoch after the first decodes nothing. Reads from
  several threads are safe: a row being read twice at once is written twice with the same
  pixels, and it counts as read only after it is written.
  """

  def __init__(self, base: ImageSource):
    super().__init__(description=base.description, image_shape=base.image_shape,
                     num_classes=base.num_classes, skipped=base.skipped)
    self._base = base
    n = len(base)
    self._images = np.empty((n,) + self.image_shape, np.uint8)
    self._labels = np.empty((n,), np.int64)
    self._read = np.zeros((n,), bool)

  def __len__(self) -> int:
    return len(self._images)

  def _get_many(self, indices):
    missing = list(dict.fromkeys(i for i in indices if not self._read[i]))  # each once
    if missing:
      for i, (image, label) in zip(missing, self._base._get_many(missing)):  # pylint: disable=protected-access
        self._images[i] = image
        self._labels[i] = label
        self._read[i] = True
    return [(self._images[i], int(self._labels[i])) for i in indices]


def nbytes(source: ImageSource) -> int:
  """Bytes of the decoded uint8 pixels of every example of `source`."""
  return len(source) * int(np.prod(source.image_shape))


def in_memory(source: ImageSource, max_bytes: int) -> ImageSource:
  """`InMemory(source)` if its decoded pixels take at most `max_bytes`, else `source`.

  Sources that already hold their pixels in memory (npz files) are returned as they are.
  """
  if max_bytes <= 0 or isinstance(source, (ArraySource, InMemory)):
    return source
  return InMemory(source) if nbytes(source) <= max_bytes else source


def take(source: ImageSource, num_examples: int) -> ImageSource:
  """Returns the first `num_examples` examples of `source` (all of it if shorter).

  Args:
    source: the dataset.
    num_examples: how many leading examples to keep, >= 1.

  Returns:
    A source of length min(num_examples, len(source)), sharing `source`'s reads.
  """
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f'take needs num_examples >= 1; saw {num_examples!r} (use 0/None in the '
                     'config to mean "all" and skip take).')
  if num_examples >= len(source):
    return source
  return Prefix(source, int(num_examples))


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
  """Center-crops `image` to a square and resizes it to size x size (PIL bicubic)."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  square = Image.fromarray(image[top:top + s, left:left + s])
  return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


def size_error(where: str, hw: tuple[int, int], image_size: int) -> ValueError:
  h, w = hw
  other = f', or set image_size={h}' if h == w else ''
  return ValueError(f'{where} is {h}x{w} (HxW) but image_size={image_size}; {RESIZE_FIX} '
                    f'to center-crop and resize{other}.')


def one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return text if len(text) <= 200 else text[:197] + '...'
