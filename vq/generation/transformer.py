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

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT = nn.initializers.normal(stddev=0.02)
MATMUL_DTYPES = ('float32', 'bfloat16')


def _materialized_t(a: jax.Array) -> jax.Array:
  """a.T [K, M] for a [M, K], written out row-major. XLA:CPU folds a plain `a.T` into the
  dot as a transposed operand, and its bfloat16 matmul is only fast without one (1024x256
  times 2080 contracted, one core: 91 GFLOP/s with `a.T`, 179 with this)."""
  m, k = a.shape
  return jax.lax.optimization_barrier(a.reshape(m, k, 1).transpose(1, 2, 0).reshape(k, m))


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [M, K] @ w [K, N] from bfloat16-rounded inputs, summed in float32; float32 [M, N]."""
  return _bf16_matmul_fwd(x, w)[0]


def _bf16_matmul_fwd(x, w):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return jnp.dot(xb, wb, preferred_element_type=jnp.float32), (xb, wb)


def _bf16_matmul_bwd(residuals, g):
  # The gradients of the product of the rounded inputs, also from bfloat16 inputs (g
  # rounded), in the two operand layouts XLA:CPU's bfloat16 matmul runs fast: [M, N] x
  # [K, N] contracting N, and [K, M] x [M, N].
  xb, wb = residuals
  gb = g.astype(jnp.bfloat16)
  dx = jax.lax.dot_general(gb, wb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dw = jnp.dot(_materialized_t(xb), gb, preferred_element_type=jnp.float32)
  return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def bf16_dot_general(x: jax.Array, w: jax.Array, dimension_numbers, precision=None,
                     preferred_element_type=None) -> jax.Array:
  """A `dot_general` for `nn.Dense` / `nn.DenseGeneral` (x's last axes against w's first)
  whose products take bfloat16-rounded inputs and sum in float32, as a TPU's default matmul
  precision does; the result (and its gradients) in x's dtype. On x86 CPUs with AVX512-BF16
  XLA runs such a matmul at twice its float32 rate (`benchmarks/matmul_peak.py`)."""
  del precision, preferred_element_type  # the precision is this function's point
  ((x_contract, w_contract), batch) = dimension_numbers
  n = len(x_contract)
  if (tuple(x_contract) != tuple(range(x.ndim - n, x.ndim))
      or tuple(w_contract) != tuple(range(n)) or any(tuple(b) for b in batch)
      or x.shape[x.ndim - n:] != w.shape[:n]):
    raise ValueError(f'bf16_dot_general handles x [..., K] times w [K, ...] only; got '
                     f'dimension_numbers={dimension_numbers!r} for shapes {x.shape}, {w.shape}.')
  k = math.prod(w.shape[:n])
  # float32 in (a no-op unless the blocks compute in bfloat16), so that the gradients come
  # back through these casts in x's and w's own dtypes.
  y = _bf16_matmul(x.reshape(-1, k).astype(jnp.float32),
                   w.reshape(k, -1).astype(jnp.float32)).astype(x.dtype)
  return y.reshape(x.shape[:x.ndim - n] + w.shape[n:])


def _dot_general(matmul_dtype: str):
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f'Transformer: matmul_dtype={matmul_dtype!r} is not one of '
                     f'{MATMUL_DTYPES}.')
  return bf16_dot_general if matmul_dtype == 'bfloat16' else jax.lax.dot_general


class SelfAttention(nn.Module):
  """Multi-head self-attention with an optional key/value cache."""
  num_heads: int
  max_len: int
  causal: bool
  decode: bool = False
  dtype: Any = jnp.float32
  matmul_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, width = x.shape
    head_dim = width // self.num_heads
    dot_general = _dot_general(self.matmul_dtype)
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), kernel_init=_INIT, dtype=self.dtype,
                          dot_general=dot_general, name='qkv')(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # [B, T, H, D]
    q_pos = jnp.arange(t)
    k_pos = jnp.arange(t)
    kv_spec = 'bkhd'
    if self.decode:
      # The cache is head-major, [B, H, max_len, D]: the layout the attention matmuls read.
      # Kept as [B, max_len, H, D], XLA:CPU copied all of it into that layout at every
      # position: 38% of GPT sampling's time, 0.33-0.53 s against 0.20-0.23 s head-major
      # for 32 grids on one CPU device (benchmarks/profile_prior_step.py --what=sample).
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
                           dot_general=dot_general, name='out')(out)


class Block(nn.Module):
  """x + attn(LN(x)); x + mlp(LN(x))."""
  num_heads: int
  max_len: int
  causal: bool
  mlp_ratio: int = 4
  dropout: float = 0.0
  decode: bool = False
  dtype: Any = jnp.float32
  matmul_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    dot_general = _dot_general(self.matmul_dtype)
    y = nn.LayerNorm(dtype=self.dtype, name='ln_attn')(x)
    y = SelfAttention(self.num_heads, self.max_len, self.causal, self.decode, self.dtype,
                      self.matmul_dtype, name='attn')(y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name='ln_mlp')(x)
    y = nn.Dense(self.mlp_ratio * width, kernel_init=_INIT, dtype=self.dtype,
                 dot_general=dot_general, name='fc')(y)
    y = nn.gelu(y)
    y = nn.Dense(width, kernel_init=_INIT, dtype=self.dtype, dot_general=dot_general,
                 name='proj')(y)
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
    matmul_dtype: 'float32', or 'bfloat16' for dense layers (the blocks' and the head's)
      whose products take bfloat16-rounded inputs and sum in float32 (`bf16_dot_general`);
      attention's two matmuls, norms and everything else keep `dtype`.
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
  matmul_dtype: str = 'float32'

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
                self.decode, self.dtype, self.matmul_dtype, name=f'block{i}')(x, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name='ln_out')(x)
    return nn.Dense(self.num_outputs, kernel_init=_INIT, dtype=jnp.float32,
                    dot_general=_dot_general(self.matmul_dtype),
                    name='head')(x.astype(jnp.float32))


def init_cache(decoder: Transformer, batch: int) -> Any:
  """An empty decoding cache (all zeros, index 0) for `batch` rows of `decoder`."""
  shapes = jax.eval_shape(
      lambda: decoder.init(jax.random.PRNGKey(0), jnp.zeros((batch, 1), jnp.int32))['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
