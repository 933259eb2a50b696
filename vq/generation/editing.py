"""Editing images with a token prior: inpainting, outpainting and class-guided image-to-image.

Usage sketch::

  gen = Generator.from_workdir('/tmp/maskgit')
  editor = Editor(gen)
  masks = masks_lib.pixel_masks('center', len(images), (32, 32))
  out = editor.inpaint(images, masks, labels=None, key=jax.random.PRNGKey(0),
                       samples_per_image=4)        # out.images uint8 [N, 4, 32, 32, 3]
  edits = editor.edit(images, target_label=3, ratios=(0.25, 0.5, 1.0),
                      key=jax.random.PRNGKey(0))   # edits.images uint8 [N, 3, 32, 32, 3]

Inpainting (MaskGIT's editing recipe, without letting the masked pixels in): encode the
image with its masked pixels replaced by OpenCV's Telea fill of the known ones
(`masks.telea`; no token then depends on what the masked pixels hold), set the tokens of the
mask's token region (`vq.generation.masks.token_region`: the tokens whose pixel cell touches
the mask, grown by `widen` tokens, 0 by default) to [MASK], decode them with the prior's own
iterative decoder (`sampling.sample_maskgit(..., tokens=...)`) conditioned on every other
token and the class token, decode the grid with the tokenizer and blend the result into the
input (`masks.blend`: the masked pixels are the completion's, pixels beyond the feathered
border are the input's exactly). Outpainting is the same with a mask at the border
(`right`).

GPT completes only raster-suffix regions (`masks.check_completable`): it decodes in raster
order, copying the known tokens (`complete_gpt`) and sampling each regenerated one from all
tokens before it, which for a suffix is exactly sampling from p(region | known tokens).

Class-guided image-to-image (`Editor.edit`, MaskGIT only): re-mask a fraction r of an
image's tokens (chosen uniformly, nested: a larger r re-masks a superset of the positions of
a smaller one, so the rows of a schedule differ only by r) and resample them under another
class label; r = 0 is the tokenizer's reconstruction, r = 1 a fresh sample of that class.

Labels: -1 is the null class (unconditional), which a class-conditional prior learned from
its `prior.class_dropout` share of training examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vq.generation import masks as masks_lib
from vq.generation import priors
from vq.generation import sampling
from vq.generation import transformer

def complete_gpt(model: transformer.Transformer, params: Any, layout: priors.TokenLayout,
                 labels: jax.Array, keys: jax.Array, settings: sampling.Settings,
                 tokens: jax.Array, known: jax.Array) -> jax.Array:
  """KV-cached raster decoding that keeps the known tokens; int32 [B, L].

  Position i takes tokens[:, i] where known[:, i], else a draw from the prior given the
  class and positions < i, with the same per-row keys as `sampling.sample_gpt` (so with
  nothing known it returns exactly `sample_gpt`'s grids). Only for known positions that
  precede every unknown one is this conditional sampling (`masks.check_completable`).
  """
  return sampling.sample_gpt(model, params, layout, labels, keys, settings, tokens, known)


def complete_tokens(kind: str, model, params, layout: priors.TokenLayout, labels: jax.Array,
                    keys: jax.Array, settings: sampling.Settings, tokens: jax.Array,
                    region: jax.Array) -> jax.Array:
  """int32 [B, L]: `tokens` with the `region` positions resampled by a `kind` prior."""
  tokens, region = jnp.asarray(tokens, jnp.int32), jnp.asarray(region, bool)
  if kind == 'gpt':
    return complete_gpt(model, params, layout, labels, keys, settings, tokens, ~region)
  masked = jnp.where(region, layout.mask_token, tokens)
  return sampling.sample_maskgit(model, params, layout, labels, keys, settings, tokens=masked)


def nested_edit_regions(num_images: int, grid: tuple[int, int], ratios: np.ndarray,
                        seed: int, candidates: np.ndarray | None = None) -> np.ndarray:
  """bool [N, R, h, w]: round(r * C) of each image's C candidate tokens for every ratio r.

  Image i orders its candidates once (`np.random.default_rng([seed, i])`) and ratio r takes
  the first round(r * C) of that order (at least one when r > 0): nested regions.
  """
  h, w = grid
  if candidates is None:
    candidates = np.ones((num_images, h, w), bool)
  out = np.zeros((num_images, len(ratios), h * w), bool)
  for i in range(num_images):
    positions = np.flatnonzero(candidates[i].ravel())
    order = np.random.default_rng([seed, i]).permutation(positions)
    for j, r in enumerate(ratios):
      k = int(round(float(r) * len(order)))
      k = max(k, 1) if r > 0 else 0
      out[i, j, order[:k]] = True
  return out.reshape(num_images, len(ratios), h, w)


def check_ratios(ratios: Any) -> np.ndarray:
  """float64 [R] in [0, 1], with a one-line error for anything else."""
  arr = np.asarray(ratios, np.float64).ravel()
  if arr.size == 0 or np.any(~np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
    raise ValueError(f'--ratios={list(np.asarray(ratios).ravel())} must be fractions in [0, 1] '
                     'of the tokens to resample; use e.g. --ratios=0.25,0.5,0.75,1.')
  return arr


@dataclasses.dataclass
class Completion:
  """What `Editor.inpaint` and `Editor.edit` return.

  Attributes:
    images: uint8 [N, S, H, W, 3] (S samples, or S ratios for `edit`).
    tokens: int32 [N, S, h, w], the completed grids.
    regions: bool [N, S, h, w], the tokens that were resampled.
    masks: bool [N, H, W], the pixel masks blended with (all True without a mask).
  """
  images: np.ndarray
  tokens: np.ndarray
  regions: np.ndarray
  masks: np.ndarray


class Editor:
  """Token-level editing with a `Generator`'s prior and tokenizer.

  Completion runs jitted on one device in chunks of `batch_size` rows (the last one padded),
  so every call shape compiles once. `widen`: tokens the region of a pixel mask grows by
  beyond the cells the mask touches (`masks.token_region`).
  """

  def __init__(self, generator, settings: sampling.Settings | None = None,
               batch_size: int | None = None, widen: int = masks_lib.DEFAULT_WIDEN):
    from vq.generation import generator as gen_lib  # pylint: disable=g-import-not-at-top
    self.gen = generator
    self.kind = generator.config.objective
    self.layout = generator.layout
    self.settings = settings or gen_lib.settings_from(generator.config)
    self.batch_size = int(batch_size or generator.config.sample.batch_size)
    self.widen = masks_lib.check_widen(widen)
    self._compiled: dict[Any, Any] = {}

  def _fn(self):
    if self.settings not in self._compiled:
      kind, model, layout, settings = self.kind, self.gen.model, self.layout, self.settings

      def fn(params, tokens, region, labels, keys):
        return complete_tokens(kind, model, params, layout, labels, keys, settings, tokens,
                               region)

      self._compiled[self.settings] = jax.jit(fn)
    return self._compiled[self.settings]

  def complete(self, tokens: np.ndarray, region: np.ndarray, labels: np.ndarray,
               key: jax.Array, *, spec: str = 'custom', offset: int = 0) -> np.ndarray:
    """int32 [N, h, w]: `tokens` with `region` resampled; row n draws from fold_in(key,
    offset + n).

    Raises:
      ValueError: a GPT prior and a region that is not a raster suffix (one line).
    """
    region = np.asarray(region, bool)
    masks_lib.check_completable(self.kind, region, spec)
    n = len(tokens)
    flat_tokens = np.asarray(tokens, np.int32).reshape(n, -1)
    flat_region = region.reshape(n, -1)
    keys = sampling.row_keys(key, n, offset)
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.key_data(keys)
    keys = np.asarray(keys)
    labels = np.asarray(labels, np.int32)
    fn, b = self._fn(), self.batch_size
    out = np.zeros_like(flat_tokens)
    for lo in range(0, n, b):
      rows = min(b, n - lo)

      def pad(x):
        chunk = x[lo:lo + rows]
        return np.concatenate([chunk, np.zeros((b - rows,) + x.shape[1:], x.dtype)])

      done = fn(self.gen.params, pad(flat_tokens), pad(flat_region), pad(labels), pad(keys))
      out[lo:lo + rows] = np.asarray(done)[:rows]
    return out.reshape(np.shape(tokens))

  def region(self, masks: np.ndarray) -> np.ndarray:
    """bool [N, h, w]: the tokens to resample for pixel masks [N, H, W]."""
    return masks_lib.token_region(masks, self.layout.grid, self.widen)

  def encode_known(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """int32 [N, h, w]: the tokens of `images` with their masked pixels Telea-filled."""
    return self.gen.tokenizer.encode(masks_lib.telea(np.asarray(images, np.uint8), masks))

  def inpaint(self, images: np.ndarray, masks: np.ndarray, labels: np.ndarray | None,
              key: jax.Array, *, samples_per_image: int = 1,
              feather: int = masks_lib.DEFAULT_FEATHER, spec: str = 'custom') -> Completion:
    """Completes the masked pixels of uint8 images [N, H, W, 3] (bool masks [N, H, W]).

    Row n * S + s (image n, sample s) draws from fold_in(key, n * S + s). The masked
    pixels of `images` are never read: the encoder sees their Telea fill (`masks.telea`).
    """
    n = len(images)
    if samples_per_image < 1:
      raise ValueError(f'--samples_per_image={samples_per_image} must be >= 1.')
    region = self.region(masks)
    masks_lib.check_completable(self.kind, region, spec)
    labels = np.full(n, priors.NULL_LABEL, np.int32) if labels is None else labels
    s = samples_per_image
    tokens = self.encode_known(images, masks)
    rep = lambda x: np.repeat(np.asarray(x), s, axis=0)
    done = self.complete(rep(tokens), rep(region), rep(labels), key, spec=spec)
    decoded = self.gen.tokenizer.decode(done)
    out = masks_lib.blend(rep(images), decoded, rep(masks), feather)
    h, w = self.layout.grid
    return Completion(images=out.reshape((n, s) + out.shape[1:]),
                      tokens=done.reshape(n, s, h, w),
                      regions=np.broadcast_to(region[:, None], (n, s, h, w)),
                      masks=np.asarray(masks, bool))

  def edit(self, images: np.ndarray, target_label: int, ratios: Any, key: jax.Array, *,
           masks: np.ndarray | None = None, feather: int = masks_lib.DEFAULT_FEATHER,
           seed: int = 0) -> Completion:
    """Resamples a fraction r of each image's tokens under `target_label`, for each r.

    With `masks`, only tokens of their token region are candidates and the result is
    blended into the input as for inpainting.
    """
    if self.kind != 'maskgit':
      raise ValueError('--mode=edit resamples scattered tokens, which only a MaskGIT prior '
                       'can do (a GPT prior decodes in raster order); use a prior trained '
                       'with experiments/maskgit_cifar.py.')
    ratios = check_ratios(ratios)
    n, r = len(images), len(ratios)
    grid = self.layout.grid
    candidates = None if masks is None else self.region(masks)
    regions = nested_edit_regions(n, grid, ratios, seed, candidates)
    tokens = self.gen.tokenizer.encode(images)
    rep_tokens = np.repeat(tokens, r, axis=0)
    labels = np.full(n * r, target_label, np.int32)
    done = self.complete(rep_tokens, regions.reshape((n * r,) + tuple(grid)), labels, key)
    decoded = self.gen.tokenizer.decode(done)
    if masks is None:
      out, used = decoded, np.ones(images.shape[:3], bool)
    else:
      used = np.asarray(masks, bool)
      out = masks_lib.blend(np.repeat(images, r, axis=0), decoded, np.repeat(used, r, axis=0),
                            feather)
    return Completion(images=out.reshape((n, r) + out.shape[1:]),
                      tokens=done.reshape((n, r) + tuple(grid)), regions=regions, masks=used)
