"""Atomic file writing: a reader never sees half a file, and a failed write loses nothing.

  files.atomic_write('/tmp/out.npz', lambda f: np.savez(f, x=x))

The bytes go to a temporary file in the destination's folder, which then replaces the
destination in one `os.replace`. If `write` raises, the temporary file is removed and an
existing destination is left as it was. The result is readable by everyone (0o644), as an
ordinary `open(path, 'wb')` under the usual umask would leave it; `tempfile.mkstemp` alone
makes files owner-only.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import BinaryIO, Callable

MODE = 0o644


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
  """Calls `write(f)` on a binary file object that becomes `path` once `write` returns."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:  # a file object: numpy adds no '.npz' to the name
      write(f)
    os.chmod(tmp, MODE)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
