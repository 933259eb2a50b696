"""Config checks that run before any model is built or compiled.

Usage sketch::

  config_validation.validate(config, num_devices=jax.local_device_count(),
                             process_count=jax.process_count())

Every failure is a `ConfigError` (a ValueError) whose one-line message names the field,
the value seen, the rule, and how to fix it.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from vq import data
from vq.models import nets

OBJECTIVES = ('vqvae', 'vqgan')
ARCHS = ('sonnet', 'taming')
QUANTIZER_KINDS = ('vq', 'ema', 'fsq', 'lfq', 'rvq')
QUANTIZER_INITS = ('random', 'kmeans')
QUANTIZER_GRADIENTS = ('ste', 'rotation')
QUANTIZER_BETA_TERMS = ('commitment', 'codebook')
# Quantizer options, the value that means "off", and the kinds that implement them.
QUANTIZER_OPTIONS = {
    'init': ('random', ('vq', 'ema')),
    'restart_after': (0, ('vq', 'ema')),
    'lookup_dim': (0, ('vq', 'ema')),
    'l2_normalize': (False, ('vq', 'ema')),
    'gradient': ('ste', ('vq', 'ema', 'rvq')),
    'beta_on': ('commitment', ('vq',)),
    'entropy_weight': (0.0, ('vq', 'ema', 'lfq')),
}
# LFQ's entropy penalty sums over all 2**bits codes for every position.
LFQ_MAX_BITS = 16
RECON_LOSSES = ('l1', 'l2')
GAN_LOSSES = ('hinge', 'nonsaturating')
DISCRIMINATORS = ('patchgan', 'stylegan')
DISC_NORMS = ('group', 'layer', 'none')
SCHEDULES = ('constant', 'cosine')
DTYPES = ('float32', 'bfloat16')
PARALLEL = ('pmap', 'jit')
UPSAMPLE_IMPLS = ('auto', 'repeat', 'phases')


class ConfigError(ValueError):
  """A config value breaks a rule; the message says which and how to fix it."""


def _fail(field: str, value, rule: str, fix: str) -> None:
  raise ConfigError(f'config.{field}={value!r} {rule}; {fix}.')


def _choice(c, field: str, choices) -> None:
  value = _get(c, field)
  if value not in choices:
    _fail(field, value, 'is unknown', f'choose one of {", ".join(map(repr, choices))}')


def _get(c, field: str):
  for part in field.split('.'):
    c = c[part]
  return c


def _at_least(c, field: str, low, *, strict: bool = False) -> None:
  value = _get(c, field)
  if (value <= low) if strict else (value < low):
    rule = f'must be {">" if strict else ">="} {low}'
    _fail(field, value, rule, f'set --config.{field} to a value {">" if strict else ">="} {low}')


def _in_unit_interval(c, field: str) -> None:
  value = _get(c, field)
  if not 0.0 <= value < 1.0:
    _fail(field, value, 'must be in [0, 1)', f'set --config.{field} to e.g. 0.99')


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             process_count: int = 1) -> None:
  """Raises `ConfigError` on the first rule `config` breaks."""
  c = config
  _choice(c, 'objective', OBJECTIVES)
  _choice(c, 'model.arch', ARCHS)
  _choice(c, 'model.dtype', DTYPES)
  _choice(c, 'model.upsample_impl', UPSAMPLE_IMPLS)
  _choice(c, 'quantizer.kind', QUANTIZER_KINDS)
  _choice(c, 'loss.recon', RECON_LOSSES)
  _choice(c, 'train.schedule', SCHEDULES)
  _choice(c, 'train.parallel', PARALLEL)
  _at_least(c, 'quantizer.num_codes', 2)
  _at_least(c, 'quantizer.code_dim', 1)
  _at_least(c, 'quantizer.beta', 0.0)
  _at_least(c, 'quantizer.epsilon', 0.0, strict=True)
  decay = c.quantizer.decay
  if not 0.0 < decay < 1.0:
    _fail('quantizer.decay', decay, 'must be in (0, 1)', 'use e.g. 0.99')
  _validate_quantizer(c)
  for w in ('recon_weight', 'perceptual_weight', 'disc_weight', 'lecam_weight', 'r1_weight'):
    _at_least(c, f'loss.{w}', 0.0)
  _at_least(c, 'train.num_steps', 1)
  _at_least(c, 'train.batch_size', 1)
  _at_least(c, 'train.learning_rate', 0.0, strict=True)
  _at_least(c, 'train.warmup_steps', 0)
  _at_least(c, 'train.grad_clip', 0.0)
  _at_least(c, 'train.weight_decay', 0.0)
  _in_unit_interval(c, 'train.ema_decay')
  for f in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    _at_least(c, f'train.{f}', 1)
  _at_least(c, 'train.image_every', 0)
  _at_least(c, 'train.eval_every', 0)
  _at_least(c, 'eval.batch_size', 1)
  _at_least(c, 'eval.max_examples', 0)
  _at_least(c, 'eval.grid_images', 1)
  _at_least(c, 'data.image_size', 1)
  _at_least(c, 'data.prefetch', 1)
  _at_least(c, 'data.cache_mb', 0)

  # Model geometry.
  if c.model.arch == 'taming':
    if not c.model.ch_mult:
      _fail('model.ch_mult', tuple(c.model.ch_mult), 'is empty', 'use e.g. (1, 2, 2)')
    _at_least(c, 'model.num_res_blocks', 1)
    for mult in c.model.ch_mult:
      if c.model.ch * mult % 32:
        _fail('model.ch', c.model.ch, f'times multiplier {mult} is not a multiple of 32 '
              '(GroupNorm uses 32 groups)', 'use a multiple of 32 such as 64 or 128')
  else:
    _at_least(c, 'model.hidden', 2)
    _at_least(c, 'model.res_hidden', 1)
    if c.model.hidden % 2:
      _fail('model.hidden', c.model.hidden, 'must be even (the first conv has hidden/2 '
            'channels)', 'use e.g. 128')
  factor = nets.downsample_factor(c.model.arch, tuple(c.model.ch_mult))
  if c.data.image_size % factor:
    _fail('data.image_size', c.data.image_size,
          f'is not divisible by the encoder downsampling factor {factor} of arch '
          f'{c.model.arch!r}', f'use a multiple of {factor} or change model.ch_mult')

  check_batches_divide(c, ('train.batch_size', 'eval.batch_size'), num_devices,
                       process_count)
  check_dataset_specs(c, ('data.dataset', 'eval.dataset'))

  # GAN.
  if c.objective == 'vqgan':
    _choice(c, 'loss.gan_loss', GAN_LOSSES)
    _choice(c, 'disc.name', DISCRIMINATORS)
    _choice(c, 'disc.norm', DISC_NORMS)
    _at_least(c, 'disc.ndf', 1)
    _at_least(c, 'disc.n_layers', 1)
    _at_least(c, 'disc.learning_rate', 0.0, strict=True)
    _at_least(c, 'loss.disc_start', 0)
    _at_least(c, 'loss.disc_warmup', 0)
    if c.loss.disc_weight > 0 and c.loss.disc_start >= c.train.num_steps:
      _fail('loss.disc_start', c.loss.disc_start,
            f'is not below train.num_steps={c.train.num_steps}, so the GAN would never switch on',
            'lower disc_start, raise num_steps, or set loss.disc_weight=0')
    if c.loss.disc_warmup > c.loss.disc_start:
      _fail('loss.disc_warmup', c.loss.disc_warmup,
            f'exceeds loss.disc_start={c.loss.disc_start} (the discriminator cannot start '
            'training before step 0)', 'use a warm-up <= disc_start')
    if c.disc.name == 'patchgan' and c.data.image_size // 2 ** c.disc.n_layers < 4:
      _fail('disc.n_layers', c.disc.n_layers,
            f'downsamples {c.data.image_size}px images below 4px before the two 4x4 convs',
            'use fewer layers for small images (2 for 32x32)')


def _validate_quantizer(c: ml_collections.ConfigDict) -> None:
  q = c.quantizer
  _choice(c, 'quantizer.init', QUANTIZER_INITS)
  _choice(c, 'quantizer.gradient', QUANTIZER_GRADIENTS)
  _choice(c, 'quantizer.beta_on', QUANTIZER_BETA_TERMS)
  for field in ('kmeans_iters', 'restart_after', 'lookup_dim', 'entropy_weight'):
    _at_least(c, f'quantizer.{field}', 0)
  _at_least(c, 'quantizer.entropy_temperature', 0.0, strict=True)
  _at_least(c, 'quantizer.usage_window', 1)
  for field, (off, kinds) in QUANTIZER_OPTIONS.items():
    if q.kind not in kinds and q[field] != off:
      _fail(f'quantizer.{field}', q[field], f'is not supported by quantizer.kind={q.kind!r} '
            f'(only by {", ".join(map(repr, kinds))})', f'set it to {off!r} or change the kind')
  if q.kind == 'fsq':
    levels = tuple(q.fsq_levels)
    if not levels or any(int(l) != l or l < 3 for l in levels):
      _fail('quantizer.fsq_levels', levels, 'must be integers >= 3 (FSQ bounds a 2-level '
            'dimension to a single value)', "use e.g. (8, 5, 5, 5), or kind='lfq' for bits")
    product = 1
    for l in levels:
      product *= int(l)
    if product != q.num_codes:
      _fail('quantizer.num_codes', q.num_codes, f'differs from the product {product} of '
            f'quantizer.fsq_levels={levels}', f'set --config.quantizer.num_codes={product}')
  if q.kind == 'lfq':
    bits = q.num_codes.bit_length() - 1
    if q.num_codes != 2 ** bits:
      _fail('quantizer.num_codes', q.num_codes, 'is not a power of two (LFQ codes are bit '
            'strings)', f'use e.g. {2 ** max(bits, 1)}')
    if bits > LFQ_MAX_BITS:
      _fail('quantizer.num_codes', q.num_codes, f'needs {bits} bits; the exact LFQ entropy '
            f'penalty over 2**bits codes is limited to {LFQ_MAX_BITS} bits here',
            f'use at most {2 ** LFQ_MAX_BITS} codes')
  if q.kind == 'rvq':
    _at_least(c, 'quantizer.rvq_depth', 1)
  if q.lookup_dim and q.kind in ('vq', 'ema') and q.lookup_dim > q.code_dim:
    _fail('quantizer.lookup_dim', q.lookup_dim, f'exceeds quantizer.code_dim={q.code_dim} '
          '(the lookup space is a low-dimensional projection)', 'use e.g. 8')


def validate_eval_size(config: ml_collections.ConfigDict, num_examples: int) -> None:
  """The eval batch must not exceed the examples evaluated (it would be mostly padding)."""
  n = min(num_examples, config.eval.max_examples or num_examples)
  if config.eval.batch_size > n:
    _fail('eval.batch_size', config.eval.batch_size,
          f'is larger than the {n} examples evaluated from {config.eval.dataset!r}',
          'use a batch size at most that (and divisible by the device count)')


def check_batches_divide(c: ml_collections.ConfigDict, fields: Sequence[str],
                         num_devices: int, process_count: int) -> None:
  """Each batch-size field divides over all devices of all processes."""
  total = num_devices * process_count
  for field in fields:
    value = _get(c, field)
    if value % total:
      _fail(field, value, f'is not divisible by the {total} devices ({num_devices} local x '
            f'{process_count} processes)',
            f'use a multiple of {total}, e.g. {max(total, value // total * total)}')


def check_dataset_specs(c: ml_collections.ConfigDict, fields: Sequence[str]) -> None:
  """The spec form only (whether the data exists is checked when it is opened)."""
  for field in fields:
    try:
      data.parse_spec(_get(c, field))
    except ValueError as e:
      raise ConfigError(f'config.{field}: {e}') from None
