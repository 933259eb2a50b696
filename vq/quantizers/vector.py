"""Vector quantizers: nearest-code lookup with straight-through gradients.

Usage sketch::

  vq = EMAVectorQuantizer(num_codes=512, code_dim=64, axis_name='batch')
  variables = vq.init(rng, z_e, train=False)            # {'vq_stats': {...}}
  out, updates = vq.apply(variables, z_e, train=True, mutable=['vq_stats'])
  out.quantized, out.indices, out.loss, out.perplexity
  images_codes = vq.apply(variables, out.indices, method='lookup')

  # Options (both quantizers): factorised cosine lookup, entropy penalty, rotation trick.
  vq = VectorQuantizer(num_codes=8192, code_dim=256, lookup_dim=8, l2_normalize=True,
                       entropy_weight=0.1, gradient='rotation')
  # Codebook upkeep (k-means init, dead-code restarts), run by the train step after the
  # step's own updates, with `z` the gathered `intermediates/lookup_input` rows:
  changed, variables = vq.apply(variables, z, dead, kmeans_now, method='maintain',
                                mutable=['params', 'vq_stats'], rngs={'codebook': key})

Both quantizers return a `QuantizerOutput`. The codebook and commitment losses are
computed from `z_e` and the selected codes *before* the straight-through patch
`z_q = z_e + sg(e - z_e)`, and beta multiplies the commitment term
`||z_e - sg(e)||^2` (van den Oord et al. 2017, eq. 3); `VectorQuantizer(beta_on='codebook')`
instead weighs the codebook term by beta and the commitment term by 1, as
taming-transformers' `VectorQuantizer2(legacy=True)` does (the quantizer of its released
VQGANs, kept for checkpoints converted by `vq.convert`). With `lookup_dim` or
`l2_normalize`, "z_e" above means the encoder output in the lookup space (projected,
normalised) and the selected code is projected back to `code_dim` afterwards.

Distances, EMA statistics and losses are kept in float32 whatever the network dtype.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq.quantizers import kmeans as kmeans_lib
from vq.core import metrics
from vq.quantizers import base


class _NearestCodeQuantizer(base.TokenSpace, nn.Module):
  """What both nearest-code quantizers share; subclasses declare the fields and variables.

  Subclasses provide `self.codebook` (a flax Variable [K, lookup space dim]) and, when
  `lookup_dim > 0`, the projections `self.lookup_in` and `self.lookup_out`.
  """

  @property
  def space_dim(self) -> int:
    """Columns of the codebook: lookup_dim when projecting, else code_dim."""
    return self.lookup_dim if self.lookup_dim > 0 else self.code_dim

  # -- Shared machinery. --

  def _check_options(self) -> None:
    name = type(self).__name__
    if self.gradient not in base.GRADIENTS:
      raise ValueError(f'{name}: gradient={self.gradient!r} is unknown; choose one of '
                       f'{base.GRADIENTS}.')
    if self.lookup_dim < 0:
      raise ValueError(f'{name}: lookup_dim={self.lookup_dim} is negative; use 0 for no '
                       'projection or a positive lookup dimension.')
    if self.entropy_weight > 0 and self.entropy_temperature <= 0:
      raise ValueError(f'{name}: entropy_temperature={self.entropy_temperature} must be > 0 '
                       'when the entropy penalty is on (entropy_weight > 0).')
    if self.kmeans_iters < 0:
      raise ValueError(f'{name}: kmeans_iters={self.kmeans_iters} is negative; use 0 for '
                       'the k-means++ seeding alone.')

  def _make_projections(self) -> None:
    # Called from setup() only: flax names the submodules after the attributes.
    if self.lookup_dim > 0:
      self.lookup_in = nn.Dense(self.lookup_dim, name='lookup_in')
      self.lookup_out = nn.Dense(self.code_dim, name='lookup_out')

  def _to_lookup_space(self, z_e: jax.Array) -> jax.Array:
    """Encoder outputs [..., code_dim] -> [M, space_dim] vectors the lookup compares."""
    base.check_code_dim(z_e, self.code_dim, type(self).__name__)
    x = z_e.reshape(-1, self.code_dim)
    if self.lookup_dim > 0:
      x = self.lookup_in(x.astype(jnp.float32))
    if self.l2_normalize:
      x = base.normalize_rows(x)
    return x

  def _from_lookup_space(self, v: jax.Array) -> jax.Array:
    return self.lookup_out(v) if self.lookup_dim > 0 else v

  def _lookup_codebook(self) -> jax.Array:
    codebook = self.codebook.value
    return base.normalize_rows(codebook) if self.l2_normalize else codebook

  def _quantize(self, z_e: jax.Array, *, train: bool, learned_codebook: bool,
                beta_on: str = 'commitment'
                ) -> tuple[base.QuantizerOutput, jax.Array, jax.Array]:
    """The forward pass; also returns the lookup-space inputs and flat indices."""
    sg = jax.lax.stop_gradient
    x = self._to_lookup_space(z_e)
    codebook = self._lookup_codebook()
    distances = base.squared_distances(x, codebook)
    indices = jnp.argmin(distances, axis=-1).astype(jnp.int32)
    codes = jnp.take(codebook, indices, axis=0)

    x32, codes32 = x.astype(jnp.float32), codes.astype(jnp.float32)
    commitment = jnp.mean(jnp.square(x32 - sg(codes32)))
    if learned_codebook:
      codebook_loss = jnp.mean(jnp.square(sg(x32) - codes32))
    else:
      codebook_loss = jnp.zeros((), jnp.float32)
    if beta_on == 'codebook':
      loss = self.beta * codebook_loss + commitment
    else:
      loss = codebook_loss + self.beta * commitment
    if self.entropy_weight > 0:
      entropy_loss = base.entropy_penalty(distances, self.entropy_temperature, self.axis_name)
      loss = loss + self.entropy_weight * entropy_loss
    else:
      entropy_loss = jnp.zeros((), jnp.float32)

    if self.gradient == 'rotation':
      patched = base.rotate_to(x, codes)
    else:
      patched = x + sg(codes.astype(x.dtype) - x)
    quantized = self._from_lookup_space(patched).astype(z_e.dtype).reshape(z_e.shape)

    one_hot = jax.nn.one_hot(indices, self.num_codes, dtype=jnp.float32)
    counts = base.psum_if(jnp.sum(one_hot, axis=0), self.axis_name)
    if train and not self.is_initializing():
      # The train step all-gathers these rows for k-means and restarts.
      self.sow('intermediates', 'lookup_input', sg(x32))
    out = base.QuantizerOutput(
        quantized=quantized,
        indices=indices.reshape(z_e.shape[:-1]),
        codebook_loss=codebook_loss,
        commitment_loss=commitment,
        loss=loss,
        perplexity=metrics.perplexity(counts),
        counts=counts,
        entropy_loss=entropy_loss)
    return out, x32, indices

  def _upkeep_codebook(self, z: jax.Array, dead: jax.Array, kmeans_now: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(new codebook, changed rows, vectors each new row stands for); writes nothing."""
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != self.space_dim:
      raise ValueError(
          f'{type(self).__name__}.maintain: z must be [N, {self.space_dim}] lookup-space '
          f'rows (the sown lookup_input), got shape {z.shape}; reshape to (-1, '
          f'{self.space_dim}).')
    if jnp.shape(dead) != (self.num_codes,):
      raise ValueError(
          f'{type(self).__name__}.maintain: dead must be bool [{self.num_codes}], got shape '
          f'{jnp.shape(dead)}; pass one flag per code.')
    dead = jnp.asarray(dead, bool)
    kmeans_now = jnp.asarray(kmeans_now, bool)
    kmeans_key, restart_key = jax.random.split(self.make_rng('codebook'))
    current = self.codebook.value
    num_codes = self.num_codes

    def run_kmeans():
      return kmeans_lib.kmeans(z, num_codes, kmeans_key, iters=self.kmeans_iters,
                               spherical=self.l2_normalize)

    def keep():
      return current.astype(jnp.float32), jnp.ones((num_codes,), jnp.float32)

    # cond, not where: k-means runs once per training, not on every step.
    codebook, weights = jax.lax.cond(kmeans_now, run_kmeans, keep)
    # Distinct rows when there are enough, so two restarted codes never coincide.
    n = z.shape[0]
    picks = jax.random.choice(restart_key, n, (num_codes,), replace=n < num_codes)
    codebook = jnp.where(dead[:, None], z[picks], codebook)
    # An empty k-means cluster still counts as one vector (see the EMA docstring).
    weights = jnp.where(dead, 1.0, jnp.maximum(weights, 1.0))
    changed = jnp.logical_or(dead, kmeans_now)
    codebook = jnp.where(changed[:, None], codebook, current).astype(current.dtype)
    return codebook, changed, weights

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Decoder-space codes for integer indices [...] -> [..., code_dim]."""
    return self._from_lookup_space(jnp.take(self._lookup_codebook(), indices, axis=0))

  def encode_to_indices(self, z_e: jax.Array) -> jax.Array:
    """Encoder outputs [..., code_dim] -> int32 indices [...], as `__call__` picks them."""
    x = self._to_lookup_space(z_e)
    return base.nearest_codes(x, self._lookup_codebook()).reshape(z_e.shape[:-1])

  def decode_from_indices(self, indices: jax.Array) -> jax.Array:
    return self.lookup(indices)




class VectorQuantizer(_NearestCodeQuantizer):
  """VQ with a codebook learned by gradient (the `||sg[z_e] - e||^2` term).

  The codebook is `params/codebook`, so `maintain` needs 'params' mutable; the train step
  resets the optimizer moments of the rows it reports as changed.

  Attributes:
    num_codes: codebook size K.
    code_dim: code dimension D; the input's last axis.
    beta: weight of the commitment loss.
    axis_name: if set, usage counts are summed over this pmap axis.
    lookup_dim: if > 0, learned dense projections code_dim -> lookup_dim before the
      lookup and back after it (factorised codes, ViT-VQGAN); the codebook has
      lookup_dim columns and the losses are measured in that space.
    l2_normalize: l2-normalise the (projected) inputs and the codes, so the nearest
      code is the one of highest cosine similarity.
    entropy_weight: weight of the entropy penalty (`base.entropy_penalty`); 0 skips it.
    entropy_temperature: its softmax temperature.
    gradient: 'ste' (straight-through) or 'rotation' (`base.rotate_to`).
    kmeans_iters: Lloyd iterations when `maintain` runs k-means.
    beta_on: 'commitment' (loss = codebook + beta * commitment) or 'codebook'
      (beta * codebook + commitment, taming's legacy placement).
  """
  num_codes: int
  code_dim: int
  beta: float = 0.25
  axis_name: Optional[str] = None
  lookup_dim: int = 0
  l2_normalize: bool = False
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  gradient: str = 'ste'
  kmeans_iters: int = 10
  beta_on: str = 'commitment'

  def setup(self):
    self._check_options()
    if self.beta_on not in base.BETA_TERMS:
      raise ValueError(f'VectorQuantizer: beta_on={self.beta_on!r} is unknown; choose one of '
                       f'{base.BETA_TERMS}.')
    init = nn.initializers.variance_scaling(1.0, 'fan_out', 'uniform')
    shape = (self.num_codes, self.space_dim)
    # Uniform with variance 1/d per entry: codes start on the scale of a unit-variance
    # encoder output projected to d dims. A Variable (not a bare param array) so that
    # `maintain` reads and writes the same value.
    self.codebook = self.variable(
        'params', 'codebook', lambda: init(self.make_rng('params'), shape, jnp.float32))
    self._make_projections()

  def __call__(self, z_e: jax.Array, *, train: bool = False) -> base.QuantizerOutput:
    out, _, _ = self._quantize(z_e, train=train, learned_codebook=True, beta_on=self.beta_on)
    return out

  def maintain(self, z: jax.Array, dead: jax.Array, kmeans_now: jax.Array) -> jax.Array:
    """k-means initialisation and dead-code restarts of `params/codebook`.

    If `kmeans_now`, the codebook becomes k-means of z (spherical with l2_normalize);
    then each dead row becomes a row of z drawn uniformly at random (distinct rows when
    z has at least K of them). Randomness comes from the 'codebook' rng: the same key
    and z on every device give the same codebook everywhere.

    Args:
      z: float32 [N, space_dim] lookup-space vectors (the sown `lookup_input`).
      dead: bool [K], codes to restart.
      kmeans_now: bool scalar (may be traced).

    Returns:
      bool [K]: rows that changed (every row when k-means ran).
    """
    codebook, changed, _ = self._upkeep_codebook(z, dead, kmeans_now)
    self.codebook.value = codebook
    return changed


class EMAVectorQuantizer(_NearestCodeQuantizer):
  """VQ whose codebook is an exponential moving average of assigned encoder outputs.

  The statistics live in the `vq_stats` collection and change only when called with
  `train=True` and `mutable=['vq_stats']`:

    counts_t = decay * counts_{t-1} + (1 - decay) * n_t        (n_t: codes' counts this step)
    sums_t   = decay * sums_{t-1}   + (1 - decay) * s_t        (s_t: sum of assigned z_e)
    avg      = x_t / (1 - decay^t)                             (zero-debiased, as in Sonnet)
    smoothed = (avg_counts + eps) / (N + K * eps) * N          (Laplace, N = sum avg_counts)
    codebook = avg_sums / smoothed

  With an axis name, n_t and s_t are summed over that axis first, so every device
  holds the same codebook. With `l2_normalize` the sums are of normalised vectors and the
  codebook is normalised after the division.

  `maintain` writes a new code c_k into row k and sets ema_counts_k = w_k * (1 - decay^t)
  and ema_sums_k = c_k * ema_counts_k (t = ema_steps), so after zero-debiasing the row
  holds w_k vectors averaging exactly c_k, and the next update blends this step's
  vectors into it as if they had followed w_k earlier assignments. w_k = 1 for a
  restarted code (one encoder output); for k-means, the number of points in the
  cluster (at least 1, so an empty cluster's code is not pulled to zero by its zero
  sums). At t = 0 (before any update) the weight is 0: the zero-debiasing then ignores
  the reset statistics, as it ignores the zero initial ones.

  Attributes:
    num_codes: codebook size K.
    code_dim: code dimension D.
    beta: weight of the commitment loss.
    decay: EMA decay.
    epsilon: Laplace smoothing constant.
    axis_name: pmap axis to sum statistics over, or None outside pmap.
    lookup_dim: if > 0, learned dense projections code_dim -> lookup_dim before the
      lookup and back after it (factorised codes, ViT-VQGAN); the codebook has
      lookup_dim columns and the losses are measured in that space.
    l2_normalize: l2-normalise the (projected) inputs and the codes, so the nearest
      code is the one of highest cosine similarity.
    entropy_weight: weight of the entropy penalty (`base.entropy_penalty`); 0 skips it.
    entropy_temperature: its softmax temperature.
    gradient: 'ste' (straight-through) or 'rotation' (`base.rotate_to`).
    kmeans_iters: Lloyd iterations when `maintain` runs k-means.
  """
  num_codes: int
  code_dim: int
  beta: float = 0.25
  decay: float = 0.99
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  lookup_dim: int = 0
  l2_normalize: bool = False
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  gradient: str = 'ste'
  kmeans_iters: int = 10

  def setup(self):
    self._check_options()
    shape = (self.num_codes, self.space_dim)
    init = nn.initializers.variance_scaling(1.0, 'fan_out', 'uniform')

    def init_codebook():
      codebook = init(self.make_rng('params'), shape, jnp.float32)
      return base.normalize_rows(codebook) if self.l2_normalize else codebook

    self.codebook = self.variable(base.STATS, 'codebook', init_codebook)
    self.ema_counts = self.variable(
        base.STATS, 'ema_counts', lambda: jnp.zeros((self.num_codes,), jnp.float32))
    self.ema_sums = self.variable(base.STATS, 'ema_sums', lambda: jnp.zeros(shape, jnp.float32))
    self.ema_steps = self.variable(base.STATS, 'ema_steps', lambda: jnp.zeros((), jnp.int32))
    self._make_projections()

  def __call__(self, z_e: jax.Array, *, train: bool = False) -> base.QuantizerOutput:
    out, x, indices = self._quantize(z_e, train=train, learned_codebook=False)
    if train and not self.is_initializing():
      one_hot = jax.nn.one_hot(indices, self.num_codes, dtype=jnp.float32)
      # Float32 EMA statistics: exact one-hot sums at HIGHEST precision (see above).
      sums = base.psum_if(jnp.matmul(one_hot.T, jax.lax.stop_gradient(x),
                                precision=jax.lax.Precision.HIGHEST), self.axis_name)
      self._ema_update(out.counts, sums)
    return out

  def _debias(self, steps: jax.Array) -> jax.Array:
    return 1.0 - jnp.power(jnp.float32(self.decay), steps.astype(jnp.float32))

  def _ema_update(self, counts: jax.Array, sums: jax.Array) -> None:
    d = self.decay
    steps = self.ema_steps.value + 1
    self.ema_steps.value = steps
    self.ema_counts.value = d * self.ema_counts.value + (1.0 - d) * counts
    self.ema_sums.value = d * self.ema_sums.value + (1.0 - d) * sums
    debias = self._debias(steps)
    avg_counts = self.ema_counts.value / debias
    avg_sums = self.ema_sums.value / debias
    total = jnp.sum(avg_counts)
    smoothed = (avg_counts + self.epsilon) / (total + self.num_codes * self.epsilon) * total
    codebook = avg_sums / smoothed[:, None]
    self.codebook.value = base.normalize_rows(codebook) if self.l2_normalize else codebook

  def maintain(self, z: jax.Array, dead: jax.Array, kmeans_now: jax.Array) -> jax.Array:
    """k-means initialisation and dead-code restarts, with their EMA statistics reset.

    If `kmeans_now`, the codebook becomes k-means of z (spherical with l2_normalize);
    then each dead row becomes a row of z drawn uniformly at random (distinct rows when
    z has at least K of them). The statistics of every replaced row are reset as the
    class docstring says. Call it after the step's EMA update (in its own apply with
    'vq_stats' mutable) so that update cannot overwrite the reset.

    Args:
      z: float32 [N, space_dim] lookup-space vectors (the sown `lookup_input`).
      dead: bool [K], codes to restart.
      kmeans_now: bool scalar (may be traced).

    Returns:
      bool [K]: rows that changed (every row when k-means ran).
    """
    codebook, changed, weights = self._upkeep_codebook(z, dead, kmeans_now)
    reset_counts = weights * self._debias(self.ema_steps.value)
    self.codebook.value = codebook
    self.ema_counts.value = jnp.where(changed, reset_counts, self.ema_counts.value)
    self.ema_sums.value = jnp.where(changed[:, None], codebook * reset_counts[:, None],
                                    self.ema_sums.value)
    return changed


QUANTIZERS = {'vq': VectorQuantizer, 'ema': EMAVectorQuantizer}
