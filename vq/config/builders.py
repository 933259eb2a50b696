"""Build modules and optimizers from a config: the only place that reads model fields.

Usage sketch::

  model = build_tokenizer(config, axis_name='batch')
  tx = build_optimizer(config.train)
  disc = build_discriminator_from_config(config)
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax

from vq.models import nets
from vq import quantizers
from vq.models import tokenizer

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype={name!r} is not supported; choose one of {sorted(DTYPES)}.')
  return DTYPES[name]


def build_tokenizer(config: ml_collections.ConfigDict,
                    axis_name: str | None = None) -> tokenizer.VQTokenizer:
  """Encoder, quantizer and decoder named by `config.model` and `config.quantizer`.

  Args:
    config: the experiment config.
    axis_name: pmap axis over which the quantizer sums codebook statistics; None
      outside pmap.
  """
  m, q = config.model, config.quantizer
  dtype = compute_dtype(m.dtype)
  if m.arch == 'sonnet':
    encoder = nets.SonnetEncoder(hidden=m.hidden, res_hidden=m.res_hidden,
                                 num_res_layers=m.num_res_layers, z_channels=q.code_dim,
                                 dtype=dtype)
    decoder = nets.SonnetDecoder(hidden=m.hidden, res_hidden=m.res_hidden,
                                 num_res_layers=m.num_res_layers, out_channels=3, dtype=dtype)
  elif m.arch == 'taming':
    common = dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                  attn_resolutions=tuple(m.attn_resolutions),
                  resolution=config.data.image_size, dtype=dtype)
    encoder = nets.TamingEncoder(z_channels=q.code_dim, **common)
    decoder = nets.TamingDecoder(out_channels=3, upsample_impl=m.get('upsample_impl', 'auto'),
                                 **common)
  else:
    raise ValueError(f"config.model.arch={m.arch!r} is unknown; choose 'sonnet' or 'taming'.")
  quantizer = build_quantizer(q, axis_name=axis_name)
  return tokenizer.VQTokenizer(encoder=encoder, quantizer=quantizer, decoder=decoder)


def build_quantizer(q: ml_collections.ConfigDict, axis_name: str | None = None) -> nn.Module:
  """The quantizer named by `config.quantizer.kind`, with the fields that kind reads."""
  codebook_options = dict(
      lookup_dim=q.lookup_dim, l2_normalize=q.l2_normalize, gradient=q.gradient,
      entropy_weight=q.entropy_weight, entropy_temperature=q.entropy_temperature,
      kmeans_iters=q.kmeans_iters)
  if q.kind == 'ema':
    return quantizers.EMAVectorQuantizer(
        num_codes=q.num_codes, code_dim=q.code_dim, beta=q.beta, decay=q.decay,
        epsilon=q.epsilon, axis_name=axis_name, **codebook_options)
  if q.kind == 'vq':
    # .get: configs saved before beta_on existed weigh the commitment term.
    return quantizers.VectorQuantizer(num_codes=q.num_codes, code_dim=q.code_dim, beta=q.beta,
                                      axis_name=axis_name,
                                      beta_on=q.get('beta_on', 'commitment'),
                                      **codebook_options)
  if q.kind == 'fsq':
    from vq.quantizers import scalar as scalar_quantizers  # pylint: disable=g-import-not-at-top
    return scalar_quantizers.FSQ(levels=tuple(q.fsq_levels), code_dim=q.code_dim,
                                 axis_name=axis_name)
  if q.kind == 'lfq':
    from vq.quantizers import scalar as scalar_quantizers  # pylint: disable=g-import-not-at-top
    return scalar_quantizers.LFQ(num_codes=q.num_codes, code_dim=q.code_dim, beta=q.beta,
                                 entropy_weight=q.entropy_weight,
                                 entropy_temperature=q.entropy_temperature, axis_name=axis_name)
  if q.kind == 'rvq':
    from vq.quantizers import residual as residual_vq  # pylint: disable=g-import-not-at-top
    return residual_vq.ResidualVQ(num_codes=q.num_codes, code_dim=q.code_dim, depth=q.rvq_depth,
                                  base='ema', beta=q.beta, decay=q.decay, epsilon=q.epsilon,
                                  axis_name=axis_name)
  raise ValueError(f"config.quantizer.kind={q.kind!r} is unknown; choose one of 'ema', 'vq', "
                   "'fsq', 'lfq', 'rvq'.")


def maintains_codebook(q: ml_collections.ConfigDict) -> bool:
  """Whether the train step runs k-means initialisation or dead-code restarts."""
  return q.kind in ('vq', 'ema') and (q.init == 'kmeans' or q.restart_after > 0)


def decoder_output_layer(config: ml_collections.ConfigDict) -> nn.Module:
  """The decoder's `conv_out` as a standalone module (for the adaptive GAN weight)."""
  return nets.output_layer(config.model.arch, 3, compute_dtype(config.model.dtype))


def learning_rate_schedule(lr: float, train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to `lr`, then constant or cosine decay to `end_lr_factor * lr`."""
  warmup = optax.linear_schedule(0.0, lr, max(train.warmup_steps, 1))
  if train.schedule == 'constant':
    after = optax.constant_schedule(lr)
  elif train.schedule == 'cosine':
    after = optax.cosine_decay_schedule(
        lr, max(train.num_steps - train.warmup_steps, 1), alpha=train.end_lr_factor)
  else:
    raise ValueError(f"config.train.schedule={train.schedule!r} is unknown; choose 'constant' "
                     "or 'cosine'.")
  if train.warmup_steps <= 0:
    return after
  return optax.join_schedules([warmup, after], [train.warmup_steps])


def build_optimizer(train: ml_collections.ConfigDict, *, learning_rate: float | None = None,
                    b1: float | None = None, b2: float | None = None
                    ) -> optax.GradientTransformation:
  """Adam(W) with the schedule above and optional global-norm clipping."""
  lr = learning_rate_schedule(train.learning_rate if learning_rate is None else learning_rate,
                              train)
  b1 = train.b1 if b1 is None else b1
  b2 = train.b2 if b2 is None else b2
  if train.weight_decay > 0:
    opt = optax.adamw(lr, b1=b1, b2=b2, weight_decay=train.weight_decay)
  else:
    opt = optax.adam(lr, b1=b1, b2=b2)
  if train.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), opt)
  return opt


def build_discriminator_from_config(config: ml_collections.ConfigDict) -> nn.Module:
  from vq.models import discriminator  # pylint: disable=g-import-not-at-top
  d = config.disc
  fields = dict(ndf=d.ndf, dtype=compute_dtype(config.model.dtype))
  if d.name == 'patchgan':
    fields.update(n_layers=d.n_layers, norm=d.norm)
  return discriminator.build_discriminator(d.name, **fields)
