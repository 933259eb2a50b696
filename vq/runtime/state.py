"""Training state: everything a step reads and writes, as one pytree.

Usage sketch::

  state = create_train_state(config, rng, image_shape)   # host arrays, unreplicated
  state.params, state.vq_stats, state.opt_state, state.disc_params, ...
  ckpt_tree = checkpointable(state)                      # what orbax saves

`frozen` holds pretrained weights the loss uses (LPIPS); they are restored from their
package, never from checkpoints, so they are left out of `checkpointable`.

With `train.ema_decay > 0`, evaluation and inference use `eval_params` = `ema_params`:
an EMA of the encoder, decoder and projection weights, paired with the live codebook.
A codebook is never EMA-averaged, whatever the quantizer: 'ema' and 'rvq' keep theirs in
`vq_stats` (itself an average of encoder outputs), 'vq' keeps its rows in
`params['quantizer']['codebook']`, and `update_ema_params` copies those rows into
`ema_params` instead of averaging them, after the step's codebook upkeep, so rows
rewritten by k-means or dead-code restarts are the rows evaluated. FSQ and LFQ have no
codebook (their projections are ordinary, averaged weights).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vq.config import builders
from vq.quantizers import usage as codebook_usage

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Generator (tokenizer) and, for VQ-GAN, discriminator state.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: tokenizer parameters.
    vq_stats: codebook statistics collection ({} for gradient-learned codebooks).
    opt_state: tokenizer optimizer state.
    disc_params: discriminator parameters ({} for VQ-VAE).
    disc_opt_state: discriminator optimizer state ({} for VQ-VAE).
    ema_params: EMA of `params` ({} when `train.ema_decay` is 0), except that codebook
      rows are copies of the live ones (`update_ema_params`).
    gan_stats: running statistics of the GAN losses (LeCAM anchors).
    code_usage: per-code usage tracking (`vq.quantizers.usage`): the step each code was last
      chosen and an EMA of usage frequencies; drives restarts and the usage metrics.
    frozen: pretrained, never-trained weights used by the loss ({'lpips': ...} or {}).
    tx, disc_tx: optax transforms (static).
  """
  step: jax.Array
  params: PyTree
  vq_stats: PyTree
  opt_state: PyTree
  disc_params: PyTree
  disc_opt_state: PyTree
  ema_params: PyTree
  gan_stats: PyTree
  code_usage: PyTree
  frozen: PyTree
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  disc_tx: optax.GradientTransformation | None = flax.struct.field(pytree_node=False)


def uses_gan(config: ml_collections.ConfigDict) -> bool:
  return config.objective == 'vqgan'


def uses_lpips(config: ml_collections.ConfigDict) -> bool:
  return uses_gan(config) and config.loss.perceptual_weight > 0


def init_key(seed: int) -> jax.Array:
  """The key that initialises all weights.

  An 'rbg' key: XLA:CPU compiles threefry-based initialisers about 5x slower (15 s vs
  3 s for the smoke model on 2 cores), and init quality does not need threefry.
  """
  return jax.random.key(seed, impl='rbg')


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       image_shape: tuple[int, int, int],
                       lpips_params: PyTree | None = None,
                       variables: PyTree | None = None) -> TrainState:
  """Fresh state for `config` (on the default device, not replicated).

  Args:
    config: the experiment config.
    rng: key for the initial weights.
    image_shape: (H, W, 3) of one training image.
    lpips_params: the frozen LPIPS weights (needed by the vqgan objective with LPIPS).
    variables: tokenizer variables ({'params', 'vq_stats'?}) to start from instead of
      initialising them, e.g. weights converted from another framework (`vq.convert`);
      the caller checks they have the structure and shapes `model.init` gives. The
      optimizer and discriminator states are fresh either way.
  """
  model = builders.build_tokenizer(config)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  gen_rng, disc_rng = jax.random.split(rng)
  if variables is None:
    # Jitted: eager init dispatches (and compiles) every op separately, ~10x slower.
    variables = jax.jit(model.init)({'params': gen_rng}, dummy)
  params = variables['params']
  vq_stats = variables.get('vq_stats', {})
  tx = builders.build_optimizer(config.train)
  disc_params, disc_opt_state, disc_tx, gan_stats, frozen = {}, {}, None, {}, {}
  if uses_gan(config):
    disc = builders.build_discriminator_from_config(config)
    disc_params = jax.jit(disc.init)(disc_rng, dummy)['params']
    disc_tx = builders.build_optimizer(config.train, learning_rate=config.disc.learning_rate,
                                       b1=config.disc.b1, b2=config.disc.b2)
    disc_opt_state = jax.jit(disc_tx.init)(disc_params)
    gan_stats = {'ema_real_logit': jnp.zeros((), jnp.float32),
                 'ema_fake_logit': jnp.zeros((), jnp.float32)}
  if uses_lpips(config):
    if lpips_params is None:
      raise ValueError('create_train_state: the vqgan objective with perceptual_weight > 0 '
                       'needs lpips_params (vq.perceptual.lpips.load_pretrained_params()).')
    frozen = {'lpips': lpips_params}
  ema_params = params if config.train.ema_decay > 0 else {}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, vq_stats=vq_stats,
                    opt_state=jax.jit(tx.init)(params), disc_params=disc_params,
                    disc_opt_state=disc_opt_state, ema_params=ema_params,
                    gan_stats=gan_stats,
                    code_usage=codebook_usage.init(model.quantizer.usage_size),
                    frozen=frozen, tx=tx, disc_tx=disc_tx)


def checkpointable(state: TrainState) -> dict:
  """The state as a plain nested dict, without `frozen` (restored from its package)."""
  d = flax.serialization.to_state_dict(state)
  d.pop('frozen')
  return d


def restore_from(state: TrainState, tree: dict) -> TrainState:
  """Inverse of `checkpointable`: `tree` values into `state`'s structure."""
  full = dict(tree, frozen=flax.serialization.to_state_dict(state.frozen))
  return flax.serialization.from_state_dict(state, full)


def is_codebook(path: tuple) -> bool:
  """Whether a `params` leaf (by its key path) holds codebook rows.

  A learned codebook is a leaf named 'codebook' under 'quantizer' (`VectorQuantizer`,
  and each `levels_i` of a residual VQ on that base).
  """
  keys = [getattr(k, 'key', None) for k in path]
  return bool(keys) and keys[-1] == 'codebook' and 'quantizer' in keys


def update_ema_params(ema_params: PyTree, params: PyTree, decay: float) -> PyTree:
  """decay * ema + (1 - decay) * params for every weight; codebook rows are copied.

  The codebook is never averaged (module docstring): it must stay the codebook the
  encoder's outputs are looked up in, restarted rows included, and an average of a row
  before and after a restart is neither.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, e, p: p if is_codebook(path) else decay * e + (1.0 - decay) * p,
      ema_params, params)


def eval_params(state: TrainState) -> PyTree:
  """Weights for evaluation and inference, to pair with `state.vq_stats`.

  The EMA weights when they are kept (their codebook rows are the live ones, see the
  module docstring), else `params`.
  """
  return state.ema_params if state.ema_params else state.params
