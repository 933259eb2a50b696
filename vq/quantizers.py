"""Vector quantizers: nearest-code lookup with straight-through gradients.

Usage sketch::

  vq = EMAVectorQuantizer(num_codes=512, code_dim=64, axis_name='batch')
  variables = vq.init(rng, z_e, train=False)            # {'vq_stats': {...}}
  out, updates = vq.apply(variables, z_e, train=True, mutable=['vq_stats'])
  out.quantized, out.indices, out.loss, out.perplexity
  images_codes = vq.apply(variables, out.indices, method='lookup')

Both quantizers return a `QuantizerOutput`. The codebook and commitment losses are
computed from `z_e` and the selected codes *before* the straight-through patch
`z_q = z_e + sg(e - z_e)`, and beta multiplies the commitment term
`||z_e - sg(e)||^2` (van den Oord et al. 2017, eq. 3).

Distances, EMA statistics and losses are kept in float32 whatever the network dtype.
"""

from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vq import metrics

STATS = 'vq_stats'  # variable collection holding codebook statistics


@flax.struct.dataclass
class QuantizerOutput:
  """What every quantizer returns.

  Attributes:
    quantized: straight-through output; equals the selected codes in the forward pass.
    indices: int32 code indices, shape of the input without its last axis.
    codebook_loss: mean ||sg[z_e] - e||^2 (zero when the codebook is an EMA).
    commitment_loss: mean ||z_e - sg[e]||^2, unweighted.
    loss: codebook_loss + beta * commitment_loss: what the train step adds to its loss.
    perplexity: exp(entropy) of code usage in this batch (over all devices if an axis
      name is given).
    counts: float32 [num_codes], how often each code was chosen in this batch (summed
      over devices if an axis name is given).
  """
  quantized: jax.Array
  indices: jax.Array
  codebook_loss: jax.Array
  commitment_loss: jax.Array
  loss: jax.Array
  perplexity: jax.Array
  counts: jax.Array


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """||z||^2 - 2 z.e + ||e||^2 for z [M, D] and codebook [K, D] -> [M, K], float32.

  The expanded form never materialises an [M, K, D] tensor.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  return (jnp.sum(z * z, axis=-1, keepdims=True)
          - 2.0 * z @ codebook.T
          + jnp.sum(codebook * codebook, axis=-1)[None, :])


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest codebook row for each z [M, D] -> int32 [M]."""
  return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)


def _psum(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _check_code_dim(z: jax.Array, code_dim: int, name: str) -> None:
  if z.shape[-1] != code_dim:
    raise ValueError(
        f'{name}: input has {z.shape[-1]} channels in its last axis (shape {z.shape}) '
        f'but code_dim is {code_dim}; project the encoder output to code_dim first.')


def _finish(z_e: jax.Array, codes: jax.Array, indices: jax.Array, *, num_codes: int,
            beta: float, learned_codebook: bool,
            axis_name: Optional[str]) -> QuantizerOutput:
  """Losses (before the straight-through patch), the patch itself, and usage statistics."""
  z32 = z_e.astype(jnp.float32)
  codes32 = codes.astype(jnp.float32)
  commitment = jnp.mean(jnp.square(z32 - jax.lax.stop_gradient(codes32)))
  if learned_codebook:
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z32) - codes32))
  else:
    codebook_loss = jnp.zeros((), jnp.float32)
  quantized = z_e + jax.lax.stop_gradient(codes.astype(z_e.dtype) - z_e)
  one_hot = jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=jnp.float32)
  counts = _psum(jnp.sum(one_hot, axis=0), axis_name)
  return QuantizerOutput(
      quantized=quantized,
      indices=indices,
      codebook_loss=codebook_loss,
      commitment_loss=commitment,
      loss=codebook_loss + beta * commitment,
      perplexity=metrics.perplexity(counts),
      counts=counts)


class VectorQuantizer(nn.Module):
  """VQ with a codebook learned by gradient (the `||sg[z_e] - e||^2` term).

  Attributes:
    num_codes: codebook size K.
    code_dim: code dimension D; the input's last axis.
    beta: weight of the commitment loss.
    axis_name: if set, usage counts are summed over this pmap axis.
  """
  num_codes: int
  code_dim: int
  beta: float = 0.25
  axis_name: Optional[str] = None

  def setup(self):
    # Uniform with variance 1/D per entry: codes start on the scale of a unit-variance
    # encoder output projected to D dims.
    self.codebook = self.param(
        'codebook', nn.initializers.variance_scaling(1.0, 'fan_out', 'uniform'),
        (self.num_codes, self.code_dim), jnp.float32)

  def __call__(self, z_e: jax.Array, *, train: bool = False) -> QuantizerOutput:
    del train  # the codebook changes only through the optimizer
    _check_code_dim(z_e, self.code_dim, type(self).__name__)
    flat = z_e.reshape(-1, self.code_dim)
    indices = nearest_codes(flat, jax.lax.stop_gradient(self.codebook))
    codes = jnp.take(self.codebook, indices, axis=0)
    return _finish(z_e, codes.reshape(z_e.shape), indices.reshape(z_e.shape[:-1]),
                   num_codes=self.num_codes, beta=self.beta, learned_codebook=True,
                   axis_name=self.axis_name)

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codes for integer indices [...] -> [..., D]."""
    return jnp.take(self.codebook, indices, axis=0)

  def encode_to_indices(self, z_e: jax.Array) -> jax.Array:
    _check_code_dim(z_e, self.code_dim, type(self).__name__)
    flat = z_e.reshape(-1, self.code_dim)
    return nearest_codes(flat, self.codebook).reshape(z_e.shape[:-1])

  def decode_from_indices(self, indices: jax.Array) -> jax.Array:
    return self.lookup(indices)


class EMAVectorQuantizer(nn.Module):
  """VQ whose codebook is an exponential moving average of assigned encoder outputs.

  The statistics live in the `vq_stats` collection and change only when called with
  `train=True` and `mutable=['vq_stats']`:

    counts_t = decay * counts_{t-1} + (1 - decay) * n_t        (n_t: codes' counts this step)
    sums_t   = decay * sums_{t-1}   + (1 - decay) * s_t        (s_t: sum of assigned z_e)
    avg      = x_t / (1 - decay^t)                             (zero-debiased, as in Sonnet)
    smoothed = (avg_counts + eps) / (N + K * eps) * N          (Laplace, N = sum avg_counts)
    codebook = avg_sums / smoothed

  With an axis name, n_t and s_t are summed over that axis first, so every device
  holds the same codebook.

  Attributes:
    num_codes: codebook size K.
    code_dim: code dimension D.
    beta: weight of the commitment loss.
    decay: EMA decay.
    epsilon: Laplace smoothing constant.
    axis_name: pmap axis to sum statistics over, or None outside pmap.
  """
  num_codes: int
  code_dim: int
  beta: float = 0.25
  decay: float = 0.99
  epsilon: float = 1e-5
  axis_name: Optional[str] = None

  def setup(self):
    shape = (self.num_codes, self.code_dim)
    init = nn.initializers.variance_scaling(1.0, 'fan_out', 'uniform')
    self.codebook = self.variable(
        STATS, 'codebook', lambda: init(self.make_rng('params'), shape, jnp.float32))
    self.ema_counts = self.variable(
        STATS, 'ema_counts', lambda: jnp.zeros((self.num_codes,), jnp.float32))
    self.ema_sums = self.variable(STATS, 'ema_sums', lambda: jnp.zeros(shape, jnp.float32))
    self.ema_steps = self.variable(STATS, 'ema_steps', lambda: jnp.zeros((), jnp.int32))

  def __call__(self, z_e: jax.Array, *, train: bool = False) -> QuantizerOutput:
    _check_code_dim(z_e, self.code_dim, type(self).__name__)
    flat = z_e.reshape(-1, self.code_dim)
    codebook = self.codebook.value
    indices = nearest_codes(flat, codebook)
    codes = jnp.take(codebook, indices, axis=0).reshape(z_e.shape)
    out = _finish(z_e, codes, indices.reshape(z_e.shape[:-1]), num_codes=self.num_codes,
                  beta=self.beta, learned_codebook=False, axis_name=self.axis_name)
    if train and not self.is_initializing():
      one_hot = jax.nn.one_hot(indices, self.num_codes, dtype=jnp.float32)
      sums = _psum(one_hot.T @ jax.lax.stop_gradient(flat).astype(jnp.float32),
                   self.axis_name)
      self._ema_update(out.counts, sums)
    return out

  def _ema_update(self, counts: jax.Array, sums: jax.Array) -> None:
    d = self.decay
    steps = self.ema_steps.value + 1
    self.ema_steps.value = steps
    self.ema_counts.value = d * self.ema_counts.value + (1.0 - d) * counts
    self.ema_sums.value = d * self.ema_sums.value + (1.0 - d) * sums
    debias = 1.0 - jnp.power(jnp.float32(d), steps.astype(jnp.float32))
    avg_counts = self.ema_counts.value / debias
    avg_sums = self.ema_sums.value / debias
    total = jnp.sum(avg_counts)
    smoothed = (avg_counts + self.epsilon) / (total + self.num_codes * self.epsilon) * total
    self.codebook.value = avg_sums / smoothed[:, None]

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codes for integer indices [...] -> [..., D]."""
    return jnp.take(self.codebook.value, indices, axis=0)

  def encode_to_indices(self, z_e: jax.Array) -> jax.Array:
    _check_code_dim(z_e, self.code_dim, type(self).__name__)
    flat = z_e.reshape(-1, self.code_dim)
    return nearest_codes(flat, self.codebook.value).reshape(z_e.shape[:-1])

  def decode_from_indices(self, indices: jax.Array) -> jax.Array:
    return self.lookup(indices)


QUANTIZERS = {'vq': VectorQuantizer, 'ema': EMAVectorQuantizer}
