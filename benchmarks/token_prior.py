"""Token-prior benchmark pieces every side shares: token files, scores, batches, the loop.

A token prior (benchmarks/peer_mingpt.py: taming's minGPT; vq's own GPT beside it) is
trained and scored on the token files of `run.py --mode=encode` (int32 `tokens` [N, h, w],
int32 `labels` [N], the tokenizer's `config_hash` / `checkpoint_step`), both splits from one
tokenizer. Nothing here imports torch or JAX, so these pieces load in any venv.

- `sequences`: the class token first (class c is token num_codes + c, a vocabulary of
  num_codes + num_classes), then the h*w image tokens in raster order.
- `batch_schedule`: the training rows of every step, drawn up front (uniform, with
  replacement, numpy seeded), so every side trains on the same batches.
- `unigram_bits_per_token`: the baseline a prior that ignores all context scores.
- `run_sides`: trains sides (objects with the methods of `Side`) in interleaved rounds on the
  same batches, alternating which goes first so load from other processes hits all alike;
  then scores each and times its sampling.

What `run_sides` reports per side:
- `train_tokens_per_s`: image tokens (batch x h*w) per second of training, the first step
  left out (one-off allocation and warm-up); `first_step_s`, `step_s_median`, `train_s`;
- `last_round_loss_bits`: the training loss of the last round, bits per image token;
- `test_bits_per_token`: mean -log2 p(token) over every image token of every test grid under
  teacher forcing, the class token as context; `eval_s`;
- `sample_images_per_s`: grids of h*w tokens sampled at once (temperature 1, no top-k),
  median over the timed calls (`sample_s`); `sample_out_of_range_fraction`: class tokens
  sampled at image positions (a trained prior puts ~0 mass there);
- `params`, `peak_rss_mb` and the side's `describe()`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from typing import Any, Callable, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenFile:
  """A token file written by `run.py --mode=encode`."""
  path: str
  tokens: np.ndarray  # int32 [N, h, w] in [0, num_codes)
  labels: np.ndarray  # int32 [N], >= 0
  num_codes: int
  image_size: int
  config_hash: str
  checkpoint_step: int


def load_tokens(path: str | os.PathLike[str]) -> TokenFile:
  """Reads and checks a token file (no pickles).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: a key is missing, or tokens/labels have the wrong dtype, shape or range.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'no token file at {path}; write one with run.py --mode=encode '
                            '--dataset=tfds:cifar10:train --out=PATH.npz.')
  with np.load(path, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  missing = [k for k in ('tokens', 'labels', 'num_codes', 'config_hash', 'checkpoint_step')
             if k not in arrays]
  if missing:
    raise ValueError(f'{path} lacks {missing} (keys seen: {sorted(arrays)}); a class-'
                     'conditional prior needs a token file of a labelled dataset written by '
                     'run.py --mode=encode.')
  tokens, labels = arrays['tokens'], arrays['labels']
  num_codes = int(arrays['num_codes'])
  for name, a in (('tokens', tokens), ('labels', labels)):
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f'{path}: {name} must be integers, saw dtype {a.dtype}; re-encode '
                       'with run.py --mode=encode.')
  if tokens.ndim != 3 or labels.shape != tokens.shape[:1] or not tokens.size:
    raise ValueError(f'{path}: expected tokens [N, h, w] and labels [N] with N > 0, saw '
                     f'tokens {tokens.shape} and labels {labels.shape}.')
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= num_codes:
    raise ValueError(f'{path}: tokens span [{lo}, {hi}] but num_codes is {num_codes}; the '
                     'file is damaged or was not written by run.py --mode=encode.')
  if int(labels.min()) < 0:
    raise ValueError(f'{path}: labels must be >= 0, saw {int(labels.min())}.')
  return TokenFile(str(path), tokens.astype(np.int32), labels.astype(np.int32), num_codes,
                   int(arrays.get('image_size', -1)), str(arrays['config_hash']),
                   int(arrays['checkpoint_step']))


def check_same_tokenizer(train: TokenFile, test: TokenFile) -> None:
  """Raises ValueError unless both files come from one tokenizer checkpoint."""
  for field in ('config_hash', 'checkpoint_step', 'num_codes'):
    a, b = getattr(train, field), getattr(test, field)
    if a != b:
      raise ValueError(f'{field} differs: {a!r} in {train.path}, {b!r} in {test.path}; '
                       'encode both splits with the same tokenizer checkpoint.')
  if train.tokens.shape[1:] != test.tokens.shape[1:]:
    raise ValueError(f'token grids differ: {train.tokens.shape[1:]} in {train.path}, '
                     f'{test.tokens.shape[1:]} in {test.path}.')


@dataclasses.dataclass(frozen=True)
class GPTSpec:
  """The prior both sides train: model size, optimizer, batch and vocabulary."""
  num_codes: int
  num_classes: int
  seq_len: int  # image tokens per grid, h * w
  layers: int = 4
  heads: int = 8
  width: int = 256
  learning_rate: float = 4.5e-4
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.01
  batch_size: int = 64

  @property
  def vocab_size(self) -> int:
    return self.num_codes + self.num_classes

  @property
  def block_size(self) -> int:
    # The input is the class token and all image tokens but the last (taming's cz[:, :-1]).
    return self.seq_len


def sequences(tf: TokenFile, num_classes: int) -> np.ndarray:
  """int64 [N, 1 + h*w]: the class token (num_codes + label), then the raster-order grid."""
  if int(tf.labels.max()) >= num_classes:
    raise ValueError(f'{tf.path}: label {int(tf.labels.max())} >= num_classes {num_classes} '
                     '(taken from the training file); encode both splits of one dataset.')
  grid = tf.tokens.reshape(len(tf.tokens), -1).astype(np.int64)
  return np.concatenate([(tf.num_codes + tf.labels.astype(np.int64))[:, None], grid], axis=1)


def unigram_bits_per_token(train_tokens: np.ndarray, test_tokens: np.ndarray,
                           num_codes: int) -> float:
  """Mean -log2 p(t) over the test tokens, p = the training histogram, add-one smoothed.

  The smoothing keeps a code that never occurs in training finite. On the 3.2M training
  tokens (512 codes, all used) of a 3,000-step experiments/vqvae_cifar.py tokenizer it moved
  the CIFAR-10 test figure by 4e-7 bits (8.74983 either way).
  """
  counts = np.bincount(np.ravel(train_tokens), minlength=num_codes).astype(np.float64) + 1.0
  log2_p = np.log2(counts / counts.sum())
  return float(-log2_p[np.ravel(test_tokens)].mean())


def batch_schedule(num_examples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """int64 [steps, batch_size]: the training rows of every step (uniform, with replacement)."""
  return np.random.default_rng(seed).integers(0, num_examples, size=(steps, batch_size),
                                              dtype=np.int64)


def tokens_per_s(step_s: list[float], tokens_per_step: int) -> float:
  """Training throughput with the first step left out (one-off allocation and warm-up)."""
  if len(step_s) < 2:
    raise ValueError(f'tokens_per_s needs at least 2 timed steps, saw {len(step_s)}; run '
                     'with --steps >= 2.')
  return tokens_per_step * (len(step_s) - 1) / float(np.sum(step_s[1:]))


def write_samples(path: str | os.PathLike[str], samples: np.ndarray, like: TokenFile,
                  num_classes: int, name: str) -> dict[str, Any]:
  """Writes sampled grids (int [n, h*w]; grid i of class i % num_classes) as a token file
  with the tokenizer metadata of `like`, so `run.py --mode=decode --tokens=PATH` decodes them.

  Grids holding a class token at an image position (>= num_codes: the prior may sample one)
  cannot be decoded and are left out; the count kept is returned.
  """
  samples = np.asarray(samples).reshape(len(samples), -1)
  labels = (np.arange(len(samples)) % num_classes).astype(np.int32)
  keep = (samples < like.num_codes).all(axis=1)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, tokens=samples[keep].astype(np.int32).reshape((-1,) + like.tokens.shape[1:]),
           labels=labels[keep], config_hash=np.array(like.config_hash),
           checkpoint_step=np.array(like.checkpoint_step, np.int64),
           num_codes=np.array(like.num_codes, np.int64),
           image_size=np.array(like.image_size, np.int64), dataset=np.array(f'samples:{name}'))
  return {'path': str(path), 'grids': int(keep.sum()), 'left_out': int((~keep).sum())}


class Side(Protocol):
  """What `run_sides` needs of a side (the peer here; vq's Flax GPT on the same terms)."""

  def num_params(self) -> int: ...

  def describe(self) -> dict[str, Any]: ...

  def train(self, rows: np.ndarray) -> dict[str, list[float]]:
    """One optimizer step per row of `rows` (int64 [k, batch], indices into the training
    sequences); returns {'step_s': [k], 'loss': [k]} with the mean cross-entropy over the
    batch's image tokens in nats."""

  def bits_per_token(self) -> float:
    """Teacher-forced mean -log2 p over every image token of the test sequences."""

  def sample(self, class_tokens: np.ndarray, temperature: float,
             seed: int) -> dict[str, Any]:
    """Samples seq_len tokens after each class token (int64 [n]), all n at once; returns
    {'tokens': int [n, seq_len], 'seconds': float}."""

  def close(self) -> float:
    """Releases the side; returns its peak RSS in MB."""


def run_sides(sides: dict[str, Side], schedule: np.ndarray, spec: GPTSpec, *, round_steps: int,
              sample_images: int, sample_repeats: int, seed: int,
              emit: Callable[[dict[str, Any]], None]) -> dict[str, dict[str, Any]]:
  """Trains every side on `schedule` in interleaved rounds, then scores and samples each.

  Sampling is interleaved too: call i samples from every side, in alternating order, with
  seed `seed + i`, from the class tokens num_codes + (0, 1, ..., num_classes - 1, 0, ...).

  Returns:
    Per side: the figures of the module docstring and `samples` (the last call's grids, int
    [sample_images, seq_len]).
  """
  names = list(sides)

  def order(i):
    return names if i % 2 == 0 else names[::-1]

  step_s = {n: [] for n in names}
  loss = {n: [] for n in names}
  train_s = {n: 0.0 for n in names}
  for r, lo in enumerate(range(0, len(schedule), round_steps)):
    rows = schedule[lo:lo + round_steps]
    for name in order(r):
      start = time.perf_counter()
      out = sides[name].train(rows)
      train_s[name] += time.perf_counter() - start
      step_s[name] += out['step_s']
      loss[name] += out['loss']
      emit({'event': 'train', 'side': name, 'step': lo + len(rows),
            'loss_bits': float(np.mean(out['loss'])) / math.log(2),
            'tokens_per_s': len(rows) * spec.batch_size * spec.seq_len / sum(out['step_s'])})
  bits, eval_s = {}, {}
  for name in names:
    start = time.perf_counter()
    bits[name] = sides[name].bits_per_token()
    eval_s[name] = time.perf_counter() - start
  class_tokens = spec.num_codes + np.arange(sample_images, dtype=np.int64) % spec.num_classes
  samples = {n: [] for n in names}
  for i in range(sample_repeats):
    for name in order(i):
      samples[name].append(sides[name].sample(class_tokens, 1.0, seed + i))
  results = {}
  for name in names:
    side = sides[name]
    seconds = [s['seconds'] for s in samples[name]]
    last = np.asarray(samples[name][-1]['tokens'])
    results[name] = {
        'params': side.num_params(),
        'train_tokens_per_s': tokens_per_s(step_s[name], spec.batch_size * spec.seq_len),
        'first_step_s': step_s[name][0],
        'step_s_median': float(np.median(step_s[name])),
        'train_s': train_s[name],
        'last_round_loss_bits': float(np.mean(loss[name][-round_steps:])) / math.log(2),
        'test_bits_per_token': bits[name],
        'eval_s': eval_s[name],
        'sample_images_per_s': sample_images / float(np.median(seconds)),
        'sample_s': [round(s, 4) for s in seconds],
        'sample_out_of_range_fraction': float(np.mean(last >= spec.num_codes)),
        'samples': last,
        **side.describe(),
    }
  for name in names:
    results[name]['peak_rss_mb'] = sides[name].close()
  return results
