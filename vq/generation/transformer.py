"""The transformer behind both token priors: pre-LayerNorm, causal (GPT) or not (MaskGIT).

Usage sketch::

  model = Transformer(vocab_size=524, num_outputs=512, max_len=65, causal=True)
  params = model.init(key, tokens)['params']                  # tokens int32 [B, T]
  logits = model.apply({'params': params}, tokens)            # float32 [B, T, 512]

  # Autoregressive decoding, one position per call, keys and values kept in 'cache':
  dec = model.clone(decode=True)
  cache = init_cache(dec, batch=64)
  logits, updates = dec.apply({'params': params, 'cache': cache}, tokens[:, :1],
                              mutable=['cache'])              # position 0, then 1, ...

Blocks are x + attn(LN(x)), then x + mlp(LN(x)) (GPT-2 / minGPT), followed by a final
LayerNorm and a linear head; embeddings and kernels start from N(0, 0.02). With
`decode=True` every call appends its positions to the cache (a flax 'cache' collection,
as big_vision's GIVT/UViM decoders keep it) and attends to everything cached so far, so
feeding a sequence one position at a time gives exactly the full causal pass's logits.
The cache holds keys and values head-major, [B, num_heads, max_len, head_dim].
Logits are float32 whatever `dtype` the blocks compute in.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT = nn.initializers.normal(stddev=0.02)


class SelfAttention(nn.Module):
  """Multi-head self-attention with an optional key/value cache."""
  num_heads: int
  max_len: int
  causal: bool
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), kernel_init=_INIT, dtype=self.dtype,
                          name='qkv')(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # [B, T, H, D]
    q_pos = jnp.arange(t)
    k_pos = jnp.arange(t)
    kv_spec = 'bkhd'
    if self.decode:
      # The cache is head-major, [B, H, max_len, D]: the layout the attention matmuls read.
      # Kept as [B, max_len, H, D], XLA:CPU copied all of it into that layout at every
      # position, 39% of GPT sampling's time (64 grids, one device, 2 cores: 0.37 s per
      # batch of 32 against 0.19 s head-major).
      initialising = not self.has_variable('cache', 'key')
      shape = (b, self.num_heads, self.max_len, head_dim)
      cached_k = self.variable('cache', 'key', jnp.zeros, shape, k.dtype)
      cached_v = self.variable('cache', 'value', jnp.zeros, shape, v.dtype)
      index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      if not initialising:
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice(
            cached_k.value, k.transpose(0, 2, 1, 3), (0, 0, start, 0))
        cached_v.value = jax.lax.dynamic_update_slice(
            cached_v.value, v.transpose(0, 2, 1, 3), (0, 0, start, 0))
        index.value = start + t
        k, v = cached_k.value, cached_v.value
        kv_spec = 'bhkd'
        q_pos = start + jnp.arange(t)
        k_pos = jnp.arange(self.max_len)
    allowed = jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)
    if self.causal:  # (decoding is causal too: it also hides cache rows not written yet)
      allowed = k_pos[None, :] <= q_pos[:, None]
    logits = jnp.einsum(f'bqhd,{kv_spec}->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    logits = jnp.where(allowed[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum(f'bhqk,{kv_spec}->bqhd', weights, v)
    return nn.DenseGeneral(width, axis=(-2, -1), kernel_init=_INIT, dtype=self.dtype,
                           name='out')(out)


class Block(nn.Module):
  """x + attn(LN(x)); x + mlp(LN(x))."""
  num_heads: int
  max_len: int
  causal: bool
  mlp_ratio: int = 4
  dropout: float = 0.0
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype, name='ln_attn')(x)
    y = SelfAttention(self.num_heads, self.max_len, self.causal, self.decode, self.dtype,
                      name='attn')(y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name='ln_mlp')(x)
    y = nn.Dense(self.mlp_ratio * width, kernel_init=_INIT, dtype=self.dtype, name='fc')(y)
    y = nn.gelu(y)
    y = nn.Dense(width, kernel_init=_INIT, dtype=self.dtype, name='proj')(y)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Transformer(nn.Module):
  """Token ids [B, T] -> logits [B, T, num_outputs].

  Attributes:
    vocab_size: input token ids lie in [0, vocab_size).
    num_outputs: logits per position (the tokenizer's codes).
    max_len: the longest sequence (position embeddings, the decoding cache).
    width, depth, num_heads, mlp_ratio: the usual sizes; num_heads must divide width.
    dropout: after the embeddings, attention and MLP (training only).
    causal: position t attends to positions <= t (GPT); otherwise to all (MaskGIT).
    decode: autoregressive decoding with a key/value cache (causal models only).
    dtype: compute dtype of the blocks; parameters and logits stay float32.
  """
  vocab_size: int
  num_outputs: int
  max_len: int
  width: int = 256
  depth: int = 4
  num_heads: int = 8
  mlp_ratio: int = 4
  dropout: float = 0.0
  causal: bool = True
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    if self.width % self.num_heads:
      raise ValueError(f'Transformer: width={self.width} is not divisible by num_heads='
                       f'{self.num_heads}; pick a width that is a multiple of it.')
    if self.decode and not self.causal:
      raise ValueError('Transformer: decode=True needs causal=True (a KV cache only serves '
                       'left-to-right decoding).')
    t = tokens.shape[1]
    if t > self.max_len:
      raise ValueError(f'Transformer: sequence of {t} tokens is longer than max_len='
                       f'{self.max_len}.')
    x = nn.Embed(self.vocab_size, self.width, embedding_init=_INIT, name='embed')(tokens)
    pos = self.param('pos_embed', _INIT, (self.max_len, self.width))
    if self.decode:
      initialising = not self.has_variable('cache', 'position')
      position = self.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
      start = jnp.zeros((), jnp.int32) if initialising else position.value
      if not initialising:
        position.value = start + t
      x = x + jax.lax.dynamic_slice_in_dim(pos, start, t, axis=0)[None]
    else:
      x = x + pos[None, :t]
    x = nn.Dropout(self.dropout, deterministic=not train)(x).astype(self.dtype)
    for i in range(self.depth):
      x = Block(self.num_heads, self.max_len, self.causal, self.mlp_ratio, self.dropout,
                self.decode, self.dtype, name=f'block{i}')(x, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name='ln_out')(x)
    return nn.Dense(self.num_outputs, kernel_init=_INIT, dtype=jnp.float32,
                    name='head')(x.astype(jnp.float32))


def init_cache(decoder: Transformer, batch: int) -> Any:
  """An empty decoding cache (all zeros, index 0) for `batch` rows of `decoder`."""
  shapes = jax.eval_shape(
      lambda: decoder.init(jax.random.PRNGKey(0), jnp.zeros((batch, 1), jnp.int32))['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
