"""Sampling token grids from a prior: KV-cached GPT decoding and MaskGIT iterative decoding.

Usage sketch::

  settings = Settings(temperature=1.0, top_k=0, top_p=1.0, guidance=2.0)
  keys = row_keys(key, len(labels))                  # one key per row: fold_in(key, row)
  tokens = sample_gpt(model, params, layout, labels, keys, settings)       # int32 [B, L]
  tokens = sample_maskgit(model, params, layout, labels, keys,
                          settings._replace(num_iterations=10))

Both are pure functions of (params, labels, keys): the same keys give the same grids, and
row b draws all its randomness from its own key, so a row does not depend on which other
rows share its batch or its device. Both run as one `lax.fori_loop`; jit them with the settings
static (`jax.jit(..., static_argnums=...)`, as `vq.generation.generator` does).

Classifier-free guidance (Ho & Salimans 2022) as LlamaGen and dalle-mini write it:
  logits = logits_uncond + s * (logits_cond - logits_uncond),
s = `guidance`; s = 1 is no guidance (only conditional rows are computed), s = 0 is the
unconditional model, s > 1 trades diversity for class fidelity. The unconditional rows
carry the null class token and run in the same batch as the conditional ones.

MaskGIT decoding (Chang et al. 2022; google-research/maskgit `parallel_decode`): start
from the given grid (all [MASK] when sampling), and at iteration t = 0 .. T-1 sample every
masked position, then keep masked the n_t least confident of the newly sampled ones,
  n_t = floor(N0 * cos(pi/2 * (t + 1) / T)), clipped to [1, unknown_t - 1] (0 at t = T-1
        and for rows with nothing left to decode),
with N0 the masked count at the start. Confidence = log p(sampled token) + Gumbel noise *
choice_temperature * (1 - (t + 1) / T); positions known at the start get +inf confidence,
so they are never changed.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vq.generation import priors
from vq.generation import transformer


class Settings(NamedTuple):
  """Sampler settings (static under jit).

  Attributes:
    temperature: logits are divided by it before sampling (> 0).
    top_k: keep only the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (1: all).
    guidance: classifier-free guidance scale s (1: none).
    num_iterations: MaskGIT decoding iterations T.
    choice_temperature: MaskGIT's Gumbel noise scale on the confidence, annealed to 0.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  guidance: float = 1.0
  num_iterations: int = 10
  choice_temperature: float = 4.5


def guided(logits_cond: jax.Array, logits_uncond: jax.Array, scale: float) -> jax.Array:
  """u + s (c - u): s = 1 gives the conditional logits exactly, s = 0 the unconditional."""
  if scale == 1.0:
    return logits_cond
  if scale == 0.0:
    return logits_uncond
  return logits_uncond + scale * (logits_cond - logits_uncond)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits outside the top-k / nucleus set become -inf (the most likely token stays)."""
  neg = jnp.finfo(logits.dtype).min
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs      # mass of the tokens ranked above
    keep = before < top_p                            # the first token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def row_keys(key: jax.Array, batch: int, offset: int = 0) -> jax.Array:
  """One key per row: fold_in(key, offset + row) for row in [0, batch)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(batch))


def _categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw per row from rows' own keys; logits [B, ..., K] -> int32 [B, ...]."""
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _with_uncond(layout: priors.TokenLayout, labels: jax.Array, guidance: float
                 ) -> tuple[jax.Array, int]:
  """Class tokens of the batch: conditional rows, then (with guidance) unconditional ones."""
  cond = layout.class_tokens(labels)
  if guidance == 1.0:
    return cond, 1
  return jnp.concatenate([cond, jnp.full_like(cond, layout.null_token)]), 2


def _combine(logits: jax.Array, copies: int, guidance: float) -> jax.Array:
  if copies == 1:
    return logits
  cond, uncond = jnp.split(logits, 2, axis=0)
  return guided(cond, uncond, guidance)


def sample_gpt(model: transformer.Transformer, params: Any, layout: priors.TokenLayout,
               labels: jax.Array, keys: jax.Array, settings: Settings = Settings(),
               tokens: jax.Array | None = None, known: jax.Array | None = None
               ) -> jax.Array:
  """L tokens per row by KV-cached decoding in raster order; int32 [B, L].

  `keys` holds one PRNG key per row (`row_keys`). With `tokens` and `known` (bool [B, L]),
  position i takes tokens[:, i] where known[:, i] and a draw otherwise, with the same keys
  (editing's raster-suffix completion); without them nothing is known.
  """
  labels = jnp.asarray(labels, jnp.int32)
  given = jnp.zeros((labels.shape[0], layout.length), jnp.int32) if tokens is None else tokens
  known = jnp.zeros(given.shape, bool) if known is None else known
  b = labels.shape[0]
  decoder = model.clone(decode=True)
  first, copies = _with_uncond(layout, labels, settings.guidance)
  cache = transformer.init_cache(decoder, b * copies)

  def body(i, carry):
    cache, out, previous = carry
    logits, updates = decoder.apply({'params': params, 'cache': cache}, previous[:, None],
                                    mutable=['cache'])
    logits = _combine(logits[:, 0], copies, settings.guidance) / settings.temperature
    logits = filter_logits(logits, settings.top_k, settings.top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
    token = jnp.where(known[:, i], given[:, i], _categorical(step_keys, logits))
    return updates['cache'], out.at[:, i].set(token), jnp.tile(token, copies)

  out = jnp.zeros((b, layout.length), jnp.int32)
  _, out, _ = jax.lax.fori_loop(0, layout.length, body, (cache, out, first))
  return out


def maskgit_num_masked(num_start: jax.Array, unknown: jax.Array, t: jax.Array,
                       num_iterations: int, length: int) -> jax.Array:
  """Tokens left masked after iteration t (see the module docstring).

  floor(N0 * cos(pi/2 * (t + 1) / T)) comes from a table computed in float64 for every
  N0 in [0, length], so a product that is an integer (6 * cos(pi/3) = 3) is not floored
  one lower by float32 rounding.
  """
  ratios = np.cos(0.5 * np.pi * (np.arange(num_iterations) + 1) / num_iterations)
  table = np.floor(np.arange(length + 1)[None, :] * ratios[:, None] + 1e-9).astype(np.int32)
  n = jnp.asarray(table)[t, num_start]
  n = jnp.maximum(1, jnp.minimum(unknown - 1, n))
  return jnp.where((t == num_iterations - 1) | (unknown == 0), 0, n)


def maskgit_iteration(model: transformer.Transformer, params: Any,
                      layout: priors.TokenLayout, first: jax.Array, copies: int,
                      keys: jax.Array, num_start: jax.Array, settings: Settings,
                      t: jax.Array, tokens: jax.Array) -> jax.Array:
  """Iteration t of MaskGIT decoding: sample the masked positions, re-mask the least sure."""
  mask_id, length, iterations = layout.mask_token, layout.length, settings.num_iterations
  unknown_map = tokens == mask_id
  inputs = jnp.concatenate([first[:, None], jnp.tile(tokens, (copies, 1))], axis=1)
  logits = model.apply({'params': params}, inputs)[:, 1:]
  logits = _combine(logits, copies, settings.guidance) / settings.temperature
  logits = filter_logits(logits, settings.top_k, settings.top_p)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
  k_sample = jax.vmap(lambda k: jax.random.fold_in(k, 0))(step_keys)
  k_choice = jax.vmap(lambda k: jax.random.fold_in(k, 1))(step_keys)
  sampled = jnp.where(unknown_map, _categorical(k_sample, logits), tokens)
  logp = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(logp, sampled[..., None], axis=-1)[..., 0]
  gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (length,)))(k_choice)
  anneal = settings.choice_temperature * (1.0 - (t + 1) / iterations)
  confidence = jnp.where(unknown_map, chosen + anneal * gumbel, jnp.inf)
  n_mask = maskgit_num_masked(num_start, jnp.sum(unknown_map, axis=1), t, iterations, length)
  # Keep masked the n_mask least confident of the positions sampled in this iteration.
  ranks = jnp.argsort(jnp.argsort(confidence, axis=1), axis=1)
  remask = (ranks < n_mask[:, None]) & unknown_map
  return jnp.where(remask, mask_id, sampled)


def sample_maskgit(model: transformer.Transformer, params: Any, layout: priors.TokenLayout,
                   labels: jax.Array, keys: jax.Array, settings: Settings = Settings(),
                   tokens: jax.Array | None = None) -> jax.Array:
  """Iterative parallel decoding; int32 [B, L] with no [MASK] left.

  Args:
    model, params: a MaskGIT prior.
    layout: its token layout.
    labels: int32 [B], -1 for the null class.
    keys: one PRNG key per row (`row_keys`).
    settings: sampler settings.
    tokens: int32 [B, L] to complete: known tokens stay, `layout.mask_token` positions are
      decoded (inpainting, editing); None samples whole grids.
  """
  labels = jnp.asarray(labels, jnp.int32)
  if tokens is None:
    tokens = jnp.full((labels.shape[0], layout.length), layout.mask_token, jnp.int32)
  first, copies = _with_uncond(layout, labels, settings.guidance)
  num_start = jnp.sum(tokens == layout.mask_token, axis=1)
  body = functools.partial(maskgit_iteration, model, params, layout, first, copies, keys,
                           num_start, settings)
  return jax.lax.fori_loop(0, settings.num_iterations, body, tokens)


def network_evaluations(kind: str, layout: priors.TokenLayout, settings: Settings) -> int:
  """Transformer passes per image: L for GPT (one position each), T for MaskGIT (x2 with
  guidance, counting the unconditional rows)."""
  passes = layout.length if kind == 'gpt' else settings.num_iterations
  return passes * (1 if settings.guidance == 1.0 else 2)
