"""The 'jit' data parallelism (jit + shard_map over a mesh) against the 'pmap' one."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import vqgan_cifar
from experiments import vqvae_cifar
from vq.runtime import parallel
from vq.runtime import state as ts
from vq.training import step as steps
from vq.training import trainer


def _vqvae(**overrides):
  c = vqvae_cifar.get_config('smoke')
  c.update_from_flattened_dict(overrides)
  return c


def _vqgan(**overrides):
  c = vqgan_cifar.get_config('smoke')
  c.loss.perceptual_weight = 0.0  # LPIPS holds no collective; its own tests cover it
  # Far smaller than :smoke so the two steps compile in seconds on 2 cores; attention
  # holds no collective.
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = ()
  c.disc.n_layers = 1
  # The discriminator and the adaptive weight (a pmean of last-layer gradients) act
  # from step 0, so both steps exercise every collective of the GAN step.
  c.loss.disc_start = 0
  c.loss.disc_warmup = 0
  c.update_from_flattened_dict(overrides)
  return c


def _run(par: parallel.Parallel, config, state, images_per_step):
  """Steps under `par` from `state`; returns (host state, host metrics)."""
  settings = steps.StepSettings.from_config(config)
  p_step = par.step(functools.partial(steps.train_step, settings=settings))
  p_state, p_rng = par.replicate(state), par.replicate(jax.random.PRNGKey(1))
  n = jax.local_device_count()
  history = []
  for images in images_per_step:
    batch = par.shard({'image': images.reshape((n, -1) + images.shape[1:])})
    p_state, metrics = p_step(p_state, batch, p_rng)
    history.append(jax.device_get(par.unreplicate(metrics)))
  return par.to_host(p_state), history


def _images(steps_, n=16):
  rng = np.random.default_rng(0)
  return [rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32) for _ in range(steps_)]


@pytest.mark.parametrize('make_config', [_vqvae, pytest.param(_vqgan, marks=pytest.mark.slow)],
                         ids=['vqvae', 'vqgan'])
def test_jit_step_equals_pmap_step(make_config):
  assert jax.local_device_count() >= 2, (
      'parallel tests need >= 2 CPU devices; tests/conftest.py forces them via XLA_FLAGS')
  config = make_config()
  images = _images(2)
  fresh = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  jit_state, jit_metrics = _run(parallel.get('jit'), config, fresh, images)
  pmap_state, pmap_metrics = _run(parallel.get('pmap'), config, fresh, images)
  assert int(jit_state.step) == int(pmap_state.step) == 2
  chex.assert_trees_all_close(ts.checkpointable(jit_state), ts.checkpointable(pmap_state),
                              rtol=1e-5, atol=1e-6)
  for a, b in zip(jit_metrics, pmap_metrics):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
  # The steps did something: the state moved away from its initial value.
  assert not np.allclose(jit_state.params['decoder']['conv_out']['kernel'],
                         fresh.params['decoder']['conv_out']['kernel'])


def test_jit_layout_replicated_state_split_batch():
  par = parallel.get('jit')
  n = jax.local_device_count()
  state = par.replicate({'w': np.arange(6, dtype=np.float32).reshape(2, 3)})
  chex.assert_shape(state['w'], (2, 3))  # one global copy, no device axis
  assert state['w'].sharding.is_fully_replicated
  batch = par.shard({'image': np.arange(n * 2 * 5, dtype=np.float32).reshape(n, 2, 5)})
  chex.assert_shape(batch['image'], (n, 2, 5))
  # Device i holds row i of the host batch, as pmap would give it.
  for shard_ in batch['image'].addressable_shards:
    i = shard_.index[0].start
    np.testing.assert_array_equal(np.asarray(shard_.data)[0],
                                  np.arange(i * 10, i * 10 + 10).reshape(2, 5))


def test_eval_step_psum_and_gather_match_numpy():
  n = jax.local_device_count()

  def eval_fn(scale, batch):
    x = batch['x'] * scale
    return jax.lax.psum(x.sum(), 'batch'), jax.lax.all_gather(x, 'batch', tiled=True)

  host = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
  for kind in parallel.KINDS:
    par = parallel.get(kind)
    total, rows = jax.device_get(par.unreplicate(
        par.eval_step(eval_fn)(par.replicate(np.float32(2.0)), par.shard({'x': host}))))
    np.testing.assert_allclose(total, 2.0 * host.sum(), err_msg=kind)
    np.testing.assert_array_equal(rows, 2.0 * host.reshape(-1), err_msg=kind)


def test_get_rejects_unknown_kind():
  with pytest.raises(ValueError, match="train.parallel='pjit'"):
    parallel.get('pjit')


def test_trainer_runs_jit_then_resumes_under_pmap(tmp_path):
  config = _vqvae(**{'train.num_steps': 2, 'train.log_every': 1, 'train.image_every': 2,
                     'train.checkpoint_every': 2, 'train.parallel': 'jit'})
  trainer.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  logged = [r for r in records if 'loss' in r]
  assert [r['step'] for r in logged] == [1, 2]
  assert all(np.isfinite(r['loss']) for r in logged)
  assert (tmp_path / 'images' / 'step_0000002.png').exists()
  # Checkpoints hold host arrays, so either implementation resumes the other's.
  config.unlock()
  config.train.num_steps = 3
  config.train.parallel = 'pmap'
  config.lock()
  trainer.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2, 3]


def test_steps_on_several_cpu_devices_return_once_they_have_run():
  fn = jax.pmap(lambda x: jax.lax.psum(x, 'batch'), axis_name='batch')
  waited = parallel.one_at_a_time(fn)
  assert waited is not fn and waited.__wrapped__ is fn and waited.lower is not None
  x = np.arange(jax.local_device_count(), dtype=np.float32)
  out = waited(x)
  assert out.is_ready()
  np.testing.assert_array_equal(out, np.full_like(x, x.sum()))
  assert parallel.one_at_a_time(fn, jax.local_devices()[:1]) is fn  # one device: as is
  assert isinstance(parallel.get('pmap').step(lambda s, b, r: (s, b)), type(waited))


def test_thousands_of_tiny_pmapped_steps_on_four_cpu_devices_run_through():
  """The loop that deadlocked XLA:CPU when steps were dispatched ahead (docs/cpu.md)."""

  def step(s, b, r):
    g = jax.lax.pmean(jax.grad(lambda p: jnp.mean((b @ p) ** 2))(s), 'batch')
    return s - 1e-4 * g, jnp.mean(g) + 0 * r[0]

  par = parallel.get('pmap')
  p_step = par.step(step)
  d = jax.local_device_count()
  s, r = par.replicate(jnp.ones((8, 8))), par.replicate(jax.random.PRNGKey(0))
  batch = par.shard(np.ones((d, 4, 8), np.float32))
  for _ in range(2000):
    s, m = p_step(s, batch, r)
  expected, b = np.ones((8, 8)), np.ones((4, 8))
  for _ in range(2000):  # the same descent in numpy: d mean((b p)^2) / dp = 2 b^T b p / 32
    expected = expected - 1e-4 * 2 * b.T @ (b @ expected) / b.size
  np.testing.assert_allclose(par.to_host(s), expected, rtol=1e-4, atol=1e-7)
