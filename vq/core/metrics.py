"""Image-quality and codebook-health metrics in pure jax.numpy.

Usage sketch::

  from vq.core import metrics

  # Model outputs live in [-1, 1]; score them on the uint8 grid a PNG would store.
  x = metrics.to_pixel_range(batch_images)     # [N, H, W, C] float32 in {0, 1, ..., 255}
  y = metrics.to_pixel_range(reconstructions)
  per_image_psnr = metrics.psnr(x, y)          # [N], at most MAX_PSNR = 100 dB
  per_image_ssim = metrics.ssim(x, y)          # [N], equals skimage's default SSIM
  ppl = metrics.perplexity(code_counts)        # scalar, in [1, K]
  used = metrics.codebook_usage(code_counts)   # scalar, in [0, 1]

Every function works on whole batches with static shapes, so it can be called inside
`jax.jit` or `jax.pmap`; reduce the per-image results (and mask padding) in the caller, with
`jnp.where(mask, value, 0)` rather than `value * mask`, so no padding row's value can leak in.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

# skimage's `structural_similarity` defaults (uniform window, sample covariance).
SSIM_WIN_SIZE = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# PSNR of identical images (MSE 0) and the cap of every PSNR, in dB (x264's convention).
MAX_PSNR = 100.0


def _check_image_pair(a: jax.Array, b: jax.Array, name: str) -> Tuple[jax.Array, jax.Array]:
  """Casts both batches to float32 after checking they are matching [N, H, W, C] arrays."""
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(
        f"{name}: the two image batches must have the same shape, got {a.shape} and {b.shape}; "
        "compare each image with its own reconstruction.")
  if a.ndim != 4:
    raise ValueError(
        f"{name}: expected image batches shaped [N, H, W, C], got shape {a.shape}; "
        "add a leading batch axis for a single image (x[None]).")
  return a.astype(jnp.float32), b.astype(jnp.float32)


def to_pixel_range(x: jax.Array) -> jax.Array:
  """Maps [-1, 1] images to the values a uint8 PNG of them would hold.

  The convention is `clip(round((x + 1) * 127.5), 0, 255)` in float32, rounding half to
  even (`jnp.round`). `vq.core.images` uses this same function when it writes PNGs, so metrics
  computed on its output match metrics recomputed from the saved files. The inverse map
  `u / 127.5 - 1` of any uint8 value `u` comes back to exactly `u`.

  Args:
    x: float array of any shape, nominally in [-1, 1]; values outside are clipped.

  Returns:
    float32 array of the same shape holding integers in [0, 255].
  """
  x = jnp.asarray(x, dtype=jnp.float32)
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0.0, 255.0)


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean squared error per image, averaged over H, W and C, on the scale given.

  Args:
    a: images [N, H, W, C] (any real dtype; computed in float32).
    b: images of the same shape as `a`.

  Returns:
    float32 [N].
  """
  a, b = _check_image_pair(a, b, "mse")
  return jnp.mean(jnp.square(a - b), axis=(1, 2, 3))


def psnr(a: jax.Array, b: jax.Array, *, data_range: float = 255.0,
         max_psnr: float = MAX_PSNR) -> jax.Array:
  """Peak signal-to-noise ratio per image: `min(10 * log10(data_range**2 / mse), max_psnr)`.

  The MSE is averaged over H, W and C of each image (one number per image, no averaging of
  per-channel PSNRs); below the cap this equals `skimage.metrics.peak_signal_noise_ratio(a[i],
  b[i], data_range=data_range)`. Identical images (MSE 0), where skimage gives `+inf`, give
  `max_psnr` (100 dB by default, the value x264 reports for identical frames), so a mean over
  a data set stays finite and JSON-writable. Values above the cap are clipped to it too, so
  the result never decreases as the MSE falls; on uint8 images (`data_range=255`) an image
  with a single value off by one reaches the cap from about 154,000 values (227x227x3).

  Args:
    a: images [N, H, W, C] on a scale whose full range is `data_range`, for instance the
      output of `to_pixel_range` with the default `data_range=255`.
    b: images of the same shape as `a`.
    data_range: the difference between the largest and smallest possible pixel value.
    max_psnr: the cap in dB, and the value for identical images.

  Returns:
    float32 [N], in dB, at most `max_psnr`.
  """
  err = mse(a, b)
  exact = err <= 0.0
  # The inner where keeps log10 away from a division by zero (and its gradient finite).
  value = 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / jnp.where(exact, 1.0, err))
  return jnp.where(exact, jnp.float32(max_psnr), jnp.minimum(value, jnp.float32(max_psnr)))


def _box_mean_valid(x: jax.Array, size: int) -> jax.Array:
  """Mean over every size x size window lying wholly inside the image ('valid' windows).

  Separable: `size` shifted slices are summed along H, then along W. Direct summation keeps
  float32 error at a few ulps, where a cumulative-sum box filter would lose digits on large
  images.
  """
  h, w = x.shape[1], x.shape[2]
  out_h, out_w = h - size + 1, w - size + 1
  rows = sum(x[:, i:i + out_h] for i in range(size))
  cols = sum(rows[:, :, j:j + out_w] for j in range(size))
  return cols / (size * size)


def ssim(a: jax.Array, b: jax.Array, *, data_range: float = 255.0) -> jax.Array:
  """Structural similarity per image, matching scikit-image's defaults.

  Implements exactly `skimage.metrics.structural_similarity(a[i], b[i], channel_axis=-1,
  data_range=data_range)` with its default arguments: a 7x7 uniform window, K1 = 0.01,
  K2 = 0.03, C1 = (K1 * data_range)**2, C2 = (K2 * data_range)**2, sample (co)variances
  scaled by 49 / 48, the SSIM map averaged over the pixels whose window lies wholly inside
  the image (skimage crops (7 - 1) // 2 = 3 pixels from each border), and the per-channel
  means then averaged over channels. This is not the Gaussian-window SSIM of Wang et al.
  (2004) used by some papers; numbers are comparable only with the same convention.

  Computed in float32; agrees with skimage in float64 to about 1e-5 for 0..255 images.

  Args:
    a: images [N, H, W, C] on a scale whose full range is `data_range`, H and W >= 7.
    b: images of the same shape as `a`.
    data_range: the difference between the largest and smallest possible pixel value.

  Returns:
    float32 [N], at most 1 (identical images give 1).
  """
  a, b = _check_image_pair(a, b, "ssim")
  h, w = a.shape[1], a.shape[2]
  if min(h, w) < SSIM_WIN_SIZE:
    raise ValueError(
        f"ssim: images must be at least {SSIM_WIN_SIZE}x{SSIM_WIN_SIZE} for the 7x7 window, "
        f"got {h}x{w}; compare larger images or use psnr.")
  box = lambda t: _box_mean_valid(t, SSIM_WIN_SIZE)
  mu_a = box(a)
  mu_b = box(b)
  # (Co)variances do not change under a constant shift; centring each channel first keeps
  # E[x^2] - E[x]^2 from cancelling catastrophically in float32 on bright images.
  ac = a - jnp.mean(a, axis=(1, 2), keepdims=True)
  bc = b - jnp.mean(b, axis=(1, 2), keepdims=True)
  mu_ac = box(ac)
  mu_bc = box(bc)
  num_px = SSIM_WIN_SIZE * SSIM_WIN_SIZE
  cov_norm = num_px / (num_px - 1.0)
  var_a = cov_norm * (box(ac * ac) - mu_ac * mu_ac)
  var_b = cov_norm * (box(bc * bc) - mu_bc * mu_bc)
  cov_ab = cov_norm * (box(ac * bc) - mu_ac * mu_bc)
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  ssim_map = ((2.0 * mu_a * mu_b + c1) * (2.0 * cov_ab + c2)) / (
      (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
  # Mean over the valid pixels of each channel, then over channels: equal counts per channel
  # make this the same as one mean over H, W and C.
  return jnp.mean(ssim_map, axis=(1, 2, 3))


def perplexity(counts: jax.Array) -> jax.Array:
  """Codebook perplexity `exp(-sum_k p_k log p_k)` with `p = counts / sum(counts)`.

  Terms with `p_k = 0` contribute 0. The result lies in [1, K]: 1 when a single code is
  used, K when all K codes are used equally. All-zero counts (nothing assigned yet) give 0,
  so that an empty histogram is not mistaken for a one-code collapse.

  Args:
    counts: non-negative float [..., K], e.g. code-assignment counts or EMA cluster sizes;
      reduced over the last axis.

  Returns:
    float32 [...].
  """
  counts = jnp.asarray(counts, dtype=jnp.float32)
  total = jnp.sum(counts, axis=-1, keepdims=True)
  p = counts / jnp.where(total > 0, total, 1.0)
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  entropy = -jnp.sum(plogp, axis=-1)
  return jnp.where(total[..., 0] > 0, jnp.exp(entropy), 0.0)


def codebook_usage(counts: jax.Array, *, threshold: float = 0.0) -> jax.Array:
  """Fraction of codes whose count is strictly greater than `threshold`.

  Args:
    counts: non-negative float [..., K]; reduced over the last axis.
    threshold: counts at or below this mark a code as unused. Keep 0 for exact assignment
      counts; EMA cluster sizes never reach 0, so pass a small positive value for them.

  Returns:
    float32 [...], in [0, 1].
  """
  counts = jnp.asarray(counts, dtype=jnp.float32)
  return jnp.mean((counts > threshold).astype(jnp.float32), axis=-1)
