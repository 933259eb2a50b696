"""k-means (k-means++ seeding + Lloyd) in pure JAX, for codebook initialisation.

Usage sketch::

  from vq.quantizers import kmeans

  z = encoder_outputs.reshape(-1, code_dim)                   # float32 [N, D]
  centroids, counts = kmeans.kmeans(z, 512, key, iters=10)    # [512, D], [512]
  seeds = kmeans.kmeans_plus_plus(z, 512, key)                # the seeding alone

Everything is a pure function of `(x, key)` with static `num_clusters`, `iters` and
`spherical`, so it runs under `jax.jit` or `jax.pmap`. Calling it with the same `x` and the
same key on every device gives the same centroids everywhere, which is what a codebook
initialised inside a pmapped step needs (do not fold the device index into that key).

Distances use the expanded form ||x||^2 - 2 x.c + ||c||^2, so memory is O(N*K) and never
O(N*K*D). Cluster sums are a one-hot matmul rather than a scatter-add: scatter-adds of
floats run as atomics on GPUs and their summation order (hence the last bits of the
centroids) would differ from run to run and from device to device.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

# TPUs would otherwise run float32 matmuls with bfloat16 passes; k-means distances must
# resolve small differences between nearby points.
_PRECISION = jax.lax.Precision.HIGHEST


def _check_inputs(x: jax.Array, num_clusters: int, name: str) -> None:
  if x.ndim != 2:
    raise ValueError(
        f'{name}: x must be a [N, D] array of points, got shape {x.shape}; '
        'reshape it with x.reshape(-1, x.shape[-1]).')
  if x.shape[0] < 1:
    raise ValueError(f'{name}: x has no points (shape {x.shape}); pass at least one row.')
  if not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
    raise ValueError(
        f'{name}: num_clusters must be a positive int, got {num_clusters!r}; '
        'pass the codebook size.')


def _squared_distances(x: jax.Array, centres: jax.Array) -> jax.Array:
  """[N, D] x [K, D] -> [N, K] squared euclidean distances, float32."""
  return (jnp.sum(x * x, axis=-1, keepdims=True)
          - 2.0 * jnp.matmul(x, centres.T, precision=_PRECISION)
          + jnp.sum(centres * centres, axis=-1)[None, :])


def _assign(x: jax.Array, centres: jax.Array) -> jax.Array:
  """One-hot float32 [N, K] assignment of each point to its nearest centre."""
  nearest = jnp.argmin(_squared_distances(x, centres), axis=-1)
  return jax.nn.one_hot(nearest, centres.shape[0], dtype=jnp.float32)


def _normalise(c: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True))
  return c / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=('num_clusters',))
def kmeans_plus_plus(x: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii, 2007): `num_clusters` rows of `x`.

  The first centre is a uniformly chosen row; each next one is a row drawn with
  probability proportional to its squared distance to the nearest centre chosen so far.
  Cost O(N*K*D) time and O(N + K*D) memory.

  When N < K (or `x` has fewer than K distinct rows) every distinct point is chosen
  first; once all remaining distances are zero the remaining centres are drawn uniformly,
  so rows repeat and some centres coincide.

  Args:
    x: float32 [N, D] points.
    num_clusters: K, the number of centres (static).
    key: PRNG key; the same key gives the same centres.

  Returns:
    float32 [K, D] centres, each a row of `x`.

  Raises:
    ValueError: if `x` is not a non-empty [N, D] array or `num_clusters` < 1.
  """
  x = jnp.asarray(x, jnp.float32)
  _check_inputs(x, num_clusters, 'kmeans_plus_plus')
  n, d = x.shape
  keys = jax.random.split(key, num_clusters)
  x_sq = jnp.sum(x * x, axis=-1)

  def distances_to(i):
    c = x[i]
    # Clamped: the expanded form can dip below zero by rounding.
    return jnp.maximum(x_sq - 2.0 * jnp.matmul(x, c, precision=_PRECISION) + x_sq[i], 0.0)

  first = jax.random.randint(keys[0], (), 0, n)
  # A chosen row is exactly at distance 0 from itself, whatever the rounding says.
  min_d2 = distances_to(first).at[first].set(0.0)
  centres = jnp.zeros((num_clusters, d), jnp.float32).at[0].set(x[first])

  def body(i, carry):
    centres, min_d2 = carry
    has_mass = jnp.sum(min_d2) > 0.0
    logits = jnp.where(has_mass,
                       jnp.where(min_d2 > 0.0, jnp.log(jnp.where(min_d2 > 0.0, min_d2, 1.0)),
                                 -jnp.inf),
                       0.0)  # every point already chosen: draw uniformly
    idx = jax.random.categorical(keys[i], logits)
    min_d2 = jnp.minimum(min_d2, distances_to(idx)).at[idx].set(0.0)
    return centres.at[i].set(x[idx]), min_d2

  centres, _ = jax.lax.fori_loop(1, num_clusters, body, (centres, min_d2))
  return centres


@functools.partial(jax.jit, static_argnames=('num_clusters', 'iters', 'spherical'))
def kmeans(x: jax.Array, num_clusters: int, key: jax.Array, *, iters: int = 10,
           spherical: bool = False) -> Tuple[jax.Array, jax.Array]:
  """k-means++ seeding followed by `iters` Lloyd iterations.

  Each Lloyd iteration assigns every point to its nearest centre (squared euclidean
  distance; ties go to the lower index) and moves each centre to the mean of its points.
  A centre that receives no points keeps its position. `iters=0` returns the seeding.

  With fewer points than clusters (N < K) the seeding repeats points (see
  `kmeans_plus_plus`); duplicated centres then lose all points to the lower-indexed copy
  and keep their position, so the result is valid but some centres coincide and have
  count 0.

  Args:
    x: float32 [N, D] points; l2-normalised rows when `spherical` is True.
    num_clusters: K, the number of centroids (static).
    key: PRNG key for the seeding; the same key gives the same result on every device.
    iters: number of Lloyd iterations (static, >= 0).
    spherical: cosine k-means: centres are re-normalised to unit length after each
      update, so for unit-norm inputs the nearest centre is the most cosine-similar one.

  Returns:
    (centroids float32 [K, D], counts float32 [K]) where counts[k] is the number of
    points whose nearest centroid is centroids[k] (the assignment to the returned
    centroids; at convergence it is also the assignment that produced them).

  Raises:
    ValueError: if `x` is not a non-empty [N, D] array, `num_clusters` < 1 or
      `iters` < 0.
  """
  x = jnp.asarray(x, jnp.float32)
  _check_inputs(x, num_clusters, 'kmeans')
  if not isinstance(iters, (int, np.integer)) or iters < 0:
    raise ValueError(f'kmeans: iters must be an int >= 0, got {iters!r}; use 0 for the '
                     'k-means++ seeding alone.')
  centres = kmeans_plus_plus(x, num_clusters, key)

  def lloyd(_, centres):
    one_hot = _assign(x, centres)
    counts = jnp.sum(one_hot, axis=0)
    sums = jnp.matmul(one_hot.T, x, precision=_PRECISION)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    if spherical:
      means = _normalise(means)
    return jnp.where(counts[:, None] > 0, means, centres)

  centres = jax.lax.fori_loop(0, iters, lloyd, centres)
  counts = jnp.sum(_assign(x, centres), axis=0)
  return centres, counts
