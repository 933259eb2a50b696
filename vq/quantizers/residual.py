"""Residual vector quantization: a stack of codebooks, each quantizing what is left.

Usage sketch::

  rvq = ResidualVQ(num_codes=512, code_dim=64, depth=4, base='ema', axis_name='batch')
  variables = rvq.init(rng, z_e)                            # {'vq_stats': {'levels_0': ...}}
  out, updates = rvq.apply(variables, z_e, train=True, mutable=['vq_stats'])
  out.indices                                               # int32 [..., 4]
  z_q = rvq.apply(variables, out.indices, method='lookup')  # [..., 64], sum over levels

Level 0 quantizes z_e, level l quantizes the residual r_l = r_{l-1} - e_{l-1} left by the
codes chosen above it (Zeghidour et al. 2021, SoundStream; Lee et al. 2022, RQ-VAE). A
token is the tuple of `depth` indices, so `depth * log2(num_codes)` bits per position with
only `depth * num_codes` code vectors.

Each level is an existing `VectorQuantizer` or `EMAVectorQuantizer` and keeps its own
losses on its own residual: level l's commitment term `||r_l - sg(e_l)||^2` reaches the
encoder through r_l (the codes subtracted above it are constants), and for base 'vq' its
codebook term trains e_l. `loss`, `codebook_loss`, `commitment_loss` and `entropy_loss`
are the sums over levels.

The decoder's input has forward value `sum_l e_l`. Its gradient follows the greedy recursion
with each level's quantization replaced by its surrogate: `q_l = Q_l(s_l)`, `s_0 = z_e`,
`s_{l+1} = s_l - q_l`, decoder input `sum_l q_l = z_e - s_depth`, so
`d z_q / d z_e = I - (I - J_{depth-1}) ... (I - J_0)` with `J_l` the Jacobian of level l's
surrogate. With `gradient='ste'` every `J_l = I` and this is the identity: one
straight-through patch on the total, `z_e + sg(sum_l e_l - z_e)`, which is how it is
computed. With `gradient='rotation'`, `J_l = lambda_l R_l` of the rotation trick
(`base.rotate_to`) taking s_l onto e_l; at depth 1 this is the single quantizer's rotation.
The losses above keep their residuals r_l with constant codes either way.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq.core import metrics
from vq.quantizers.vector import EMAVectorQuantizer
from vq.quantizers.base import GRADIENTS
from vq.quantizers.base import QuantizerOutput
from vq.quantizers.base import TokenSpace
from vq.quantizers.base import rotate_to
from vq.quantizers.vector import VectorQuantizer

BASES = {'ema': EMAVectorQuantizer, 'vq': VectorQuantizer}


class ResidualVQ(TokenSpace, nn.Module):
  """`depth` quantizers applied in turn to the residual of the levels before them.

  Variables live under `levels_0` ... `levels_{depth-1}` in the base quantizer's
  collections (`params` for 'vq', `vq_stats` for 'ema'); each level's statistics change
  only with `train=True`, and with an axis name each level sums them over devices.

  Attributes:
    num_codes: codes per level (the vocabulary of each index slot).
    code_dim: code dimension D; the input's last axis.
    depth: number of levels.
    base: 'ema' (EMA codebooks) or 'vq' (codebooks learned by gradient).
    beta: commitment weight of every level.
    decay: EMA decay (base 'ema').
    epsilon: Laplace smoothing of the EMA counts (base 'ema').
    axis_name: pmap axis over which counts and EMA statistics are summed, or None.
    gradient: 'ste' (straight-through on the total) or 'rotation' (the rotation trick at
      every level, composed as in the module docstring).
  """
  num_codes: int
  code_dim: int
  depth: int
  base: str = 'ema'
  beta: float = 0.25
  decay: float = 0.99
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  gradient: str = 'ste'

  def __post_init__(self):
    if self.gradient not in GRADIENTS:
      raise ValueError(f'ResidualVQ gradient={self.gradient!r} is unknown; choose one of '
                       f'{GRADIENTS}.')
    if self.base not in BASES:
      raise ValueError(f'ResidualVQ base={self.base!r} is unknown; choose one of '
                       f'{sorted(BASES)}.')
    if int(self.depth) != self.depth or self.depth < 1:
      raise ValueError(f'ResidualVQ depth must be an integer >= 1, got {self.depth}.')
    super().__post_init__()

  @property
  def index_depth(self) -> int:
    return self.depth

  def setup(self):
    if self.base == 'ema':
      make = lambda: EMAVectorQuantizer(
          num_codes=self.num_codes, code_dim=self.code_dim, beta=self.beta, decay=self.decay,
          epsilon=self.epsilon, axis_name=self.axis_name)
    else:
      make = lambda: VectorQuantizer(num_codes=self.num_codes, code_dim=self.code_dim,
                                     beta=self.beta, axis_name=self.axis_name)
    self.levels = [make() for _ in range(self.depth)]

  def __call__(self, z_e: jax.Array, *, train: bool = False) -> QuantizerOutput:
    residual = z_e.astype(jnp.float32)
    total = jnp.zeros_like(residual)
    outs = []
    for level in self.levels:
      out = level(residual, train=train)
      # The level's forward value is its code; as a constant it leaves the next level's
      # commitment gradient flowing to the encoder only through the residual.
      code = jax.lax.stop_gradient(out.quantized.astype(jnp.float32))
      total = total + code
      residual = residual - code
      outs.append(out)
    counts = jnp.concatenate([o.counts for o in outs])
    summed = lambda name: sum(getattr(o, name) for o in outs)
    if self.gradient == 'rotation':
      surrogate = self._rotated(z_e.astype(jnp.float32), [o.quantized for o in outs])
      quantized = (surrogate + jax.lax.stop_gradient(total - surrogate)).astype(z_e.dtype)
    else:
      quantized = z_e + jax.lax.stop_gradient(total.astype(z_e.dtype) - z_e)
    return QuantizerOutput(
        quantized=quantized,
        indices=jnp.stack([o.indices for o in outs], axis=-1),
        codebook_loss=summed('codebook_loss'),
        commitment_loss=summed('commitment_loss'),
        loss=summed('loss'),
        perplexity=metrics.perplexity(counts),
        counts=counts,
        entropy_loss=summed('entropy_loss'))

  @staticmethod
  def _rotated(z_e: jax.Array, codes: list[jax.Array]) -> jax.Array:
    """sum_l q_l with q_l = rotate_to(s_l, e_l), s_{l+1} = s_l - q_l (module docstring)."""
    s, out = z_e, jnp.zeros_like(z_e)
    for code in codes:
      q = rotate_to(s, jax.lax.stop_gradient(code.astype(jnp.float32)))
      out = out + q
      s = s - q
    return out

  def _check_indices(self, indices: jax.Array) -> None:
    if indices.ndim < 1 or indices.shape[-1] != self.depth:
      raise ValueError(
          f'ResidualVQ: indices have shape {indices.shape} but the last axis must hold the '
          f'{self.depth} levels; pass the [..., depth] indices that the quantizer returned.')

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Sum of the level codes for indices [..., depth] -> [..., D]."""
    self._check_indices(indices)
    return sum(level.lookup(indices[..., i]) for i, level in enumerate(self.levels))

  def encode_to_indices(self, z_e: jax.Array) -> jax.Array:
    """Indices [..., depth] of the greedy residual assignment; no statistics change."""
    residual = z_e.astype(jnp.float32)
    indices = []
    for level in self.levels:
      idx = level.encode_to_indices(residual)
      residual = residual - level.lookup(idx)
      indices.append(idx)
    return jnp.stack(indices, axis=-1)

  def decode_from_indices(self, indices: jax.Array) -> jax.Array:
    return self.lookup(indices)
