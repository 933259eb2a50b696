"""Token priors: how a token grid becomes a transformer's sequence, and the two objectives.

Usage sketch::

  layout = TokenLayout(num_codes=512, num_classes=10, grid=(8, 8))
  model = build_model('gpt', layout, width=256, depth=4, num_heads=8)
  loss, aux = gpt_loss(model, params, tokens, labels)            # tokens int32 [B, 64]
  loss, aux = maskgit_loss(model, params, tokens, labels, key)

Sequences (one vocabulary for both priors, `TokenLayout`):
  [class token, t_0, ..., t_{L-1}]  with  t_i in [0, num_codes) in raster order,
  class c -> num_codes + c, the null class (label -1: dropped for classifier-free guidance,
  or an unconditional prior) -> num_codes + num_classes, [MASK] -> num_codes + num_classes + 1.

GPT (causal) reads [class, t_0 .. t_{L-2}] and predicts t_0 .. t_{L-1}: the class token
plays the start token. Its loss is the mean next-token cross-entropy, so the held-out loss
/ ln 2 is an exact bits/token.

MaskGIT (bidirectional) reads [class, t_0 .. t_{L-1}] with some tokens replaced by [MASK]
and predicts the masked ones. In training each example draws r ~ U[0, 1) and masks
ceil(cos(pi r / 2) * L) tokens (at least one), chosen uniformly (Chang et al. 2022); the
loss is the cross-entropy over masked positions only. `masked_log_likelihood` scores a fixed
mask ratio: a reconstruction loss, never a likelihood of the grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vq.generation import transformer

KINDS = ('gpt', 'maskgit')
NULL_LABEL = -1


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """The token vocabulary and grid a prior works on."""
  num_codes: int
  num_classes: int
  grid: tuple[int, int]

  @property
  def length(self) -> int:
    """Image tokens per grid, L."""
    return int(self.grid[0] * self.grid[1])

  @property
  def null_token(self) -> int:
    return self.num_codes + self.num_classes

  @property
  def mask_token(self) -> int:
    return self.num_codes + self.num_classes + 1

  @property
  def vocab_size(self) -> int:
    return self.num_codes + self.num_classes + 2

  def class_tokens(self, labels: jax.Array) -> jax.Array:
    """int32 [B]: num_codes + label, or the null token where label == -1."""
    labels = jnp.asarray(labels, jnp.int32)
    if self.num_classes == 0:
      return jnp.full(labels.shape, self.null_token, jnp.int32)
    return jnp.where(labels < 0, self.null_token, self.num_codes + labels)


def build_model(kind: str, layout: TokenLayout, *, width: int, depth: int, num_heads: int,
                mlp_ratio: int = 4, dropout: float = 0.0, dtype: Any = jnp.float32,
                matmul_dtype: str = 'float32') -> transformer.Transformer:
  """The transformer of a `kind` prior ('gpt' or 'maskgit') over `layout`."""
  if kind not in KINDS:
    raise ValueError(f'prior kind {kind!r} is not one of {KINDS}.')
  return transformer.Transformer(
      vocab_size=layout.vocab_size, num_outputs=layout.num_codes, max_len=layout.length + 1,
      width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout,
      causal=kind == 'gpt', dtype=dtype, matmul_dtype=matmul_dtype)


def drop_labels(labels: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Labels replaced by -1 (the null class) with probability `rate` each."""
  if rate <= 0:
    return labels
  return jnp.where(jax.random.bernoulli(key, rate, labels.shape), NULL_LABEL, labels)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log p(target), float32 [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def gpt_inputs(layout: TokenLayout, tokens: jax.Array, labels: jax.Array) -> jax.Array:
  """[class, t_0 .. t_{L-2}]: what the GPT reads to predict t_0 .. t_{L-1}."""
  return jnp.concatenate([layout.class_tokens(labels)[:, None], tokens[:, :-1]], axis=1)


def gpt_token_nll(model, params, layout: TokenLayout, tokens: jax.Array, labels: jax.Array,
                  *, train: bool = False, rngs: dict | None = None) -> jax.Array:
  """-log p(t_i | class, t_<i) in nats, float32 [B, L] (teacher forcing)."""
  logits = model.apply({'params': params}, gpt_inputs(layout, tokens, labels), train=train,
                       rngs=rngs)
  return _cross_entropy(logits, tokens)


def cosine_mask_ratio(r: jax.Array) -> jax.Array:
  """MaskGIT's cosine schedule: the fraction of tokens masked at progress r in [0, 1]."""
  return jnp.cos(0.5 * jnp.pi * r)


def random_mask(key: jax.Array, batch: int, length: int, num_masked: jax.Array) -> jax.Array:
  """bool [B, L]: exactly num_masked[b] positions of row b, chosen uniformly."""
  scores = jax.random.uniform(key, (batch, length))
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  return ranks < num_masked[:, None]


def training_mask(key: jax.Array, batch: int, length: int) -> jax.Array:
  """MaskGIT training masks: ceil(cos(pi r / 2) L) positions per row, r ~ U[0, 1)."""
  k_ratio, k_pos = jax.random.split(key)
  ratio = cosine_mask_ratio(jax.random.uniform(k_ratio, (batch,)))
  num = jnp.clip(jnp.ceil(ratio * length).astype(jnp.int32), 1, length)
  return random_mask(k_pos, batch, length, num)


def maskgit_inputs(layout: TokenLayout, tokens: jax.Array, labels: jax.Array,
                   mask: jax.Array) -> jax.Array:
  """[class, t_0 .. t_{L-1}] with masked positions replaced by [MASK]."""
  masked = jnp.where(mask, layout.mask_token, tokens)
  return jnp.concatenate([layout.class_tokens(labels)[:, None], masked], axis=1)


def maskgit_token_nll(model, params, layout: TokenLayout, tokens: jax.Array,
                      labels: jax.Array, mask: jax.Array, *, train: bool = False,
                      rngs: dict | None = None) -> jax.Array:
  """-log p(t_i | class, unmasked tokens) in nats at every position, float32 [B, L]."""
  logits = model.apply({'params': params}, maskgit_inputs(layout, tokens, labels, mask),
                       train=train, rngs=rngs)
  return _cross_entropy(logits[:, 1:], tokens)


def fixed_ratio_num_masked(length: int, ratio: float) -> int:
  """Masked tokens per grid for `masked_log_likelihood`: round(ratio * L), at least 1."""
  return max(1, min(length, int(round(ratio * length))))


def loss_and_metrics(kind: str, model, params, layout: TokenLayout, tokens: jax.Array,
                     labels: jax.Array, key: jax.Array, *, class_dropout: float,
                     train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of a `kind` prior on one batch, and its metrics (nats and bits)."""
  k_drop, k_mask, k_dropout = jax.random.split(key, 3)
  labels = drop_labels(labels, class_dropout, k_drop) if layout.num_classes else labels
  rngs = {'dropout': k_dropout}
  if kind == 'gpt':
    nll = gpt_token_nll(model, params, layout, tokens, labels, train=train, rngs=rngs)
    loss = jnp.mean(nll)
    return loss, {'loss': loss, 'bits_per_token': loss / math.log(2)}
  mask = training_mask(k_mask, tokens.shape[0], layout.length)
  nll = maskgit_token_nll(model, params, layout, tokens, labels, mask, train=train, rngs=rngs)
  weights = mask.astype(jnp.float32)
  loss = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return loss, {'loss': loss, 'masked_bits_per_token': loss / math.log(2),
                'mask_fraction': jnp.mean(weights)}


def unigram_bits_per_token(train_tokens: np.ndarray, test_tokens: np.ndarray,
                           num_codes: int) -> float:
  """Bits/token of the test tokens under the training tokens' histogram (add-one smoothed)."""
  counts = np.bincount(np.asarray(train_tokens).ravel(), minlength=num_codes) + 1.0
  logp = np.log2(counts / counts.sum())
  return float(-np.mean(logp[np.asarray(test_tokens).ravel()]))
