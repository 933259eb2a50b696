"""Pixel masks for editing, the token region they cover, and the blend back into the image.

Usage sketch::

  masks = pixel_masks('center', num_images=4, image_shape=(32, 32))   # bool [4, 32, 32]
  region = token_region(masks, grid=(8, 8))                           # bool [4, 8, 8]
  filled = telea(images, masks)       # what the encoder sees: no masked pixel gets through
  check_completable('gpt', region, 'center')     # one-line ValueError: not a raster suffix
  out = blend(originals, decoded, masks, feather=2)                   # uint8 [4, 32, 32, 3]

Mask specs (`--mask=...`); True / white marks the pixels to regenerate:
  `center`                    rows and columns [S/4, S/4 + S/2): the middle half of each side;
  `left|right|top|bottom`     that half of the image (`right`: columns [W - W/2, W));
  `box:x0,y0,x1,y1`           pixel columns [x0, x1) and rows [y0, y1) (x1, y1 exclusive);
  `file:PATH`                 one image file (png, ...) of the image's size for every image,
                              grey or RGB with equal channels, values {0, 255} or {0, 1};
  `npz:PATH`                  an .npz whose `masks` array holds one mask per image,
                              [N, H, W] (or [N, H, W, 1]), bool or {0, 1} or {0, 255}.
A mask must mask something and must leave something: empty and all-masked masks, masks of
another size, non-binary values and missing files are one-line errors, raised before any
model is loaded.

Token region. The tokenizer maps an image of H x W pixels to an h x w grid, each token
owning the f_y x f_x pixel cell [i f_y, (i + 1) f_y) x [j f_x, (j + 1) f_x) with
f = H / h (4 for CIFAR: 32 pixels -> 8 tokens). A token is in the region when any pixel of
its cell is masked, grown by `widen` tokens in all 8 directions (clipped at the grid's
edge). For CIFAR's `center` mask (pixels 8..23) the cells are rows/columns 2..5 (16 of 64
tokens); widened by one, as MaskGIT's demo does, rows/columns 1..6 (36 tokens); for
`bottom` (rows 16..31) rows 4..7, or 3..7 widened.

Encoding without the masked pixels. A convolutional encoder's tokens see past their cell,
so tokens next to the mask would carry what the masked pixels hold (a user's damaged
pixels; in an evaluation, the hidden truth). The editor therefore encodes `telea(images,
masks)`: the masked pixels replaced by OpenCV's Telea fill of the known ones, which reads
no masked pixel. No token then depends on the masked pixels, so the region need not be
widened to hide them: `DEFAULT_WIDEN` is 0, which on CIFAR-10 completes better than
widening by one on LPIPS, FD-VGG and PSNR (docs/editing.md). Class-guided editing
(`Editor.edit`) is different: it keeps part of the region's content, so it encodes the
input as it is.

GPT samples tokens in raster order, each from the tokens before it, so it can complete a
region only when the region is a suffix of that order (every token after the first
regenerated one is regenerated too): full-width bands reaching the bottom edge, such as
`bottom`. `right` is no suffix: row 0's right tokens come before row 1's known left
tokens, which a causal model cannot look ahead to. `check_completable` refuses the rest in
one line; MaskGIT completes any region.

Blend (feathered border). Decoded pixels replace the masked ones entirely, and pixels at
Chebyshev distance d = 1..feather outside the mask get alpha = 1 - d / (feather + 1) of the
decoded image (feather=2: 2/3, 1/3); every pixel farther than `feather` from the mask keeps
the input exactly. The feather runs outward, so no original pixel inside the mask leaks
into a completion (what inpainting metrics score).
"""

from __future__ import annotations

import numbers
import os
import pathlib
from typing import Sequence

import numpy as np

NAMED = ('center', 'left', 'right', 'top', 'bottom')
SPEC_FORMS = ('center, left, right, top, bottom, box:x0,y0,x1,y1, file:PATH.png or '
              'npz:PATH.npz')
MASKED_GREY = 128   # how masked pixels look in the "masked input" column of the grids
DEFAULT_WIDEN = 0   # tokens the region grows by beyond the cells the mask touches
DEFAULT_FEATHER = 2  # pixels of soft border outside the mask (`blend`)
TELEA_RADIUS = 3    # cv2.inpaint's neighbourhood radius, in pixels


def _fail(spec: str, problem: str, fix: str) -> ValueError:
  return ValueError(f'--mask={spec}: {problem}; {fix}.')


def check_spec(spec: str) -> str:
  """Validates the form of a mask spec (not yet its file contents); returns it."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f'--mask={spec!r} is empty; use one of {SPEC_FORMS}.')
  kind, _, rest = spec.partition(':')
  if spec in NAMED:
    return spec
  if kind == 'box':
    _box_numbers(spec, rest)
    return spec
  if kind in ('file', 'npz') and rest:
    return spec
  raise ValueError(f'--mask={spec} is not a mask spec; use one of {SPEC_FORMS}.')


def _box_numbers(spec: str, rest: str) -> tuple[int, int, int, int]:
  parts = rest.split(',')
  try:
    x0, y0, x1, y1 = (int(p) for p in parts)
  except ValueError:
    raise _fail(spec, 'a box is four integers x0,y0,x1,y1', 'use e.g. --mask=box:8,8,24,24'
                ) from None
  return x0, y0, x1, y1


def split_specs(text: str) -> list[str]:
  """'center,box:0,0,8,8,right' -> ['center', 'box:0,0,8,8', 'right'] (a box takes 4 numbers)."""
  parts, out = text.split(','), []
  while parts:
    part = parts.pop(0)
    if part.startswith('box:'):
      part = ','.join([part] + parts[:3])
      parts = parts[3:]
    out.append(check_spec(part))
  return out


def named_mask(spec: str, image_shape: tuple[int, int]) -> np.ndarray:
  """bool [H, W] of a named or box spec."""
  height, width = image_shape
  m = np.zeros((height, width), bool)
  if spec == 'center':
    y0, x0 = height // 4, width // 4
    m[y0:y0 + height // 2, x0:x0 + width // 2] = True
  elif spec == 'left':
    m[:, :width // 2] = True
  elif spec == 'right':
    m[:, width - width // 2:] = True
  elif spec == 'top':
    m[:height // 2] = True
  elif spec == 'bottom':
    m[height - height // 2:] = True
  else:
    x0, y0, x1, y1 = _box_numbers(spec, spec.partition(':')[2])
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
      raise _fail(spec, f'the box is empty or leaves the {width}x{height} image (x0 < x1 <= '
                  f'{width} and y0 < y1 <= {height} needed; x1, y1 are exclusive)',
                  'give pixel bounds inside the image')
    m[y0:y1, x0:x1] = True
  return m


def _binary(spec: str, values: np.ndarray, where: str) -> np.ndarray:
  """bool masks from bool, {0, 1} or {0, 255} values."""
  if values.dtype == np.bool_:
    return values
  if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
    raise _fail(spec, f'{where} has dtype {values.dtype}', 'store bool or uint8 masks')
  seen = np.unique(values)
  if np.all(np.isin(seen, (0, 1))):
    return values.astype(bool)
  if np.all(np.isin(seen, (0, 255))):
    return values == 255
  shown = ', '.join(str(v) for v in seen[:6].tolist())
  raise _fail(spec, f'{where} is not binary (values {shown}{"..." if len(seen) > 6 else ""})',
              'use 0 for pixels to keep and 255 (or 1) for pixels to regenerate, with no '
              'anti-aliasing')


def _read_file_mask(spec: str, path: pathlib.Path) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      img.load()
      values = np.asarray(img.convert('L') if img.mode == 'P' else img)
  except OSError as e:
    raise _fail(spec, f'{path} is not a readable image ({" ".join(str(e).split())})',
                'save the mask as a PNG') from None
  if values.ndim == 3:
    color = values[..., :3] if values.shape[-1] >= 3 else values[..., :1]
    if np.any(color != color[..., :1]):
      raise _fail(spec, f'{path} has colour (its channels differ)',
                  'save a black-and-white mask (0 keep, 255 regenerate)')
    values = color[..., 0]
  return _binary(spec, values, str(path))


def _read_npz_masks(spec: str, path: pathlib.Path) -> np.ndarray:
  try:
    with np.load(path, allow_pickle=False) as f:
      if 'masks' not in f.files:
        raise _fail(spec, f'{path} holds {sorted(f.files)} but no `masks` array',
                    'save the masks with np.savez(path, masks=masks)')
      values = f['masks']
  except (OSError, ValueError) as e:
    if isinstance(e, ValueError) and str(e).startswith('--mask='):
      raise
    raise _fail(spec, f'{path} is not a readable .npz ({" ".join(str(e).split())})',
                'save the masks with np.savez(path, masks=masks)') from None
  if values.ndim == 4 and values.shape[-1] == 1:
    values = values[..., 0]
  if values.ndim != 3:
    raise _fail(spec, f'`masks` in {path} has shape {values.shape}',
                'store one mask per image, [N, H, W]')
  return _binary(spec, values, f'`masks` in {path}')


def pixel_masks(spec: str, num_images: int, image_shape: tuple[int, int]) -> np.ndarray:
  """bool [N, H, W] masks of `spec` for `num_images` images of `image_shape` pixels.

  Raises:
    ValueError (one line) for a bad spec, a missing or unreadable file, a mask of another
    size or count, non-binary values, an empty mask or one that masks every pixel.
  """
  check_spec(spec)
  height, width = (int(s) for s in image_shape)
  kind, _, rest = spec.partition(':')
  if kind in ('file', 'npz'):
    path = pathlib.Path(os.path.expanduser(rest))
    if not path.is_file():
      raise _fail(spec, f'{path} does not exist', 'give the path of an existing mask file')
    if kind == 'file':
      masks = _read_file_mask(spec, path)[None]
    else:
      masks = _read_npz_masks(spec, path)
      if len(masks) != num_images:
        raise _fail(spec, f'{path} holds {len(masks)} masks for {num_images} images',
                    'store exactly one mask per image, in the dataset\'s order (or pass '
                    '--max_images)')
    if masks.shape[1:] != (height, width):
      raise _fail(spec, f'the masks are {masks.shape[2]}x{masks.shape[1]} pixels but the '
                  f'images are {width}x{height}', f'make masks of {width}x{height}')
  else:
    masks = named_mask(spec, (height, width))[None]
  counts = masks.reshape(len(masks), -1).sum(axis=1)
  which = (lambda i: f'mask {i} of {rest}') if kind == 'npz' else (lambda i: 'the mask')
  for i in np.flatnonzero(counts == 0)[:1]:
    raise _fail(spec, f'{which(i)} is empty (no pixel masked)',
                'mark the pixels to regenerate with 255 (or 1)')
  for i in np.flatnonzero(counts == height * width)[:1]:
    raise _fail(spec, f'{which(i)} masks every pixel, leaving nothing to condition on',
                'use --mode=sample to generate whole images')
  return np.broadcast_to(masks, (num_images, height, width)) if len(masks) == 1 else masks


def check_divisible(image_shape: Sequence[int], grid: Sequence[int]) -> tuple[int, int]:
  """The pixel cell (f_y, f_x) of a token; one-line error if the grid does not tile."""
  (height, width), (h, w) = image_shape, grid
  if height % h or width % w:
    raise ValueError(f'images of {width}x{height} pixels do not split into the {w}x{h} token '
                     'grid evenly; use the tokenizer\'s image size.')
  return height // h, width // w


def dilate(masks: np.ndarray, steps: int = 1) -> np.ndarray:
  """bool [..., h, w] grown by `steps` cells in all 8 directions (clipped at the edges)."""
  out = np.asarray(masks, bool)
  for _ in range(steps):
    padded = np.pad(out, [(0, 0)] * (out.ndim - 2) + [(1, 1), (1, 1)])
    h, w = out.shape[-2:]
    grown = np.zeros_like(out)
    for dy in range(3):
      for dx in range(3):
        grown |= padded[..., dy:dy + h, dx:dx + w]
    out = grown
  return out


def check_widen(widen: int) -> int:
  """`widen` as an int >= 0, with a one-line error for anything else."""
  if isinstance(widen, bool) or not isinstance(widen, numbers.Integral) or widen < 0:
    raise ValueError(f'--widen={widen!r} must be a whole number of tokens >= 0 to grow the '
                     'token region by (0: the cells the mask touches; 1: MaskGIT\'s demo).')
  return int(widen)


def token_region(masks: np.ndarray, grid: Sequence[int], widen: int = DEFAULT_WIDEN
                 ) -> np.ndarray:
  """bool [N, h, w]: tokens whose pixel cell has a masked pixel, widened by `widen` tokens."""
  widen = check_widen(widen)
  masks = np.asarray(masks, bool)
  n = masks.shape[0]
  fy, fx = check_divisible(masks.shape[1:], grid)
  h, w = grid
  cells = masks.reshape(n, h, fy, w, fx).any(axis=(2, 4))
  return dilate(cells, min(widen, max(h, w)))   # past the grid's size nothing changes


def is_raster_suffix(region: np.ndarray) -> np.ndarray:
  """bool [N]: whether each region is {t >= k} in raster order for some k."""
  flat = np.asarray(region, bool).reshape(len(region), -1)
  return np.all(flat[:, 1:] >= flat[:, :-1], axis=1)


def gpt_message(spec: str, region: np.ndarray, index: int) -> str:
  """The one line that says why GPT cannot complete image `index`'s region."""
  h, w = region.shape[1:]
  rows, cols = np.nonzero(region[index])
  return (f'--mask={spec}: a GPT prior samples tokens in raster order, so it completes only '
          'masks whose token region is a raster suffix (full-width bands reaching the bottom '
          f'edge, e.g. --mask=bottom); the region of image {index} (rows {rows.min()}-'
          f'{rows.max()}, columns {cols.min()}-{cols.max()} of the {h}x{w} grid) has known '
          'tokens after regenerated ones: use a MaskGIT prior '
          '(experiments/maskgit_cifar.py) for this mask.')


def check_completable(kind: str, region: np.ndarray, spec: str) -> None:
  """Raises the one-line refusal when a `kind` prior cannot complete some region."""
  if kind != 'gpt':
    return
  ok = is_raster_suffix(region)
  if not np.all(ok):
    raise ValueError(gpt_message(spec, region, int(np.flatnonzero(~ok)[0])))


def check_feather(feather: int) -> int:
  """`feather` as an int >= 0, with a one-line error for anything else."""
  if isinstance(feather, bool) or not isinstance(feather, numbers.Integral) or feather < 0:
    raise ValueError(f'--feather={feather!r} must be >= 0 (pixels of soft border; 0: none).')
  return int(feather)


def feather_alpha(masks: np.ndarray, feather: int) -> np.ndarray:
  """float32 [N, H, W]: 1 in the mask, 1 - d / (feather + 1) at distance d <= feather, else 0."""
  feather = check_feather(feather)
  masks = np.asarray(masks, bool)
  alpha = masks.astype(np.float32)
  grown = masks
  for d in range(1, feather + 1):
    ring = dilate(grown) & ~grown
    alpha[ring] = 1.0 - d / (feather + 1.0)
    grown = grown | ring
  return alpha


def blend(original: np.ndarray, generated: np.ndarray, masks: np.ndarray,
          feather: int) -> np.ndarray:
  """uint8 [N, H, W, 3]: generated pixels in the mask, the input beyond the feather."""
  alpha = feather_alpha(masks, feather)[..., None]
  mixed = alpha * generated.astype(np.float32) + (1.0 - alpha) * original.astype(np.float32)
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def telea(images: np.ndarray, masks: np.ndarray, radius: int = TELEA_RADIUS) -> np.ndarray:
  """uint8 [N, H, W, 3]: OpenCV's Telea inpainting of each image's masked pixels.

  The fill is computed from the unmasked pixels only; the unmasked pixels are unchanged.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  out = np.empty_like(images)
  for i, (image, mask) in enumerate(zip(images, masks)):
    out[i] = cv2.inpaint(np.ascontiguousarray(image), np.asarray(mask, np.uint8) * 255,
                         radius, cv2.INPAINT_TELEA)
  return out


def masked_view(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """The "masked input" shown in grids: masked pixels grey."""
  return np.where(np.asarray(masks, bool)[..., None], np.uint8(MASKED_GREY), images)
