"""Fréchet distance between Gaussian fits of two feature sets: FID on Inception features.

  acc = fid.StatsAccumulator(2048)
  for batch, mask in batches:                  # features [B, D], mask [B] (padding = False)
    acc.add(features_fn(batch), mask)
  mu, sigma = acc.statistics()                 # float64 [D], [D, D]
  score = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)

  mu, sigma = fid.feature_statistics(features)  # the same from one [N, D] array

Everything is float64 numpy on the host: the matrix square root of a 2048x2048 product is
ill-conditioned, and pytorch-fid's reference numbers are float64 too. `frechet_distance` follows
pytorch-fid's `calculate_frechet_distance`, so scores agree with it given the same statistics.
"""

from typing import Any

import numpy as np
from scipy import linalg

# Tolerance on the imaginary part of sqrtm's diagonal, as in pytorch-fid.
_IMAG_ATOL = 1e-3


def _as_matrix(features: Any, name: str) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f'{name} must be [N, D] feature vectors, got shape {features.shape}; '
                     'flatten or pool the features first.')
  return features


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """Mean and sample covariance of [N, D] features, in float64.

  Args:
    features: [N, D] array (numpy or jax), N >= 2.

  Returns:
    (mu [D], sigma [D, D]) with sigma as `np.cov(features, rowvar=False)` (ddof=1).
  """
  features = _as_matrix(features, 'features')
  if features.shape[0] < 2:
    raise ValueError(f'feature_statistics needs at least 2 feature vectors for a covariance, got '
                     f'{features.shape[0]}; pass more images.')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

  As pytorch-fid: the square root is `scipy.linalg.sqrtm` of the product; if that is not finite
  (a nearly singular product), both covariances get `eps` added to their diagonals and it is
  computed again; imaginary parts from round-off are dropped. Where pytorch-fid would raise on a
  large imaginary part, the `eps` retry is tried first.

  Args:
    mu1: [D] mean of the first set.
    sigma1: [D, D] covariance of the first set.
    mu2: [D] mean of the second set.
    sigma2: [D, D] covariance of the second set.
    eps: diagonal offset for the retry.

  Returns:
    The distance as a Python float (not the square root: FID is d^2).

  Raises:
    ValueError: on mismatched shapes, or when no real square root could be found.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'frechet_distance needs mu [D] and sigma [D, D] for both sets, got mu1 '
                     f'{mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 '
                     f'{sigma2.shape}; compute both with the same feature extractor.')
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not _usable(covmean):
    offset = np.eye(d) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if not np.isfinite(covmean).all():
    raise ValueError(f'frechet_distance: sqrtm(sigma1 @ sigma2) is not finite even with {eps} '
                     'added to the diagonals; check the statistics for NaN/inf or pass more '
                     'feature vectors.')
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > _IMAG_ATOL:
      raise ValueError(f'frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary diagonal part '
                       f'of {imag:.3g} (> {_IMAG_ATOL}); the covariances are not valid (symmetric '
                       'positive semi-definite) or far too rank-deficient; use more samples.')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _usable(covmean: np.ndarray) -> bool:
  if not np.isfinite(covmean).all():
    return False
  return not (np.iscomplexobj(covmean)
              and np.max(np.abs(np.diagonal(covmean).imag)) > _IMAG_ATOL)


class StatsAccumulator:
  """Streaming mean and covariance of feature vectors, in float64.

  Sums are taken around a fixed shift (the first batch's mean), which keeps the covariance
  accurate when features have a mean large compared with their spread; the result equals
  `np.mean` / `np.cov(rowvar=False)` of all unmasked rows seen.

  Attributes:
    dim: feature dimension D.
    count: number of feature vectors added so far.
  """

  def __init__(self, dim: int):
    if dim < 1:
      raise ValueError(f'StatsAccumulator dim must be positive, got {dim}.')
    self.dim = dim
    self.count = 0
    self._shift: np.ndarray | None = None
    self._sum = np.zeros((dim,), np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def add(self, features: Any, mask: Any = None) -> None:
    """Adds the rows of `features` whose `mask` is true.

    Args:
      features: [B, D] array (numpy or jax).
      mask: optional [B] booleans (or 0/1), False for padding rows; default all rows.
    """
    features = _as_matrix(features, 'features')
    if features.shape[1] != self.dim:
      raise ValueError(f'StatsAccumulator.add: features have dimension {features.shape[1]}, '
                       f'the accumulator {self.dim}; use one accumulator per feature extractor.')
    if mask is not None:
      mask = np.asarray(mask)
      if mask.shape != (features.shape[0],):
        raise ValueError(f'StatsAccumulator.add: mask shape {mask.shape} does not match '
                         f'{features.shape[0]} feature rows; pass one flag per row.')
      features = features[mask.astype(bool)]
    if features.shape[0] == 0:
      return
    if self._shift is None:
      self._shift = features.mean(axis=0)
    centred = features - self._shift
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred
    self.count += features.shape[0]

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of everything added; sigma with ddof=1 like `np.cov`."""
    if self.count < 2:
      raise ValueError(f'StatsAccumulator has {self.count} feature vectors, a covariance needs at '
                       'least 2; add more (unmasked) rows.')
    mean_centred = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
    return self._shift + mean_centred, sigma
