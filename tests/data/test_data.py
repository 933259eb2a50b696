"""Tests for vq.data: specs, the three source kinds, and batch order/layout.

Oracles are written out here independently: PIL/numpy for decoding and resizing, the
documented permutation formula for the training order, plain index sets for coverage.
"""

import io
import logging
import os
import threading
import time
import warnings

import chex
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vq import data

# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize('spec, expected', [
    ('tfds:cifar10:train', data.DatasetSpec('tfds', 'cifar10', 'train')),
    ('tfds:cifar10:test', data.DatasetSpec('tfds', 'cifar10', 'test')),
    ('tfds:cifar10:train[:1000]', data.DatasetSpec('tfds', 'cifar10', 'train[:1000]')),
    ('npz:/path/file.npz', data.DatasetSpec('npz', '/path/file.npz', None)),
    ('folder:/path/to/images', data.DatasetSpec('folder', '/path/to/images', None)),
    ('folder:rel/a:b', data.DatasetSpec('folder', 'rel/a:b', None)),
])
def test_parse_spec_good(spec, expected):
  assert data.parse_spec(spec) == expected


@pytest.mark.parametrize('spec', [
    '', 'cifar10', 'tfds:cifar10', 'tfds:cifar10:', 'tfds::train', 'npz:', 'folder:',
    'hf:cifar10:train', 'TFDS:cifar10:train', None,
])
def test_parse_spec_bad(spec):
  with pytest.raises(ValueError, match=r"Unknown dataset spec .*'tfds:NAME:SPLIT'") as e:
    data.parse_spec(spec)
  assert repr(spec) in str(e.value)
  assert '\n' not in str(e.value)


# ----------------------------------------------------------------------------- npz


def _random_images(n, h, w, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_npz_round_trip(tmp_path):
  images = _random_images(5, 4, 6)
  labels = np.array([3, 0, 1, 3, 2], np.int64)
  path = tmp_path / 'd.npz'
  np.savez(path, images=images, labels=labels)
  source = data.open_source(f'npz:{path}')
  assert len(source) == 5
  assert source.image_shape == (4, 6, 3)
  assert source.num_classes == 4
  assert source.skipped == []
  for i in range(5):
    ex = source[i]
    assert ex['image'].dtype == np.uint8
    np.testing.assert_array_equal(ex['image'], images[i])
    assert ex['label'] == labels[i] and isinstance(ex['label'], np.int32)
  np.testing.assert_array_equal(source[-1]['image'], images[4])
  with pytest.raises(IndexError):
    source[5]


def test_npz_without_labels_and_grayscale(tmp_path):
  gray = _random_images(3, 2, 2, c=1)
  path = tmp_path / 'g.npz'
  np.savez(path, images=gray)
  source = data.open_source(f'npz:{path}')
  assert source.num_classes is None
  assert source.image_shape == (2, 2, 3)
  ex = source[1]
  assert ex['label'] == -1
  np.testing.assert_array_equal(ex['image'], np.concatenate([gray[1]] * 3, axis=-1))


@pytest.mark.parametrize('arrays, match', [
    ({'pixels': np.zeros((2, 4, 4, 3), np.uint8)}, r'no key "images".*pixels'),
    ({'images': np.zeros((2, 4, 4, 3), np.float32)}, r'float32 \[2, 4, 4, 3\].*uint8'),
    ({'images': np.zeros((4, 4, 3), np.uint8)}, r'uint8 \[4, 4, 3\].*\[N, H, W, 3\]'),
    ({'images': np.zeros((2, 4, 4, 4), np.uint8)}, r'uint8 \[2, 4, 4, 4\]'),
    ({'images': np.zeros((0, 4, 4, 3), np.uint8)}, r'empty'),
    ({'images': np.zeros((2, 4, 4, 3), np.uint8), 'labels': np.zeros(3, np.int32)},
     r'"labels" is int32 \[3\].*shape \[2\]'),
    ({'images': np.zeros((2, 4, 4, 3), np.uint8), 'labels': np.zeros(2, np.float32)},
     r'"labels" is float32'),
])
def test_npz_bad_contents(tmp_path, arrays, match):
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=match) as e:
    data.open_source(f'npz:{path}')
  assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_npz_missing_or_not_npz(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    data.open_source(f'npz:{tmp_path}/nope.npz')
  text = tmp_path / 'text.npz'
  text.write_text('not a zip')
  with pytest.raises(ValueError, match=r'text.npz is not a readable .npz'):
    data.open_source(f'npz:{text}')
  single = tmp_path / 'single.npy'
  np.save(single, np.zeros((1, 2, 2, 3), np.uint8))
  with pytest.raises(ValueError, match=r'single ndarray, not an .npz'):
    data.open_source(f'npz:{single}')


def _crop_resize_oracle(image, size):
  """Center square crop and PIL bicubic resize, spelled out."""
  h, w = image.shape[:2]
  s = min(h, w)
  box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
  return np.asarray(Image.fromarray(image).crop(box).resize((size, size), Image.BICUBIC))


def test_npz_resize(tmp_path):
  images = _random_images(2, 6, 10)
  path = tmp_path / 'r.npz'
  np.savez(path, images=images)
  with pytest.raises(ValueError, match=r'6x10 \(HxW\) but image_size=4; pass resize=True'):
    data.open_source(f'npz:{path}', image_size=4)
  source = data.open_source(f'npz:{path}', image_size=4, resize=True)
  assert source.image_shape == (4, 4, 3)
  np.testing.assert_array_equal(source[1]['image'], _crop_resize_oracle(images[1], 4))
  # A constant image stays constant through crop and bicubic resize.
  const = np.full((1, 5, 7, 3), 77, np.uint8)
  np.savez(path, images=const)
  np.testing.assert_array_equal(
      data.open_source(f'npz:{path}', image_size=3, resize=True)[0]['image'], 77)


def test_take_keeps_a_prefix(tmp_path):
  images = _random_images(6, 2, 2)
  path = tmp_path / 't.npz'
  np.savez(path, images=images, labels=np.arange(6))
  source = data.open_source(f'npz:{path}')
  head = data.take(source, 4)
  assert len(head) == 4 and head.image_shape == (2, 2, 3) and head.num_classes == 6
  np.testing.assert_array_equal(np.stack([head[i]['image'] for i in range(4)]), images[:4])
  assert head[-1]['label'] == 3
  with pytest.raises(IndexError):
    head[4]
  assert len(data.take(source, 100)) == 6
  with pytest.raises(ValueError, match='num_examples >= 1; saw 0'):
    data.take(source, 0)
  got = list(data.eval_batches(head, global_batch_size=4, num_local_devices=2))
  assert len(got) == 1 and got[0]['mask'].all()


# ----------------------------------------------------------------------------- folder


@pytest.fixture
def image_folder(tmp_path):
  """A flat folder with png, jpg, grayscale, RGBA, palettes and two broken files."""
  root = tmp_path / 'imgs'
  root.mkdir()
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  smooth = np.broadcast_to(np.linspace(0, 255, 8, dtype=np.uint8)[None, :, None],
                           (8, 8, 3)).copy()
  gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
  rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
  palette = Image.fromarray(rgb).quantize(colors=16)
  Image.fromarray(rgb).save(root / 'a_rgb.png')
  Image.fromarray(smooth).save(root / 'b_photo.JPG', quality=95)
  Image.fromarray(gray).save(root / 'c_gray.png')
  Image.fromarray(rgba).save(root / 'd_rgba.png')
  palette.save(root / 'e_palette.gif')
  # Per-entry alpha is stored as bytes, which makes a plain P -> RGB convert warn.
  palette.save(root / 'e_palette_alpha.png', transparency=bytes(range(0, 160, 10)))
  (root / 'f_garbage.png').write_bytes(b'this is not an image')
  good_png = (root / 'a_rgb.png').read_bytes()
  (root / 'g_truncated.png').write_bytes(good_png[:len(good_png) // 2])
  (root / 'notes.txt').write_text('ignored: not an image extension')
  (root / '.hidden.png').write_bytes(b'ignored: hidden')
  expected = {
      'a_rgb.png': rgb,
      'b_photo.JPG': smooth,
      'c_gray.png': np.stack([gray] * 3, axis=-1),
      'd_rgba.png': rgba[..., :3],
      'e_palette.gif': np.asarray(palette.convert('RGB')),
      'e_palette_alpha.png': np.asarray(palette.convert('RGB')),
  }
  return root, expected


def test_folder_decodes_modes_and_skips_corrupt(image_folder, caplog):
  root, expected = image_folder
  with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    source = data.open_source(f'folder:{root}')
    examples = [source[i] for i in range(len(source))]
  assert not [w for w in caught if 'Palette' in str(w.message)]
  assert len(source) == len(expected)
  assert source.image_shape == (8, 8, 3)
  assert source.num_classes is None
  assert sorted(os.path.basename(f) for f, _ in source.skipped) == [
      'f_garbage.png', 'g_truncated.png']
  assert all(reason for _, reason in source.skipped)
  assert any('skipped 2 of 8' in r.getMessage() for r in caplog.records)
  for ex, name in zip(examples, sorted(expected)):  # sorted order is the index order.
    assert ex['label'] == -1
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (8, 8, 3)
    if name.endswith('.JPG'):  # lossy: close, not equal.
      assert np.abs(ex['image'].astype(int) - expected[name]).mean() < 3
    else:
      np.testing.assert_array_equal(ex['image'], expected[name], err_msg=name)


def test_folder_16_bit_and_exif_orientation(tmp_path):
  root = tmp_path / 'odd'
  root.mkdir()
  deep = np.random.default_rng(3).integers(0, 65536, (6, 4), dtype=np.uint16)
  Image.fromarray(deep).save(root / 'a_16bit.png')
  pixels = _random_images(1, 4, 6, seed=4)[0]
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: the stored image must be turned 90 degrees clockwise.
  Image.fromarray(pixels).save(root / 'b_rotated.png', exif=exif)
  source = data.open_source(f'folder:{root}')
  assert source.image_shape == (6, 4, 3)
  np.testing.assert_array_equal(source[0]['image'],
                                np.stack([(deep >> 8).astype(np.uint8)] * 3, axis=-1))
  np.testing.assert_array_equal(source[1]['image'], np.rot90(pixels, k=-1))


def test_folder_size_mismatch_and_resize(tmp_path):
  root = tmp_path / 'sizes'
  root.mkdir()
  small = _random_images(1, 8, 8)[0]
  wide = _random_images(1, 6, 12, seed=2)[0]
  Image.fromarray(small).save(root / 'a.png')
  Image.fromarray(wide).save(root / 'b.png')
  with pytest.raises(ValueError, match=r'mixes image sizes.*b.png is 6x12'):
    data.open_source(f'folder:{root}')
  with pytest.raises(ValueError, match=r'b.png .*6x12 \(HxW\) but image_size=8; pass '
                     r'resize=True \(config field data.resize\)') as e:
    data.open_source(f'folder:{root}', image_size=8)
  assert '\n' not in str(e.value)
  source = data.open_source(f'folder:{root}', image_size=4, resize=True)
  assert source.image_shape == (4, 4, 3)
  np.testing.assert_array_equal(source[0]['image'], _crop_resize_oracle(small, 4))
  np.testing.assert_array_equal(source[1]['image'], _crop_resize_oracle(wide, 4))


def test_folder_class_subfolders(tmp_path):
  root = tmp_path / 'classes'
  for cls, n in (('dog', 2), ('cat', 1), ('emu', 1)):
    (root / cls / 'deep').mkdir(parents=True)
    for k in range(n):
      Image.fromarray(_random_images(1, 4, 4, seed=k)[0]).save(root / cls / 'deep' / f'{k}.png')
  source = data.open_source(f'folder:{root}')
  assert source.num_classes == 3
  # Order: cat/0, dog/0, dog/1, emu/0; classes sorted by name.
  assert [int(source[i]['label']) for i in range(len(source))] == [0, 1, 1, 2]


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing_dir'):
    data.open_source(f'folder:{tmp_path}/missing_dir')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match=r'has no image files'):
    data.open_source(f'folder:{empty}')
  (empty / 'x.png').write_bytes(b'junk')
  with pytest.raises(ValueError, match=r'None of the 1 image files .* could be decoded'):
    data.open_source(f'folder:{empty}')


# ----------------------------------------------------------------------------- tfds


def test_tfds_cifar10_shared_copy():
  for split, n in (('train', 50000), ('test', 10000)):
    start = time.perf_counter()
    source = data.open_source(f'tfds:cifar10:{split}', download=False)
    assert time.perf_counter() - start < 20
    assert len(source) == n
    assert source.image_shape == (32, 32, 3)
    assert source.num_classes == 10
    for i in (0, n - 1):
      ex = source[i]
      assert ex['image'].dtype == np.uint8 and ex['image'].shape == (32, 32, 3)
      assert 0 <= ex['label'] < 10
  assert len(data.open_source('tfds:cifar10:train[:100]', download=False)) == 100


def test_tfds_images_decode_with_opencv_to_the_stored_png_pixels():
  """requirements.txt pins OpenCV so tfds decodes with it; pixels equal PIL's PNG decode."""
  from tensorflow_datasets.core.features import image_feature  # pylint: disable=g-import-not-at-top
  assert image_feature.cv2 is not None, 'tfds did not pick up OpenCV'
  source = data.open_source('tfds:cifar10:test', download=False)
  builder = tfds.builder('cifar10')
  raw = builder.as_data_source(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  indices = list(range(0, 10_000, 97))
  for i, example in zip(indices, raw.__getitems__(indices)):
    with Image.open(io.BytesIO(example['image'])) as png:
      assert png.format == 'PNG'
      np.testing.assert_array_equal(source[i]['image'], np.asarray(png.convert('RGB')))


def test_tfds_resize_rule_and_bad_names():
  with pytest.raises(ValueError, match=r'32x32 \(HxW\) but image_size=16; pass resize=True'):
    data.open_source('tfds:cifar10:test', image_size=16, download=False)
  plain = data.open_source('tfds:cifar10:test', download=False)
  small = data.open_source('tfds:cifar10:test', image_size=16, resize=True, download=False)
  assert small.image_shape == (16, 16, 3)
  np.testing.assert_array_equal(small[3]['image'],
                                _crop_resize_oracle(plain[3]['image'], 16))
  with pytest.raises(ValueError, match=r"split 'validation'.*\['train', 'test'\]"):
    data.open_source('tfds:cifar10:validation', download=False)
  with pytest.raises(ValueError, match=r"no dataset named 'not_a_dataset_xyz'"):
    data.open_source('tfds:not_a_dataset_xyz:train', download=False)


def test_tfds_offline_without_prepared_copy(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.open_source('tfds:cifar10:train', data_dir=str(tmp_path), download=False)
  msg = str(e.value)
  assert '\n' not in msg
  for part in ('not prepared', str(tmp_path), 'TFDS_DATA_DIR', 'download=False',
               "download_and_prepare(file_format='array_record')"):
    assert part in msg, part


def test_tfds_download_failure_is_one_clear_error(tmp_path, monkeypatch):
  real_builder = tfds.builder
  calls = []

  def offline_builder(*args, **kwargs):
    builder = real_builder(*args, **kwargs)

    def fail(**kwargs):
      calls.append(kwargs)
      raise OSError('Network is unreachable')

    builder.download_and_prepare = fail
    return builder

  monkeypatch.setattr(tfds, 'builder', offline_builder)
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'downloading failed: OSError: Network is '
                     r'unreachable.*TFDS_DATA_DIR') as e:
    data.open_source('tfds:cifar10:train')
  assert f'TFDS_DATA_DIR={tmp_path}' in str(e.value)
  assert calls == [{'file_format': 'array_record'}]
  assert isinstance(e.value.__cause__, OSError)


# ----------------------------------------------------------------------------- batches


def _indexed_source(tmp_path, n, h=2, w=3):
  """An npz source whose label is the example index, so batches reveal their rows."""
  images = _random_images(n, h, w, seed=n)
  path = tmp_path / f'idx{n}.npz'
  np.savez(path, images=images, labels=np.arange(n))
  return data.open_source(f'npz:{path}'), images


def _take(iterator, k):
  out = [next(iterator) for _ in range(k)]
  iterator.close()
  return out


def test_train_batches_order_values_and_shapes(tmp_path):
  n, batch, seed = 22, 8, 5
  source, images = _indexed_source(tmp_path, n)
  got = _take(data.train_batches(source, global_batch_size=batch, num_local_devices=4,
                                 seed=seed), 7)
  steps_per_epoch = n // batch  # 2: the last 6 of each epoch's order are dropped.
  for step, b in enumerate(got):
    chex.assert_shape(b['image'], (4, 2, 2, 3, 3))
    chex.assert_shape(b['label'], (4, 2))
    assert b['image'].dtype == np.float32 and b['label'].dtype == np.int32
    assert b['image'].min() >= -1 and b['image'].max() <= 1
    epoch, pos = divmod(step, steps_per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(n)
    want = order[pos * batch:(pos + 1) * batch]
    np.testing.assert_array_equal(b['label'].reshape(-1), want)
    np.testing.assert_allclose(b['image'].reshape(batch, 2, 3, 3),
                               images[want].astype(np.float64) / 127.5 - 1, atol=1e-6)


def test_train_batches_epochs_are_permutations(tmp_path):
  n, batch = 20, 5
  source, _ = _indexed_source(tmp_path, n)
  got = _take(data.train_batches(source, global_batch_size=batch, num_local_devices=1,
                                 seed=0, prefetch=0, num_threads=1), 12)
  epochs = [np.concatenate([b['label'].ravel() for b in got[e * 4:(e + 1) * 4]])
            for e in range(3)]
  for labels in epochs:
    np.testing.assert_array_equal(np.sort(labels), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch.


def test_train_batches_deterministic_and_resumable(tmp_path):
  source, _ = _indexed_source(tmp_path, 30)
  kwargs = dict(global_batch_size=8, num_local_devices=2)
  run = _take(data.train_batches(source, seed=3, **kwargs), 10)
  again = _take(data.train_batches(source, seed=3, num_threads=2, prefetch=0, **kwargs), 10)
  other = _take(data.train_batches(source, seed=4, **kwargs), 10)
  for k in (0, 5):  # 5 is past the first epoch boundary (3 steps per epoch).
    resumed = _take(data.train_batches(source, seed=3, start_step=k, **kwargs), 10 - k)
    for a, b in zip(run[k:], resumed):
      chex.assert_trees_all_equal(a, b)
  for a, b in zip(run, again):
    chex.assert_trees_all_equal(a, b)
  assert any(not np.array_equal(a['label'], b['label']) for a, b in zip(run, other))


def test_train_batches_processes_split_the_global_batch(tmp_path):
  source, _ = _indexed_source(tmp_path, 25)
  kwargs = dict(global_batch_size=8, seed=9)
  single = _take(data.train_batches(source, num_local_devices=4, **kwargs), 6)
  per_process = [
      _take(data.train_batches(source, num_local_devices=2, process_index=p,
                               process_count=2, **kwargs), 6) for p in range(2)]
  for step in range(6):
    p0, p1 = per_process[0][step]['label'], per_process[1][step]['label']
    chex.assert_shape([p0, p1], (2, 2))
    assert not set(p0.ravel()) & set(p1.ravel())
    np.testing.assert_array_equal(np.concatenate([p0.ravel(), p1.ravel()]),
                                  single[step]['label'].ravel())


@pytest.mark.parametrize('kwargs, match', [
    (dict(global_batch_size=10, num_local_devices=4), r'global_batch_size=10 is not '
     r'divisible by process_count \* num_local_devices = 1 \* 4 = 4.*e.g. 12'),
    (dict(global_batch_size=8, num_local_devices=2, process_count=3, process_index=0),
     r'= 3 \* 2 = 6'),
    (dict(global_batch_size=16, num_local_devices=1), r'global_batch_size=16 exceeds the '
     r'12 examples'),
    (dict(global_batch_size=4, num_local_devices=1, process_index=2, process_count=2),
     r'process_index=2 is outside'),
    (dict(global_batch_size=4, num_local_devices=1, seed=-1), r'seed must be'),
])
def test_train_batches_layout_errors(tmp_path, kwargs, match):
  source, _ = _indexed_source(tmp_path, 12)
  kwargs = {'seed': 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    data.train_batches(source, **kwargs)


def test_train_batches_close_stops_threads_and_errors_propagate(tmp_path):
  source, _ = _indexed_source(tmp_path, 16)
  it = data.train_batches(source, global_batch_size=4, num_local_devices=1, seed=0,
                          num_threads=3)
  next(it)
  it.close()
  deadline = time.time() + 5
  while (any(t.name.startswith('vq-data') for t in threading.enumerate())
         and time.time() < deadline):
    time.sleep(0.05)
  assert not any(t.name.startswith('vq-data') for t in threading.enumerate())

  class Broken(type(source)):

    def _get_many(self, indices):
      raise OSError('disk went away')

  broken = Broken(np.zeros((4, 2, 2, 3), np.uint8), None, description='broken',
                  num_classes=None)
  with pytest.raises(OSError, match='disk went away'):
    next(data.train_batches(broken, global_batch_size=2, num_local_devices=1, seed=0))


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize('n, batch, devices, processes', [
    (11, 4, 2, 1),   # N not a multiple of B.
    (11, 4, 1, 2),   # two processes.
    (13, 8, 2, 2),   # the second process gets a fully masked last batch.
    (3, 8, 2, 2),    # B > N: process 1 only yields padding.
    (12, 4, 2, 1),   # exact multiple: no padding.
])
def test_eval_batches_count_every_example_once(tmp_path, n, batch, devices, processes):
  source, images = _indexed_source(tmp_path, n)
  per_device = batch // (processes * devices)
  seen = []
  for p in range(processes):
    got = list(data.eval_batches(source, global_batch_size=batch, num_local_devices=devices,
                                 process_index=p, process_count=processes))
    assert len(got) == -(-n // batch) == data.num_eval_batches(n, batch)
    for b in got:
      chex.assert_shape(b['image'], (devices, per_device, 2, 3, 3))
      chex.assert_shape([b['label'], b['mask']], (devices, per_device))
      assert b['mask'].dtype == bool and b['label'].dtype == np.int32
      mask = b['mask']
      labels = b['label'][mask]
      seen.extend(labels.tolist())
      np.testing.assert_allclose(b['image'][mask],
                                 images[labels].astype(np.float64) / 127.5 - 1, atol=1e-6)
      assert np.all(b['image'][~mask] == 0) and np.all(b['label'][~mask] == 0)
  assert sorted(seen) == list(range(n))


def test_eval_batches_in_order_and_layout_error(tmp_path):
  source, _ = _indexed_source(tmp_path, 10)
  got = list(data.eval_batches(source, global_batch_size=4, num_local_devices=2))
  flat = np.concatenate([b['label'].ravel()[b['mask'].ravel()] for b in got])
  np.testing.assert_array_equal(flat, np.arange(10))
  with pytest.raises(ValueError, match='not divisible'):
    data.eval_batches(source, global_batch_size=6, num_local_devices=4)


@pytest.mark.parametrize('n, batch, want', [(0, 4, 0), (1, 4, 1), (8, 4, 2), (9, 4, 3)])
def test_num_eval_batches(n, batch, want):
  assert data.num_eval_batches(n, batch) == want


# ----------------------------------------------------------------------------- conversion


def test_to_float_and_to_uint8():
  x = np.arange(256, dtype=np.uint8)
  f = data.to_float(x)
  assert f.dtype == np.float32
  np.testing.assert_allclose(f, x.astype(np.float64) / 127.5 - 1, atol=1e-7)
  assert f[0] == -1 and f[255] == 1
  np.testing.assert_array_equal(data.to_uint8(f), x)
  np.testing.assert_array_equal(
      data.to_uint8(np.array([-3.0, 2.0, np.nan, -1 + 0.6 / 127.5, -1 + 0.4 / 127.5])),
      [0, 255, 0, 1, 0])
  fj = data.to_float(jnp.asarray(x))
  assert isinstance(fj, jnp.ndarray) and fj.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(fj), f, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(data.to_uint8(fj)), x)
  with pytest.raises(ValueError, match='expects uint8 images; saw dtype float32'):
    data.to_float(f)
