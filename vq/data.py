"""Image datasets as random-access sources, and deterministic, resumable batches.

Usage::

  from vq import data

  train = data.open_source('tfds:cifar10:train')  # or 'npz:/x.npz', 'folder:/imgs'
  batches = data.train_batches(
      train, global_batch_size=64, num_local_devices=jax.local_device_count(),
      seed=0, start_step=step, process_index=jax.process_index(),
      process_count=jax.process_count())
  batch = next(batches)  # {'image': f32 [D, b, H, W, 3] in [-1, 1], 'label': i32 [D, b]}

  test = data.take(data.open_source('tfds:cifar10:test'), 1000)  # first 1000 only
  for batch in data.eval_batches(test, global_batch_size=64, num_local_devices=D):
    ...  # weight per-example metrics by batch['mask']; padding rows are zeros

Sources hand out uint8 [H, W, 3] images; batches are float32 in [-1, 1] (`to_float`,
`to_uint8`). The training order is a pure function of (seed, step), so resuming with
`start_step=k` replays exactly the batches k, k+1, ... of an uninterrupted run and no
iterator state needs checkpointing.

Dataset specs:
  * `tfds:NAME:SPLIT` reads a prepared array_record copy with `tfds.data_source` (no
    TensorFlow needed to read). It looks in `data_dir`, else `$TFDS_DATA_DIR`, else the
    tfds default (~/tensorflow_datasets).
  * `npz:PATH` loads `images` (uint8 [N, H, W, 3]; [N, H, W, 1] is tiled to 3 channels)
    and optional integer `labels` [N] into memory; `num_classes` is `max(labels) + 1`.
  * `folder:PATH` lists png/jpg/jpeg/bmp/gif/webp/tif/tiff files recursively (sorted; names
    starting with '.' are ignored) and decodes every file once at open, so corrupt files
    are skipped up front (see `ImageSource.skipped`) instead of failing mid-epoch. If every
    file sits in a subfolder, the sorted top-level subfolder names are the classes
    (ImageFolder layout); otherwise labels are -1. Grayscale, palette, CMYK and RGBA are
    converted to RGB (alpha is dropped), 16-bit images are scaled to 8 bits, and EXIF
    orientation is applied.

When `image_size` is given and the images have another size, `resize=True` center-crops
each image to a square and resizes it with PIL bicubic; without it opening fails.
"""

import collections
from collections.abc import Iterator, Sequence
from concurrent import futures
import dataclasses
import math
import operator
import os
import zipfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps

_SPEC_FORMS = ("'tfds:NAME:SPLIT' (e.g. 'tfds:cifar10:train'), 'npz:/path/file.npz' "
               "or 'folder:/path/to/images'")
_IMAGE_EXTENSIONS = frozenset(
    ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff'))
_RESIZE_FIX = 'pass resize=True (config field data.resize)'
# Folder scans decode every file; PIL releases the GIL while decoding.
_SCAN_THREADS = 8
# eval_batches has no tuning arguments; these keep it as quick as the training path.
_EVAL_PREFETCH = 2
_EVAL_THREADS = 4


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A parsed dataset spec string (see `parse_spec`).

  Attributes:
    kind: 'tfds', 'npz' or 'folder'.
    name: the tfds dataset name, or a filesystem path.
    split: the tfds split (e.g. 'train', 'test[:1000]'); None for npz and folder.
  """
  kind: str
  name: str
  split: str | None


def parse_spec(spec: str) -> DatasetSpec:
  """Parses 'tfds:NAME:SPLIT', 'npz:PATH' or 'folder:PATH'.

  Args:
    spec: the dataset spec string.

  Returns:
    The parsed `DatasetSpec`.

  Raises:
    ValueError: `spec` has none of the accepted forms.
  """
  bad = ValueError(f'Unknown dataset spec {spec!r}; expected {_SPEC_FORMS}.')
  if not isinstance(spec, str):
    raise bad
  kind, _, rest = spec.partition(':')
  if kind == 'tfds':
    # Split only at the first ':' after the name: slices like 'train[:1000]' contain ':'.
    name, _, split = rest.partition(':')
    if not name or not split:
      raise bad
    return DatasetSpec(kind='tfds', name=name, split=split)
  if kind in ('npz', 'folder') and rest:
    return DatasetSpec(kind=kind, name=rest, split=None)
  raise bad


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

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.description}, n={len(self)}, '
            f'image_shape={self.image_shape}, num_classes={self.num_classes})')

  def _get_many(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """Returns (uint8 image, label) for valid, non-negative indices."""
    raise NotImplementedError


class _ArraySource(ImageSource):
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


class _FolderSource(ImageSource):
  """Image files decoded on access; the scan at open vouches they all decode."""

  def __init__(self, paths: list[str], labels: list[int], size: int | None, **kwargs):
    super().__init__(**kwargs)
    self._paths = paths
    self._labels = labels
    self._size = size

  def __len__(self) -> int:
    return len(self._paths)

  def _get_many(self, indices):
    out = []
    for i in indices:
      image = _read_image_file(self._paths[i])
      if self._size is not None:
        image = _fit(image, self._size)
      if image.shape != self.image_shape:
        raise ValueError(f'{self._paths[i]} is now {image.shape}, not {self.image_shape} '
                         'as when the folder was opened; reopen the source.')
      out.append((image, self._labels[i]))
    return out


class _TfdsSource(ImageSource):
  """A tfds array_record data source, decoded on access."""

  def __init__(self, data_source, image_key: str, label_key: str | None,
               size: int | None, **kwargs):
    super().__init__(**kwargs)
    self._ds = data_source
    self._image_key = image_key
    self._label_key = label_key
    self._size = size

  def __len__(self) -> int:
    return len(self._ds)

  def _get_many(self, indices):
    # One array_record read for the whole chunk is cheaper than one per example.
    examples = self._ds.__getitems__([int(i) for i in indices])
    out = []
    for ex in examples:
      image = np.asarray(ex[self._image_key])
      if image.ndim == 2:
        image = image[..., None]
      if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
      if self._size is not None and image.shape[:2] != (self._size, self._size):
        image = _fit(image, self._size)
      label = -1 if self._label_key is None else int(ex[self._label_key])
      out.append((image, label))
    return out


class _Prefix(ImageSource):
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
  return _Prefix(source, int(num_examples))


def open_source(spec: str, *, image_size: int | None = None, data_dir: str | None = None,
                resize: bool = False, download: bool = True) -> ImageSource:
  """Opens a dataset spec as a random-access `ImageSource`.

  Args:
    spec: 'tfds:NAME:SPLIT', 'npz:PATH' or 'folder:PATH' (see the module docstring).
    image_size: if set, every image must be image_size x image_size (or is made so with
      `resize`); if None, the dataset's own size is used and must be uniform.
    data_dir: tfds data directory; defaults to $TFDS_DATA_DIR, then the tfds default.
    resize: center-crop to square and bicubic-resize images whose size differs from
      `image_size`, instead of raising.
    download: for tfds, try `download_and_prepare` (needs internet and TensorFlow) when no
      prepared copy is found.

  Returns:
    The opened source.

  Raises:
    ValueError: bad spec, bad contents, or an image size mismatch without `resize`.
    FileNotFoundError: missing file or folder, or an unprepared tfds dataset.
  """
  parsed = parse_spec(spec)
  if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
    raise ValueError(f'image_size must be a positive int or None; saw {image_size!r}.')
  if parsed.kind == 'tfds':
    return _open_tfds(parsed.name, parsed.split, image_size=image_size,
                      data_dir=data_dir, resize=resize, download=download)
  path = os.path.expanduser(parsed.name)
  if parsed.kind == 'npz':
    return _open_npz(path, image_size=image_size, resize=resize)
  return _open_folder(path, image_size=image_size, resize=resize)


def _fit(image: np.ndarray, size: int) -> np.ndarray:
  """Center-crops `image` to a square and resizes it to size x size (PIL bicubic)."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  square = Image.fromarray(image[top:top + s, left:left + s])
  return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


def _size_error(where: str, hw: tuple[int, int], image_size: int) -> ValueError:
  h, w = hw
  other = f', or set image_size={h}' if h == w else ''
  return ValueError(f'{where} is {h}x{w} (HxW) but image_size={image_size}; {_RESIZE_FIX} '
                    f'to center-crop and resize{other}.')


def _open_npz(path: str, *, image_size: int | None, resize: bool) -> ImageSource:
  expected = 'uint8 images [N, H, W, 3] (or [N, H, W, 1]) and optional int labels [N]'
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No npz file at {path}; expected a file from '
                            'np.savez(path, images=..., labels=...).')
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path} is not a readable .npz file ({_one_line(e)}); expected '
                     f'{expected}.') from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f'{path} holds a single {type(npz).__name__}, not an .npz archive; '
                     f'save {expected} with np.savez.')
  with npz:
    if 'images' not in npz.files:
      raise ValueError(f'{path} has no key "images" (keys: {npz.files}); expected '
                       f'{expected}.')
    try:
      images = npz['images']
      labels = npz['labels'] if 'labels' in npz.files else None
    except ValueError as e:  # object arrays need pickle, which stays off.
      raise ValueError(f'{path} holds object arrays ({_one_line(e)}); expected '
                       f'{expected}.') from e
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'{path}: "images" is {images.dtype} {list(images.shape)}; expected '
                     f'{expected}.')
  n = len(images)
  if n == 0:
    raise ValueError(f'{path}: "images" is empty {list(images.shape)}; expected at least '
                     'one image.')
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  num_classes = None
  if labels is not None:
    if (labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < -1):
      raise ValueError(f'{path}: "labels" is {labels.dtype} {list(labels.shape)}; expected '
                       f'integers >= -1 of shape [{n}] to match "images".')
    labels = labels.astype(np.int32)
    num_classes = int(labels.max()) + 1 if labels.max() >= 0 else None
  if image_size is not None and images.shape[1:3] != (image_size, image_size):
    if not resize:
      raise _size_error(f'npz:{path}', images.shape[1:3], image_size)
    images = np.stack([_fit(im, image_size) for im in images])
  return _ArraySource(images, labels, description=f'npz:{path}', num_classes=num_classes)


def _to_rgb(img: Image.Image) -> np.ndarray:
  """Converts any PIL mode to uint8 RGB."""
  if img.mode.startswith('I;16') or img.mode == 'I':
    # PIL's own conversion clips 16-bit values at 255, which turns most pixels white.
    gray = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)
  if img.mode == 'P':
    # Same pixels as a direct convert, minus PIL's warning about byte-wise transparency.
    img = img.convert('RGBA')
  if img.mode != 'RGB':
    img = img.convert('RGB')
  return np.asarray(img, dtype=np.uint8)


def _read_image_file(path: str) -> np.ndarray:
  with Image.open(path) as img:
    return _to_rgb(ImageOps.exif_transpose(img))


def _scan_file(path: str) -> tuple[tuple[int, int] | None, str | None]:
  """Returns ((h, w), None) if `path` decodes fully, else (None, reason)."""
  try:
    return _read_image_file(path).shape[:2], None
  # PIL raises many types on bad data (OSError, SyntaxError, struct.error, ...); any of
  # them means "skip this file", never a crash.
  except Exception as e:  # pylint: disable=broad-except
    return None, f'{type(e).__name__}: {_one_line(e)}'


def _open_folder(root: str, *, image_size: int | None, resize: bool) -> ImageSource:
  if not os.path.isdir(root):
    if os.path.exists(root):
      raise ValueError(f'folder:{root} is a file, not a directory; use npz:{root} for an '
                       'npz file or point folder: at a directory of images.')
    raise FileNotFoundError(f'No directory at {root}; point folder: at a directory of '
                            'image files.')
  rel_paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    rel_dir = os.path.relpath(dirpath, root)
    for f in filenames:
      if not f.startswith('.') and os.path.splitext(f)[1].lower() in _IMAGE_EXTENSIONS:
        rel_paths.append(os.path.normpath(os.path.join(rel_dir, f)))
  # Sort path components, not strings, so 'a/b' and 'a-b/c' order the same on every OS.
  rel_paths.sort(key=lambda p: p.split(os.sep))
  if not rel_paths:
    raise ValueError(f'folder:{root} has no image files '
                     f'({", ".join(sorted(_IMAGE_EXTENSIONS))}); point it at a folder of '
                     'images.')
  # Classes come from all listed files, so a corrupt file cannot shift the label ids.
  if all(os.sep in p for p in rel_paths):
    class_names = sorted({p.split(os.sep)[0] for p in rel_paths})
    class_ids = {c: i for i, c in enumerate(class_names)}
    all_labels = [class_ids[p.split(os.sep)[0]] for p in rel_paths]
    num_classes = len(class_names)
  else:
    all_labels = [-1] * len(rel_paths)
    num_classes = None

  full_paths = [os.path.join(root, p) for p in rel_paths]
  with futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
    scans = list(pool.map(_scan_file, full_paths))
  paths, labels, sizes, skipped = [], [], [], []
  for path, label, (hw, reason) in zip(full_paths, all_labels, scans):
    if hw is None:
      skipped.append((path, reason))
    else:
      paths.append(path)
      labels.append(label)
      sizes.append(hw)
  if skipped:
    logging.warning('folder:%s: skipped %d of %d image files that could not be decoded; '
                    'first: %s (%s).', root, len(skipped), len(full_paths), *skipped[0])
  if not paths:
    raise ValueError(f'None of the {len(full_paths)} image files under {root} could be '
                     f'decoded; first: {skipped[0][0]} ({skipped[0][1]}).')

  if image_size is None:
    odd = [i for i, hw in enumerate(sizes) if hw != sizes[0]]
    if odd:
      (h0, w0), (h1, w1) = sizes[0], sizes[odd[0]]
      raise ValueError(f'folder:{root} mixes image sizes ({len(odd)} differ): {paths[0]} is '
                       f'{h0}x{w0} but {paths[odd[0]]} is {h1}x{w1} (HxW); set image_size '
                       f'(config field data.image_size) and {_RESIZE_FIX}.')
    shape = (*sizes[0], 3)
    fit_size = None
  else:
    odd = [i for i, hw in enumerate(sizes) if hw != (image_size, image_size)]
    if odd and not resize:
      first = odd[0]
      raise _size_error(f'{paths[first]} ({len(odd)} of {len(paths)} files differ)',
                        sizes[first], image_size)
    shape = (image_size, image_size, 3)
    fit_size = image_size if odd else None
  return _FolderSource(paths, labels, fit_size, description=f'folder:{root}',
                       image_shape=shape, num_classes=num_classes, skipped=skipped)


def _open_tfds(name: str, split: str, *, image_size: int | None, data_dir: str | None,
               resize: bool, download: bool) -> ImageSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow import.

  if data_dir is not None:
    looked_in = f'data_dir={data_dir}'
  elif os.environ.get('TFDS_DATA_DIR'):
    data_dir = os.environ['TFDS_DATA_DIR']
    looked_in = f'TFDS_DATA_DIR={data_dir}'
  else:
    looked_in = 'the tfds default data dir (TFDS_DATA_DIR is unset)'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'tfds has no dataset named {name!r} (spec tfds:{name}:{split}); see '
                     'https://www.tensorflow.org/datasets/catalog for names.') from e
  if not builder.is_prepared():
    reason, cause = 'download=False', None
    if download:
      try:
        builder.download_and_prepare(file_format='array_record')
      except Exception as e:  # pylint: disable=broad-except  # offline, no TF, disk full...
        reason, cause = f'downloading failed: {type(e).__name__}: {_one_line(e)}', e
    if not builder.is_prepared():
      root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
      raise FileNotFoundError(
          f'tfds dataset {name!r} is not prepared in {builder.data_dir} (looked in '
          f'{looked_in}; {reason}). Set TFDS_DATA_DIR or data_dir to a folder holding a '
          'prepared copy, or prepare one on a machine with internet and TensorFlow: '
          f'python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\', '
          f'data_dir=\'{root}\').download_and_prepare(file_format=\'array_record\')"'
      ) from cause
  try:
    data_source = builder.as_data_source(split=split)
  except (ValueError, KeyError, NotImplementedError) as e:
    raise ValueError(f'Cannot read split {split!r} of tfds dataset {name!r} from '
                     f'{builder.data_dir}: {_one_line(e).rstrip(".")}; available splits: '
                     f'{list(builder.info.splits)}.') from e

  features = builder.info.features
  image_key = 'image' if 'image' in features else next(
      (k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
  if image_key is None:
    raise ValueError(f'tfds dataset {name!r} has no image feature (features: '
                     f'{list(features)}); pick an image dataset.')
  h, w, c = features[image_key].shape
  if c not in (1, 3):
    raise ValueError(f'tfds dataset {name!r} images have {c} channels; expected 1 or 3.')
  label_key, num_classes = None, None
  if 'label' in features and isinstance(features['label'], tfds.features.ClassLabel):
    label_key, num_classes = 'label', features['label'].num_classes

  where = f'tfds:{name}:{split}'
  fit_size = None
  if image_size is None:
    if h is None or w is None:
      raise ValueError(f'{where} has images of varying size ({h}x{w}); set image_size '
                       f'(config field data.image_size) and {_RESIZE_FIX}.')
    shape = (h, w, 3)
  else:
    if (h, w) != (image_size, image_size):
      if not resize:
        raise _size_error(where, (h, w), image_size)
      fit_size = image_size
    shape = (image_size, image_size, 3)
  return _TfdsSource(data_source, image_key, label_key, fit_size, description=where,
                     image_shape=shape, num_classes=num_classes)


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return text if len(text) <= 200 else text[:197] + '...'


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


def _check_layout(global_batch_size: int, num_local_devices: int, process_index: int,
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
  per_process = _check_layout(global_batch_size, num_local_devices, process_index,
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
  lo = process_index * per_process

  def plans():
    steps_per_epoch = n // global_batch_size
    epoch, order = None, None
    step = start_step
    while True:
      e, pos = divmod(step, steps_per_epoch)
      if e != epoch:
        epoch, order = e, np.random.default_rng((seed, e)).permutation(n)
      begin = pos * global_batch_size + lo
      yield order[begin:begin + per_process]
      step += 1

  return _load_batches(source, plans(), per_process, num_local_devices, prefetch=prefetch,
                       num_threads=num_threads, with_mask=False)


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
  per_process = _check_layout(global_batch_size, num_local_devices, process_index,
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
