"""Dataset specs and the readers behind them: tfds, npz and image folders.

Usage sketch::

  from vq import data

  train = data.open_source('tfds:cifar10:train')   # or 'npz:/x.npz', 'folder:/imgs'
  test = data.take(data.open_source('tfds:cifar10:test', image_size=32), 1000)

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

from concurrent import futures
import dataclasses
import os
import zipfile

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps

from vq.data.sources import ArraySource
from vq.data.sources import ImageSource
from vq.data.sources import RESIZE_FIX
from vq.data.sources import fit_image
from vq.data.sources import one_line
from vq.data.sources import size_error

_SPEC_FORMS = ("'tfds:NAME:SPLIT' (e.g. 'tfds:cifar10:train'), 'npz:/path/file.npz' "
               "or 'folder:/path/to/images'")
_IMAGE_EXTENSIONS = frozenset(
    ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff'))
# Folder scans decode every file; PIL releases the GIL while decoding.
_SCAN_THREADS = 8


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
        image = fit_image(image, self._size)
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
        image = fit_image(image, self._size)
      label = -1 if self._label_key is None else int(ex[self._label_key])
      out.append((image, label))
    return out


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


def _open_npz(path: str, *, image_size: int | None, resize: bool) -> ImageSource:
  expected = 'uint8 images [N, H, W, 3] (or [N, H, W, 1]) and optional int labels [N]'
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No npz file at {path}; expected a file from '
                            'np.savez(path, images=..., labels=...).')
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path} is not a readable .npz file ({one_line(e)}); expected '
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
      raise ValueError(f'{path} holds object arrays ({one_line(e)}); expected '
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
      raise size_error(f'npz:{path}', images.shape[1:3], image_size)
    images = np.stack([fit_image(im, image_size) for im in images])
  return ArraySource(images, labels, description=f'npz:{path}', num_classes=num_classes)


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
    return None, f'{type(e).__name__}: {one_line(e)}'


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
                       f'(config field data.image_size) and {RESIZE_FIX}.')
    shape = (*sizes[0], 3)
    fit_size = None
  else:
    odd = [i for i, hw in enumerate(sizes) if hw != (image_size, image_size)]
    if odd and not resize:
      first = odd[0]
      raise size_error(f'{paths[first]} ({len(odd)} of {len(paths)} files differ)',
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
        reason, cause = f'downloading failed: {type(e).__name__}: {one_line(e)}', e
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
                     f'{builder.data_dir}: {one_line(e).rstrip(".")}; available splits: '
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
                       f'(config field data.image_size) and {RESIZE_FIX}.')
    shape = (h, w, 3)
  else:
    if (h, w) != (image_size, image_size):
      if not resize:
        raise size_error(where, (h, w), image_size)
      fit_size = image_size
    shape = (image_size, image_size, 3)
  return _TfdsSource(data_source, image_key, label_key, fit_size, description=where,
                     image_shape=shape, num_classes=num_classes)
