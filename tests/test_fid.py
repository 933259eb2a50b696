"""Tests for vq.fid and vq.inception against closed forms and numpy reference implementations."""

import sys
import types

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq import fid
from vq import inception
from vq import weights

_BN_EPS = 1e-3


def _rng(seed):
  return np.random.default_rng(seed)


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _fd_by_eigh(mu1, s1, mu2, s2):
  """FD with Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): eigh instead of sqrtm."""
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(root @ s2 @ root)
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()


# --- Fréchet distance ---


def test_fd_of_identical_statistics_is_zero():
  x = _rng(0).normal(size=(300, 24)) * 3 + 1
  mu, sigma = fid.feature_statistics(x)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.parametrize('seed', range(4))
def test_fd_diagonal_gaussians_closed_form(seed):
  rng = _rng(seed)
  d = 10
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((mu1 - mu2)**2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert isinstance(got, float)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def _fd_2x2(mu1, s1, mu2, s2):
  # A 2x2 matrix A with positive eigenvalues has sqrt(A) = (A + sqrt(det A) I) / t with
  # t = sqrt(tr A + 2 sqrt(det A)) (Cayley-Hamilton), so Tr sqrt(A) = t.
  a = s1 @ s2
  tr_sqrt = np.sqrt(np.trace(a) + 2 * np.sqrt(np.linalg.det(a)))
  return np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


def test_fd_known_non_diagonal_value():
  s1 = np.array([[2.0, 1.0], [1.0, 2.0]])
  s2 = np.array([[1.0, 0.0], [0.0, 4.0]])
  mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
  # S1 S2 = [[2, 4], [1, 8]]: trace 10, det 12.
  expected = 5.0 + 4.0 + 5.0 - 2 * np.sqrt(10 + 2 * np.sqrt(12))
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-12)
  np.testing.assert_allclose(expected, 5.7712206, rtol=1e-7)  # 14 - 2 sqrt(16.9282032).


@pytest.mark.parametrize('seed', range(4))
def test_fd_random_2x2_explicit_sqrtm(seed):
  rng = _rng(seed + 10)
  mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
  s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), _fd_2x2(mu1, s1, mu2, s2),
                             rtol=1e-9)


@pytest.mark.parametrize('n', [200, 6])  # Full-rank, and singular covariances (6 < 16 points).
def test_fd_matches_eigh_route(n):
  rng = _rng(n)
  x = rng.normal(size=(n, 16)) @ rng.normal(size=(16, 16))
  y = rng.normal(size=(n, 16)) @ rng.normal(size=(16, 16)) + 0.5
  a, b = fid.feature_statistics(x), fid.feature_statistics(y)
  got = fid.frechet_distance(*a, *b)
  np.testing.assert_allclose(got, _fd_by_eigh(*a, *b), rtol=1e-6)
  np.testing.assert_allclose(fid.frechet_distance(*b, *a), got, rtol=1e-6)


def test_fd_retries_with_diagonal_offset_when_sqrtm_fails(monkeypatch):
  rng = _rng(3)
  mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
  s1, s2 = _random_spd(rng, 4), _random_spd(rng, 4)
  real_sqrtm = fid.linalg.sqrtm
  calls = []

  def flaky_sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(fid.linalg, 'sqrtm', flaky_sqrtm)
  eps = 0.5  # Large, so that the offset visibly changes the value.
  got = fid.frechet_distance(mu1, s1, mu2, s2, eps=eps)
  assert len(calls) == 2
  off = eps * np.eye(4)
  # pytorch-fid offsets only the square-root term; the traces stay those of the inputs.
  expected = (_fd_by_eigh(mu1, s1 + off, mu2, s2 + off) - 2 * 4 * eps)
  np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_fd_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='sigma2'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_fd_rejects_invalid_covariance():
  with pytest.raises(ValueError, match='imaginary'):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_feature_statistics_formula():
  x = _rng(5).normal(size=(40, 6)) + 7
  mu, sigma = fid.feature_statistics(jnp.asarray(x, jnp.float32))
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  centred = x - x.sum(axis=0) / 40
  np.testing.assert_allclose(mu, x.sum(axis=0) / 40, rtol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 39, rtol=1e-10)
  assert mu.dtype == sigma.dtype == np.float64
  with pytest.raises(ValueError, match='at least 2'):
    fid.feature_statistics(x[:1])


def test_stats_accumulator_matches_np_cov():
  rng = _rng(7)
  acc = fid.StatsAccumulator(4)
  kept = []
  for b, size in enumerate([6, 1, 0, 11, 8]):
    x = rng.normal(size=(size, 4)) @ rng.normal(size=(4, 4)) + 1e4
    # First batch entirely padding: the shift must come from real rows.
    mask = np.zeros(size, bool) if b == 0 else rng.uniform(size=size) < 0.7
    if b % 2:  # Also take jax arrays (float32: the reference sees the same rounded values).
      x = np.asarray(jnp.asarray(x), np.float64)
      acc.add(jnp.asarray(x, jnp.float32), mask.astype(np.int32) if b == 3 else mask)
    else:
      acc.add(x, mask)
    kept.append(x[mask])
  tail = rng.normal(size=(3, 4)) + 1e4
  acc.add(tail)  # No mask: every row counts.
  rows = np.concatenate(kept + [tail])
  mu, sigma = acc.statistics()
  assert acc.count == rows.shape[0]
  np.testing.assert_allclose(mu, np.mean(rows, axis=0), rtol=1e-14)
  np.testing.assert_allclose(sigma, np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-9)


def test_stats_accumulator_errors():
  acc = fid.StatsAccumulator(3)
  with pytest.raises(ValueError, match='dimension 4'):
    acc.add(np.zeros((2, 4)))
  with pytest.raises(ValueError, match='mask shape'):
    acc.add(np.zeros((2, 3)), np.ones(3, bool))
  acc.add(np.zeros((1, 3)))
  with pytest.raises(ValueError, match='1 feature vectors'):
    acc.statistics()
