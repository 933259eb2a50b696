"""Train step, loop, resume and evaluation tests on tiny configs."""

import json
import pathlib

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import vqgan_cifar
from experiments import vqvae_cifar
from vq.config import builders
from vq import data
from vq.evaluation import evaluator
from vq.runtime import parallel
from vq.runtime import state as ts
from vq.training import step as steps
from vq.training import trainer
from tests import train_util


def _smoke(**overrides):
  config = vqvae_cifar.get_config('smoke')
  config.update_from_flattened_dict(overrides)
  return config


_run_steps = train_util.run_steps


@pytest.mark.parametrize('kind', ['ema', 'vq'])
def test_pmapped_step_equals_single_device_step_on_concatenated_batch(kind):
  assert jax.local_device_count() >= 2, (
      'pmap tests need >= 2 CPU devices; tests/conftest.py forces them via XLA_FLAGS')
  config = _smoke(**{'quantizer.kind': kind})
  rng = np.random.default_rng(0)
  images = [rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32) for _ in range(3)]
  devices = jax.local_devices()
  multi, m_multi = _run_steps(config, devices[:2], images)
  single, m_single = _run_steps(config, devices[:1], images)
  # Every device holds the same state after a step.
  for leaf in jax.tree.leaves(multi):
    np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[1]))
  chex.assert_trees_all_close(ts.checkpointable(parallel.to_host(multi)),
                              ts.checkpointable(parallel.to_host(single)),
                              rtol=2e-4, atol=2e-5)
  for a, b in zip(m_multi, m_single):
    chex.assert_trees_all_close(a, b, rtol=2e-4, atol=2e-5)
  assert int(parallel.to_host(multi).step) == 3


def test_step_gradient_equals_hand_written_vqvae_loss_with_beta_on_commitment():
  """One SGD step of the gradient-learned VQ equals -lr * grad of van den Oord's loss.

  L = recon_weight * mean((x_hat - x)^2) + mean((sg(z_e) - e)^2) + beta * mean((z_e - sg(e))^2)
  with e the nearest code and x_hat decoded from the straight-through z_e + sg(e - z_e).
  Beta on the codebook term instead would scale the codebook's gradient by beta and the
  encoder's commitment gradient by 1 / beta.
  """
  config = _smoke(**{'quantizer.kind': 'vq', 'quantizer.init': 'random',
                     'quantizer.restart_after': 0, 'quantizer.beta': 0.25})
  assert config.loss.recon == 'l2'
  lr = 0.5
  state = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  tx = optax.sgd(lr)
  state = state.replace(tx=tx, opt_state=tx.init(state.params))
  images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  new, _ = _run_steps(config, jax.local_devices()[:1], [images], state)
  update = jax.tree.map(lambda n, o: (o - n) / lr, parallel.to_host(new).params, state.params)

  model = builders.build_tokenizer(config)
  sg = jax.lax.stop_gradient

  def loss(params):
    variables = {'params': params}
    z_e = model.apply(variables, images, method=lambda m, x: m.encoder(x)).astype(jnp.float32)
    z = z_e.reshape(-1, z_e.shape[-1])
    codebook = params['quantizer']['codebook']
    nearest = jnp.argmin(jnp.sum((sg(z)[:, None, :] - sg(codebook)[None]) ** 2, -1), axis=1)
    e = codebook[nearest]
    z_q = (z + sg(e - z)).reshape(z_e.shape)
    recon = model.apply(variables, z_q, method=lambda m, v: m.decoder(v))
    return (config.loss.recon_weight * jnp.mean((recon - images) ** 2)
            + jnp.mean((sg(z) - e) ** 2) + 0.25 * jnp.mean((z - sg(e)) ** 2))

  expected = jax.jit(jax.grad(loss))(state.params)
  assert np.abs(np.asarray(expected['quantizer']['codebook'])).max() > 0
  chex.assert_trees_all_close(update, expected, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize('objective', ['vqvae', 'vqgan'])
def test_step_passes_only_rng_streams_that_some_module_reads(objective, monkeypatch):
  """Every rng stream the step hands to `apply` is read by a module (`make_rng`)."""
  if objective == 'vqvae':
    config = _smoke(**{'quantizer.kind': 'vq', 'quantizer.restart_after': 1})
  else:
    config = vqgan_cifar.get_config('smoke')
    config.loss.perceptual_weight = 0.0
  # Shapes are all tracing needs: no initialiser has to compile or run.
  state = jax.eval_shape(lambda: ts.create_train_state(config, ts.init_key(0), (32, 32, 3)))
  passed, read = set(), set()
  real_apply, real_make_rng = nn.Module.apply, nn.Module.make_rng

  def apply(self, *args, rngs=None, **kwargs):
    passed.update(rngs or {})
    return real_apply(self, *args, rngs=rngs, **kwargs)

  def make_rng(self, name='params'):
    read.add(name)
    return real_make_rng(self, name)

  monkeypatch.setattr(nn.Module, 'apply', apply)
  monkeypatch.setattr(nn.Module, 'make_rng', make_rng)
  step = functools.partial(steps.train_step, settings=steps.StepSettings.from_config(config))
  # Tracing is enough: every apply and make_rng call happens while the step is traced.
  jax.make_jaxpr(step, axis_env=[('batch', 2)])(
      state, {'image': np.zeros((4, 32, 32, 3), np.float32)}, jax.random.PRNGKey(0))
  assert 'codebook' in read  # the upkeep's stream (k-means and restarts)
  assert passed <= read, f'streams passed but never read: {passed - read}'


def test_rng_is_per_step_and_per_device():
  keys = jax.pmap(lambda r, s: steps.step_rng(r, s), axis_name='batch',
                  devices=jax.local_devices()[:2])(
                      parallel.replicate(jax.random.PRNGKey(0), jax.local_devices()[:2]),
                      jnp.array([3, 3]))
  assert not np.array_equal(keys[0], keys[1])
  expected0 = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 3), 0)
  np.testing.assert_array_equal(keys[0], expected0)


def _params_of(workdir):
  from vq.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(pathlib.Path(workdir) / 'checkpoints')
  step = ckpt.latest_step()
  state, _ = ckpt.restore(step, ts.create_train_state(_smoke(), ts.init_key(0), (32, 32, 3)))
  ckpt.close()
  return step, state


def test_smoke_trains_then_resumes_exactly(tmp_path):
  """2 steps, then the same call with more steps resumes; equals an uninterrupted run."""
  config = _smoke(**{'train.num_steps': 2, 'train.log_every': 1, 'train.image_every': 2,
                     'train.checkpoint_every': 2})
  interrupted = tmp_path / 'interrupted'
  trainer.train_and_evaluate(config, str(interrupted))
  assert (interrupted / 'config.json').exists()
  assert json.loads((interrupted / 'config.json').read_text())['train']['num_steps'] == 2
  assert (interrupted / 'images' / 'step_0000002.png').exists()
  records = [json.loads(l) for l in (interrupted / 'metrics.jsonl').read_text().splitlines()]
  logged = [r for r in records if 'loss' in r]
  assert [r['step'] for r in logged] == [1, 2]
  for key in ('perplexity', 'codebook_usage', 'dead_codes', 'grad_norm', 'param_norm'):
    assert key in logged[-1]
  assert list((interrupted / 'checkpoints').iterdir())

  config.unlock()
  config.train.num_steps = 4
  config.lock()
  trainer.train_and_evaluate(config, str(interrupted))
  records = [json.loads(l) for l in (interrupted / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2, 3, 4]

  straight = tmp_path / 'straight'
  trainer.train_and_evaluate(config, str(straight))
  step_a, a = _params_of(interrupted)
  step_b, b = _params_of(straight)
  assert step_a == step_b == 4
  chex.assert_trees_all_equal(ts.checkpointable(a), ts.checkpointable(b))


def test_eval_counts_each_example_once_and_matches_numpy(tmp_path):
  config = _smoke(**{'train.num_steps': 1, 'train.image_every': 0, 'eval.batch_size': 16,
                     'eval.lpips': False})
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
  npz = tmp_path / 'eval.npz'
  np.savez(npz, images=images)
  config.eval.dataset = f'npz:{npz}'
  workdir = tmp_path / 'wd'
  trainer.train_and_evaluate(config, str(workdir))
  results = evaluator.evaluate(config, str(workdir))
  assert results['num_examples'] == 37
  saved = json.loads((workdir / 'eval' / 'step_1.json').read_text())
  for key in ('step', 'dataset', 'num_examples', 'psnr', 'ssim', 'mse', 'codebook_usage',
              'perplexity'):
    assert key in saved

  # Oracle: reconstruct on the host, quantise like a PNG, numpy PSNR/MSE per image.
  _, state = _params_of(workdir)
  recon = trainer.Reconstructor(config)(state.params, state.vq_stats, data.to_float(images))
  y = np.clip(np.round((recon.astype(np.float64) + 1) * 127.5), 0, 255)
  mse = np.mean((images.astype(np.float64) - y) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(results['mse'], mse.mean(), rtol=1e-4)
  np.testing.assert_allclose(results['psnr'], np.mean(10 * np.log10(255.0 ** 2 / mse)),
                             rtol=1e-4)
  assert 0 < results['ssim'] <= 1
  assert 0 < results['codebook_usage'] <= 1


def test_eval_every_evaluates_during_training_like_mode_eval(tmp_path):
  config = _smoke(**{'train.num_steps': 4, 'train.eval_every': 3, 'train.image_every': 0,
                     'train.checkpoint_every': 4, 'eval.batch_size': 16,
                     'eval.max_examples': 32, 'eval.lpips': False, 'eval.rfid': False})
  workdir = tmp_path / 'wd'
  final = trainer.train_and_evaluate(config, str(workdir))
  # At every eval_every steps and at the end.
  assert sorted(p.name for p in (workdir / 'eval').iterdir()) == ['step_3.json', 'step_4.json']
  during = json.loads((workdir / 'eval' / 'step_4.json').read_text())
  assert during['num_examples'] == 32 and during['step'] == 4
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'eval/psnr' in r] == [3, 4]
  # The same numbers as --mode=eval on the final checkpoint.
  after = evaluator.evaluate(config, str(workdir))
  for key in ('psnr', 'ssim', 'mse', 'codebook_usage', 'perplexity'):
    np.testing.assert_allclose(during[key], after[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(final[f'eval/{key}'], after[key], rtol=1e-5, err_msg=key)
  # Evaluations at steps 3 and 4 saw different weights.
  assert json.loads((workdir / 'eval' / 'step_3.json').read_text())['mse'] != during['mse']


def test_eval_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match='train first'):
    evaluator.evaluate(_smoke(), str(tmp_path / 'empty'))



@pytest.mark.parametrize('kind', ['ema', pytest.param('vq', marks=pytest.mark.slow)])
def test_bfloat16_compute_keeps_float32_state_and_losses(kind):
  config = _smoke(**{'model.dtype': 'bfloat16', 'quantizer.kind': kind})
  rng = np.random.default_rng(0)
  images = [rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32) for _ in range(2)]
  p_state, metrics = _run_steps(config, jax.local_devices()[:2], images)
  host = parallel.to_host(p_state)
  for tree in (host.params, host.vq_stats, host.opt_state):
    for leaf in jax.tree.leaves(tree):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.asarray(leaf).dtype == np.float32
  for m in metrics:
    assert all(np.asarray(v).dtype == np.float32 for v in m.values()), m
    assert np.isfinite(m['loss'])
  # The forward really runs in bfloat16: the encoder output differs from float32 compute.
  f32 = _smoke(**{'quantizer.kind': kind})
  state = ts.create_train_state(f32, ts.init_key(0), (32, 32, 3))
  enc = lambda c: builders.build_tokenizer(c).apply(
      {'params': state.params, 'vq_stats': state.vq_stats}, images[0],
      method=lambda m, x: m.encoder(x))
  assert enc(config).dtype == jnp.bfloat16 and enc(f32).dtype == jnp.float32
