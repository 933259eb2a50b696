"""Tests for vq.evaluation.precision_recall: a brute-force numpy oracle and hand-made sets."""

import numpy as np
import pytest

from vq.evaluation import precision_recall as pr


def _distances(a, b):
  """Euclidean distances from explicit differences (no norm expansion)."""
  return np.sqrt(np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1))


def _oracle_radii(x, k):
  d = _distances(x, x)
  np.fill_diagonal(d, np.inf)
  return np.sort(d, axis=1)[:, k - 1]


def _oracle(real, fake, k):
  real_radii, fake_radii = _oracle_radii(real, k), _oracle_radii(fake, k)
  d = _distances(real, fake)  # [N, M]
  precision = np.mean([np.any(d[:, j] <= real_radii) for j in range(fake.shape[0])])
  recall = np.mean([np.any(d[i, :] <= fake_radii) for i in range(real.shape[0])])
  return precision, recall


@pytest.mark.parametrize('seed,k,batch_size', [(0, 3, 1024), (1, 3, 7), (2, 1, 1), (3, 5, 16)])
def test_matches_brute_force(seed, k, batch_size):
  rng = np.random.default_rng(seed)
  # Overlapping but different distributions, offset from the origin so the shift matters.
  real = rng.normal(size=(70, 6)) + 50.0
  fake = 1.3 * rng.normal(size=(55, 6)) + 50.5
  want_precision, want_recall = _oracle(real, fake, k)
  got = pr.precision_recall(real.astype(np.float32).astype(np.float64), fake, k=k,
                            batch_size=batch_size)
  assert 0 < want_precision < 1 and 0 < want_recall < 1  # The case is not degenerate.
  assert got == {'precision': want_precision, 'recall': want_recall}


def test_knn_radii_excludes_the_point_itself():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(40, 5))
  for k in (1, 3):
    np.testing.assert_allclose(pr.knn_radii(x, k=k, batch_size=9), _oracle_radii(x, k) ** 2,
                               rtol=1e-12)


def test_one_dimensional_hand_case():
  # k = 1. Real radii: 0 -> 1, 1 -> 1, 10 -> 9. Fake radii: 0.5 -> 5, 5.5 -> 5, 20 -> 14.5.
  real = np.array([[0.0], [1.0], [10.0]])
  fake = np.array([[0.5], [5.5], [20.0]])
  # 0.5 lies within 1 of 0, 5.5 within 9 of 10; 20 is 10 from 10 > 9. Every real point lies
  # within 5 of 0.5 or 5.5. Counting a point as its own neighbour would make all radii 0.
  assert pr.precision_recall(real, fake, k=1) == {'precision': 2 / 3, 'recall': 1.0}


def test_identical_sets_give_one():
  x = np.random.default_rng(5).normal(size=(200, 32)).astype(np.float32)
  assert pr.precision_recall(x, x.copy()) == {'precision': 1.0, 'recall': 1.0}


def test_far_apart_clusters_give_zero():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(100, 16))
  fake = rng.normal(size=(80, 16)) + 1000.0
  assert pr.precision_recall(real, fake) == {'precision': 0.0, 'recall': 0.0}


def test_collapsed_samples_have_full_precision_and_low_recall():
  rng = np.random.default_rng(7)
  real = 3.0 * rng.normal(size=(150, 64)) + 7.0
  fake = np.repeat(real[:1], 25, axis=0)  # Every sample is real point 0.
  # Each sample sits on real point 0 (distance 0 <= its radius). The samples' radii are all
  # 0 (their neighbours are duplicates), so only real point 0 itself is covered.
  assert pr.precision_recall(real, fake) == {'precision': 1.0, 'recall': 1 / 150}


def test_duplicated_points_have_zero_radius():
  x = np.repeat(np.random.default_rng(8).normal(size=(5, 12)) + 100.0, 4, axis=0)
  np.testing.assert_array_equal(pr.knn_radii(x, k=3), np.zeros(20))


@pytest.mark.parametrize('real,fake,k,match', [
    (np.zeros((10, 4)), np.zeros((10, 5)), 3, '4 dimensions, fake_features 5'),
    (np.zeros((3, 4)), np.zeros((10, 4)), 3, 'real_features has 3 points'),
    (np.zeros((10,)), np.zeros((10, 4)), 3, r'must be \[N, D\]'),
    (np.full((10, 4), np.nan), np.zeros((10, 4)), 3, 'NaN or inf'),
    (np.zeros((10, 4)), np.zeros((10, 4)), 0, 'k must be a positive int'),
])
def test_bad_inputs(real, fake, k, match):
  with pytest.raises(ValueError, match=match):
    pr.precision_recall(real, fake, k=k)
