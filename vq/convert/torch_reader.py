"""PyTorch checkpoint files read without torch and without running any code they hold.

Usage sketch::

  tree = torch_reader.read_checkpoint('/tmp/last.ckpt')   # nested dicts, lists, tensors
  sd = torch_reader.pick_state_dict(tree, ('state_dict',), '/tmp/last.ckpt')
  kernel = np.asarray(sd['encoder.conv_in.weight'])        # loaded on first use

A torch checkpoint is a pickle, and unpickling can call any importable function. This
reader runs the pickle through an unpickler that imports nothing: the only callables it
hands out are its own tensor builders (for `torch._utils._rebuild_tensor_v2` and friends)
and `collections.OrderedDict`. Globals of the bookkeeping objects training loops store
beside the weights (Lightning's callback classes used as dict keys, LlamaGen's
`argparse.Namespace` of arguments, omegaconf containers, numpy scalars) become inert
`Opaque` records that only remember their name and arguments; any other global (`os.system`,
`builtins.eval`, `subprocess.Popen`, ...) is refused with a `ValueError`.

This reads files that `torch.load(weights_only=True)` refuses: torch 2.13's restricted
loader stops at the `argparse.Namespace` in LlamaGen's checkpoints and at the callback
classes Lightning 1.0 (taming-transformers) uses as dict keys. Both torch formats are
read: the zip archive of torch >= 1.6 and the older stream format (magic number, pickles,
then raw storages). Tensor data stays on disk until a tensor is converted to numpy, so a
checkpoint's optimizer state costs nothing.

`read_checkpoint(path, reader='torch')` uses `torch.load(path, weights_only=True)` instead,
where torch is installed (it is imported only then).
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import zipfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np

READERS = ('builtin', 'torch')
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b'PK\x03\x04'

# torch storage classes (pickled as globals 'torch.<Name>Storage') and their numpy dtypes.
_STORAGE_DTYPES = {
    'FloatStorage': np.dtype('float32'), 'DoubleStorage': np.dtype('float64'),
    'HalfStorage': np.dtype('float16'), 'BFloat16Storage': 'bfloat16',
    'LongStorage': np.dtype('int64'), 'IntStorage': np.dtype('int32'),
    'ShortStorage': np.dtype('int16'), 'CharStorage': np.dtype('int8'),
    'ByteStorage': np.dtype('uint8'), 'BoolStorage': np.dtype('bool'),
}
# Modules whose globals may appear in a checkpoint as bookkeeping (never as weights); they
# become `Opaque` records and are never imported.
_RECORD_MODULES = ('pytorch_lightning', 'lightning', 'lightning_fabric', 'argparse', 'omegaconf',
                   'numpy', 'torch', 'collections', 'pathlib', 'typing', 'enum', 'datetime',
                   'functools', '_codecs', 'builtins', '__builtin__', 'fractions', 'decimal')
# ...except these builtins, which no training loop stores and exploits reach for (protocol 2
# pickles name the module '__builtin__').
_NEVER_BUILTINS = {'eval', 'exec', 'execfile', 'compile', 'open', 'file', 'getattr', 'setattr',
                   'delattr', '__import__', 'globals', 'locals', 'vars', 'input', 'breakpoint',
                   'apply', 'reload', 'type', 'object', 'super'}


def _bfloat16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top  # a jax dependency
  return np.dtype(ml_dtypes.bfloat16)


class Opaque:
  """An inert stand-in for an object of a class the reader does not import.

  Calling it, instantiating it or restoring state into it only records the arguments.
  """
  _name = 'Opaque'

  def __new__(cls, *args, **kwargs):
    # Set here, not in __init__: pickle's NEWOBJ creates objects without calling __init__.
    self = super().__new__(cls)
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
    return self

  def __init__(self, *args, **kwargs):
    del args, kwargs  # recorded by __new__

  def __setstate__(self, state):
    self.state = state

  def append(self, item):
    self.items.append(item)

  def extend(self, items):
    self.items.extend(items)

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def __repr__(self):
    return f'Opaque({self._name})'


class _Storage:
  """A torch storage: its dtype, its element count and how to read its bytes."""

  def __init__(self, dtype: Any, numel: int, read: Callable[[], bytes], byteorder: str):
    self.dtype, self.numel, self._read, self._byteorder = dtype, numel, read, byteorder
    self._array = None

  def array(self) -> np.ndarray:
    if self._array is None:
      dtype = _bfloat16() if self.dtype == 'bfloat16' else self.dtype
      raw = self._read()
      if len(raw) < self.numel * dtype.itemsize:
        raise ValueError(f'a storage of {self.numel} {dtype} elements holds only {len(raw)} '
                         'bytes; the checkpoint is truncated or damaged.')
      array = np.frombuffer(raw, dtype, count=self.numel)
      if self._byteorder == 'big' and dtype.itemsize > 1:
        array = array.byteswap()
      self._array = array
    return self._array


class TensorRef:
  """A tensor of the checkpoint, read from disk when converted with `np.asarray`.

  Attributes:
    shape: the tensor's shape.
    dtype: its numpy dtype ('bfloat16' for bfloat16, which `np.asarray` widens to float32).
  """

  def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...],
               stride: tuple[int, ...]):
    self._storage, self._offset, self.shape, self._stride = storage, offset, shape, stride
    self.dtype = storage.dtype
    # Bounds first: as_strided on numbers from a file must never reach outside the storage.
    if any(s < 0 for s in shape) or any(s < 0 for s in stride) or offset < 0:
      raise ValueError(f'tensor of shape {shape} with strides {stride} at offset {offset}: '
                       'negative values; the checkpoint is damaged.')
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else -1
    if last >= storage.numel:
      raise ValueError(f'tensor of shape {shape} with strides {stride} at offset {offset} '
                       f'reaches past its storage of {storage.numel} elements; the checkpoint '
                       'is damaged.')

  def __array__(self, dtype=None, copy=None):
    del copy
    base = self._storage.array()
    if not all(self.shape):
      out = np.zeros(self.shape, base.dtype)
    else:
      item = base.dtype.itemsize
      out = np.lib.stride_tricks.as_strided(
          base[self._offset:], self.shape, tuple(s * item for s in self._stride),
          writeable=False).copy()
    if self.dtype == 'bfloat16':
      out = out.astype(np.float32)
    return out if dtype is None else out.astype(dtype)

  def __repr__(self):
    return f'TensorRef(shape={self.shape}, dtype={self.dtype})'


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> TensorRef:
  del unused  # requires_grad, backward_hooks, metadata: not part of the values
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'a tensor rebuilt from {type(storage).__name__}, not a '
                                 'storage of the file')
  ints = lambda t: isinstance(t, (tuple, list)) and all(type(v) is int for v in t)  # pylint: disable=unidiomatic-typecheck
  if type(storage_offset) is not int or not ints(size) or not ints(stride) or (  # pylint: disable=unidiomatic-typecheck
      len(size) != len(stride)):
    raise pickle.UnpicklingError(f'a tensor with offset {storage_offset!r}, size {size!r} and '
                                 f'stride {stride!r}')
  return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  del unused  # requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state  # a tensor subclass (Parameter): its values are the tensor's
  if func not in (_rebuild_tensor, _rebuild_parameter):
    raise pickle.UnpicklingError('a tensor subclass rebuilt by an unknown function')
  return func(*args)


_FUNCTIONS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Unpickler(pickle.Unpickler):
  """Resolves globals without importing; storages come from `storage(pid)`."""

  def __init__(self, file, storage: Callable[[tuple], _Storage] | None, source: str):
    super().__init__(file)
    self._storage, self._source = storage, source
    self._records: dict[tuple[str, str], type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _FUNCTIONS:
      return _FUNCTIONS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    top = module.split('.')[0]
    builtin = module in ('builtins', '__builtin__')
    if top in _RECORD_MODULES and not (builtin and name in _NEVER_BUILTINS):
      key = (module, name)
      if key not in self._records:
        self._records[key] = type(name, (Opaque,), {'_name': f'{module}.{name}'})
      return self._records[key]
    raise pickle.UnpicklingError(
        f'refusing to load {self._source}: its pickle calls {module}.{name}, which is neither '
        'a tensor nor a record a training loop stores, and unpickling it could run code')

  def persistent_load(self, pid: Any) -> Any:
    if self._storage is None or not isinstance(pid, tuple) or not pid or pid[0] not in (
        'storage', b'storage'):
      raise pickle.UnpicklingError(f'refusing to load {self._source}: persistent id '
                                   f'{str(pid)[:80]!r} is not a tensor storage')
    return self._storage(pid)


def _storage_args(pid: tuple, source: str) -> tuple[_StorageType, str, int]:
  if len(pid) < 5 or not isinstance(pid[1], _StorageType) or type(pid[4]) is not int:  # pylint: disable=unidiomatic-typecheck
    raise pickle.UnpicklingError(f'{source}: malformed storage id {str(pid)[:120]}')
  return pid[1], str(pid[2]), pid[4]


def _read_zip(path: pathlib.Path, source: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
  pickles = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
  if len(pickles) != 1:
    raise ValueError(f'{source} is a zip but not a torch checkpoint (no single '
                     '<archive>/data.pkl inside); pass the .ckpt/.pt file torch.save wrote.')
  prefix = pickles[0][:-len('data.pkl')]
  byteorder = 'little'
  storages: dict[str, _Storage] = {}

  def read_member(member: str) -> Callable[[], bytes]:
    def read() -> bytes:
      with zipfile.ZipFile(path) as archive:
        return archive.read(member)
    return read

  with zipfile.ZipFile(path) as archive:
    if f'{prefix}byteorder' in names:
      byteorder = archive.read(f'{prefix}byteorder').decode('ascii', 'replace').strip()
    data = archive.read(pickles[0])

  def storage(pid: tuple) -> _Storage:
    storage_type, key, numel = _storage_args(pid, source)
    member = f'{prefix}data/{key}'
    if member not in names:
      raise pickle.UnpicklingError(f'{source}: storage {key!r} is not in the archive')
    if key not in storages:
      storages[key] = _Storage(storage_type.dtype, numel, read_member(member), byteorder)
    return storages[key]

  return _Unpickler(io.BytesIO(data), storage, source).load()


def _read_legacy(path: pathlib.Path, source: str) -> Any:
  """torch < 1.6's format: magic, protocol, sys info, the object, keys, raw storages."""
  with open(path, 'rb') as f:
    header = [_Unpickler(f, None, source).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
      raise ValueError(f'{source} is a pickle but not a torch checkpoint (magic '
                       f'{str(header[0])[:30]}); pass the file torch.save wrote.')
    byteorder = 'little' if (header[2] or {}).get('little_endian', True) else 'big'
    found: dict[str, tuple[_StorageType, int]] = {}
    storages: dict[str, _Storage] = {}
    offsets: dict[str, int] = {}

    def read_at(key: str) -> Callable[[], bytes]:
      def read() -> bytes:
        with open(path, 'rb') as g:
          g.seek(offsets[key])
          return g.read(storages[key].numel * _itemsize(storages[key].dtype))
      return read

    def storage(pid: tuple) -> _Storage:
      storage_type, key, numel = _storage_args(pid, source)
      if len(pid) > 5 and pid[5] is not None:
        raise pickle.UnpicklingError(f'{source}: storage views (torch < 1.0 files) are not '
                                     'supported; load and save the file again with torch')
      found.setdefault(key, (storage_type, numel))
      if key not in storages:
        storages[key] = _Storage(storage_type.dtype, numel, read_at(key), byteorder)
      return storages[key]

    result = _Unpickler(f, storage, source).load()
    keys = _Unpickler(f, None, source).load()
    if not isinstance(keys, list) or set(keys) != set(found):
      raise ValueError(f'{source}: the storage list does not match the tensors; the file is '
                       'damaged.')
    for key in keys:
      size = int.from_bytes(f.read(8), byteorder)  # elements, as torch writes them
      offsets[key] = f.tell()
      f.seek(size * _itemsize(storages[key].dtype), os.SEEK_CUR)
  return result


def _itemsize(dtype: Any) -> int:
  return 2 if dtype == 'bfloat16' else dtype.itemsize


def _read_with_torch(path: pathlib.Path) -> Any:
  import torch  # pylint: disable=g-import-not-at-top  # only this reader needs torch

  def to_numpy(x):
    if isinstance(x, torch.Tensor):
      x = x.detach().cpu()
      return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if isinstance(x, Mapping):
      return {k: to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return type(x)(to_numpy(v) for v in x)
    return x

  try:
    tree = torch.load(path, map_location='cpu', weights_only=True)
  except (pickle.UnpicklingError, RuntimeError) as e:
    first = next((line.strip() for line in str(e).splitlines() if 'Unsupported' in line),
                 str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise ValueError(f'torch.load(weights_only=True) refused {path} ({first[:300]}); '
                     '--reader=builtin reads such records without running them.') from None
  return to_numpy(tree)


def read_checkpoint(path: str | os.PathLike, reader: str = 'builtin') -> Any:
  """The object a torch checkpoint file holds, with tensors as `TensorRef`s (or numpy).

  Args:
    path: a file written by `torch.save` (zip or the older stream format).
    reader: 'builtin' (this module's restricted unpickler, no torch needed) or 'torch'
      (`torch.load(weights_only=True)`, tensors as numpy arrays).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not a torch checkpoint, damaged, or its pickle would call a function
      outside the tensor builders (the message names it).
  """
  path = pathlib.Path(path)
  if reader not in READERS:
    raise ValueError(f'reader={reader!r} is unknown; choose one of {READERS}.')
  if not path.is_file():
    raise FileNotFoundError(f'No checkpoint at {path}; check the path.')
  if reader == 'torch':
    return _read_with_torch(path)
  with open(path, 'rb') as f:
    head = f.read(4)
  try:
    if head == _ZIP_MAGIC:
      return _read_zip(path, str(path))
    if head[:1] == b'\x80':
      return _read_legacy(path, str(path))
  except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, KeyError,
          IndexError, zipfile.BadZipFile) as e:
    message = str(e)
    if not message.startswith(('refusing', str(path))):
      message = f'{path} could not be read as a torch checkpoint ({type(e).__name__}: {e})'
    raise ValueError(f'{message}.') from None
  raise ValueError(f'{path} is not a torch checkpoint (it starts with {head!r}, neither a zip '
                   'nor a pickle); pass the .ckpt/.pt file torch.save wrote.')


def pick_state_dict(tree: Any, keys: Sequence[str], source: str) -> dict[str, Any]:
  """The state dict inside a checkpoint: `tree[k]` for the first of `keys` present, else
  `tree` itself when it already maps parameter names to tensors."""
  if not isinstance(tree, Mapping):
    raise ValueError(f'{source} holds a {type(tree).__name__}, not a dict of weights; pass '
                     'a checkpoint written with torch.save of a dict or a state_dict().')
  for key in keys:
    if key in tree:
      tree = tree[key]
      break
  else:
    if not any(isinstance(v, (TensorRef, np.ndarray)) for v in tree.values()):
      raise ValueError(f'{source} has no {" or ".join(map(repr, keys))} entry (top-level keys: '
                       f'{sorted(map(str, tree))[:12]}); pass the training checkpoint.')
  if not isinstance(tree, Mapping):
    raise ValueError(f'{source}: the state dict is a {type(tree).__name__}, not a dict.')
  return {str(k): v for k, v in tree.items() if isinstance(v, (TensorRef, np.ndarray))}
