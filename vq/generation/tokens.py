"""What a prior learns from: a frozen tokenizer's token grids, encoded once and cached.

Usage sketch::

  tok = load_tokenizer('/tmp/vqvae', step=None)          # latest checkpoint
  train = encoded_split(tok, 'tfds:cifar10:train', cache_dir, flip=True)
  train.tokens, train.labels                             # int32 [2N, h, w], int32 [2N]
  batches = token_batches(train, global_batch_size=64, num_local_devices=D, seed=0,
                          start_step=0)                  # {'tokens': [D, b, L], 'label': [D, b]}

A tokenizer is named by `identity(tok)`: its workdir, config hash and checkpoint step.
Cached grids live in `<prior workdir>/tokens/<split>-<key>.npz`, the key hashing the
identity, the dataset spec and the flip setting: a retrained tokenizer gets a new file
(rebuilt), never stale tokens. With `flip=True` the training split is encoded twice, as
is and mirrored left-right, so the prior sees both orientations as separate grids.
Training batches follow `vq.data.train_plan`: a pure function of (seed, step), so a
resumed run replays exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Iterator

from absl import logging
import ml_collections
import numpy as np

from vq import data
from vq import inference
from vq.core import weights
from vq.data import batches as data_batches
from vq.generation import validation

_TOKENIZER_OBJECTIVES = ('vqvae', 'vqgan')


def tuples(value: Any) -> Any:
  """JSON lists back to the tuples the configs use (module fields must be hashable)."""
  if isinstance(value, dict):
    return {k: tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(tuples(v) for v in value)
  return value


def tokenizer_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a tokenizer in `workdir` was trained with (its config.json)."""
  path = pathlib.Path(workdir).expanduser()
  if not path.is_dir():
    raise ValueError(f'prior.tokenizer_workdir={str(workdir)!r} does not exist; pass the '
                     '--workdir of a trained tokenizer (run.py --config=experiments/'
                     'vqvae_cifar.py --workdir=DIR trains one).')
  config_file = path / 'config.json'
  if not config_file.is_file():
    raise ValueError(f'prior.tokenizer_workdir={str(workdir)!r} holds no config.json, so it '
                     'is not a vq tokenizer workdir; pass the --workdir a tokenizer was '
                     'trained in.')
  try:
    config = ml_collections.ConfigDict(tuples(json.loads(config_file.read_text())))
  except ValueError as e:
    raise ValueError(f'{config_file} is not valid JSON ({e}); it is not a vq tokenizer '
                     'workdir.') from None
  if config.get('objective') not in _TOKENIZER_OBJECTIVES:
    raise ValueError(f'prior.tokenizer_workdir={str(workdir)!r} holds a '
                     f'{config.get("objective")!r} run, not a tokenizer (objective vqvae or '
                     'vqgan); pass the workdir of a trained tokenizer.')
  if config.quantizer.kind == 'rvq':
    raise ValueError(f'prior.tokenizer_workdir={str(workdir)!r} is a residual-VQ tokenizer '
                     f'({config.quantizer.rvq_depth} indices per position); the token priors '
                     'model one index per position: use a vq/ema/fsq/lfq tokenizer.')
  return config


def load_tokenizer(workdir: str | os.PathLike, step: int | None = None) -> inference.Tokenizer:
  """The tokenizer trained in `workdir` at `step` (None or 0: its latest checkpoint)."""
  config = tokenizer_config(workdir)
  try:
    return inference.Tokenizer.from_workdir(config, workdir, step=step or None)
  except FileNotFoundError as e:
    raise ValueError(f'prior.tokenizer_workdir={str(workdir)!r}: {e}') from None


def identity(tok: inference.Tokenizer, workdir: str | os.PathLike) -> dict[str, Any]:
  """What names a tokenizer's tokens: its workdir, config hash and checkpoint step."""
  return {'workdir': str(pathlib.Path(workdir).expanduser().absolute()),
          'config_hash': tok.config_hash, 'step': int(tok.step)}


def check_same_tokenizer(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
  """Refuses a tokenizer that changed under a prior trained on another one's tokens."""
  if not saved:
    return
  if saved.get('config_hash') != current['config_hash'] or saved.get('step') != current['step']:
    raise ValueError(
        f'the tokenizer changed under this prior: it was trained on the tokens of step '
        f'{saved.get("step")} (config {saved.get("config_hash")}) of {saved.get("workdir")}, '
        f'and that workdir now gives step {current["step"]} (config '
        f'{current["config_hash"]}); pass --config.prior.tokenizer_step={saved.get("step")} '
        'if that checkpoint is still kept, or train the prior in a new --workdir.')


@dataclasses.dataclass(frozen=True)
class TokenSplit:
  """Token grids of one dataset split: int32 tokens [N, h, w], int32 labels [N]."""
  tokens: np.ndarray
  labels: np.ndarray
  spec: str

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_classes(self) -> int:
    return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0


def _cache_key(ident: dict[str, Any], spec: str, flip: bool, max_examples: int) -> str:
  text = json.dumps({'tokenizer': ident, 'spec': spec, 'flip': bool(flip),
                     'max_examples': int(max_examples)}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _encode(tok: inference.Tokenizer, source: data.ImageSource, flip: bool,
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  grids, labels, flipped = [], [], []
  for lo in range(0, len(source), chunk):
    images, batch_labels = source.get_many(range(lo, min(lo + chunk, len(source))))
    grids.append(tok.encode(images))
    labels.append(batch_labels)
    if flip:
      flipped.append(tok.encode(np.ascontiguousarray(images[:, :, ::-1])))
  tokens = np.concatenate(grids + flipped)
  labels = np.concatenate(labels * (2 if flip else 1))
  return tokens.astype(np.int32), labels


def encoded_split(tok: inference.Tokenizer, ident: dict[str, Any], spec: str,
                  cache_dir: str | os.PathLike, *, flip: bool = False,
                  data_dir: str | None = None, max_examples: int = 0,
                  download: bool = True) -> TokenSplit:
  """The grids of `spec` (plus mirrored copies with `flip`), from the cache or encoded now."""
  cache_dir = pathlib.Path(cache_dir)
  split = data.parse_spec(spec).split or pathlib.Path(data.parse_spec(spec).name).stem
  path = cache_dir / f'{split}-{_cache_key(ident, spec, flip, max_examples)}.npz'
  if path.is_file():
    arrays = weights.load_npz(path)
    if json.loads(str(arrays['meta']))['tokenizer'] == ident:
      logging.info('vq: token grids of %s from %s', spec, path)
      return TokenSplit(arrays['tokens'], arrays['labels'], spec)
  source = data.open_source(spec, image_size=tok.image_size, data_dir=data_dir,
                            resize=bool(tok.config.data.resize), download=download)
  if max_examples:
    source = data.take(source, max_examples)
  logging.info('vq: encoding %d images of %s%s with the tokenizer (step %d)', len(source),
               spec, ' and their mirror images' if flip else '', tok.step)
  tokens, labels = _encode(tok, source, flip)
  meta = json.dumps({'tokenizer': ident, 'spec': spec, 'flip': bool(flip),
                     'max_examples': int(max_examples)}, sort_keys=True)
  cache_dir.mkdir(parents=True, exist_ok=True)
  weights.save_npz(path, {'tokens': tokens, 'labels': labels, 'meta': np.asarray(meta)})
  return TokenSplit(tokens, labels, spec)


def prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
            saved_identity: dict | None = None
            ) -> tuple[inference.Tokenizer, dict, TokenSplit, TokenSplit]:
  """(tokenizer, identity, train grids, held-out grids) of a prior: loaded, checked, cached.

  `saved_identity` is the tokenizer a checkpoint of this prior was trained on (None for a
  fresh prior): another tokenizer is refused.
  """
  tok = load_tokenizer(config.prior.tokenizer_workdir, step=config.prior.tokenizer_step or None)
  ident = identity(tok, config.prior.tokenizer_workdir)
  check_same_tokenizer(saved_identity, ident)
  validation.check_token_space(config, tok.token_shape)
  cache = workdir / 'tokens'
  data_dir = config.data.data_dir or None
  train = encoded_split(tok, ident, config.data.dataset, cache, flip=config.prior.flip,
                        data_dir=data_dir, max_examples=config.data.max_examples,
                        download=config.data.download)
  held_out = encoded_split(tok, ident, config.eval.dataset, cache, flip=False,
                           data_dir=data_dir, max_examples=config.eval.max_examples,
                           download=config.data.download)
  num_classes = config.data.num_classes
  if num_classes and train.labels.max() >= num_classes:
    raise ValueError(f'config.data.num_classes={num_classes} but {config.data.dataset} has '
                     f'labels up to {int(train.labels.max())}; set it to '
                     f'{int(train.labels.max()) + 1}.')
  if num_classes and train.labels.min() < 0:
    raise ValueError(f'{config.data.dataset} has unlabelled images; train an unconditional '
                     'prior with --config.data.num_classes=0.')
  return tok, ident, train, held_out


def token_batches(split: TokenSplit, *, global_batch_size: int, num_local_devices: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Training batches of flattened grids forever, from `start_step` (see `vq.data.train_plan`).

  Yields:
    {'tokens': int32 [D, b, L], 'label': int32 [D, b]} with b = B / (P * D).
  """
  per_process = data_batches.check_layout(global_batch_size, num_local_devices,
                                          process_index, process_count)
  n = len(split)
  if global_batch_size > n:
    raise ValueError(f'train.batch_size={global_batch_size} exceeds the {n} token grids of '
                     f'{split.spec}; lower it.')
  flat = split.tokens.reshape(n, -1)
  per_device = per_process // num_local_devices
  for rows in data_batches.train_plan(n, global_batch_size, seed=seed, start_step=start_step,
                                      process_index=process_index, per_process=per_process):
    yield {'tokens': flat[rows].reshape(num_local_devices, per_device, -1),
           'label': split.labels[rows].reshape(num_local_devices, per_device)}


def eval_batches(split: TokenSplit, *, global_batch_size: int, num_local_devices: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One in-order pass, the last batch zero-padded with mask False (every grid once)."""
  n = len(split)
  flat = split.tokens.reshape(n, -1)
  per_device = global_batch_size // num_local_devices
  for lo in range(0, n, global_batch_size):
    rows = np.arange(lo, lo + global_batch_size)
    valid = rows < n
    rows = np.where(valid, rows, 0)
    yield {'tokens': flat[rows].reshape(num_local_devices, per_device, -1),
           'label': np.where(valid, split.labels[rows], 0).reshape(num_local_devices,
                                                                  per_device),
           'mask': valid.reshape(num_local_devices, per_device)}
