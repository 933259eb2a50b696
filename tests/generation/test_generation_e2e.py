"""The prior's real entry points on a tiny tokenizer: train, resume, sample, refuse bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import gpt_cifar
from experiments import maskgit_cifar
from experiments import vqvae_cifar
from vq.generation import cli
from vq.generation import evaluation
from vq.generation import generator as gen_lib
from vq.generation import priors
from vq.generation import trainer
from vq.runtime import parallel
from vq.training import trainer as tokenizer_trainer

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('tokenizer')
  config = vqvae_cifar.get_config('smoke')
  config.train.num_steps, config.train.checkpoint_every, config.train.image_every = 2, 2, 0
  tokenizer_trainer.train_and_evaluate(config, str(workdir))
  return workdir


def _config(module, tokenizer_dir, **overrides):
  c = module.get_config('smoke')
  c.prior.tokenizer_workdir = str(tokenizer_dir)
  c.data.max_examples, c.eval.max_examples = 64, 32
  c.train.batch_size, c.sample.batch_size, c.eval.batch_size = 8, 8, 16
  c.train.image_every, c.eval.num_samples = 0, 16
  for k, v in overrides.items():
    section, field = k.split('.')
    c[section][field] = v
  return c


def _params(workdir):
  ckpt = gen_lib.checkpointer(workdir / 'checkpoints', keep=3)
  step = ckpt.latest_step()
  tree = ckpt._manager.restore(step)  # pylint: disable=protected-access
  ckpt.close()
  return step, tree['state']['params']


def test_gpt_trains_resumes_exactly_and_samples(tokenizer_dir, tmp_path):
  straight = tmp_path / 'straight'
  trainer.train_and_evaluate(_config(gpt_cifar, tokenizer_dir, **{'train.num_steps': 6}),
                             str(straight))
  resumed = tmp_path / 'resumed'
  trainer.train_and_evaluate(_config(gpt_cifar, tokenizer_dir, **{'train.num_steps': 3}),
                             str(resumed))
  metrics = trainer.train_and_evaluate(
      _config(gpt_cifar, tokenizer_dir, **{'train.num_steps': 6}), str(resumed))
  assert np.isfinite(metrics['loss']) and metrics['tokens_per_s'] > 0
  (step_a, a), (step_b, b) = _params(straight), _params(resumed)
  assert step_a == step_b == 6
  chex.assert_trees_all_equal(a, b)

  gen = gen_lib.Generator.from_workdir(straight)
  images = gen.sample([3, 3, 5], jax.random.PRNGKey(0))
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, gen.sample([3, 3, 5], jax.random.PRNGKey(0)))
  for bad, needle in (([10], 'outside the classes 0..9'), ([1.5], 'integers')):
    with pytest.raises(ValueError, match=needle):
      gen.sample(bad, jax.random.PRNGKey(0))

  results = evaluation.evaluate(gen.config, str(straight))
  saved = json.loads((straight / 'eval' / 'step_6.json').read_text(),
                     parse_constant=lambda c: pytest.fail(f'{c} in the eval JSON'))
  assert saved == json.loads(json.dumps(results))
  for key in ('test_bits_per_token', 'fd_vgg', 'precision', 'recall', 'classifier_accuracy',
              'classifier_score', 'classifier_accuracy_real', 'sample_images_per_s'):
    assert np.isfinite(results[key]), key
  assert results['gfid'] is None or np.isfinite(results['gfid'])
  assert results['network_evaluations_per_image'] == 64 and results['num_fake'] == 16
  assert 0 <= results['precision'] <= 1 and 1 <= results['classifier_score'] <= 10
  for ref in ('reference_reconstructions', 'reference_unigram'):
    assert np.isfinite(results[ref]['fd_vgg'])
  # The uniform-over-everything baseline: the unigram grids' bits/token, by hand.
  train = np.concatenate([np.load(f)['tokens'].ravel() for f in (straight / 'tokens').glob('train-*.npz')])
  held = np.concatenate([np.load(f)['tokens'].ravel() for f in (straight / 'tokens').glob('test-*.npz')])
  counts = np.bincount(train, minlength=64) + 1.0
  assert results['reference_unigram']['test_bits_per_token'] == pytest.approx(
      -np.mean(np.log2(counts / counts.sum())[held]))

  out = cli.sample_to_dir(gen.config, str(straight), str(tmp_path / 'samples'), labels=[1, 1, 4])
  with np.load(out['samples_npz']) as f:
    assert f['images'].shape == (3, 32, 32, 3) and f['tokens'].shape == (3, 8, 8)
    np.testing.assert_array_equal(f['labels'], [1, 1, 4])
  assert pathlib.Path(out['samples_png']).stat().st_size > 0


def test_maskgit_trains_and_an_unconditional_prior_refuses_labels(tokenizer_dir, tmp_path):
  config = _config(maskgit_cifar, tokenizer_dir, **{'train.num_steps': 2,
                                                    'data.num_classes': 0})
  trainer.train_and_evaluate(config, str(tmp_path / 'mg'))
  gen = gen_lib.Generator.from_workdir(tmp_path / 'mg')
  assert gen.sample([-1, -1], jax.random.PRNGKey(1)).shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match='unconditional'):
    gen.sample([2], jax.random.PRNGKey(1))


def test_bad_tokenizer_workdirs_fail_before_anything_compiles(tokenizer_dir, tmp_path,
                                                              monkeypatch):
  def no_model(*args, **kwargs):
    raise AssertionError('the model was built before the input was checked')
  monkeypatch.setattr(gen_lib, 'create_state', no_model)
  prior_dir = tmp_path / 'a_prior'
  prior_dir.mkdir()
  (prior_dir / 'config.json').write_text('{"objective": "maskgit"}')
  for workdir, needle in ((tmp_path / 'missing', 'does not exist'),
                          (prior_dir, 'not a tokenizer'),
                          ('', 'tokenizer_workdir')):
    config = _config(gpt_cifar, tokenizer_dir)
    config.prior.tokenizer_workdir = str(workdir)
    with pytest.raises(ValueError, match=needle) as e:
      trainer.train_and_evaluate(config, str(tmp_path / 'w'))
    assert '\n' not in str(e.value)


def test_a_prior_train_step_on_two_devices_equals_one_device():
  layout = priors.TokenLayout(num_codes=16, num_classes=3, grid=(2, 2))
  config = gpt_cifar.get_config('smoke')
  model = priors.build_model('gpt', layout, width=32, depth=1, num_heads=4)
  state = gen_lib.create_state(config, model, layout, jax.random.PRNGKey(0))
  # Plain SGD: the update is the gradient itself. (Adam's first step is lr * sign(g), which
  # flips on gradients within rounding of 0 when two devices sum in another order.)
  tx = optax.sgd(1.0)
  state = state.replace(tx=tx, opt_state=tx.init(state.params))
  rng = np.random.default_rng(0)
  batch = {'tokens': rng.integers(0, 16, (8, 4)).astype(np.int32),
           'label': rng.integers(0, 3, (8,)).astype(np.int32)}
  step = lambda s, b, r: trainer.train_step(s, b, r, kind='gpt', model=model, layout=layout,
                                            class_dropout=0.0)
  results = []
  for n in (1, 2):
    devices = jax.local_devices()[:n]
    p_step = parallel.pmap_train_step(step, devices=devices)
    shard = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    out, metrics = p_step(parallel.replicate(state, devices), parallel.shard(shard, devices),
                          parallel.replicate(jax.random.PRNGKey(1), devices))
    results.append((parallel.to_host(out).params, parallel.to_host(metrics)['loss']))
  chex.assert_trees_all_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(tokenizer_dir, tmp_path):
  args = [sys.executable, str(REPO / 'run.py'), '--config=experiments/gpt_cifar.py:smoke',
          f'--config.prior.tokenizer_workdir={tokenizer_dir}', '--config.data.max_examples=64',
          '--config.eval.max_examples=32', '--config.train.batch_size=8',
          '--config.sample.batch_size=8', '--config.eval.batch_size=16',
          '--config.train.image_every=0', '--config.train.num_steps=20',
          '--config.train.checkpoint_every=3', '--config.train.log_every=1', '--cpu_devices=1']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(args + [f'--workdir={killed}'], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = killed / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count('"loss"') >= 6:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  killed_at, _ = _params(killed)
  assert killed_at is not None and killed_at < 20, f'kill landed at {killed_at}'
  rerun = subprocess.run(args + [f'--workdir={killed}'], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=300, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  straight = subprocess.run(args + [f'--workdir={tmp_path / "straight"}'], cwd=REPO, env=env,
                            text=True, capture_output=True, timeout=300, check=False)
  assert straight.returncode == 0, straight.stderr[-3000:]
  (step_a, a), (step_b, b) = _params(killed), _params(tmp_path / 'straight')
  assert step_a == step_b == 20
  chex.assert_trees_all_equal(a, b)

