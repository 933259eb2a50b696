"""Quantizers without a learned codebook: FSQ and LFQ.

Usage sketch::

  fsq = FSQ(levels=(8, 5, 5, 5), code_dim=64)               # 1000 codes, ~10 bits/token
  variables = fsq.init(rng, z_e)                            # {'params': projections}
  out = fsq.apply(variables, z_e)                           # QuantizerOutput
  z_q = fsq.apply(variables, out.indices, method='lookup')  # [..., 64]

  lfq = LFQ(num_codes=1024, code_dim=64, entropy_weight=0.1)  # 10 bits/token
  out = lfq.apply(lfq.init(rng, z_e), z_e, train=True)      # out.loss has the entropy term

Both fix their code set in advance, so no code can die and nothing is kept in `vq_stats`:

* FSQ (Mentzer et al. 2023, "Finite Scalar Quantization") bounds each of `len(levels)`
  dimensions and rounds it to one of `levels[i]` values; a code is a point of that grid.
  There is no codebook to pull towards the encoder, so codebook and commitment losses are
  zero and `loss` is zero: the reconstruction loss alone trains the encoder.
* LFQ (Yu et al. 2023, MAGVIT-v2 "lookup-free quantization") takes the sign of each of
  log2(num_codes) dimensions. Its loss is beta * commitment plus entropy_weight times an
  entropy penalty that makes each position confident and the batch use all codes.

When `code_dim` differs from the quantizer's own width, learned dense projections map
code_dim -> width before quantization and back after it; `lookup` applies the same
projection back, so the decoder sees the same vectors as in the forward pass.

The straight-through patch is written `code + (z - sg(z))`: its forward value is exactly
the code (so `lookup(indices)` reproduces `quantized` bit for bit without projections) and
its gradient is the identity on z.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vq.core import metrics
from vq.quantizers.base import QuantizerOutput
from vq.quantizers.base import TokenSpace
from vq.quantizers.base import check_code_dim
from vq.quantizers.base import psum_if


def _straight_through(code: jax.Array, z: jax.Array) -> jax.Array:
  """Forward value exactly `code`, gradient the identity on `z`."""
  return jax.lax.stop_gradient(code) + (z - jax.lax.stop_gradient(z))


def _usage_counts(indices: jax.Array, vocab_size: int,
                  axis_name: Optional[str]) -> jax.Array:
  # A scatter-add instead of a one-hot matrix: FSQ/LFQ vocabularies reach 2**16 codes.
  counts = jnp.zeros((vocab_size,), jnp.float32).at[indices.reshape(-1)].add(1.0)
  return psum_if(counts, axis_name)


def _output(quantized, indices, *, vocab_size, axis_name, commitment, loss,
            entropy_loss) -> QuantizerOutput:
  counts = _usage_counts(indices, vocab_size, axis_name)
  zero = jnp.zeros((), jnp.float32)
  return QuantizerOutput(
      quantized=quantized, indices=indices, codebook_loss=zero,
      commitment_loss=zero if commitment is None else commitment,
      loss=zero if loss is None else loss, perplexity=metrics.perplexity(counts),
      counts=counts, entropy_loss=zero if entropy_loss is None else entropy_loss)


class _Projected(TokenSpace, nn.Module):
  """Shared plumbing: optional dense projections code_dim <-> width around the grid."""

  def _setup_projections(self, width: int) -> None:
    if self.code_dim != width:
      self.project_in = nn.Dense(width, name='project_in')
      self.project_out = nn.Dense(self.code_dim, name='project_out')
    else:
      self.project_in = None
      self.project_out = None

  def _to_grid(self, z: jax.Array) -> jax.Array:
    z = z.astype(jnp.float32)
    return z if self.project_in is None else self.project_in(z).astype(jnp.float32)

  def _from_grid(self, codes: jax.Array) -> jax.Array:
    return codes if self.project_out is None else self.project_out(codes)

  # Subclasses define `indices_to_codes` and `_quantize(grid) -> (codes, indices)`.

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Vectors the decoder consumes for indices [...] -> [..., code_dim]."""
    return self._from_grid(self.indices_to_codes(indices))

  def encode_to_indices(self, z_e: jax.Array) -> jax.Array:
    check_code_dim(z_e, self.code_dim, type(self).__name__)
    return self._quantize(self._to_grid(z_e))[1]

  def decode_from_indices(self, indices: jax.Array) -> jax.Array:
    return self.lookup(indices)


class FSQ(_Projected):
  """Finite scalar quantization onto a fixed grid of prod(levels) codes.

  Each grid dimension i is bounded by
  `f(z) = tanh(z + shift) * half_l - offset` with `half_l = (L - 1)(1 - 1e-3) / 2`,
  `offset = 0.5` for even L (else 0) and `shift = atanh(offset / half_l)` (so f(0) = 0),
  which rounds to exactly L integers; the code is that integer divided by L // 2, in
  [-1, 1]. The index of a code is its mixed-radix number with dimension 0 least
  significant: a bijection between the grid and [0, prod(levels)).

  Codebook, commitment and total losses are zero: the grid is fixed, so there is nothing
  to pull together; the encoder learns through the straight-through reconstruction
  gradient alone.

  Attributes:
    levels: number of values per grid dimension, each >= 3 (a 2-level dimension has no
      bound centred on 0; use LFQ for binary codes).
    code_dim: the input's last axis; projected to len(levels) when different.
    axis_name: pmap axis over which usage counts are summed, or None.
  """
  levels: Sequence[int]
  code_dim: int
  axis_name: Optional[str] = None

  def __post_init__(self):
    levels = tuple(self.levels)
    # A tuple keeps the module hashable (a static jit argument) when given a list.
    object.__setattr__(self, 'levels', levels)
    if not levels or any(int(l) != l or l < 3 for l in levels):
      raise ValueError(f'FSQ levels must be a non-empty sequence of integers >= 3, got '
                       f'{levels}; e.g. (8, 5, 5, 5) for 1000 codes.')
    if math.prod(levels) >= 2**31:
      raise ValueError(f'FSQ levels {levels} give {math.prod(levels)} codes, more than int32 '
                       'indices hold; use fewer or smaller levels.')
    super().__post_init__()

  @property
  def vocab_size(self) -> int:
    return math.prod(int(l) for l in self.levels)

  def _levels(self) -> np.ndarray:
    return np.asarray(self.levels, np.int32)

  def _half_width(self) -> np.ndarray:
    return self._levels() // 2

  def _basis(self) -> np.ndarray:
    return np.cumprod([1] + list(self._levels()[:-1])).astype(np.int32)

  def setup(self):
    self._setup_projections(len(self.levels))

  def bound(self, z: jax.Array) -> jax.Array:
    """Squash z [..., len(levels)] into the range that rounds to `levels` integers."""
    levels = self._levels().astype(np.float64)
    half_l = (levels - 1) * (1 - 1e-3) / 2
    offset = np.where(self._levels() % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half_l)
    return (jnp.tanh(z + shift.astype(np.float32)) * half_l.astype(np.float32)
            - offset.astype(np.float32))

  def _quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    bounded = self.bound(z)
    half_width = self._half_width().astype(np.float32)
    codes = _straight_through(jnp.round(bounded) / half_width, bounded / half_width)
    return codes, self.codes_to_indices(jax.lax.stop_gradient(codes))

  def codes_to_indices(self, codes: jax.Array) -> jax.Array:
    """Grid codes [..., len(levels)] in [-1, 1] -> int32 indices [...]."""
    half_width = self._half_width()
    digits = jnp.round(codes * half_width).astype(jnp.int32) + half_width
    return jnp.sum(digits * self._basis(), axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """Int indices [...] in [0, vocab_size) -> grid codes [..., len(levels)], float32."""
    digits = (indices[..., None].astype(jnp.int32) // self._basis()) % self._levels()
    half_width = self._half_width()
    return ((digits - half_width) / half_width).astype(jnp.float32)

  def __call__(self, z_e: jax.Array, *, train: bool = False) -> QuantizerOutput:
    del train  # no statistics to update
    check_code_dim(z_e, self.code_dim, type(self).__name__)
    codes, indices = self._quantize(self._to_grid(z_e))
    return _output(self._from_grid(codes), indices, vocab_size=self.vocab_size,
                   axis_name=self.axis_name, commitment=None, loss=None, entropy_loss=None)


class LFQ(_Projected):
  """Lookup-free quantization: the sign of each of log2(num_codes) dimensions.

  code = sign(z) in {-1, +1}^bits (z = 0 maps to -1), index = sum_i [code_i > 0] 2^i.

  Entropy penalty (MAGVIT-v2): with `p_m = softmax_c(2 z_m . c / T)` over all num_codes
  codes c (equal to softmax(-||z_m - c||^2 / T), since ||c||^2 is constant),
  `entropy_loss = mean_m H(p_m) - H(mean_m p_m)`: low when each position is confident and
  the batch spreads over many codes. With an axis name both means run over the positions
  of every device (psums of sums and counts), so the value equals the single-device value
  on the concatenated batch and is the same on every device. It costs
  O(positions * num_codes) memory and is skipped (zero, and left out of `loss`) when
  entropy_weight is 0 or outside training (`train=False`: evaluation, tokenizing), where
  only the codes are used.

  `loss = beta * commitment + entropy_weight * entropy_loss`, commitment being
  `mean ||z - sg(code)||^2` over this device's positions (after the projection in);
  there is no codebook loss.

  Attributes:
    num_codes: 2**bits, a power of two >= 2.
    code_dim: the input's last axis; projected to bits when different.
    entropy_weight: weight of the entropy penalty in `loss`.
    entropy_temperature: T in the softmax above.
    beta: weight of the commitment loss.
    axis_name: pmap axis over which counts and the entropy statistics are summed.
  """
  num_codes: int
  code_dim: int
  entropy_weight: float = 0.1
  entropy_temperature: float = 0.01
  beta: float = 0.25
  axis_name: Optional[str] = None

  def __post_init__(self):
    n = self.num_codes
    if int(n) != n or n < 2 or (int(n) & (int(n) - 1)) != 0 or n > 2**30:
      raise ValueError(f'LFQ num_codes must be a power of two between 2 and 2**30, got {n}; '
                       'e.g. 1024 for 10 bits per token.')
    if self.entropy_temperature <= 0:
      raise ValueError(f'LFQ entropy_temperature must be > 0, got {self.entropy_temperature}.')
    super().__post_init__()

  @property
  def bits(self) -> int:
    return int(self.num_codes).bit_length() - 1

  @property
  def vocab_size(self) -> int:
    return 2**self.bits

  def setup(self):
    self._setup_projections(self.bits)

  def _powers(self) -> np.ndarray:
    return (2 ** np.arange(self.bits)).astype(np.int32)

  def codes_to_indices(self, codes: jax.Array) -> jax.Array:
    """Sign codes [..., bits] -> int32 indices [...]."""
    return jnp.sum((codes > 0).astype(jnp.int32) * self._powers(), axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """Int indices [...] -> sign codes [..., bits] in {-1, +1}, float32."""
    bit_set = (indices[..., None].astype(jnp.int32) & self._powers()) > 0
    return jnp.where(bit_set, 1.0, -1.0).astype(jnp.float32)

  def _entropy_loss(self, z: jax.Array) -> jax.Array:
    flat = z.reshape(-1, self.bits)
    all_codes = self.indices_to_codes(jnp.arange(self.vocab_size))
    logits = (2.0 / self.entropy_temperature) * (flat @ all_codes.T)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    positions = psum_if(jnp.float32(flat.shape[0]), self.axis_name)
    sample_entropy = psum_if(-jnp.sum(p * log_p), self.axis_name) / positions
    avg_p = psum_if(jnp.sum(p, axis=0), self.axis_name) / positions
    # Double where: codes nobody uses have avg_p == 0 and must give 0, not 0 * -inf or a
    # NaN gradient.
    safe = jnp.where(avg_p > 0, avg_p, 1.0)
    batch_entropy = -jnp.sum(jnp.where(avg_p > 0, avg_p * jnp.log(safe), 0.0))
    return sample_entropy - batch_entropy

  def _quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    codes = _straight_through(jnp.where(z > 0, 1.0, -1.0).astype(jnp.float32), z)
    return codes, self.codes_to_indices(jax.lax.stop_gradient(codes))

  def __call__(self, z_e: jax.Array, *, train: bool = False) -> QuantizerOutput:
    """Quantizes z_e; with `train=False` the entropy penalty is not computed (zero)."""
    check_code_dim(z_e, self.code_dim, type(self).__name__)
    z = self._to_grid(z_e)
    codes, indices = self._quantize(z)
    commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(codes)))
    if self.entropy_weight and train:
      entropy = self._entropy_loss(z)
    else:
      entropy = jnp.zeros((), jnp.float32)
    loss = self.beta * commitment + self.entropy_weight * entropy
    return _output(self._from_grid(codes), indices, vocab_size=self.vocab_size,
                   axis_name=self.axis_name, commitment=commitment, loss=loss,
                   entropy_loss=entropy)
