"""The torch checkpoint reader: torch's two file formats read bit for bit, pickles that would
run code refused before anything runs.

tests/convert/fixtures/reader.npz holds a dict of tensors saved by torch 2.13 in its zip
format and in its older stream format, and the arrays torch loads back from them
(tools/make_convert_fixtures.py). The malicious files are built here, opcode by opcode.
"""

import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from vq.convert import torch_reader

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def _global(module, name):
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _str(text):
  data = text.encode()
  return b'X' + len(data).to_bytes(4, 'little') + data


def _call_pickle(module, name, arg):
  """Protocol-2 pickle of `module.name(arg)`: GLOBAL, the argument tuple, REDUCE."""
  return b'\x80\x02' + _global(module, name) + _str(arg) + b'\x85R.'


def _torch_zip(path, data_pkl, storages=None):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', data_pkl)
    archive.writestr('archive/version', '3\n')
    for key, raw in (storages or {}).items():
      archive.writestr(f'archive/data/{key}', raw)


def _tensor_pickle(numel, size, stride):
  """{'w': _rebuild_tensor_v2(FloatStorage '0' of numel, 0, size, stride, False, OrderedDict())}."""
  storage_id = (b'(' + _str('storage') + _global('torch', 'FloatStorage') + _str('0') +
                _str('cpu') + b'K' + bytes([numel]) + b't' + b'Q')
  ints = lambda v: b'(' + b''.join(b'K' + bytes([i]) for i in v) + b't'
  tensor = (_global('torch._utils', '_rebuild_tensor_v2') + b'(' + storage_id + b'K\x00' +
            ints(size) + ints(stride) + b'\x89' + _global('collections', 'OrderedDict') +
            b')R' + b'tR')
  return b'\x80\x02}' + _str('w') + tensor + b's.'


@pytest.fixture(scope='module')
def cases():
  with np.load(FIXTURES / 'reader.npz', allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_both_torch_formats_read_as_torch_loads_them(cases, fmt, tmp_path):
  path = tmp_path / f'{fmt}.pt'
  path.write_bytes(cases[fmt].tobytes())
  tree = torch_reader.read_checkpoint(path)
  sd = torch_reader.pick_state_dict(tree, ('state_dict',), str(path))
  expected = {k[len('expected_'):]: v for k, v in cases.items() if k.startswith('expected_')}
  assert set(sd) == set(expected)
  for key, want in expected.items():
    got = np.asarray(sd[key])
    assert got.dtype == want.dtype and got.shape == want.shape, key
    np.testing.assert_array_equal(got, want, err_msg=key)
  assert tree['steps'] == 7
  # argparse.Namespace(lr=1e-4), pickled as NEWOBJ + BUILD: recorded, never built.
  assert isinstance(tree['args'], torch_reader.Opaque)
  assert repr(tree['args']) == 'Opaque(argparse.Namespace)'
  assert (tree['args'].args, tree['args'].state) == ((), {'lr': 1e-4})


def test_tensor_data_is_read_only_when_converted(cases, tmp_path):
  path = tmp_path / 'zip.pt'
  path.write_bytes(cases['zip'].tobytes())
  tree = torch_reader.read_checkpoint(path)
  ref = tree['state_dict']['transposed']
  assert isinstance(ref, torch_reader.TensorRef) and ref.shape == (6, 4)
  path.unlink()  # the storages are still on disk only: reading them now fails
  with pytest.raises(FileNotFoundError):
    np.asarray(ref)


@pytest.mark.parametrize('module,name', [('os', 'system'), ('posix', 'system'),
                                         ('builtins', 'eval'), ('__builtin__', 'exec'),
                                         ('subprocess', 'check_call')])
@pytest.mark.parametrize('container', ['zip', 'stream'])
def test_pickles_that_call_code_are_refused_before_anything_runs(module, name, container,
                                                                  tmp_path):
  marker = tmp_path / 'ran'
  payload = _call_pickle(module, name, f'touch {marker}')
  path = tmp_path / 'evil.pt'
  if container == 'zip':
    _torch_zip(path, payload)
  else:
    path.write_bytes(payload)
  with pytest.raises(ValueError, match=rf'refusing to load .*{module}\.{name}') as info:
    torch_reader.read_checkpoint(path)
  assert '\n' not in str(info.value)
  assert not marker.exists()


def test_records_are_inert_and_other_inputs_rejected(tmp_path):
  # An allowed record class called with arguments is only recorded, never imported.
  path = tmp_path / 'record.pt'
  _torch_zip(path, _call_pickle('argparse', 'Namespace', 'x'))
  record = torch_reader.read_checkpoint(path)
  assert isinstance(record, torch_reader.Opaque) and record.args == ('x',)
  # A protocol-0 pickle (no torch header) and an unrelated file are not checkpoints.
  raw = tmp_path / 'raw.pkl'
  raw.write_bytes(pickle.dumps({'a': 1}, protocol=0))
  with pytest.raises(ValueError, match='not a torch checkpoint'):
    torch_reader.read_checkpoint(raw)
  zipped = tmp_path / 'other.zip'
  with zipfile.ZipFile(zipped, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  with pytest.raises(ValueError, match='no single <archive>/data.pkl'):
    torch_reader.read_checkpoint(zipped)
  with pytest.raises(FileNotFoundError):
    torch_reader.read_checkpoint(tmp_path / 'absent.pt')


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
  storage = np.arange(4, dtype=np.float32).tobytes()
  good = tmp_path / 'good.pt'
  _torch_zip(good, _tensor_pickle(4, (2, 2), (1, 2)), {'0': storage})
  np.testing.assert_array_equal(np.asarray(torch_reader.read_checkpoint(good)['w']),
                                np.arange(4, dtype=np.float32).reshape(2, 2).T)
  bad = tmp_path / 'bad.pt'
  _torch_zip(bad, _tensor_pickle(4, (10,), (1,)), {'0': storage})
  with pytest.raises(ValueError, match=r'reaches past its storage of 4 elements'):
    torch_reader.read_checkpoint(bad)


def test_pick_state_dict_names_the_keys_it_looked_for(tmp_path):
  with pytest.raises(ValueError, match=r"no 'model' entry \(top-level keys: \['steps'\]\)"):
    torch_reader.pick_state_dict({'steps': 3}, ('model',), 'x.pt')
  arrays = {'a.weight': np.zeros(2), 'note': 'text'}
  assert list(torch_reader.pick_state_dict(arrays, ('model',), 'x.pt')) == ['a.weight']
