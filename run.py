r"""vq: train and evaluate discrete image tokenizers (VQ-VAE, VQ-GAN).

  python run.py --config=experiments/vqgan_cifar.py --workdir=/tmp/vqgan
  python run.py --config=experiments/vqvae_cifar.py:smoke --workdir=/tmp/smoke
  python run.py --config=experiments/vqvae_cifar.py --workdir=/tmp/vqvae --mode=eval
  python run.py --config=experiments/vqvae_cifar.py --config.train.batch_size=128 ...
  python run.py --config=... --workdir=/shared/vq --coordinator_address=10.0.0.1:1234 \
      --num_processes=2 --process_id=0        # on host 0; host 1 runs --process_id=1

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
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'reconstruct', 'encode', 'decode', 'sample', 'inpaint',
                      'edit', 'sample_large', 'eval_inpaint'],
    'train: train (resuming from workdir). eval: evaluate the latest checkpoint on '
    'config.eval.dataset. Tokenizers: reconstruct: --dataset -> PNG grid (inputs above '
    'reconstructions) and per-image PSNR in --out. encode: --dataset -> .npz of token indices '
    'at --out (with the config hash and checkpoint step). decode: --tokens .npz -> PNG images '
    'in --out. Token priors (gpt, maskgit): sample: --out/samples.png and samples.npz; '
    'inpaint, edit, sample_large, eval_inpaint: editing (vq/generation/edit_cli.py).')
_LABELS = flags.DEFINE_string('labels', None, 'sample: comma-separated class ids, e.g. 3,3,5 '
                              '(default: --num_samples class-balanced samples).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', None, 'sample: how many (default 8 per '
                                    'class).')
_DATASET = flags.DEFINE_string('dataset', None, 'reconstruct/encode/inpaint/edit/eval_inpaint: '
                               'dataset spec (tfds:NAME:SPLIT, npz:PATH, folder:PATH); default '
                               'config.eval.dataset.')
_OUT = flags.DEFINE_string('out', None, 'reconstruct/decode/sample and the editing modes: '
                           'output folder; encode: output .npz.')
_TOKENS = flags.DEFINE_string('tokens', None, 'decode: the .npz written by --mode=encode.')
_MAX_IMAGES = flags.DEFINE_integer('max_images', None, 'reconstruct: images in the grid '
                                   '(default 64); encode, eval_inpaint: first N images '
                                   '(default all); inpaint, edit: first N (default 16).')
_MASK = flags.DEFINE_string('mask', None, 'inpaint/edit: center, left|right|top|bottom, '
                            'box:x0,y0,x1,y1, file:PATH.png or npz:PATH.npz; eval_inpaint: a '
                            'comma-separated list (default center,right).')
_SAMPLES_PER_IMAGE = flags.DEFINE_integer('samples_per_image', None, 'inpaint: completions '
                                          'per image (default 1).')
_TARGET_LABEL = flags.DEFINE_integer('target_label', None, 'edit: the class to turn images to.')
_RATIOS = flags.DEFINE_string('ratios', None, 'edit: fractions of tokens to resample '
                              '(default 0.25,0.5,0.75,1).')
_TOKEN_GRID = flags.DEFINE_string('token_grid', None, 'sample_large: token rows,columns, '
                                  'e.g. 16,16.')
_FEATHER = flags.DEFINE_integer('feather', None, 'inpaint/edit/eval_inpaint: pixels of soft '
                                'border outside the mask (default 2; 0: none).')
_WIDEN = flags.DEFINE_integer('widen', None, 'inpaint/edit/eval_inpaint: tokens the region '
                              'grows by beyond the cells the mask touches (default 0).')
_REINIT = flags.DEFINE_bool(
    'reinit_unusable_checkpoints', False,
    'If the workdir has checkpoints but none can be restored, move them aside '
    '(checkpoints.unusable-<time>) and train from step 0 instead of stopping.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, "Multi-process: 'host:port' of process 0 (default: "
    '$JAX_COORDINATOR_ADDRESS or what JAX detects under Slurm / Open MPI / Cloud TPU).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-process: processes in the job (default: from the launcher '
    'in the environment, else 1).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-process: this process, 0 .. num_processes - 1 (default: from '
    'the launcher in the environment).')
_CPU_DEVICES = flags.DEFINE_string(
    'cpu_devices', 'auto', "XLA devices of the CPU platform in a single-process run: 'auto' "
    '(one per core up to 8, as many as train.batch_size and eval.batch_size divide evenly '
    'over; XLA:CPU runs each convolution on about one core, so this is faster; see '
    'vq/cpu/devices.py) or a number. A count set in XLA_FLAGS wins; multi-process runs and '
    'GPU/TPU training ignore it.')
_HOST_HUGE_PAGES = flags.DEFINE_bool(
    'host_huge_pages', True, 'Training on the CPU (Linux, glibc 2.35+, THP mode madvise): '
    'restart once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so that XLA:CPU\'s per-step '
    'scratch buffer is faulted in 2 MiB pages (CPU training step 2.46 vs 2.7 s on the taming '
    'CIFAR VQ-VAE; see vq/cpu/host_memory.py). The log says when it restarted; child '
    'processes do not inherit the setting. --nohost_huge_pages skips the restart.')
_CPU_FAST_PATHS = flags.DEFINE_bool(
    'cpu_fast_paths', True, 'XLA:CPU fast paths: native kernels, im2col convolutions, one '
    'device per core, the huge-page restart (vq/cpu/fast_paths.py). --nocpu_fast_paths (or '
    'VQ_CPU_FAST_PATHS=0) runs the plain XLA program a GPU/TPU runs, on one CPU device.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and tfds (dozens of lines per checkpoint)."""

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorflow_datasets'))
    return not (noisy and record.levelno < logging_std.WARNING)


def _tokenizer_mode(config):
  """--mode=reconstruct|encode|decode with a trained tokenizer from --workdir."""
  from vq import inference  # pylint: disable=g-import-not-at-top
  mode = _MODE.value
  if not _OUT.value:
    raise ValueError(f'--mode={mode} needs --out (a folder for PNGs, or the .npz path for '
                     'encode).')
  if mode == 'decode' and not _TOKENS.value:
    raise ValueError('--mode=decode needs --tokens=PATH.npz (written by --mode=encode).')
  tok = inference.Tokenizer.from_workdir(config, _WORKDIR.value)
  spec = _DATASET.value or config.eval.dataset
  data_dir = config.data.data_dir or None
  if mode == 'reconstruct':
    return inference.reconstruct_dataset(tok, spec, _OUT.value, data_dir=data_dir,
                                         max_images=_MAX_IMAGES.value or 64)
  if mode == 'encode':
    return inference.encode_dataset(tok, spec, _OUT.value, data_dir=data_dir,
                                    max_images=_MAX_IMAGES.value or 0)
  return {'written': inference.decode_file(tok, _TOKENS.value, _OUT.value)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from vq.cpu import fast_paths  # pylint: disable=g-import-not-at-top
  from vq.cpu import host_memory  # pylint: disable=g-import-not-at-top
  if not _CPU_FAST_PATHS.value:
    os.environ[fast_paths.ENV] = '0'  # read by vq.cpu wherever a fast path is chosen
  # Flags parsed, nothing started: the cheapest moment to re-execute (returns if it did not,
  # and in the restarted process, saying so). Only training restarts.
  logging.info('vq: host huge pages (vq/cpu/host_memory.py): %s',
               host_memory.restart_with_huge_pages(_HOST_HUGE_PAGES.value
                                                   and _MODE.value == 'train'))
  from vq.runtime import distributed  # pylint: disable=g-import-not-at-top
  from vq.cpu import devices as cpu_devices  # pylint: disable=g-import-not-at-top
  try:
    if not distributed.joins_processes(_COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value):  # before JAX starts its backends
      plan = cpu_devices.resolve_plan(
          _CPU_DEVICES.value, [_CONFIG.value.train.batch_size, _CONFIG.value.eval.batch_size])
      logging.info('vq: the CPU platform shows %d device(s) (used if JAX runs on the CPU): %s',
                   cpu_devices.apply_plan(plan), plan.describe())
    else:
      cpu_devices.add_collective_timeouts()
    # Before anything touches a device: joins the other processes of a multi-host job.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top
  warning = fast_paths.cpu_fallback_warning(jax.default_backend(),
                                            fast_paths.accelerator_seen())
  if warning:
    logging.warning('%s', warning)
  # Imported here so that `--help` stays fast and flag errors come before JAX starts.
  from vq.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from vq.config import validation as config_validation  # pylint: disable=g-import-not-at-top
  from vq.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from vq.training import trainer  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  try:
    if config.get('objective') in ('gpt', 'maskgit'):  # a token prior (vq/generation)
      from vq.generation import cli  # pylint: disable=g-import-not-at-top
      results = cli.run(config, _MODE.value, _WORKDIR.value, out=_OUT.value,
                        labels=_LABELS.value, num_samples=_NUM_SAMPLES.value,
                        reinit_unusable_checkpoints=_REINIT.value, mask=_MASK.value,
                        dataset=_DATASET.value, max_images=_MAX_IMAGES.value,
                        samples_per_image=_SAMPLES_PER_IMAGE.value,
                        target_label=_TARGET_LABEL.value, ratios=_RATIOS.value,
                        token_grid=_TOKEN_GRID.value, feather=_FEATHER.value,
                        widen=_WIDEN.value)
      if results is not None:
        print(json.dumps(results, indent=2, sort_keys=True, default=str))
    elif _MODE.value == 'train':
      trainer.train_and_evaluate(config, _WORKDIR.value,
                                 reinit_unusable_checkpoints=_REINIT.value)
    elif _MODE.value == 'eval':
      results = evaluator.evaluate(config, _WORKDIR.value)
      print(json.dumps(results, indent=2, sort_keys=True))
    elif _MODE.value in ('sample', 'inpaint', 'edit', 'sample_large', 'eval_inpaint'):
      raise ValueError(f'--mode={_MODE.value} needs a token prior config (objective gpt or '
                       f'maskgit), not {config.objective!r}; train one with '
                       'experiments/gpt_cifar.py.')
    else:
      print(json.dumps(_tokenizer_mode(config), indent=2, sort_keys=True, default=str))
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
