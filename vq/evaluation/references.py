"""A cache of the originals' feature statistics (fd_vgg, rfid), keyed by what they depend on.

Usage sketch::

  key = references.reference_key(config, source, 'vgg16_relu5_3_avgpool',
                                 references.params_fingerprint(vgg_params))
  cached = references.load_reference_stats(key)     # (mu, sigma) or None
  references.save_reference_stats(key, mu, sigma, count)

The statistics of the originals depend only on the data and the feature network, so they
are cached as .npz in `ref_stats_dir()`, keyed by the evaluator version, the feature
network's weights, the dataset spec, its size and `eval.max_examples`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from vq import data
from vq.core import weights

EVALUATOR_VERSION = 'vq-eval-1'


def ref_stats_dir() -> pathlib.Path:
  """$VQ_CACHE_DIR/ref_stats if $VQ_CACHE_DIR is set, else ~/.cache/vq/ref_stats."""
  root = os.environ.get('VQ_CACHE_DIR') or pathlib.Path.home() / '.cache' / 'vq'
  return pathlib.Path(root) / 'ref_stats'


def params_fingerprint(params: Any) -> str:
  """sha256 of a params tree's names, shapes, dtypes and bytes (which network made the stats)."""
  digest = hashlib.sha256()
  for key, leaf in sorted(weights.flatten_tree(jax.device_get(params)).items()):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{key}:{leaf.dtype}:{leaf.shape};'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def reference_key(config: ml_collections.ConfigDict, source: data.ImageSource,
                  feature_kind: str, network_fingerprint: str) -> str:
  """JSON naming everything the originals' feature statistics depend on."""
  spec = data.parse_spec(config.eval.dataset)
  data_file = None
  if spec.kind == 'npz':
    # A rewritten file at the same path must not reuse stale statistics.
    try:
      stat = os.stat(os.path.expanduser(spec.name))
      data_file = [stat.st_size, stat.st_mtime_ns]
    except OSError:  # `source` was passed in and the spec names no file: the key still differs.
      data_file = 'missing'
  return json.dumps({
      'evaluator': EVALUATOR_VERSION, 'feature': feature_kind, 'network': network_fingerprint,
      'dataset': config.eval.dataset, 'source': source.description,
      'max_examples': int(config.eval.max_examples), 'num_examples': len(source),
      'image_size': int(config.data.image_size), 'resize': bool(config.data.resize),
      'data_file': data_file}, sort_keys=True)


def reference_path(key: str) -> pathlib.Path:
  kind = json.loads(key)['feature']
  return ref_stats_dir() / f'{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz'


def load_reference_stats(key: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(mu, sigma) cached under `key`, or None when absent or unusable (then recomputed)."""
  path = reference_path(key)
  if not path.is_file():
    return None
  try:
    arrays = weights.load_npz(path)
    if str(arrays['key']) != key:
      raise ValueError('its key differs (hash collision or edited file)')
    logging.info('eval: originals\' statistics from %s', path)
    return arrays['mu'], arrays['sigma']
  except (ValueError, KeyError) as e:
    logging.warning('ignoring reference statistics %s (%s); recomputing them.', path, e)
    return None


def save_reference_stats(key: str, mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
  if jax.process_index() != 0:
    return
  path = reference_path(key)
  try:
    weights.save_npz(path, {'mu': mu, 'sigma': sigma, 'count': np.int64(count),
                            'key': np.asarray(key)})
    logging.info('eval: cached the originals\' statistics in %s', path)
  except OSError as e:  # A read-only cache only costs a recomputation next time.
    logging.warning('could not cache reference statistics at %s (%s).', path, e)
