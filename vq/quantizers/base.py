"""What every quantizer shares: its output, its token space, and the lookup mathematics.

Usage sketch::

  from vq.quantizers import base

  d = base.squared_distances(z, codebook)        # [N, K], float32
  idx = base.nearest_codes(z, codebook)          # [N]
  out: base.QuantizerOutput                      # what every quantizer returns

Distances and losses are computed in float32 whatever the network dtype; the codebook
distances run at HIGHEST matmul precision (float32 on TPU/GPU too).
"""

from __future__ import annotations

import math
from typing import Optional

import flax
import jax
import jax.numpy as jnp


STATS = 'vq_stats'  # variable collection holding codebook statistics
GRADIENTS = ('ste', 'rotation')
BETA_TERMS = ('commitment', 'codebook')  # the loss term beta weighs (VectorQuantizer)

# Norms below this count as zero: the rotation trick falls back to straight-through, and
# l2 normalisation leaves the vector at (near) zero instead of dividing by zero.
_NORM_EPS = 1e-6


@flax.struct.dataclass
class QuantizerOutput:
  """What every quantizer returns.

  Attributes:
    quantized: straight-through (or rotated) output; in the forward pass, the selected
      codes mapped back to code_dim.
    indices: int32 code indices, shape of the input without its last axis.
    codebook_loss: mean ||sg[z_e] - e||^2 (zero when the codebook is an EMA).
    commitment_loss: mean ||z_e - sg[e]||^2, unweighted.
    loss: codebook_loss + beta * commitment_loss (+ entropy_weight * entropy_loss): what
      the train step adds to its loss (beta * codebook_loss + commitment_loss with
      `VectorQuantizer(beta_on='codebook')`).
    perplexity: exp(entropy) of code usage in this batch (over all devices if an axis
      name is given).
    counts: float32 [num_codes], how often each code was chosen in this batch (summed
      over devices if an axis name is given). Residual VQ concatenates its levels.
    entropy_loss: the entropy penalty before its weight (zero when it is off); its
      weighted value is already part of `loss`.
  """
  quantized: jax.Array
  indices: jax.Array
  codebook_loss: jax.Array
  commitment_loss: jax.Array
  loss: jax.Array
  perplexity: jax.Array
  counts: jax.Array
  entropy_loss: jax.Array


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """||z||^2 - 2 z.e + ||e||^2 for z [M, D] and codebook [K, D] -> [M, K], float32.

  The expanded form never materialises an [M, K, D] tensor. The product runs at HIGHEST
  precision: by default TPUs multiply float32 with bfloat16 passes and recent NVIDIA GPUs
  may use TF32, either of which can flip the nearest code between close neighbours.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  return (jnp.sum(z * z, axis=-1, keepdims=True)
          - 2.0 * jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
          + jnp.sum(codebook * codebook, axis=-1)[None, :])


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest codebook row for each z [M, D] -> int32 [M]."""
  return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)


def normalize_rows(x: jax.Array) -> jax.Array:
  """Rows of x scaled to unit length, float32; (near-)zero rows stay (near) zero."""
  x = x.astype(jnp.float32)
  # max() inside the rsqrt keeps the gradient finite at x = 0, unlike a norm.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPS ** 2))


def psum_if(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def entropy_penalty(distances: jax.Array, temperature: float,
                    axis_name: Optional[str] = None) -> jax.Array:
  """MaskGIT-style entropy penalty from [M, K] squared distances, float32 scalar.

  With p = softmax(-d / T) per position, returns mean_m H(p_m) - H(mean_m p_m): low
  when each position is confident about its code while all positions together spread
  over the codebook. With an axis name both means run over every device (psum of sums
  over psum of counts), so N devices give the value of 1 device on the concatenated batch.
  Under pmap the gradient each device gets is then, like a local mean's, N times its
  share of the global gradient; the step's pmean of the gradients removes that factor.

  Args:
    distances: [M, K] squared distances between M inputs and K codes.
    temperature: softmax temperature T > 0.
    axis_name: pmap axis to average over, or None.

  Returns:
    The penalty in nats.
  """
  logits = -distances.astype(jnp.float32) / temperature
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p)
  total = psum_if(jnp.asarray(distances.shape[0], jnp.float32), axis_name)
  per_position = psum_if(-jnp.sum(p * log_p), axis_name) / total
  mean_p = psum_if(jnp.sum(p, axis=0), axis_name) / total
  # A code whose probability underflowed to 0 adds 0; the floor keeps its gradient finite.
  batch = -jnp.sum(mean_p * jnp.log(jnp.maximum(mean_p, 1e-30)))
  return per_position - batch


def rotate_to(z: jax.Array, e: jax.Array) -> jax.Array:
  """The rotation trick (Fifty et al. 2024): forward value e, gradient lambda * R.

  R = I - 2 r r^T + 2 q u^T with u = z/||z||, q = e/||e||, r = (u+q)/||u+q|| rotates u
  onto q, and lambda = ||e||/||z|| rescales; both are constants for the gradient. The
  product lambda * R z is formed from dot products, never materialising R. For u = -q
  the guard sets r = 0 and R = I - 2 q q^T, a reflection that still maps u onto q; for
  ||z|| ~ 0 it uses u = q and lambda = 1, i.e. the straight-through identity.

  Args:
    z: [M, d] inputs.
    e: [M, d] their selected codes (no gradient flows to them through this function).

  Returns:
    float32 [M, d] equal to e up to one rounding, with d out / d z = lambda * R per row.
  """
  sg = jax.lax.stop_gradient
  z = z.astype(jnp.float32)
  e = sg(e.astype(jnp.float32))
  z_norm = sg(jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True)))
  e_norm = jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))
  q = e / jnp.maximum(e_norm, _NORM_EPS)
  live = z_norm > _NORM_EPS
  safe_z_norm = jnp.where(live, z_norm, 1.0)
  u = jnp.where(live, sg(z) / safe_z_norm, q)
  scale = jnp.where(live, e_norm / safe_z_norm, 1.0)
  w = u + q
  w_norm = jnp.sqrt(jnp.sum(w * w, axis=-1, keepdims=True))
  r = jnp.where(w_norm > _NORM_EPS, w / jnp.maximum(w_norm, _NORM_EPS), 0.0)
  dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
  rotated = scale * (z - 2.0 * r * dot(r, z) + 2.0 * q * dot(u, z))
  # lambda * R z equals e only up to a few roundings; the patch makes it one.
  return rotated + sg(e - rotated)


def check_code_dim(z: jax.Array, code_dim: int, name: str) -> None:
  if z.shape[-1] != code_dim:
    raise ValueError(
        f'{name}: input has {z.shape[-1]} channels in its last axis (shape {z.shape}) '
        f'but code_dim is {code_dim}; project the encoder output to code_dim first.')


class TokenSpace:
  """Token-space properties every quantizer has (usable on an unbound module).

  A quantizer defines `vocab_size` (codes per index slot) and, if it emits several
  indices per position, `index_depth`; the rest follows.
  """

  @property
  def vocab_size(self) -> int:
    """Codes per index slot."""
    return self.num_codes

  @property
  def index_depth(self) -> int:
    """Indices per position."""
    return 1

  @property
  def bits_per_token(self) -> float:
    """Bits one position's indices carry: index_depth * log2(vocab_size)."""
    return self.index_depth * math.log2(self.vocab_size)

  @property
  def usage_size(self) -> int:
    """Length of `QuantizerOutput.counts`."""
    return self.vocab_size * self.index_depth
