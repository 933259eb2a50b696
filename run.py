r"""vq: train and evaluate discrete image tokenizers (VQ-VAE, VQ-GAN).

  python run.py --config=experiments/vqgan_cifar.py --workdir=/tmp/vqgan
  python run.py --config=experiments/vqvae_cifar.py:smoke --workdir=/tmp/smoke
  python run.py --config=experiments/vqvae_cifar.py --workdir=/tmp/vqvae --mode=eval
  python run.py --config=experiments/vqvae_cifar.py --config.train.batch_size=128 ...

This file only parses flags; everything it calls lives in `vq/` and is what tests and
the Colab notebook call too.
"""

import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. experiments/vqgan_cifar.py[:smoke].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and images.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming from workdir) then stop; '
                          'eval: evaluate the latest checkpoint in workdir.')
_REINIT = flags.DEFINE_bool(
    'reinit_unusable_checkpoints', False,
    'If the workdir has checkpoints but none can be restored, move them aside '
    '(checkpoints.unusable-<time>) and train from step 0 instead of stopping.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and tfds (dozens of lines per checkpoint)."""

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorflow_datasets'))
    return not (noisy and record.levelno < logging_std.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so that `--help` stays fast and flag errors come before JAX starts.
  from vq import checkpointing  # pylint: disable=g-import-not-at-top
  from vq import config_validation  # pylint: disable=g-import-not-at-top
  from vq import evaluation  # pylint: disable=g-import-not-at-top
  from vq import trainer  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  try:
    if _MODE.value == 'train':
      trainer.train_and_evaluate(config, _WORKDIR.value,
                                 reinit_unusable_checkpoints=_REINIT.value)
    else:
      results = evaluation.evaluate(config, _WORKDIR.value)
      print(json.dumps(results, indent=2, sort_keys=True))
  except (config_validation.ConfigError, checkpointing.UnusableCheckpoints, ValueError,
          FileNotFoundError) as e:
    # Our own errors are one line that says what to fix; VQ_DEBUG=1 shows the traceback.
    if os.environ.get('VQ_DEBUG'):
      raise
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)


if __name__ == '__main__':
  app.run(main)
