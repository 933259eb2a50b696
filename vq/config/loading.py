"""Config files in Python: load one the way `run.py --config=...` does.

Usage sketch::

  import vq
  config = vq.load_config('experiments/vqvae_cifar.py:smoke',
                          {'train.num_steps': 20, 'quantizer.kind': 'fsq'})

A config file defines `get_config(arg=None)`; the text after ':' is its argument. The
returned config is locked like run.py's (a misspelt field is an error, not a new field).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import sys
from typing import Any, Mapping

import ml_collections


@contextlib.contextmanager
def _importable_from(root: pathlib.Path):
  """Config files import their base as `from experiments import base`: make that resolve."""
  added = str(root) not in sys.path
  if added:
    sys.path.insert(0, str(root))
  try:
    yield
  finally:
    if added:
      sys.path.remove(str(root))


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`, applies dotted `overrides` ({'train.num_steps': 20}), locks it."""
  text = os.fspath(path)
  file_part, _, arg = text.partition(':')
  file = pathlib.Path(file_part).expanduser()
  if not file.is_file():
    raise FileNotFoundError(f'config file {file_part!r} does not exist; pass a path such as '
                            "'experiments/vqvae_cifar.py' (optionally ':smoke').")
  spec = importlib.util.spec_from_file_location(f'vq_config_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  with _importable_from(file.resolve().parent.parent):
    spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{file_part} defines no get_config(arg=None); a config file must.')
  config = module.get_config(arg) if arg else module.get_config()
  config = ml_collections.ConfigDict(config)
  for dotted, value in (overrides or {}).items():
    node = config
    *parents, leaf = dotted.split('.')
    for name in parents:
      if name not in node:
        raise ValueError(f'override {dotted!r}: config has no field {name!r}; see '
                         'experiments/base.py for the fields.')
      node = node[name]
    if leaf not in node:
      raise ValueError(f'override {dotted!r}: config has no field {leaf!r}; see '
                       'experiments/base.py for the fields.')
    node[leaf] = value
  config.lock()
  return config
