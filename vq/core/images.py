"""Image grids, PNG writing and code-usage histograms for summaries and samples.

Usage sketch::

  from vq.core import images

  grid = images.make_grid([originals, reconstructions], max_columns=8)  # uint8 [H', W', 3]
  images.save_png(workdir / "samples" / f"recon_{step:07d}.png", grid)
  writer.write_images(step, {"reconstructions": grid[None],
                             "code_usage": images.histogram_image(counts)[None]})

Float images are taken to be in [-1, 1] and are converted with `vq.core.metrics.to_pixel_range`,
so a saved PNG holds exactly the pixels the metrics were computed on.
"""

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image

from vq.core import files
from vq.core import metrics

PathLike = Union[str, os.PathLike]

# Colours of `histogram_image`: light bars on black, dead codes marked red on the bottom row.
_BAR_COLOUR = np.array([230, 230, 230], dtype=np.uint8)
_DEAD_COLOUR = np.array([220, 40, 40], dtype=np.uint8)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Returns uint8 images: uint8 passes through, floats in [-1, 1] go through to_pixel_range.

  Args:
    images: uint8 array, or float array nominally in [-1, 1], of any shape.

  Returns:
    uint8 array of the same shape.
  """
  if not hasattr(images, "dtype"):
    images = np.asarray(images, dtype=np.float32)
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8:
    return np.asarray(images)
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(
        f"images must be uint8 or float in [-1, 1], got dtype {dtype}; convert them with "
        "x.astype(np.uint8) or x / 127.5 - 1 first.")
  return np.asarray(metrics.to_pixel_range(images)).astype(np.uint8)


def make_grid(rows: Sequence[np.ndarray], *, max_columns: int = 8, pad: int = 2) -> np.ndarray:
  """Tiles several aligned image batches into one uint8 image.

  Row group `r` shows `rows[r]`, so `[originals, reconstructions]` puts each reconstruction
  directly below its original. A batch longer than `max_columns` wraps onto further lines
  and the groups interleave line by line (originals 0-7, reconstructions 0-7, originals
  8-15, reconstructions 8-15, ...), keeping each pair in the same column. Cells left over
  on the last line, and the `pad`-pixel borders, are black.

  Args:
    rows: batches [N, H, W, 3] (or [N, H, W, 1], shown as grey), each uint8 or float in
      [-1, 1], all with the same N, H and W.
    max_columns: the most images per line.
    pad: pixels of black border around and between cells.

  Returns:
    uint8 [L * (H + pad) + pad, C * (W + pad) + pad, 3] with C = min(N, max_columns)
    columns and L = len(rows) * ceil(N / C) lines.
  """
  if not rows:
    raise ValueError("make_grid needs at least one batch of images, got an empty sequence.")
  if max_columns < 1 or pad < 0:
    raise ValueError(
        f"make_grid needs max_columns >= 1 and pad >= 0, got max_columns={max_columns}, "
        f"pad={pad}.")
  batches = [to_uint8(r) for r in rows]
  shape = batches[0].shape
  for b in batches:
    if b.ndim != 4 or b.shape[-1] not in (1, 3) or b.shape[0] == 0:
      raise ValueError(
          f"make_grid expects non-empty batches shaped [N, H, W, 3] or [N, H, W, 1], got "
          f"{b.shape}; add a batch axis with x[None] for a single image.")
    if b.shape != shape:
      raise ValueError(
          f"make_grid needs every row to have the same shape so images line up, got "
          f"{[x.shape for x in batches]}; slice them to a common N first.")
  n, h, w, _ = shape
  batches = [np.broadcast_to(b, (n, h, w, 3)) for b in batches]
  cols = min(n, max_columns)
  lines_per_group = -(-n // cols)
  num_lines = len(batches) * lines_per_group
  grid = np.zeros((num_lines * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
  for i in range(n):
    chunk, col = divmod(i, cols)
    x0 = pad + col * (w + pad)
    for r, b in enumerate(batches):
      y0 = pad + (chunk * len(batches) + r) * (h + pad)
      grid[y0:y0 + h, x0:x0 + w] = b[i]
  return grid


def save_png(path: PathLike, image_uint8: np.ndarray) -> None:
  """Writes a uint8 image as PNG atomically, creating parent directories.

  The image goes to a temporary file in the destination directory and is then renamed over
  `path` (`os.replace`), so a reader never sees a half-written file.

  Args:
    path: destination file name (local file system).
    image_uint8: uint8 [H, W, 3], [H, W, 1] or [H, W].
  """
  image = np.asarray(image_uint8)
  if image.dtype != np.uint8:
    raise ValueError(
        f"save_png expects a uint8 image, got dtype {image.dtype}; convert floats in [-1, 1] "
        "with vq.core.images.to_uint8 first.")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
    raise ValueError(
        f"save_png expects an image shaped [H, W, 3], [H, W, 1] or [H, W], got {image.shape}; "
        "tile a batch with make_grid first.")
  files.atomic_write(
      path, lambda f: Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG"))


def histogram_image(counts: np.ndarray, *, height: int = 64, max_width: int = 512) -> np.ndarray:
  """Draws code-usage counts as a bar plot, one column per code, for image summaries.

  Bar heights are `ceil(height * count / max(counts))`, so any used code shows at least one
  pixel. Codes with count 0 get a red pixel on the bottom row. When there are more than
  `max_width` codes, consecutive codes are averaged into `ceil(K / ceil(K / max_width))`
  columns (a column is red only if all its codes are unused).

  Args:
    counts: non-negative numbers [K] (numpy or JAX array), in code order.
    height: image height in pixels.
    max_width: the most columns before codes are binned.

  Returns:
    uint8 [height, width, 3] with width = K, or the binned count when K > max_width.
  """
  counts = np.asarray(counts, dtype=np.float64)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f"histogram_image expects counts shaped [K], got {counts.shape}.")
  if not np.all(np.isfinite(counts)) or np.any(counts < 0):
    raise ValueError(
        f"histogram_image expects finite non-negative counts, got min {counts.min()} and "
        f"max {counts.max()}; check the codebook statistics for NaNs.")
  if height < 1 or max_width < 1:
    raise ValueError(
        f"histogram_image needs height >= 1 and max_width >= 1, got {height} and {max_width}.")
  k = counts.size
  per_bin = -(-k // max_width)
  width = -(-k // per_bin)
  padded = np.full(width * per_bin, np.nan)
  padded[:k] = counts
  # nanmean so the ragged last bin is averaged over the codes it actually holds.
  values = np.nanmean(padded.reshape(width, per_bin), axis=1)
  peak = values.max()
  bar = np.zeros(width, dtype=np.int64)
  if peak > 0:
    bar = np.ceil(height * values / peak).astype(np.int64)
  image = np.zeros((height, width, 3), dtype=np.uint8)
  rows_from_bottom = np.arange(height)[::-1][:, None]
  image[rows_from_bottom < bar[None, :]] = _BAR_COLOUR
  image[-1, values == 0] = _DEAD_COLOUR
  return image
