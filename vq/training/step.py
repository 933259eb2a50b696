"""Pure train steps: (state, batch, rng) -> (state, metrics).

Usage sketch::

  step_fn = functools.partial(train_step, settings=StepSettings.from_config(config))
  p_step = parallel.pmap_train_step(step_fn)           # the only place that knows pmap
  state, metrics = p_step(state, batch, rng)            # batch['image']: [devices, b, H, W, 3]

Each step runs under a named axis 'batch': gradients, metrics and codebook statistics
are averaged (or summed) over it here, so the same function serves 1 or many devices.

The VQ-GAN step does one forward pass of the generator and one of the discriminator on
the reconstruction, and pulls each back twice with `jax.vjp`: the discriminator's
pullback gives the generator its adversarial gradient and the discriminator its own;
taming's adaptive weight uses gradients w.r.t. the kernel of the decoder's last layer
(taming's `last_layer = decoder.conv_out.weight`; the bias is left out, as there),
obtained by re-applying only that layer to its sown input (no second backward through
the decoder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vq.config import builders
from vq.quantizers import usage as codebook_usage
from vq.runtime import state as ts

AXIS = 'batch'
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything a step needs besides the state: modules and loss fields (hashable)."""
  model: nn.Module
  output_layer: nn.Module | None
  discriminator: nn.Module | None
  lpips: nn.Module | None
  objective: str
  recon: str
  recon_weight: float
  perceptual_weight: float
  disc_weight: float
  adaptive_weight: bool
  gan_loss: str
  disc_start: int
  disc_warmup: int
  lecam_weight: float
  lecam_decay: float
  r1_weight: float
  ema_decay: float
  usage_size: int
  usage_window: int
  maintain: bool
  kmeans_init: bool
  restart_after: int
  lr_schedule: Any

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'StepSettings':
    gan = ts.uses_gan(config)
    lpips_module = None
    if ts.uses_lpips(config):
      from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
      lpips_module = lpips.LPIPS()
    l, q = config.loss, config.quantizer
    model = builders.build_tokenizer(config, axis_name=AXIS)
    return cls(
        model=model,
        output_layer=builders.decoder_output_layer(config) if gan else None,
        discriminator=builders.build_discriminator_from_config(config) if gan else None,
        lpips=lpips_module, objective=config.objective, recon=l.recon,
        recon_weight=l.recon_weight, perceptual_weight=l.perceptual_weight,
        disc_weight=l.disc_weight, adaptive_weight=l.adaptive_weight, gan_loss=l.gan_loss,
        disc_start=l.disc_start, disc_warmup=l.disc_warmup, lecam_weight=l.lecam_weight,
        lecam_decay=l.lecam_decay, r1_weight=l.r1_weight, ema_decay=config.train.ema_decay,
        usage_size=model.quantizer.usage_size, usage_window=q.usage_window,
        maintain=builders.maintains_codebook(q), kmeans_init=q.init == 'kmeans',
        restart_after=q.restart_after,
        lr_schedule=builders.learning_rate_schedule(config.train.learning_rate, config.train))


def step_rng(rng: jax.Array, step: jax.Array) -> jax.Array:
  """Per-step, per-device key: fold in the step, then the device's index on 'batch'."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(AXIS))


def shared_step_rng(rng: jax.Array, step: jax.Array) -> jax.Array:
  """Per-step key equal on every device (codebook upkeep must agree everywhere)."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), 0x7FFFFFFF)


def _reconstruction(s: StepSettings, recon: jax.Array, images: jax.Array) -> jax.Array:
  from vq.training import losses  # pylint: disable=g-import-not-at-top
  return jnp.mean(losses.reconstruction_loss(recon, images, kind=s.recon))


def _codebook_metrics(s: StepSettings, q, usage) -> Metrics:
  """Batch statistics plus the upkeep's sliding-window usage (independent of batch size)."""
  batch_used = jnp.sum(q.counts > 0)
  return {'codebook_loss': q.codebook_loss, 'commitment_loss': q.commitment_loss,
          'entropy_loss': q.entropy_loss, 'perplexity': q.perplexity,
          'batch_usage': batch_used / s.usage_size, **usage}


# Rows of encoder outputs each device contributes to codebook upkeep (k-means, restarts).
UPKEEP_ROWS_PER_DEVICE = 4096


def upkeep_needed(dead: jax.Array, kmeans_now: jax.Array) -> jax.Array:
  """Whether this step rewrites any code: some code is dead, or k-means runs now."""
  return jnp.logical_or(jnp.any(dead), kmeans_now)


def _maintain(s: StepSettings, state: ts.TrainState, lookup_input: jax.Array,
              dead: jax.Array, kmeans_now: jax.Array, rng: jax.Array
              ) -> tuple[ts.TrainState, jax.Array]:
  """Gathers encoder rows from every device and rewrites dead codes (or all, k-means).

  Returns the state with the new codebook (and reset statistics / Adam moments of the
  rewritten rows) and the bool [K] mask of rewritten rows.
  """
  z = lookup_input.reshape(-1, lookup_input.shape[-1])
  if z.shape[0] > UPKEEP_ROWS_PER_DEVICE:
    pick = jax.random.choice(jax.random.fold_in(step_rng(rng, state.step), 1), z.shape[0],
                             (UPKEEP_ROWS_PER_DEVICE,), replace=False)
    z = z[pick]
  z = jax.lax.all_gather(z, AXIS, tiled=True)
  changed, variables = s.model.apply(
      {'params': state.params, 'vq_stats': state.vq_stats}, z, dead, kmeans_now,
      method=lambda m, *a: m.quantizer.maintain(*a), mutable=['params', 'vq_stats'],
      rngs={'codebook': shared_step_rng(rng, state.step)})
  params = variables['params']
  # Adam moments of rewritten rows of a gradient-learned codebook start again from zero.
  opt_state = state.opt_state
  if 'codebook' in state.params.get('quantizer', {}):
    mask = jax.tree.map(lambda x: jnp.zeros((), bool), state.params)
    mask['quantizer']['codebook'] = changed[:, None]
    opt_state = optax.tree_utils.tree_map_params(
        state.tx, lambda x, m: jnp.where(m, jnp.zeros_like(x), x), opt_state, mask,
        transform_non_params=lambda x: x)
  state = state.replace(params=params, vq_stats=variables.get('vq_stats', state.vq_stats),
                        opt_state=opt_state)
  return state, changed


def _codebook_upkeep(s: StepSettings, state: ts.TrainState, q, mutated: dict,
                     rng: jax.Array) -> tuple[ts.TrainState, Metrics]:
  """Usage tracking, then k-means initialisation and dead-code restarts.

  Runs after the optimizer update and the quantizer's own statistics update of this step,
  so that codes replaced here keep their reset statistics, and before the weights' EMA
  (`_update_ema`), so that it copies the rewritten codebook. Every device gathers the same
  rows and uses the same key, so all codebooks stay identical.

  The gather of up to `UPKEEP_ROWS_PER_DEVICE` rows from every device onto every device
  (devices * 4096 * dim floats) and the rewrite run under a `lax.cond`, only on steps
  that rewrite a code (`upkeep_needed`); on the others they would leave the state
  unchanged, so skipping them changes no result. `dead` and `kmeans_now` come from
  replicated values, so every device takes the same branch (collectives inside agree).
  """
  done = state.step + 1
  usage = codebook_usage.update(state.code_usage, q.counts, done)
  restarted = jnp.zeros((), jnp.float32)
  if s.maintain:
    if s.restart_after > 0:
      dead = codebook_usage.dead_mask(usage, done, s.restart_after)
    else:
      dead = jnp.zeros((s.usage_size,), bool)
    kmeans_now = jnp.logical_and(s.kmeans_init, state.step == 0)
    lookup_input = mutated['intermediates']['quantizer']['lookup_input'][0]
    state, changed = jax.lax.cond(
        upkeep_needed(dead, kmeans_now),
        lambda st: _maintain(s, st, lookup_input, dead, kmeans_now, rng),
        lambda st: (st, jnp.zeros_like(dead)), state)
    usage = codebook_usage.mark_restarted(usage, changed, done)
    restarted = jnp.sum(changed).astype(jnp.float32)
  # Dead: not chosen in the last `restart_after` steps (or the usage window without restarts).
  dead_limit = s.restart_after if s.restart_after > 0 else s.usage_window
  alive = codebook_usage.window_usage(usage, done, dead_limit)
  metrics = {
      'codebook_usage': codebook_usage.window_usage(usage, done, s.usage_window),
      'dead_codes': s.usage_size * (1.0 - alive),
      'restarted_codes': restarted}
  return state.replace(code_usage=usage), metrics


def _apply_generator_update(s: StepSettings, state: ts.TrainState, grads, new_vq_stats
                            ) -> tuple[ts.TrainState, Metrics]:
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  state = state.replace(params=params, opt_state=opt_state, vq_stats=new_vq_stats)
  return state, {'grad_norm': optax.global_norm(grads),
                 'param_norm': optax.global_norm(params)}


def _update_ema(s: StepSettings, state: ts.TrainState) -> ts.TrainState:
  """The weights' EMA, after codebook upkeep (`ts.update_ema_params`: codebooks copied)."""
  if s.ema_decay <= 0:
    return state
  return state.replace(
      ema_params=ts.update_ema_params(state.ema_params, state.params, s.ema_decay))


def vqvae_step(state: ts.TrainState, batch: dict, rng: jax.Array, *, settings: StepSettings
               ) -> tuple[ts.TrainState, Metrics]:
  """Reconstruction + codebook + commitment loss; one Adam step."""
  s = settings
  images = batch['image']

  def loss_fn(params):
    (recon, q), mutated = s.model.apply(
        {'params': params, 'vq_stats': state.vq_stats}, images, train=True,
        mutable=['vq_stats', 'intermediates'])
    rec = _reconstruction(s, recon, images)
    loss = s.recon_weight * rec + q.loss
    return loss, (rec, q, mutated)

  (loss, (rec, q, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, norms = _apply_generator_update(s, state, grads, mutated.get('vq_stats', {}))
  new_state, usage = _codebook_upkeep(s, new_state, q, mutated, rng)
  new_state = _update_ema(s, new_state)
  metrics = {'loss': loss, 'recon_loss': rec, **_codebook_metrics(s, q, usage), **norms,
             'learning_rate': s.lr_schedule(state.step)}
  metrics = jax.lax.pmean(metrics, AXIS)
  return new_state.replace(step=state.step + 1), metrics


def vqgan_step(state: ts.TrainState, batch: dict, rng: jax.Array, *, settings: StepSettings
               ) -> tuple[ts.TrainState, Metrics]:
  """taming's VQ-GAN generator step and discriminator step from one forward pass."""
  from vq.training import losses  # pylint: disable=g-import-not-at-top
  s = settings
  images = batch['image']
  step = state.step

  def generator(params):
    (recon, q), mutated = s.model.apply(
        {'params': params, 'vq_stats': state.vq_stats}, images, train=True,
        mutable=['vq_stats', 'intermediates'])
    return (recon, q.loss), (q, mutated)

  (recon, q_loss), gen_vjp, (q, mutated) = jax.vjp(generator, state.params, has_aux=True)

  # Reconstruction and perceptual terms, differentiated w.r.t. the reconstruction only.
  def rec_fn(x):
    rec = _reconstruction(s, x, images)
    perc = jnp.zeros((), jnp.float32)
    if s.lpips is not None:
      perc = jnp.mean(s.lpips.apply({'params': state.frozen['lpips']}, x, images))
    return s.recon_weight * rec + s.perceptual_weight * perc, (rec, perc)

  (rec_total, (rec, perc)), g_rec = jax.value_and_grad(rec_fn, has_aux=True)(recon)

  # One discriminator forward on the reconstruction, pulled back twice.
  disc = lambda p, x: s.discriminator.apply({'params': p}, x).astype(jnp.float32)
  fake_logits, fake_vjp = jax.vjp(disc, state.disc_params, recon)
  real_logits, real_vjp = jax.vjp(lambda p: disc(p, images), state.disc_params)

  g_adv_loss, g_cot = jax.value_and_grad(
      lambda l: jnp.mean(losses.generator_loss(l, kind=s.gan_loss)))(fake_logits)
  _, g_adv = fake_vjp(g_cot)

  # taming's adaptive weight from gradients w.r.t. its `last_layer`, the decoder's
  # `conv_out.weight` (the kernel, not the bias), averaged over devices so every device
  # (and a 1-device run on the same global batch) agrees.
  if s.adaptive_weight:
    h = mutated['intermediates']['decoder']['conv_out_input'][0]
    conv_out = state.params['decoder']['conv_out']
    last = lambda k: s.output_layer.apply({'params': {**conv_out, 'kernel': k}}, h
                                          ).astype(jnp.float32)
    _, last_vjp = jax.vjp(last, conv_out['kernel'])
    rec_last = jax.lax.pmean(last_vjp(g_rec)[0], AXIS)
    adv_last = jax.lax.pmean(last_vjp(g_adv)[0], AXIS)
    d_weight = losses.adaptive_generator_weight(rec_last, adv_last) * s.disc_weight
  else:
    d_weight = jnp.asarray(s.disc_weight, jnp.float32)
  gen_on = step >= s.disc_start
  adv_scale = jnp.where(gen_on, d_weight, 0.0)

  grads, = gen_vjp((g_rec + adv_scale * g_adv, jnp.ones_like(q_loss)))
  new_state, norms = _apply_generator_update(s, state, grads, mutated.get('vq_stats', {}))
  new_state, usage = _codebook_upkeep(s, new_state, q, mutated, rng)
  new_state = _update_ema(s, new_state)

  # Discriminator: hinge / non-saturating loss on detached fakes, LeCAM, R1.
  ema_real, ema_fake = state.gan_stats['ema_real_logit'], state.gan_stats['ema_fake_logit']

  def d_loss_fn(real, fake):
    d = jnp.mean(losses.discriminator_loss(real, fake, kind=s.gan_loss))
    if s.lecam_weight > 0:
      d = d + s.lecam_weight * jnp.mean(losses.lecam_regularizer(real, fake, ema_real, ema_fake))
    return d

  d_loss, (real_cot, fake_cot) = jax.value_and_grad(d_loss_fn, argnums=(0, 1))(
      real_logits, fake_logits)
  d_grads = jax.tree.map(jnp.add, real_vjp(real_cot)[0], fake_vjp(fake_cot)[0])
  r1 = jnp.zeros((), jnp.float32)
  if s.r1_weight > 0:
    r1_fn = lambda p: jnp.mean(losses.r1_penalty(lambda x: disc(p, x), images))
    r1, r1_grads = jax.value_and_grad(r1_fn)(state.disc_params)
    d_grads = jax.tree.map(lambda a, b: a + s.r1_weight * b, d_grads, r1_grads)
  d_grads = jax.lax.pmean(d_grads, AXIS)
  d_updates, d_opt_state = state.disc_tx.update(d_grads, state.disc_opt_state,
                                                state.disc_params)
  d_params = optax.apply_updates(state.disc_params, d_updates)
  disc_on = step >= s.disc_start - s.disc_warmup
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(disc_on, n, o), new, old)
  real_mean = jax.lax.pmean(jnp.mean(real_logits), AXIS)
  fake_mean = jax.lax.pmean(jnp.mean(fake_logits), AXIS)
  gan_stats = {
      'ema_real_logit': s.lecam_decay * ema_real + (1 - s.lecam_decay) * real_mean,
      'ema_fake_logit': s.lecam_decay * ema_fake + (1 - s.lecam_decay) * fake_mean}
  new_state = new_state.replace(
      step=step + 1, disc_params=keep(d_params, state.disc_params),
      disc_opt_state=keep(d_opt_state, state.disc_opt_state),
      gan_stats=keep(gan_stats, state.gan_stats))

  metrics = {
      'loss': rec_total + q_loss + adv_scale * g_adv_loss, 'recon_loss': rec,
      'perceptual_loss': perc, 'g_loss': g_adv_loss, 'd_loss': d_loss, 'd_weight': adv_scale,
      'r1_penalty': r1, 'logits_real': jnp.mean(real_logits),
      'logits_fake': jnp.mean(fake_logits), 'disc_active': disc_on.astype(jnp.float32),
      'd_grad_norm': optax.global_norm(d_grads), **_codebook_metrics(s, q, usage), **norms,
      'learning_rate': s.lr_schedule(step)}
  return new_state, jax.lax.pmean(metrics, AXIS)


def train_step(state: ts.TrainState, batch: dict, rng: jax.Array, *, settings: StepSettings
               ) -> tuple[ts.TrainState, Metrics]:
  """The objective's step (`settings.objective` is static)."""
  if settings.objective == 'vqgan':
    return vqgan_step(state, batch, rng, settings=settings)
  return vqvae_step(state, batch, rng, settings=settings)
