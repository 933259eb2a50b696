"""Safe storage for pretrained weights: flat .npz files, never pickles.

  tree = {'conv1': {'kernel': k, 'bias': b}}
  save_npz('/tmp/net.npz', flatten_tree(tree))
  tree = unflatten_tree(load_npz('/tmp/net.npz'))

A pickle can run arbitrary code when it is loaded, so files reached through a user-supplied path
are only ever read as .npz with `allow_pickle=False`, after a content check that turns pickles
(raw or inside a torch zip) away with an error that says what to do instead.
"""

import os
import pathlib
from typing import Any, Mapping
import zipfile

import numpy as np

from vq.core import files

_SEP = '/'
_PICKLE_PROTO = b'\x80'  # Opcode that opens every pickle of protocol 2 or later.
_ZIP_MAGIC = b'PK\x03\x04'


def flatten_tree(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flattens nested dicts of arrays to {'a/b/c': array} for storage in an .npz."""
  flat = {}
  for key, value in tree.items():
    if _SEP in key:
      raise ValueError(f'Tree key {key!r} contains {_SEP!r}, which flat keys use as separator; '
                       'rename it.')
    if isinstance(value, Mapping):
      for sub_key, leaf in flatten_tree(value).items():
        flat[f'{key}{_SEP}{sub_key}'] = leaf
    else:
      flat[key] = np.asarray(value)
  return flat


def unflatten_tree(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of `flatten_tree`."""
  tree: dict[str, Any] = {}
  for key, leaf in flat.items():
    *parents, name = key.split(_SEP)
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = leaf
  return tree


def ensure_not_pickle(path: str | os.PathLike[str]) -> None:
  """Raises ValueError if the file at `path` is a pickle or a torch zip checkpoint.

  The check reads the content, not the file name, so a pickle renamed to .npz is refused too.
  """
  path = pathlib.Path(path)
  with open(path, 'rb') as f:
    head = f.read(4)
  hint = ('convert it to .npz in a trusted environment (e.g. numpy arrays from '
          'state_dict().items() written with numpy.savez) and pass that file instead')
  if head[:1] == _PICKLE_PROTO:
    raise ValueError(f'Refusing to load {path}: it is a pickle, which can run code when loaded; '
                     f'{hint}.')
  if head == _ZIP_MAGIC:
    try:
      with zipfile.ZipFile(path) as archive:
        not_npy = [n for n in archive.namelist() if not n.endswith('.npy')]
    except zipfile.BadZipFile as e:
      raise ValueError(f'{path} starts like a zip but is not readable as one ({e}); '
                       'delete it or write it again with numpy.savez.') from e
    if not_npy:
      raise ValueError(f'Refusing to load {path}: it is a zip with non-.npy members '
                       f'(e.g. {not_npy[0]!r}), like a torch checkpoint holding pickles; {hint}.')


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads every array of an .npz file into memory, refusing pickles of any kind.

  Raises:
    FileNotFoundError: if there is no file at `path`.
    ValueError: if the file is a pickle, a torch checkpoint or not an .npz archive.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No weights file at {path}; check the path.')
  ensure_not_pickle(path)
  with open(path, 'rb') as f:
    is_zip = f.read(4) == _ZIP_MAGIC
  if not is_zip:
    raise ValueError(f'{path} is not an .npz archive; pass a file written with numpy.savez.')
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f'Could not read {path} as an .npz archive ({e}); delete it or pass a file '
                     'written with numpy.savez.') from e


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` to `path` as an .npz, atomically so a crash never leaves half a file."""
  files.atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v)
                                                    for k, v in arrays.items()}))
