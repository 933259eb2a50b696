"""Tests for vq.core.metrics and vq.core.images against numpy formulas, scikit-image, scipy and PIL."""

import os

import chex
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import scipy.stats
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from vq.core import images
from vq.core import metrics


def _rng(seed: int) -> np.random.Generator:
  return np.random.default_rng(seed)


def _noisy_pair(shape, sigma, seed):
  rng = _rng(seed)
  a = rng.integers(0, 256, shape).astype(np.float64)
  b = np.clip(np.round(a + rng.normal(0.0, sigma, shape)), 0, 255)
  return a, b


def _smooth_pair(shape, seed):
  """Gradients plus a checkerboard, and a blurred, shifted copy: image-like structure."""
  rng = _rng(seed)
  n, h, w, c = shape
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  base = 255 * (0.5 * yy + 0.3 * xx)[None, :, :, None] * rng.uniform(0.5, 1.0, (n, 1, 1, c))
  checker = 60.0 * (((np.arange(h)[:, None] // 4) + (np.arange(w)[None, :] // 4)) % 2)
  a = np.clip(base + checker[None, :, :, None], 0, 255)
  b = np.roll(a, 1, axis=2)
  b = np.clip(0.5 * b + 0.25 * np.roll(b, 1, axis=1) + 0.25 * np.roll(b, -1, axis=1) + 10, 0, 255)
  return np.round(a), np.round(b)


def _ssim_cases():
  cases = {}
  for shape in [(3, 32, 32, 3), (2, 17, 40, 3)]:
    tag = "x".join(map(str, shape[1:3]))
    for sigma in [1, 8, 40]:
      cases[f"noise{sigma}_{tag}"] = _noisy_pair(shape, sigma, seed=sigma)
    rng = _rng(7)
    cases[f"unrelated_{tag}"] = (rng.integers(0, 256, shape).astype(np.float64),
                                 rng.integers(0, 256, shape).astype(np.float64))
    cases[f"structured_{tag}"] = _smooth_pair(shape, seed=3)
    bright = rng.integers(250, 256, shape).astype(np.float64)
    cases[f"bright_{tag}"] = (bright, np.clip(bright + rng.integers(-2, 3, shape), 0, 255))
  shape = (3, 32, 32, 3)
  levels_a = np.array([0.0, 200.0, 255.0])[:, None, None, None]
  levels_b = np.array([0.0, 37.0, 254.0])[:, None, None, None]
  cases["constant"] = (np.broadcast_to(levels_a, shape).copy(),
                       np.broadcast_to(levels_b, shape).copy())
  cases["constant_vs_noise"] = (np.full(shape, 128.0), _noisy_pair(shape, 20, seed=11)[1])
  cases["grey_7x7_single_channel"] = _noisy_pair((2, 7, 7, 1), 15, seed=5)
  return cases


_SSIM_CASES = _ssim_cases()


@pytest.mark.parametrize("name", sorted(_SSIM_CASES))
def test_ssim_matches_skimage_per_image(name):
  a, b = _SSIM_CASES[name]
  ours = metrics.ssim(a.astype(np.float32), b.astype(np.float32))
  expected = np.array([
      sk_ssim(a[i], b[i], channel_axis=-1, data_range=255) for i in range(a.shape[0])])
  chex.assert_shape(ours, (a.shape[0],))
  # Bright, flat images are where float32 E[x^2] - E[x]^2 cancels: without centring first
  # they are off by ~5e-6, with it by ~1e-7, so hold them to the tighter bound.
  atol = 1e-6 if name.startswith("bright") else 1e-5
  chex.assert_trees_all_close(np.asarray(ours, np.float64), expected, atol=atol, rtol=0)


def test_ssim_other_data_range_matches_skimage():
  a, b = _noisy_pair((2, 16, 16, 3), 10, seed=2)
  a, b = a / 255.0, b / 255.0
  ours = metrics.ssim(a.astype(np.float32), b.astype(np.float32), data_range=1.0)
  expected = [sk_ssim(a[i], b[i], channel_axis=-1, data_range=1.0) for i in range(2)]
  chex.assert_trees_all_close(np.asarray(ours, np.float64), np.array(expected), atol=1e-4)


def test_ssim_of_identical_images_is_one():
  a, _ = _noisy_pair((2, 12, 9, 3), 1, seed=0)
  chex.assert_trees_all_close(metrics.ssim(a, a), jnp.ones(2), atol=1e-6)


def test_ssim_rejects_images_smaller_than_window():
  with pytest.raises(ValueError, match="at least 7x7"):
    metrics.ssim(np.zeros((1, 6, 32, 3)), np.zeros((1, 6, 32, 3)))


@pytest.mark.parametrize("data_range", [255.0, 2.0])
def test_psnr_and_mse_match_numpy_formula(data_range):
  a, b = _noisy_pair((4, 8, 10, 3), 12, seed=4)
  a, b = a * data_range / 255, b * data_range / 255
  expected_mse = ((a - b) ** 2).reshape(4, -1).mean(axis=1)
  expected_psnr = 10 * np.log10(data_range**2 / expected_mse)
  ours_mse = metrics.mse(a.astype(np.float32), b.astype(np.float32))
  ours_psnr = metrics.psnr(a.astype(np.float32), b.astype(np.float32), data_range=data_range)
  chex.assert_shape([ours_mse, ours_psnr], (4,))
  chex.assert_trees_all_close(np.asarray(ours_mse, np.float64), expected_mse, rtol=1e-5)
  chex.assert_trees_all_close(np.asarray(ours_psnr, np.float64), expected_psnr, atol=1e-4)
  skimage_psnr = [sk_psnr(a[i], b[i], data_range=data_range) for i in range(4)]
  chex.assert_trees_all_close(np.asarray(ours_psnr, np.float64), np.array(skimage_psnr),
                              atol=1e-4)


def test_psnr_accepts_uint8_and_caps_identical_images():
  a = _rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  b = a.copy()
  b[1, 0, 0, 0] ^= 1  # One pixel off by one: mse = 1 / 192.
  ours = np.asarray(metrics.psnr(a, b))
  assert ours[0] == metrics.MAX_PSNR == 100.0
  np.testing.assert_allclose(ours[1], 10 * np.log10(255.0**2 * 192), rtol=1e-6)


def test_psnr_is_capped_and_finite_for_exact_and_near_exact_images():
  # A constant image reconstructed exactly, and one with one value off by one among
  # 256 * 256 * 3 (10 log10(255^2 * 196608) = 101.07 dB without the cap).
  a = np.full((2, 256, 256, 3), 128, np.uint8)
  b = a.copy()
  b[1, 0, 0, 0] = 129
  assert 10 * np.log10(255.0**2 * 256 * 256 * 3) > 101
  ours = np.asarray(metrics.psnr(a, b))
  np.testing.assert_array_equal(ours, [100.0, 100.0])
  np.testing.assert_array_equal(np.asarray(metrics.psnr(a, b, max_psnr=60.0)), [60.0, 60.0])
  # Its gradient at an exact reconstruction is finite (zero), not NaN.
  grad = jax.grad(lambda y: metrics.psnr(a[:1].astype(np.float32), y)[0])(
      a[:1].astype(np.float32))
  assert np.all(np.asarray(grad) == 0)


def test_metrics_reject_mismatched_shapes():
  with pytest.raises(ValueError, match="same shape"):
    metrics.psnr(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    metrics.mse(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_psnr_and_ssim_under_jit_and_pmap():
  a, b = _noisy_pair((4, 16, 16, 3), 10, seed=9)
  a, b = a.astype(np.float32), b.astype(np.float32)
  expected_ssim = [sk_ssim(a[i].astype(np.float64), b[i].astype(np.float64),
                           channel_axis=-1, data_range=255) for i in range(4)]
  expected_psnr = 10 * np.log10(255.0**2 / ((a - b).astype(np.float64) ** 2)
                                .reshape(4, -1).mean(axis=1))

  def both(x, y):
    return metrics.psnr(x, y), metrics.ssim(x, y)

  jit_psnr, jit_ssim = jax.jit(both)(a, b)
  chex.assert_trees_all_close(np.asarray(jit_psnr, np.float64), expected_psnr, atol=1e-4)
  chex.assert_trees_all_close(np.asarray(jit_ssim, np.float64), np.array(expected_ssim),
                              atol=1e-4)
  # conftest forces 4 CPU devices: one image per device.
  chex.assert_equal(jax.local_device_count(), 4)
  pmap_psnr, pmap_ssim = jax.pmap(both)(a[:, None], b[:, None])
  chex.assert_shape([pmap_psnr, pmap_ssim], (4, 1))
  chex.assert_trees_all_close(np.asarray(pmap_psnr[:, 0], np.float64), expected_psnr, atol=1e-4)
  chex.assert_trees_all_close(np.asarray(pmap_ssim[:, 0], np.float64), np.array(expected_ssim),
                              atol=1e-4)


@pytest.mark.parametrize("to_unit", [lambda u: u / 127.5 - 1.0, lambda u: u * (2.0 / 255.0) - 1.0],
                         ids=["div127.5", "mul2/255"])
def test_to_pixel_range_round_trips_every_uint8_value(to_unit):
  u = np.arange(256, dtype=np.uint8)
  x = to_unit(u.astype(np.float32)).astype(np.float32)
  back = np.asarray(metrics.to_pixel_range(x))
  np.testing.assert_array_equal(back, u.astype(np.float32))
  np.testing.assert_array_equal(images.to_uint8(x), u)


def test_to_pixel_range_rounds_to_nearest_and_clips():
  x = np.concatenate([_rng(1).uniform(-1.5, 1.5, 5000), [-1.0, 1.0, -7.0, 3.0]])
  x = x.astype(np.float32)
  out = np.asarray(metrics.to_pixel_range(x))
  scaled = (x.astype(np.float64) + 1) * 127.5
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, np.rint(out))  # Integer-valued.
  assert out.min() == 0 and out.max() == 255
  inside = (scaled >= 0) & (scaled <= 255)
  assert np.all(np.abs(out[inside] - scaled[inside]) <= 0.5 + 1e-4)
  np.testing.assert_array_equal(out[scaled < 0], 0)
  np.testing.assert_array_equal(out[scaled > 255], 255)


def test_perplexity_and_usage_known_values():
  k = 16
  chex.assert_trees_all_close(metrics.perplexity(jnp.full(k, 3.0)), jnp.float32(k), rtol=1e-6)
  chex.assert_trees_all_close(metrics.codebook_usage(jnp.full(k, 3.0)), jnp.float32(1.0))
  one_hot = np.zeros(k, np.float32)
  one_hot[5] = 42.0
  chex.assert_trees_all_close(metrics.perplexity(one_hot), jnp.float32(1.0))
  chex.assert_trees_all_close(metrics.codebook_usage(one_hot), jnp.float32(1 / k))
  # Nothing assigned yet: documented as 0, not NaN.
  chex.assert_trees_all_close(metrics.perplexity(np.zeros(k)), jnp.float32(0.0))
  chex.assert_trees_all_close(metrics.codebook_usage(np.zeros(k)), jnp.float32(0.0))


def test_perplexity_and_usage_match_numpy_and_scipy():
  counts = _rng(3).poisson(2.0, size=(3, 64)).astype(np.float32)
  counts[1, :40] = 0.0
  expected_ppl = np.exp(scipy.stats.entropy(counts.astype(np.float64), axis=-1))
  expected_usage = np.count_nonzero(counts, axis=-1) / 64
  chex.assert_trees_all_close(np.asarray(metrics.perplexity(counts), np.float64), expected_ppl,
                              rtol=1e-5)
  chex.assert_trees_all_close(np.asarray(metrics.codebook_usage(counts), np.float64),
                              expected_usage)
  ema_sizes = np.array([1e-9, 0.5, 2.0, 1e-7], np.float32)
  chex.assert_trees_all_close(metrics.codebook_usage(ema_sizes, threshold=1e-5),
                              jnp.float32(0.5))
  jitted = jax.jit(lambda c: (metrics.perplexity(c), metrics.codebook_usage(c)))(counts)
  chex.assert_trees_all_close(np.asarray(jitted[0], np.float64), expected_ppl, rtol=1e-5)


# No subnormal counts: XLA on CPU flushes them to zero, so numpy and the jitted metric
# would disagree about which codes are used (hypothesis found 12 counts of 1e-45).
@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(hnp.arrays(np.float32, 12, elements=st.floats(0, 1e4, width=32,
                                                                allow_subnormal=False)))
def test_perplexity_lies_between_one_and_codes_used(counts):
  hypothesis.assume(counts.sum() > 0)
  used = np.count_nonzero(counts)
  ppl = float(metrics.perplexity(counts))
  assert 1.0 - 1e-5 <= ppl <= used * (1 + 1e-5)


def _constant_batch(values, h=3, w=4, channels=3):
  return np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None],
                         (len(values), h, w, channels)).copy()


def test_make_grid_places_originals_above_reconstructions():
  originals = _constant_batch([10, 11, 12])
  recons = _constant_batch([20, 21, 22])
  grid = images.make_grid([originals, recons], max_columns=8, pad=2)
  h, w, pad = 3, 4, 2
  chex.assert_shape(grid, (2 * (h + pad) + pad, 3 * (w + pad) + pad, 3))
  assert grid.dtype == np.uint8
  for col in range(3):
    x0 = pad + col * (w + pad)
    np.testing.assert_array_equal(grid[pad:pad + h, x0:x0 + w], 10 + col)
    np.testing.assert_array_equal(grid[2 * pad + h:2 * pad + 2 * h, x0:x0 + w], 20 + col)
  # Borders and gaps stay black.
  assert np.all(grid[:pad] == 0) and np.all(grid[:, :pad] == 0)
  assert np.all(grid[pad + h:2 * pad + h] == 0)
  assert np.all(grid[:, pad + w:2 * pad + w] == 0)


def test_make_grid_wraps_and_interleaves_lines():
  originals = _constant_batch(list(range(1, 6)))  # 5 images, 2 per line -> 3 lines per group.
  recons = _constant_batch(list(range(101, 106)))
  grid = images.make_grid([originals, recons], max_columns=2, pad=1)
  h, w, pad = 3, 4, 1
  chex.assert_shape(grid, (6 * (h + pad) + pad, 2 * (w + pad) + pad, 3))

  def cell(line, col):
    y0, x0 = pad + line * (h + pad), pad + col * (w + pad)
    return grid[y0:y0 + h, x0:x0 + w]

  expected_lines = [[1, 2], [101, 102], [3, 4], [103, 104], [5, 0], [105, 0]]
  for line, values in enumerate(expected_lines):
    for col, value in enumerate(values):
      np.testing.assert_array_equal(cell(line, col), value)


def test_make_grid_converts_floats_and_grey():
  u = _rng(2).integers(0, 256, (2, 5, 5, 1), dtype=np.uint8)
  floats = u.astype(np.float32) / 127.5 - 1
  grid = images.make_grid([floats], pad=0)
  chex.assert_shape(grid, (5, 10, 3))
  np.testing.assert_array_equal(grid[:, :5], np.repeat(u[0], 3, axis=-1))
  np.testing.assert_array_equal(grid[:, 5:], np.repeat(u[1], 3, axis=-1))


def test_make_grid_rejects_misaligned_rows():
  with pytest.raises(ValueError, match="same shape"):
    images.make_grid([np.zeros((2, 4, 4, 3), np.uint8), np.zeros((3, 4, 4, 3), np.uint8)])
  with pytest.raises(ValueError, match="uint8 or float"):
    images.make_grid([np.zeros((2, 4, 4, 3), np.int32)])


def test_save_png_writes_readable_png_equal_to_array(tmp_path):
  image = _rng(4).integers(0, 256, (9, 13, 3), dtype=np.uint8)
  path = tmp_path / "nested" / "dir" / "grid.png"
  images.save_png(path, image)
  with Image.open(path) as f:
    assert f.format == "PNG"
    np.testing.assert_array_equal(np.asarray(f.convert("RGB")), image)
  # Overwriting leaves exactly one file: the temporary one was renamed away.
  images.save_png(str(path), image[::-1])
  with Image.open(path) as f:
    np.testing.assert_array_equal(np.asarray(f), image[::-1])
  assert os.listdir(path.parent) == ["grid.png"]


def test_saved_grid_matches_metric_pixels(tmp_path):
  """PSNR computed in-graph equals PSNR recomputed from the saved PNGs."""
  rng = _rng(5)
  x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.1, x.shape), -1, 1).astype(np.float32)
  in_graph = np.asarray(metrics.psnr(metrics.to_pixel_range(x), metrics.to_pixel_range(y)))
  for name, batch in [("x.png", x), ("y.png", y)]:
    images.save_png(tmp_path / name, images.make_grid([batch], pad=0))
  with Image.open(tmp_path / "x.png") as fx, Image.open(tmp_path / "y.png") as fy:
    px, py = np.asarray(fx, np.float64), np.asarray(fy, np.float64)
  from_files = [sk_psnr(px[:, 8 * i:8 * (i + 1)], py[:, 8 * i:8 * (i + 1)], data_range=255)
                for i in range(2)]
  chex.assert_trees_all_close(in_graph.astype(np.float64), np.array(from_files), atol=1e-4)


def test_save_png_rejects_float_images(tmp_path):
  with pytest.raises(ValueError, match="uint8"):
    images.save_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))


def test_histogram_image_bars_and_dead_codes():
  counts = np.array([0.0, 1.0, 2.0, 4.0])
  hist = images.histogram_image(counts, height=8)
  chex.assert_shape(hist, (8, 4, 3))
  assert hist.dtype == np.uint8
  lit = hist.any(axis=-1)
  # Bar heights: ceil(8 * [0, .25, .5, 1]) = [0, 2, 4, 8], drawn from the bottom.
  np.testing.assert_array_equal(lit.sum(axis=0), [1, 2, 4, 8])  # Code 0: one red pixel.
  np.testing.assert_array_equal(hist[-1, 0], [220, 40, 40])
  assert not lit[:-1, 0].any()
  assert lit[-2:, 1].all() and not lit[:-2, 1].any()
  # A rarely used code still shows one pixel: ceil(8 * [1, 3, 100] / 100) = [1, 1, 8].
  tiny = images.histogram_image(np.array([1.0, 3.0, 100.0]), height=8)
  np.testing.assert_array_equal(tiny.any(axis=-1).sum(axis=0), [1, 1, 8])
  np.testing.assert_array_equal(tiny[-1, 0], [230, 230, 230])


def test_histogram_image_bins_large_codebooks():
  counts = np.zeros(1000)
  counts[:500] = 5.0  # Second half dead.
  hist = images.histogram_image(counts, height=16, max_width=256)
  # ceil(1000 / 256) = 4 codes per column -> 250 columns.
  chex.assert_shape(hist, (16, 250, 3))
  assert hist[:, :125].any(axis=-1).all()
  np.testing.assert_array_equal(hist[-1, 125:], np.tile([220, 40, 40], (125, 1)))
  with pytest.raises(ValueError, match="non-negative"):
    images.histogram_image(np.array([1.0, -1.0]))
