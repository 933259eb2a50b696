"""vq.core.files: atomic writes leave the whole new file or the old one, readable by all."""

import os
import stat

import numpy as np
import pytest

from vq.core import files
from vq.core import images
from vq.core import weights


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_writes_the_bytes_readable_by_all(tmp_path):
  path = tmp_path / 'sub' / 'out.bin'
  files.atomic_write(path, lambda f: f.write(b'abc'))
  assert path.read_bytes() == b'abc'
  assert _mode(path) == 0o644
  assert os.listdir(path.parent) == ['out.bin']


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'out.bin'
  path.write_bytes(b'old')

  def fail(f):
    f.write(b'half')
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    files.atomic_write(path, fail)
  assert path.read_bytes() == b'old'
  assert os.listdir(tmp_path) == ['out.bin']


def test_png_and_npz_writers_go_through_it(tmp_path):
  images.save_png(tmp_path / 'a.png', np.zeros((4, 4, 3), np.uint8))
  weights.save_npz(tmp_path / 'b.npz', {'x': np.arange(3)})
  assert _mode(tmp_path / 'a.png') == 0o644 and _mode(tmp_path / 'b.npz') == 0o644
  with np.load(tmp_path / 'b.npz') as npz:
    np.testing.assert_array_equal(npz['x'], np.arange(3))
  assert sorted(os.listdir(tmp_path)) == ['a.png', 'b.npz']
