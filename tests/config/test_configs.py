"""Every config file imports and builds; bad configs fail early with one-line messages."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import base
from experiments import vqvae_cifar
from vq.config import builders
from vq.config import validation as config_validation
from vq.config.validation import ConfigError
from vq.generation import generator as gen_lib
from vq.generation import priors
from vq.generation import validation as prior_validation

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted(p for p in (REPO / 'experiments').glob('*.py')
                      if p.name not in ('__init__.py', 'base.py', 'prior_base.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_files_exist():
  names = {p.name for p in CONFIG_FILES}
  assert {'vqvae_cifar.py', 'vqgan_cifar.py', 'gpt_cifar.py', 'maskgit_cifar.py'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_every_config_imports_validates_and_builds(path, arg):
  config = _load(path).get_config(arg)
  if prior_validation.is_prior(config):  # a token prior: its transformer over an 8x8 grid
    config.prior.tokenizer_workdir = '/a/tokenizer'
    prior_validation.validate(config, num_devices=1)
    layout = priors.TokenLayout(num_codes=512, num_classes=config.data.num_classes,
                                grid=(8, 8))
    model = gen_lib.build_model(config, layout)
    logits = jax.eval_shape(lambda: model.apply(
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 65), jnp.int32)),
        jnp.zeros((2, 65), jnp.int32)))
    assert logits.shape == (2, 65, 512)
    return
  config_validation.validate(config, num_devices=1)
  for field in ('objective', 'seed', 'train.num_steps', 'train.batch_size', 'eval.dataset'):
    node = config
    for part in field.split('.'):
      node = node[part]
  model = builders.build_tokenizer(config)
  size = config.data.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, 3))))
  recon = jax.eval_shape(lambda: model.apply(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))),
      jnp.zeros((2, size, size, 3)))[0])
  assert recon.shape == (2, size, size, 3)
  assert 'params' in shapes


def test_unknown_config_argument_is_an_error():
  with pytest.raises(ValueError, match="unknown config argument 'smok'"):
    vqvae_cifar.get_config('smok')


def _bad(field, value, **extra):
  def make():
    c = vqvae_cifar.get_config('smoke')
    c.update_from_flattened_dict({field: value, **extra})
    return c
  return make


# (config factory, regex the one-line message must match)
BAD_CONFIGS = {
    'unknown_objective': (_bad('objective', 'vqvea'), r"objective='vqvea' is unknown.*'vqvae', 'vqgan'"),
    'unknown_arch': (_bad('model.arch', 'unet'), r"model.arch='unet' is unknown"),
    'unknown_quantizer': (_bad('quantizer.kind', 'fsqq'), r"quantizer.kind='fsqq' is unknown"),
    'unknown_recon_loss': (_bad('loss.recon', 'l3'), r"loss.recon='l3' is unknown"),
    'unknown_dtype': (_bad('model.dtype', 'float16'), r"model.dtype='float16' is unknown"),
    'unknown_upsample_impl': (_bad('model.upsample_impl', 'fast'), r"model.upsample_impl='fast' is unknown.*'phases'"),
    'unknown_schedule': (_bad('train.schedule', 'linear'), r"train.schedule='linear'"),
    'batch_not_divisible': (_bad('train.batch_size', 6), r'train.batch_size=6 is not divisible by the 4 devices'),
    'eval_batch_not_divisible': (_bad('eval.batch_size', 10), r'eval.batch_size=10 is not divisible'),
    'image_size_not_divisible': (_bad('data.image_size', 30), r'data.image_size=30 is not divisible by the encoder downsampling factor 4'),
    'taming_image_size': (_bad('model.arch', 'taming', **{'data.image_size': 34}), r'data.image_size=34 is not divisible .* factor 4'),
    'taming_groupnorm': (_bad('model.arch', 'taming', **{'model.ch': 48}), r'model.ch=48 times multiplier 1 is not a multiple of 32'),
    'unknown_beta_on': (_bad('quantizer.beta_on', 'encoder'), r"quantizer.beta_on='encoder' is unknown.*'commitment', 'codebook'"),
    'beta_on_codebook_needs_vq': (_bad('quantizer.beta_on', 'codebook'), r"quantizer.beta_on='codebook' is not supported by quantizer.kind='ema'"),
    'codebook_too_small': (_bad('quantizer.num_codes', 1), r'quantizer.num_codes=1 must be >= 2'),
    'code_dim_zero': (_bad('quantizer.code_dim', 0), r'quantizer.code_dim=0 must be >= 1'),
    'negative_beta': (_bad('quantizer.beta', -0.1), r'quantizer.beta=-0.1 must be >= 0'),
    'bad_decay': (_bad('quantizer.decay', 1.0), r'quantizer.decay=1.0 must be in \(0, 1\)'),
    'negative_recon_weight': (_bad('loss.recon_weight', -1.0), r'loss.recon_weight=-1.0 must be >= 0'),
    'negative_perceptual': (_bad('loss.perceptual_weight', -1.0), r'loss.perceptual_weight=-1.0'),
    'zero_lr': (_bad('train.learning_rate', 0.0), r'train.learning_rate=0.0 must be > 0'),
    'negative_lr': (_bad('train.learning_rate', -1e-3), r'train.learning_rate=-0.001 must be > 0'),
    'zero_steps': (_bad('train.num_steps', 0), r'train.num_steps=0 must be >= 1'),
    'zero_log_every': (_bad('train.log_every', 0), r'train.log_every=0 must be >= 1'),
    'bad_ema_decay': (_bad('train.ema_decay', 1.5), r'train.ema_decay=1.5 must be in \[0, 1\)'),
    'bad_dataset_spec': (_bad('data.dataset', 'cifar10'), r'config.data.dataset'),
    'bad_eval_dataset_spec': (_bad('eval.dataset', 'hf:cifar10'), r'config.eval.dataset'),
    'disc_start_beyond_steps': (_bad('objective', 'vqgan', **{'loss.disc_weight': 0.5, 'loss.disc_start': 50}), r'loss.disc_start=50 is not below train.num_steps=20'),
    'unknown_gan_loss': (_bad('objective', 'vqgan', **{'loss.gan_loss': 'wgan'}), r"loss.gan_loss='wgan' is unknown"),
    'unknown_discriminator': (_bad('objective', 'vqgan', **{'disc.name': 'biggan'}), r"disc.name='biggan' is unknown"),
    'disc_too_deep': (_bad('objective', 'vqgan', **{'disc.n_layers': 4}), r'disc.n_layers=4 downsamples 32px'),
    'disc_warmup_too_long': (_bad('objective', 'vqgan', **{'loss.disc_start': 5, 'loss.disc_warmup': 9}), r'loss.disc_warmup=9 exceeds loss.disc_start=5'),
    'zero_disc_lr': (_bad('objective', 'vqgan', **{'disc.learning_rate': 0.0}), r'disc.learning_rate=0.0 must be > 0'),
}


@pytest.mark.parametrize('name', sorted(BAD_CONFIGS))
def test_bad_config_fails_with_one_line_message(name):
  make, pattern = BAD_CONFIGS[name]
  with pytest.raises(ConfigError, match=pattern) as info:
    config_validation.validate(make(), num_devices=4)
  assert '\n' not in str(info.value)


def test_valid_smoke_config_passes_on_four_devices():
  config_validation.validate(vqvae_cifar.get_config('smoke'), num_devices=4)


def _run_cli(*args, timeout=120):
  env = dict(os.environ)
  return subprocess.run([sys.executable, str(REPO / 'run.py'), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_rejects_unknown_objective_before_compiling(tmp_path):
  result = _run_cli('--config=experiments/vqvae_cifar.py:smoke', f'--workdir={tmp_path}',
                    '--config.objective=vqvea')
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and "config.objective='vqvea' is unknown" in lines[0]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_cli_rejects_misspelt_override(tmp_path):
  result = _run_cli('--config=experiments/vqvae_cifar.py:smoke', f'--workdir={tmp_path}',
                    '--config.train.num_stepz=3')
  assert result.returncode != 0
  assert 'num_stepz' in result.stderr


def test_smoke_shrinks_the_config():
  full, smoke = vqvae_cifar.get_config(), base.shrink_for_smoke(vqvae_cifar.get_config())
  assert smoke.train.num_steps < full.train.num_steps
  assert smoke.train.batch_size < full.train.batch_size


def test_eval_batch_larger_than_split_is_rejected():
  config = vqvae_cifar.get_config('smoke')
  config.eval.max_examples = 40
  with pytest.raises(ConfigError, match=r'eval.batch_size=64 is larger than the 40 examples'):
    config_validation.validate_eval_size(config, 10_000)
  config.eval.max_examples = 0
  config_validation.validate_eval_size(config, 64)  # exactly one batch is fine


def test_unwritable_workdir_fails_before_compiling(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  result = _run_cli('--config=experiments/vqvae_cifar.py:smoke', f'--workdir={blocker}/sub')
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'cannot be created' in lines[0], result.stderr[-2000:]


def _bad_prior(field, value, **extra):
  def make():
    from experiments import gpt_cifar  # pylint: disable=g-import-not-at-top
    c = gpt_cifar.get_config('smoke')
    c.update_from_flattened_dict({'prior.tokenizer_workdir': '/t', field: value, **extra})
    return c
  return make


BAD_PRIOR_CONFIGS = {
    'no_tokenizer': (_bad_prior('prior.tokenizer_workdir', ''), r"prior.tokenizer_workdir='' is empty"),
    'unknown_objective': (_bad_prior('objective', 'diffusion'), r"objective='diffusion' is unknown.*'gpt', 'maskgit'"),
    'heads': (_bad_prior('prior.num_heads', 5), r'prior.num_heads=5 does not divide prior.width=32'),
    'class_dropout': (_bad_prior('prior.class_dropout', 1.0), r'prior.class_dropout=1.0 must be in \[0, 1\)'),
    'top_p': (_bad_prior('sample.top_p', 0.0), r'sample.top_p=0.0 must be in \(0, 1\]'),
    'temperature': (_bad_prior('sample.temperature', 0.0), r'sample.temperature=0.0 must be > 0'),
    'mask_ratio': (_bad_prior('eval.mask_ratio', 1.0), r'eval.mask_ratio=1.0 must be in \(0, 1\)'),
    'guidance_unconditional': (_bad_prior('sample.guidance', 2.0, **{'data.num_classes': 0}), r'sample.guidance=2.0 needs a class-conditional prior'),
    'sample_batch': (_bad_prior('sample.batch_size', 6), r'sample.batch_size=6 is not divisible by the 4 devices'),
    'negative_top_k': (_bad_prior('sample.top_k', -1), r'sample.top_k=-1 must be >= 0'),
    'matmul_dtype': (_bad_prior('prior.matmul_dtype', 'float16'), r"prior.matmul_dtype='float16' is unknown.*'float32', 'bfloat16'"),
}


@pytest.mark.parametrize('name', sorted(BAD_PRIOR_CONFIGS))
def test_bad_prior_config_fails_with_one_line_message(name):
  make, pattern = BAD_PRIOR_CONFIGS[name]
  with pytest.raises(ConfigError, match=pattern) as info:
    prior_validation.validate(make(), num_devices=4)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('matmul_dtype', [None, 'float32', 'bfloat16'])
def test_prior_matmul_dtype_reaches_the_model_and_old_configs_mean_float32(matmul_dtype):
  c = _bad_prior('prior.width', 32)()          # a valid prior config
  with c.unlocked():
    if matmul_dtype is None:                   # a config.json written before the field
      del c.prior['matmul_dtype']
    else:
      c.prior.matmul_dtype = matmul_dtype
  prior_validation.validate(c, num_devices=4)
  layout = priors.TokenLayout(num_codes=16, num_classes=10, grid=(2, 2))
  assert gen_lib.build_model(c, layout).matmul_dtype == (matmul_dtype or 'float32')


def test_cli_sample_mode_refuses_a_tokenizer_config(tmp_path):
  result = _run_cli('--config=experiments/vqvae_cifar.py:smoke', f'--workdir={tmp_path}',
                    '--mode=sample', f'--out={tmp_path}/s')
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'needs a token prior config' in lines[0], result.stderr[-2000:]
