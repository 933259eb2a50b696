"""Checks of a token-prior config and of sampling requests, before anything compiles.

Usage sketch::

  validation.validate(config, num_devices=jax.local_device_count())
  labels = validation.check_labels([3, 3, 5], num_classes=10)

Every failure is a `vq.config.validation.ConfigError` (a ValueError) with a one-line
message naming the field, the value seen, the rule and the fix, as for tokenizer configs.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np

from vq.config import validation as base
from vq.generation import priors
from vq.generation import transformer

ConfigError = base.ConfigError
OBJECTIVES = priors.KINDS
DTYPES = ('float32', 'bfloat16')
# The tokenizer config's rule helpers: one message format for every config.
_fail = base._fail  # pylint: disable=protected-access
_choice = base._choice  # pylint: disable=protected-access
_get = base._get  # pylint: disable=protected-access
_at_least = base._at_least  # pylint: disable=protected-access


def matmul_dtype(config: ml_collections.ConfigDict) -> str:
  """`prior.matmul_dtype`; 'float32' for configs written before the field existed."""
  return config.prior.get('matmul_dtype', 'float32')


def is_prior(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` describes a token prior (else a tokenizer)."""
  return config.get('objective') in OBJECTIVES


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             process_count: int = 1) -> None:
  """Raises `ConfigError` on the first rule `config` breaks."""
  c = config
  _choice(c, 'objective', OBJECTIVES)
  _choice(c, 'prior.dtype', DTYPES)
  if matmul_dtype(c) not in transformer.MATMUL_DTYPES:
    _fail('prior.matmul_dtype', matmul_dtype(c), 'is unknown',
          f'choose one of {", ".join(map(repr, transformer.MATMUL_DTYPES))}')
  _choice(c, 'train.schedule', base.SCHEDULES)
  _choice(c, 'train.parallel', base.PARALLEL)
  if not c.prior.tokenizer_workdir:
    _fail('prior.tokenizer_workdir', c.prior.tokenizer_workdir,
          'is empty: a prior learns the tokens of a trained tokenizer',
          'pass --config.prior.tokenizer_workdir=DIR, the --workdir of a run of '
          'experiments/vqvae_cifar.py (or another tokenizer config)')
  for field, low in (('prior.tokenizer_step', 0), ('prior.width', 1), ('prior.depth', 1),
                     ('prior.num_heads', 1), ('prior.mlp_ratio', 1), ('prior.dropout', 0.0),
                     ('data.num_classes', 0), ('data.max_examples', 0),
                     ('train.num_steps', 1), ('train.batch_size', 1),
                     ('train.warmup_steps', 0), ('train.grad_clip', 0.0),
                     ('train.weight_decay', 0.0), ('train.log_every', 1),
                     ('train.checkpoint_every', 1), ('train.keep_checkpoints', 1),
                     ('train.image_every', 0), ('train.eval_every', 0),
                     ('sample.top_k', 0), ('sample.num_iterations', 1),
                     ('sample.choice_temperature', 0.0), ('sample.guidance', 0.0),
                     ('sample.batch_size', 1), ('sample.seed', 0), ('eval.batch_size', 1),
                     ('eval.max_examples', 0), ('eval.num_samples', 1),
                     ('eval.grid_per_class', 1)):
    _at_least(c, field, low)
  _at_least(c, 'train.learning_rate', 0.0, strict=True)
  _at_least(c, 'sample.temperature', 0.0, strict=True)
  if c.prior.width % c.prior.num_heads:
    _fail('prior.num_heads', c.prior.num_heads,
          f'does not divide prior.width={c.prior.width}',
          f'use a divisor of {c.prior.width}, e.g. 8')
  if not 0.0 <= c.prior.class_dropout < 1.0:
    _fail('prior.class_dropout', c.prior.class_dropout,
          'must be in [0, 1)', 'use e.g. 0.1 (0 disables guidance training)')
  if not 0.0 < c.sample.top_p <= 1.0:
    _fail('sample.top_p', c.sample.top_p, 'must be in (0, 1]',
          'use 1.0 for no nucleus filtering, or e.g. 0.9')
  if not 0.0 < c.eval.mask_ratio < 1.0:
    _fail('eval.mask_ratio', c.eval.mask_ratio, 'must be in (0, 1)',
          'use e.g. 0.5')
  if c.sample.guidance != 1.0 and c.data.num_classes == 0:
    _fail('sample.guidance', c.sample.guidance,
          'needs a class-conditional prior (data.num_classes=0)',
          'leave sample.guidance at 1.0 for an unconditional prior')
  base.check_batches_divide(c, ('train.batch_size', 'eval.batch_size', 'sample.batch_size'),
                            num_devices, process_count)
  base.check_dataset_specs(c, ('data.dataset', 'eval.dataset'))


def check_token_space(config: ml_collections.ConfigDict, grid: Sequence[int]) -> None:
  """Rules that need the tokenizer: MaskGIT's iterations fit the grid."""
  length = int(np.prod(grid))
  if config.objective == 'maskgit' and config.sample.num_iterations > length:
    _fail('sample.num_iterations', config.sample.num_iterations,
          f'exceeds the {length} tokens of a {"x".join(map(str, grid))} grid',
          f'use at most {length} (8-12 is usual)')


def check_labels(labels: Any, num_classes: int) -> np.ndarray:
  """Labels for sampling as int32 [N]; one-line errors for anything a prior cannot take."""
  arr = np.asarray(labels)
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(f'labels must be a non-empty 1-D list of class ids; saw shape '
                     f'{arr.shape}.')
  if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'labels must be integers; saw dtype {arr.dtype} ({arr[:4].tolist()}...).')
  if num_classes == 0:
    if np.any(arr != priors.NULL_LABEL):
      raise ValueError('labels were given, but this prior is unconditional '
                       '(data.num_classes=0); sample without --labels.')
    return arr.astype(np.int32)
  bad = arr[(arr < 0) | (arr >= num_classes)]
  if bad.size:
    raise ValueError(f'label {int(bad[0])} is outside the classes 0..{num_classes - 1} of '
                     f'this prior; pass labels in that range.')
  return arr.astype(np.int32)


def parse_labels(text: str) -> list[int]:
  """'3,3,5' -> [3, 3, 5], with a one-line error for anything else."""
  try:
    return [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise ValueError(f'--labels={text!r} is not a comma-separated list of integers; use e.g. '
                     '--labels=3,3,5.') from None
