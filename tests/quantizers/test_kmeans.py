"""Tests for vq.quantizers.kmeans against numpy oracles.

The oracles are written here in numpy float64: brute-force [N, K, D] distances, Lloyd's
update (empty clusters keep their centre, cosine variant re-normalises), exact k-means++
sampling probabilities for a tiny point set, and cluster means of synthetic data whose
true labels are known.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.quantizers import kmeans

K = 6
D = 3


def _np_sq_dist(x, c):
  x = np.asarray(x, np.float64)
  c = np.asarray(c, np.float64)
  return np.sum((x[:, None, :] - c[None, :, :]) ** 2, axis=-1)


def _np_lloyd(x, centres, iters, spherical=False, margin=1e-4):
  """Lloyd's algorithm in float64; checks every assignment is free of near-ties.

  The margin is far above float32 rounding of these O(10) squared distances (~1e-6), so
  the float32 implementation must make the same assignments.
  """
  x = np.asarray(x, np.float64)
  c = np.asarray(centres, np.float64).copy()
  for _ in range(iters):
    d = _np_sq_dist(x, c)
    top2 = np.sort(d, axis=-1)[:, :2]
    assert np.min(top2[:, 1] - top2[:, 0]) > margin, 'near-tie in the test data; reseed'
    assign = np.argmin(d, axis=-1)
    for k in range(c.shape[0]):
      members = x[assign == k]
      if len(members):
        mean = members.mean(axis=0)
        c[k] = mean / np.linalg.norm(mean) if spherical else mean
  return c


def _blobs(seed, n_per, num_blobs, d, spread, noise):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_blobs, d)) * spread
  labels = np.repeat(np.arange(num_blobs), n_per)
  x = centres[labels] + noise * rng.normal(size=(labels.size, d))
  return x.astype(np.float32), labels


def _row_indices(x, rows):
  """Index in x of each row of `rows` (each must be an exact copy of a row of x)."""
  eq = np.all(np.asarray(rows)[:, None, :] == np.asarray(x)[None, :, :], axis=-1)
  assert np.all(eq.any(axis=1)), 'a centre is not a row of x'
  return np.argmax(eq, axis=1)


@pytest.mark.parametrize('spherical', [False, True])
def test_lloyd_matches_numpy_from_the_same_seeding(spherical):
  # Overlapping blobs and K above the number of blobs: assignments change between
  # iterations, so the comparison exercises several real updates.
  x, _ = _blobs(seed=1, n_per=40, num_blobs=4, d=D, spread=2.0, noise=1.0)
  if spherical:
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  key = jax.random.key(3)
  seeds, _ = kmeans.kmeans(x, K, key, iters=0, spherical=spherical)
  chex.assert_trees_all_equal(seeds, kmeans.kmeans_plus_plus(x, K, key))
  iters = 5
  centres, counts = kmeans.kmeans(x, K, key, iters=iters, spherical=spherical)
  expected = _np_lloyd(x, seeds, iters, spherical=spherical)
  chex.assert_shape(centres, (K, D))
  chex.assert_trees_all_close(centres, expected.astype(np.float32), atol=1e-5)
  expected_counts = np.bincount(np.argmin(_np_sq_dist(x, expected), axis=-1), minlength=K)
  np.testing.assert_array_equal(counts, expected_counts.astype(np.float32))
  assert counts.dtype == jnp.float32


def test_seeding_picks_distinct_rows():
  x = np.random.default_rng(0).normal(size=(40, D)).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), 8)
  seeds = jax.vmap(lambda k: kmeans.kmeans_plus_plus(x, K, k))(keys)
  for s in np.asarray(seeds):
    idx = _row_indices(x, s)
    assert len(set(idx.tolist())) == K, f'seeding repeated a row: {idx}'


def test_seeding_follows_d_squared_probabilities():
  # Three points on a line: the first centre is uniform, the second is drawn with
  # probability d^2 / sum(d^2) from the first.
  x = np.array([[0.0], [1.0], [3.0]], np.float32)
  num_draws = 6000
  keys = jax.random.split(jax.random.key(42), num_draws)
  seeds = np.asarray(jax.vmap(lambda k: kmeans.kmeans_plus_plus(x, 2, k))(keys))
  first = seeds[:, 0, 0].astype(int)
  second = seeds[:, 1, 0].astype(int)
  points = x[:, 0].astype(int)
  d2 = (points[:, None] - points[None, :]) ** 2.0
  expected = (d2 / d2.sum(axis=1, keepdims=True)) / 3.0  # P(first=i, second=j)
  observed = np.zeros((3, 3))
  for i, a in enumerate(points):
    for j, b in enumerate(points):
      observed[i, j] = np.mean((first == a) & (second == b))
  # Binomial standard error is at most 0.0065 here; 4.5 of them keeps flakiness away.
  np.testing.assert_allclose(observed, expected, atol=0.03)


def test_finds_well_separated_clusters_exactly():
  num_blobs, n_per = 5, 12
  x, labels = _blobs(seed=7, n_per=n_per, num_blobs=num_blobs, d=D, spread=50.0, noise=0.1)
  centres, counts = kmeans.kmeans(x, num_blobs, jax.random.key(1), iters=4)
  true_means = np.stack([x[labels == b].astype(np.float64).mean(0) for b in range(num_blobs)])
  match = np.argmin(_np_sq_dist(centres, true_means), axis=-1)
  assert sorted(match.tolist()) == list(range(num_blobs)), f'clusters merged: {match}'
  chex.assert_trees_all_close(np.asarray(centres), true_means[match].astype(np.float32),
                              atol=1e-4)
  np.testing.assert_array_equal(counts, np.full(num_blobs, n_per, np.float32))


def test_spherical_centres_are_unit_norm():
  x = np.random.default_rng(5).normal(size=(60, D))
  x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  centres, counts = kmeans.kmeans(x, K, jax.random.key(2), iters=3, spherical=True)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(centres), axis=-1), 1.0, atol=1e-5)
  assert float(np.sum(counts)) == 60.0


def test_pmap_same_key_gives_identical_codebooks():
  n_dev = 4
  assert jax.local_device_count() >= n_dev, (
      f'needs {n_dev} devices, got {jax.local_device_count()}; run via tests/conftest.py')
  x, _ = _blobs(seed=1, n_per=40, num_blobs=4, d=D, spread=2.0, noise=1.0)
  key = jax.random.key(3)
  fn = jax.pmap(lambda x, k: kmeans.kmeans(x, K, k, iters=5), in_axes=(0, None))
  centres, counts = fn(np.broadcast_to(x, (n_dev,) + x.shape), key)
  chex.assert_shape(centres, (n_dev, K, D))
  for i in range(1, n_dev):
    np.testing.assert_array_equal(centres[i], centres[0])
    np.testing.assert_array_equal(counts[i], counts[0])
  single, _ = kmeans.kmeans(x, K, key, iters=5)
  # Independent check that the shared result is Lloyd from the shared seeding.
  seeds = kmeans.kmeans_plus_plus(x, K, key)
  chex.assert_trees_all_close(centres[0], _np_lloyd(x, seeds, 5).astype(np.float32),
                              atol=1e-5)
  chex.assert_trees_all_close(centres[0], single, atol=1e-6)


def test_fewer_points_than_clusters():
  x = np.array([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, -3.0, 0.0]], np.float32)
  k = 8
  centres, counts = kmeans.kmeans(x, k, jax.random.key(9), iters=3)
  chex.assert_shape(centres, (k, D))
  idx = _row_indices(x, np.asarray(centres))
  assert set(idx.tolist()) == {0, 1, 2}, f'every point must be a centre, got rows {idx}'
  np.testing.assert_array_equal(np.sort(np.asarray(counts)), [0.0] * (k - 3) + [1.0] * 3)
  chex.assert_tree_all_finite(centres)


@pytest.mark.parametrize('args, message', [
    ((np.zeros((4, 2, 3), np.float32), 2), 'shape'),
    ((np.zeros((0, 3), np.float32), 2), 'no points'),
    ((np.zeros((4, 3), np.float32), 0), 'num_clusters'),
])
def test_bad_inputs_raise(args, message):
  with pytest.raises(ValueError, match=message):
    kmeans.kmeans(*args, jax.random.key(0))


def test_negative_iters_raise():
  with pytest.raises(ValueError, match='iters'):
    kmeans.kmeans(np.zeros((4, 3), np.float32), 2, jax.random.key(0), iters=-1)
