"""Improved precision and recall of generated samples (Kynkäänniemi et al., 2019).

  result = precision_recall.precision_recall(real_features, fake_features)   # k = 3
  result['precision']   # fraction of generated samples inside the real manifold
  result['recall']      # fraction of real samples inside the generated manifold

Each set's manifold is the union of balls around its points, the ball of point i having as
radius the distance to its k-th nearest neighbour among the *other* points of the same set.
A sample is inside a manifold when it lies within (<=) the radius of at least one of its
points. Features are arbitrary vectors, e.g. the 512-d VGG16 relu5_3 average-pooled features
that fd_vgg uses (`vq.perceptual.lpips.LPIPS.pooled_features`; see `vq.evaluation.evaluator`),
or Inception pool3 features as in the paper. The paper's results use 50,000 samples per set and
k = 3; the numbers depend on both, so compare them only at equal sizes and k.

Arithmetic: float64 numpy on the host. Both sets are shifted by the real set's mean (distances
do not change, round-off shrinks), squared distances are ||a||^2 + ||b||^2 - 2 a.b in blocks of
`batch_size` rows against the whole other set, so memory stays at batch_size * N float64 (80 MB
for 1,024 x 10,000) and the distances never exist in full. Squared distances within float64
round-off of zero (_SNAP_ULPS ulps of ||a||^2 + ||b||^2) are set to exactly zero, so duplicated
points are at distance 0 from each other, as they would be in exact arithmetic. Radii and
membership tests use the same squared distances, so no square root is taken.

Speed: with 10,000 real and 10,000 generated 512-d features (three 10,000 x 10,000 distance
passes) one call took 27.9 and 28.8 s (two calls; peak memory of the whole process, inputs
included, 488 MB) on the 2-core CPU dev machine while other jobs shared it (load average about
9): `python -m benchmarks.precision_recall --num=10000 --dim=512`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_K = 3
DEFAULT_BATCH_SIZE = 1024
# Round-off of a.b in float64 is below D * eps * |a| |b|; a few ulps of the norms cover it for
# the sums BLAS forms (blocked, pairwise), far below any distance between distinct samples.
_SNAP_ULPS = 64


def _as_features(features: Any, name: str) -> np.ndarray:
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
    raise ValueError(f'{name} must be [N, D] feature vectors; saw shape {features.shape}; '
                     'flatten or pool the features first.')
  if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
    raise ValueError(f'{name} must be real numbers; saw dtype {features.dtype}.')
  features = features.astype(np.float64)
  if not np.isfinite(features).all():
    raise ValueError(f'{name} contain NaN or inf; check the feature extractor.')
  return features


def _squared_distances(a: np.ndarray, a_norms: np.ndarray, b: np.ndarray,
                       b_norms: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] squared Euclidean distances, >= 0, exactly 0 within round-off of 0."""
  scale = a_norms[:, None] + b_norms[None, :]
  d2 = scale - 2.0 * (a @ b.T)
  d2[d2 <= _SNAP_ULPS * np.finfo(np.float64).eps * scale] = 0.0
  return d2


def knn_radii(features: Any, *, k: int = DEFAULT_K,
              batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Squared distance from each point to its k-th nearest neighbour among the others.

  Args:
    features: [N, D], N > k.
    k: which neighbour (1 = nearest).
    batch_size: rows of the distance matrix held at once.

  Returns:
    float64 [N] squared radii.
  """
  x = _as_features(features, 'features')
  _check_k_and_batch(k, batch_size, x.shape[0], 'features')
  norms = np.einsum('nd,nd->n', x, x)
  return _radii(x, norms, k, batch_size)


def _radii(x: np.ndarray, norms: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  n = x.shape[0]
  radii = np.empty((n,), np.float64)
  for begin in range(0, n, batch_size):
    end = min(begin + batch_size, n)
    d2 = _squared_distances(x[begin:end], norms[begin:end], x, norms)
    rows = np.arange(end - begin)
    d2[rows, begin + rows] = np.inf  # The point itself is not its own neighbour.
    radii[begin:end] = np.partition(d2, k - 1, axis=1)[:, k - 1]
  return radii


def _check_k_and_batch(k: Any, batch_size: Any, n: int, name: str) -> None:
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'k must be a positive int; saw {k!r}; the paper uses k = 3.')
  if n <= k:
    raise ValueError(f'{name} has {n} points; k = {k} neighbours among the others need at least '
                     f'{k + 1}; pass more samples or lower k.')
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'batch_size must be a positive int; saw {batch_size!r}.')


def precision_recall(real_features: Any, fake_features: Any, *, k: int = DEFAULT_K,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, float]:
  """Improved precision and recall of `fake_features` against `real_features`.

  Args:
    real_features: [N, D] features of real images, N > k.
    fake_features: [M, D] features of generated images, M > k.
    k: neighbourhood size for the radii (the paper's default, 3).
    batch_size: distance-matrix rows held at once (memory: batch_size * max(N, M) float64).

  Returns:
    {'precision': fraction of the M generated samples within the k-NN radius of some real
    sample, 'recall': fraction of the N real samples within the k-NN radius of some generated
    sample}, each in [0, 1].

  Raises:
    ValueError: on non-[N, D] or non-finite features, different D, or too few points for k.
  """
  real = _as_features(real_features, 'real_features')
  fake = _as_features(fake_features, 'fake_features')
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f'real_features have {real.shape[1]} dimensions, fake_features '
                     f'{fake.shape[1]}; extract both with the same network.')
  _check_k_and_batch(k, batch_size, real.shape[0], 'real_features')
  _check_k_and_batch(k, batch_size, fake.shape[0], 'fake_features')
  shift = real.mean(axis=0)  # Distances are shift-invariant; smaller norms, less round-off.
  real, fake = real - shift, fake - shift
  real_norms = np.einsum('nd,nd->n', real, real)
  fake_norms = np.einsum('nd,nd->n', fake, fake)
  real_radii = _radii(real, real_norms, k, batch_size)
  fake_radii = _radii(fake, fake_norms, k, batch_size)
  # One pass over the real x fake distances serves both directions.
  fake_inside = np.zeros((fake.shape[0],), bool)
  real_inside = np.zeros((real.shape[0],), bool)
  for begin in range(0, real.shape[0], batch_size):
    end = min(begin + batch_size, real.shape[0])
    d2 = _squared_distances(real[begin:end], real_norms[begin:end], fake, fake_norms)
    real_inside[begin:end] = np.any(d2 <= fake_radii[None, :], axis=1)
    fake_inside |= np.any(d2 <= real_radii[begin:end, None], axis=0)
  return {'precision': float(np.mean(fake_inside)), 'recall': float(np.mean(real_inside))}
