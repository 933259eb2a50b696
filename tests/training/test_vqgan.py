"""The VQ-GAN step against explicit, separately computed gradients."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import vqgan_cifar
from vq.config import builders
from vq.training import losses
from vq.runtime import parallel
from vq.runtime import state as ts
from vq.training import step as steps


def _config(**overrides):
  c = vqgan_cifar.get_config('smoke')
  c.loss.perceptual_weight = 0.0  # LPIPS has its own tests; keep these fast
  # Smaller than :smoke so each step compiles in seconds on 2 cores.
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (16,)
  c.disc.n_layers = 1
  c.loss.disc_start = 2
  c.loss.disc_warmup = 1
  c.train.num_steps = 10
  c.update_from_flattened_dict(overrides)
  return c


def _sgd_state(config, lr=1.0):
  """A fresh state whose optimizers are plain SGD, so an update is -lr * gradient."""
  state = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  tx, dtx = optax.sgd(lr), optax.sgd(lr)
  return state.replace(tx=tx, disc_tx=dtx, opt_state=tx.init(state.params),
                       disc_opt_state=dtx.init(state.disc_params))


def _step(config, state, images, devices, p_step=None):
  if p_step is None:
    p_step = _pmapped(config, devices)
  n = len(devices)
  batch = parallel.shard({'image': images.reshape((n, -1) + images.shape[1:])}, devices)
  new, metrics = p_step(parallel.replicate(state, devices), batch,
                        parallel.replicate(jax.random.PRNGKey(1), devices))
  return parallel.to_host(new), jax.device_get(parallel.unreplicate(metrics))


def _pmapped(config, devices):
  settings = steps.StepSettings.from_config(config)
  return parallel.pmap_train_step(functools.partial(steps.train_step, settings=settings),
                                  devices=devices)


def _images(n=8, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)


def _explicit_gradients(config, state, images):
  """Generator gradients of each loss term computed separately with jax.grad."""
  model = builders.build_tokenizer(config)
  disc = builders.build_discriminator_from_config(config)

  def forward(params):
    (recon, q), _ = model.apply({'params': params, 'vq_stats': state.vq_stats}, images,
                                train=True, mutable=['vq_stats'])
    return recon, q

  def rec_loss(params):
    recon, q = forward(params)
    return config.loss.recon_weight * jnp.mean(
        losses.reconstruction_loss(recon, images, kind=config.loss.recon)), q.loss

  def g_loss(params):
    recon, _ = forward(params)
    logits = disc.apply({'params': state.disc_params}, recon)
    return jnp.mean(losses.generator_loss(logits, kind=config.loss.gan_loss))

  @jax.jit
  def grads(params):
    return (jax.grad(lambda p: rec_loss(p)[0])(params),
            jax.grad(lambda p: rec_loss(p)[1])(params), jax.grad(g_loss)(params))

  return grads(state.params)


def _conv_out_kernel_gradient(config, state, images, loss_of_recon):
  """d loss / d decoder.conv_out.kernel by a full jax.grad through the whole network."""
  model = builders.build_tokenizer(config)

  def loss(kernel):
    params = jax.tree.map(lambda x: x, state.params)
    params['decoder']['conv_out']['kernel'] = kernel
    (recon, _), _ = model.apply({'params': params, 'vq_stats': state.vq_stats}, images,
                                train=True, mutable=['vq_stats'])
    return loss_of_recon(recon)

  return np.asarray(jax.jit(jax.grad(loss))(state.params['decoder']['conv_out']['kernel']))


def test_adaptive_weight_and_generator_gradient_equal_explicit_computation():
  config = _config(**{'loss.disc_start': 0, 'loss.disc_warmup': 0})
  assert config.loss.recon == 'l1' and config.loss.gan_loss == 'hinge'
  state = _sgd_state(config)
  images = _images()
  new, metrics = _step(config, state, images, jax.local_devices()[:1])

  # taming's calculate_adaptive_weight: norms of the gradients w.r.t. last_layer =
  # decoder.conv_out.weight (the kernel alone), L1 and hinge losses written out here.
  disc = builders.build_discriminator_from_config(config)
  rec_kernel = _conv_out_kernel_gradient(
      config, state, images,
      lambda r: config.loss.recon_weight * jnp.mean(jnp.abs(r - images)))
  gan_kernel = _conv_out_kernel_gradient(
      config, state, images, lambda r: -jnp.mean(disc.apply({'params': state.disc_params}, r)))
  expected_weight = np.clip(np.linalg.norm(rec_kernel) / (np.linalg.norm(gan_kernel) + 1e-4),
                            0, 1e4) * config.loss.disc_weight
  np.testing.assert_allclose(metrics['d_weight'], expected_weight, rtol=1e-4)

  g_rec, g_q, g_adv = _explicit_gradients(config, state, images)
  total = jax.tree.map(lambda a, b, c: a + b + expected_weight * c, g_rec, g_q, g_adv)
  update = jax.tree.map(lambda new_p, old_p: old_p - new_p, new.params, state.params)
  chex.assert_trees_all_close(update, total, rtol=2e-3, atol=1e-6)


def test_before_disc_start_generator_sees_no_adversarial_term_and_disc_waits():
  config = _config(**{'loss.disc_start': 5, 'loss.disc_warmup': 2})
  state = _sgd_state(config)
  images = _images()
  new, metrics = _step(config, state, images, jax.local_devices()[:1])
  g_rec, g_q, _ = _explicit_gradients(config, state, images)
  update = jax.tree.map(lambda n, o: o - n, new.params, state.params)
  chex.assert_trees_all_close(update, jax.tree.map(jnp.add, g_rec, g_q), rtol=2e-3, atol=1e-6)
  assert metrics['d_weight'] == 0.0
  assert metrics['disc_active'] == 0.0
  chex.assert_trees_all_equal(new.disc_params, state.disc_params)


def test_discriminator_trains_during_warmup_with_hinge_gradient():
  config = _config(**{'loss.disc_start': 5, 'loss.disc_warmup': 5})
  state = _sgd_state(config)
  images = _images()
  new, metrics = _step(config, state, images, jax.local_devices()[:1])
  assert metrics['disc_active'] == 1.0 and metrics['d_weight'] == 0.0
  model = builders.build_tokenizer(config)
  disc = builders.build_discriminator_from_config(config)
  (recon, _), _ = jax.jit(lambda p, s: model.apply({'params': p, 'vq_stats': s}, images,
                                                    train=True, mutable=['vq_stats']))(
                                                        state.params, state.vq_stats)

  def d_loss(dp):
    real = disc.apply({'params': dp}, images)
    fake = disc.apply({'params': dp}, jax.lax.stop_gradient(recon))
    return jnp.mean(jnp.maximum(0, 1 - real) + jnp.maximum(0, 1 + fake))  # hinge, by hand

  expected = jax.jit(jax.grad(d_loss))(state.disc_params)
  update = jax.tree.map(lambda n, o: o - n, new.disc_params, state.disc_params)
  chex.assert_trees_all_close(update, expected, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(metrics['d_loss'], jax.jit(d_loss)(state.disc_params), rtol=1e-5)


def test_pmapped_vqgan_step_equals_single_device_step():
  assert jax.local_device_count() >= 2, 'needs >= 2 forced CPU devices (tests/conftest.py)'
  config = _config(**{'loss.disc_start': 0, 'loss.disc_warmup': 0, 'loss.lecam_weight': 0.1})
  # SGD: Adam would turn float noise in the (theoretically zero) gradients of conv biases
  # followed by GroupNorm into +-lr updates, hiding real differences behind fake ones.
  state = _sgd_state(config, lr=0.1)
  images = _images()
  devices = jax.local_devices()
  multi, m_multi = _step(config, state, images, devices[:2])
  single, m_single = _step(config, state, images, devices[:1])
  chex.assert_trees_all_close(ts.checkpointable(multi), ts.checkpointable(single),
                              rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(m_multi, m_single, rtol=2e-4, atol=2e-5)


def _softplus(x):
  return np.logaddexp(0.0, x)


def test_nonsaturating_lecam_r1_and_weight_ema_equal_their_formulas():
  config = _config(**{'loss.gan_loss': 'nonsaturating', 'loss.r1_weight': 0.3,
                      'loss.lecam_weight': 0.2, 'loss.lecam_decay': 0.9,
                      'train.ema_decay': 0.75, 'loss.disc_start': 0, 'loss.disc_warmup': 0})
  images = _images()
  state = _sgd_state(config, lr=0.5)
  model = builders.build_tokenizer(config)
  disc = builders.build_discriminator_from_config(config)
  # The logits, from the generator and the discriminator applied on their own.
  (recon, _), _ = jax.jit(lambda p, s: model.apply({'params': p, 'vq_stats': s}, images,
                                                    train=True, mutable=['vq_stats']))(
                                                        state.params, state.vq_stats)
  logits = jax.jit(lambda dp, x: disc.apply({'params': dp}, x))
  real = np.asarray(logits(state.disc_params, images), np.float64)
  fake = np.asarray(logits(state.disc_params, recon), np.float64)
  # LeCAM anchors inside the logits' range, so both of its hinges are partly active; EMA
  # weights away from the params, so the EMA's old value matters.
  anchor_real, anchor_fake = float(np.median(fake)), float(np.median(real))
  state = state.replace(
      gan_stats={'ema_real_logit': np.float32(anchor_real),
                 'ema_fake_logit': np.float32(anchor_fake)},
      ema_params=jax.tree.map(lambda x: 0.5 * x, state.params))
  new, metrics = _step(config, state, images, jax.local_devices()[:1])

  lecam = np.mean(np.maximum(real - anchor_fake, 0) ** 2 +
                  np.maximum(anchor_real - fake, 0) ** 2)
  assert lecam > 0
  expected_d = np.mean(_softplus(-real)) + np.mean(_softplus(fake)) + 0.2 * lecam
  np.testing.assert_allclose(metrics['d_loss'], expected_d, rtol=1e-5)
  np.testing.assert_allclose(metrics['g_loss'], np.mean(_softplus(-fake)), rtol=1e-5)
  np.testing.assert_allclose(metrics['logits_real'], real.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['logits_fake'], fake.mean(), rtol=1e-5, atol=1e-6)
  # LeCAM anchors: EMAs of the mean logits.
  np.testing.assert_allclose(new.gan_stats['ema_real_logit'],
                             0.9 * anchor_real + 0.1 * real.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.gan_stats['ema_fake_logit'],
                             0.9 * anchor_fake + 0.1 * fake.mean(), rtol=1e-5, atol=1e-6)

  # R1: mean over examples of ||d sum(D(x_i)) / d x_i||^2, from jax.grad of the logits
  # alone, checked against a central difference along a random direction.
  input_grad = np.asarray(jax.jit(jax.grad(
      lambda x: jnp.sum(disc.apply({'params': state.disc_params}, x))))(images), np.float64)
  direction = np.random.default_rng(1).normal(size=images.shape).astype(np.float32)
  h = 1e-2
  total = lambda x: float(np.sum(np.asarray(logits(state.disc_params, x), np.float64)))
  np.testing.assert_allclose((total(images + h * direction) - total(images - h * direction))
                             / (2 * h), np.sum(input_grad * direction), rtol=2e-2)
  r1 = np.mean(np.sum(input_grad ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(metrics['r1_penalty'], r1, rtol=1e-4)

  # The discriminator's SGD update is the gradient of the whole loss, written out here.
  def d_total(dp):
    d = lambda x: disc.apply({'params': dp}, x)
    r, f = d(images), d(jax.lax.stop_gradient(recon))
    lecam_ = jnp.mean(jnp.maximum(r - anchor_fake, 0) ** 2 +
                      jnp.maximum(anchor_real - f, 0) ** 2)
    grad_x = jax.grad(lambda x: jnp.sum(d(x)))(images)
    return (jnp.mean(jax.nn.softplus(-r)) + jnp.mean(jax.nn.softplus(f)) + 0.2 * lecam_
            + 0.3 * jnp.mean(jnp.sum(grad_x ** 2, axis=(1, 2, 3))))

  expected = jax.tree.map(lambda g: 0.5 * g, jax.jit(jax.grad(d_total))(state.disc_params))
  update = jax.tree.map(lambda n, o: o - n, new.disc_params, state.disc_params)
  chex.assert_trees_all_close(update, expected, rtol=2e-3, atol=1e-6)

  # Weight EMA: decay * old EMA + (1 - decay) * the new params, leaf by leaf.
  chex.assert_trees_all_close(
      new.ema_params,
      jax.tree.map(lambda e, p: 0.75 * e + 0.25 * p, state.ema_params, new.params),
      rtol=1e-6, atol=1e-7)
  assert not np.allclose(new.params['decoder']['conv_out']['kernel'],
                         state.params['decoder']['conv_out']['kernel'])


@pytest.mark.slow
def test_vqgan_smoke_with_lpips_trains_two_steps_then_resumes(tmp_path):
  from vq.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from vq.training import trainer  # pylint: disable=g-import-not-at-top
  config = _config(**{'loss.perceptual_weight': 1.0, 'loss.disc_start': 1,
                      'loss.disc_warmup': 1, 'train.num_steps': 2, 'train.log_every': 1,
                      'train.image_every': 0, 'train.ema_decay': 0.9})
  trainer.train_and_evaluate(config, str(tmp_path))
  config.train.num_steps = 3
  last = trainer.train_and_evaluate(config, str(tmp_path))
  assert last['perceptual_loss'] > 0 and last['d_weight'] > 0
  ckpt = checkpointing.Checkpointer(tmp_path / 'checkpoints')
  assert ckpt.all_steps() == [2, 3]
  meta = ckpt.read_meta(3)
  ckpt.close()
  assert meta['objective'] == 'vqgan'
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  logged = [r for r in records if 'd_loss' in r]
  assert [r['step'] for r in logged] == [1, 2, 3]
  for key in ('d_weight', 'logits_real', 'logits_fake', 'd_loss', 'g_loss', 'perceptual_loss'):
    assert key in logged[-1]
