"""Scoring completions: PSNR and LPIPS over the masked region, FD-VGG, and the baselines.

Usage sketch::

  results = evaluate_inpainting(gen, images, {'center': masks_c, 'right': masks_r},
                                labels=None, key=jax.random.PRNGKey(0),
                                most_frequent=code)          # {'center': {'prior': {...}}}
  masked_psnr(completed, originals, masks)                   # float64 [N], dB
  MaskedLPIPS()(completed, originals, masks)                 # float32 [N]
  python -m vq.generation.edit_eval A/eval_inpaint.json B/...  # the markdown table

Per mask and method, over every image once:
- `psnr_masked`: per image 10 log10(255^2 / MSE over its masked pixels and channels), then
  the mean over images (MSE floored at 255^2 1e-10, i.e. at most 100 dB);
- `lpips_masked`: LPIPS (VGG16, v0.1) with each level's distance map averaged over the
  masked region instead of the whole image: at a level of stride s every location is
  weighted by the fraction of its s x s pixel cell inside the mask (`MaskedLPIPS`; an
  all-True mask gives LPIPS exactly). The deeper levels' receptive fields reach past the
  mask, as any perceptual metric's do;
- `fd_vgg`: the Fréchet distance of the completed images' VGG16 features
  (`vq.evaluation.image_sets.ImageSetScorer`, as the generation metrics) against those of
  the same real images, uncompleted.
Methods, all blended into the input by the same `masks.blend` with the same feather; none
but the reference reads a masked pixel (their tokens come from the Telea-filled input,
`masks.telea`):
- `prior`: the prior's completion (GPT only where the region is a raster suffix);
- `tokenizer_most_frequent`: the tokenizer alone, the region's tokens set to the most
  frequent code of the training grids, decoded;
- `opencv_telea`: `cv2.inpaint(image, mask, 3, cv2.INPAINT_TELEA)`, no learning;
- `reference_reconstruction`: the tokenizer's reconstruction of the whole image pasted
  into the mask: it sees the masked pixels, so it is the ceiling of any token completion,
  not a competitor.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vq import data
from vq.evaluation import fid
from vq.generation import masks as masks_lib

METHODS = ('prior', 'tokenizer_most_frequent', 'opencv_telea', 'reference_reconstruction')
_MIN_MSE = 255.0 ** 2 * 1e-10


def masked_psnr(a: np.ndarray, b: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """float64 [N]: PSNR (dB, range 255) of each image pair over its masked pixels."""
  diff = np.square(a.astype(np.float64) - b.astype(np.float64)).sum(axis=-1)   # [N, H, W]
  m = np.asarray(masks, bool)
  mse = (diff * m).sum(axis=(1, 2)) / (m.sum(axis=(1, 2)) * a.shape[-1])
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, _MIN_MSE))


def level_weights(masks: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """[N, h, w]: the fraction of each level cell's pixels inside the mask."""
  n, height, width = masks.shape
  h, w = shape
  fy, fx = height // h, width // w
  cropped = masks[:, :h * fy, :w * fx]
  return cropped.reshape(n, h, fy, w, fx).mean(axis=(2, 4))


class MaskedLPIPS:
  """LPIPS restricted to a pixel mask (module docstring), jitted in batches of `batch_size`.

  `reference(images)` keeps the VGG maps of the images compared against (the originals),
  so that scoring several completions of them runs VGG once per completion only.
  """

  def __init__(self, batch_size: int = 250):
    from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
    model = lpips.LPIPS()
    self._params = lpips.load_pretrained_params()
    self.batch_size = int(batch_size)

    def taps(params, x):
      return model.apply({'params': params}, data.to_float(x), method=lpips.LPIPS.features)

    def distance(params, ref, b, m):
      total = jnp.zeros((b.shape[0],), jnp.float32)
      for level, (fa, fb) in enumerate(zip(ref, taps(params, b))):
        d = jnp.square(fa - fb) @ params[f'lin{level}']                        # [N, h, w]
        weight = level_weights(m.astype(jnp.float32), d.shape[1:3])
        total = total + jnp.sum(d * weight, axis=(1, 2)) / jnp.maximum(
            jnp.sum(weight, axis=(1, 2)), 1e-12)
      return total

    self._taps, self._distance = jax.jit(taps), jax.jit(distance)

  def _chunks(self, n: int):
    # One compiled shape per power of two up to batch_size: small sets stay cheap.
    bs = min(self.batch_size, 1 << max(n - 1, 0).bit_length())
    for lo in range(0, n, bs):
      rows = min(bs, n - lo)
      pad = lambda x, lo=lo, rows=rows: np.concatenate(
          [x[lo:lo + rows], np.ones((bs - rows,) + x.shape[1:], x.dtype)])
      yield lo, rows, pad

  def reference(self, images: np.ndarray) -> list[Any]:
    """The VGG maps of uint8 images [N, H, W, 3], batch by batch, for `distance`."""
    return [self._taps(self._params, pad(images)) for _, _, pad in self._chunks(len(images))]

  def distance(self, reference: list[Any], images: np.ndarray,
               masks: np.ndarray | None = None) -> np.ndarray:
    """float32 [N]: masked LPIPS of `images` to the images `reference` was made from."""
    n = len(images)
    m = np.ones(images.shape[:3], bool) if masks is None else np.asarray(masks, bool)
    out = np.zeros(n, np.float32)
    for ref, (lo, rows, pad) in zip(reference, self._chunks(n)):
      out[lo:lo + rows] = np.asarray(self._distance(self._params, ref, pad(images),
                                                    pad(m)))[:rows]
    return out

  def __call__(self, a: np.ndarray, b: np.ndarray, masks: np.ndarray | None = None
               ) -> np.ndarray:
    """float32 [N] for uint8 images a, b [N, H, W, 3] (masks None: the whole image)."""
    return self.distance(self.reference(b), a, masks)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance between two [N, D] feature sets (`vq.evaluation.fid`)."""
  (mu_a, sigma_a), (mu_b, sigma_b) = fid.feature_statistics(a), fid.feature_statistics(b)
  return float(fid.frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def vgg_scorer(image_size: int, batch_size: int, classifier: bool = False):
  """An `ImageSetScorer` (VGG features; the CIFAR-10 classifier when asked and available).

  Returns (scorer, why the classifier is missing or None).
  """
  from vq.evaluation import image_sets  # pylint: disable=g-import-not-at-top
  if classifier:
    try:
      scorer = image_sets.ImageSetScorer.create(inception=False, classifier=True,
                                                image_size=image_size, batch_size=batch_size)
      return scorer, scorer.unavailable.get('probs')
    except ImportError as e:
      why = f'the CIFAR-10 classifier is not available ({" ".join(str(e).split())})'
      return image_sets.ImageSetScorer.create(inception=False, classifier=False,
                                              image_size=image_size,
                                              batch_size=batch_size), why
  return image_sets.ImageSetScorer.create(inception=False, classifier=False,
                                          image_size=image_size, batch_size=batch_size), None


def most_frequent_code(train_tokens: np.ndarray, num_codes: int) -> int:
  """The code the training grids use most (ties: the smallest)."""
  return int(np.argmax(np.bincount(np.asarray(train_tokens).ravel(), minlength=num_codes)))


def completions(editor, images: np.ndarray, tokens: np.ndarray, masks: np.ndarray,
                region: np.ndarray, labels: np.ndarray, key: jax.Array, *, most_frequent: int,
                feather: int, offset: int, prior: bool, spec: str) -> dict[str, np.ndarray]:
  """{method: uint8 [N, H, W, 3]} for one chunk of images (the methods of METHODS)."""
  tok = editor.gen.tokenizer
  out = {}
  filled_pixels = masks_lib.telea(images, masks)
  known = tok.encode(filled_pixels)       # what the methods may use: no masked pixel
  if prior:
    done = editor.complete(known, region, labels, key, spec=spec, offset=offset)
    out['prior'] = masks_lib.blend(images, tok.decode(done), masks, feather)
  filled = np.where(region, most_frequent, known)
  out['tokenizer_most_frequent'] = masks_lib.blend(images, tok.decode(filled), masks, feather)
  out['opencv_telea'] = masks_lib.blend(images, filled_pixels, masks, feather)
  out['reference_reconstruction'] = masks_lib.blend(images, tok.decode(tokens), masks, feather)
  return out


def evaluate_inpainting(editor, images: np.ndarray, masks: dict[str, np.ndarray],
                        labels: np.ndarray, key: jax.Array, *, most_frequent: int,
                        feather: int, chunk: int = 500,
                        scorer: Any = None, lpips_fn: MaskedLPIPS | None = None,
                        on_chunk: Callable[[str, dict[str, np.ndarray], int], None] | None = None
                        ) -> dict[str, Any]:
  """Scores every method on every image once, for each named mask set [N, H, W].

  Row n of the prior draws from fold_in(key, n) for every mask. `on_chunk(spec, outputs,
  lo)` sees each chunk's completions (for pictures).
  """
  n = len(images)
  regions = {spec: editor.region(m) for spec, m in masks.items()}
  applicable = {spec: bool(np.all(masks_lib.is_raster_suffix(r))) or editor.kind != 'gpt'
                for spec, r in regions.items()}
  scorer = scorer or vgg_scorer(images.shape[1], editor.batch_size)[0]
  lpips_fn = lpips_fn or MaskedLPIPS()
  sums: dict[tuple[str, str], dict[str, list]] = {}
  real_features = []
  start = time.perf_counter()
  for lo in range(0, n, chunk):
    hi = min(n, lo + chunk)
    batch = images[lo:hi]
    tokens = editor.gen.tokenizer.encode(batch)
    real_features.append(scorer.features(batch)['vgg'])
    reference = lpips_fn.reference(batch)
    for spec, m in masks.items():
      outputs = completions(editor, batch, tokens, m[lo:hi], regions[spec][lo:hi],
                            labels[lo:hi], key, most_frequent=most_frequent, feather=feather,
                            offset=lo, prior=applicable[spec], spec=spec)
      if on_chunk is not None:
        on_chunk(spec, outputs, lo)
      for method, done in outputs.items():
        acc = sums.setdefault((spec, method), {'psnr': [], 'lpips': [], 'vgg': []})
        acc['psnr'].append(masked_psnr(done, batch, m[lo:hi]))
        acc['lpips'].append(lpips_fn.distance(reference, done, m[lo:hi]))
        acc['vgg'].append(scorer.features(done)['vgg'])
    logging.info('vq: inpainting eval %d/%d images in %.0f s', hi, n,
                 time.perf_counter() - start)
  real = np.concatenate(real_features)
  results: dict[str, Any] = {}
  for spec in masks:
    region = regions[spec]
    entry = {'token_region_fraction': float(region.mean()),
             'pixel_fraction': float(np.mean(masks[spec]))}
    if not applicable[spec]:
      bad = int(np.flatnonzero(~masks_lib.is_raster_suffix(region))[0])
      entry['prior_not_applicable'] = masks_lib.gpt_message(spec, region, bad)
    for method in METHODS:
      if (spec, method) not in sums:
        continue
      acc = sums[(spec, method)]
      entry[method] = {'psnr_masked': float(np.mean(np.concatenate(acc['psnr']))),
                       'lpips_masked': float(np.mean(np.concatenate(acc['lpips']))),
                       'fd_vgg': frechet(np.concatenate(acc['vgg']), real),
                       'num_images': int(n)}
    results[spec] = entry
  return results


def markdown_table(runs: list[dict[str, Any]]) -> str:
  """The inpainting table of one or more eval_inpaint JSONs (one per prior), as markdown.

  One row per mask and method; the baselines of a mask are shown once (they do not depend
  on the prior), the prior's row is named by its objective.
  """
  lines = ['| mask | method | PSNR masked (dB) | LPIPS masked | FD-VGG |',
           '|---|---|---:|---:|---:|']
  masks = list(dict.fromkeys(k for run in runs for k, v in run.items()
                             if isinstance(v, dict) and 'pixel_fraction' in v))
  for spec in masks:
    rows, seen = [], set()
    for run in runs:
      entry = run.get(spec)
      if not entry:
        continue
      if 'prior' in entry:
        rows.append((f'{run["objective"]} (step {run["step"]})', entry['prior']))
      for method in METHODS[1:]:
        if method in entry and method not in seen:
          seen.add(method)
          rows.append((method, entry[method]))
    for name, s in rows:
      lines.append(f'| {spec} | {name} | {s["psnr_masked"]:.2f} | {s["lpips_masked"]:.3f} | '
                   f'{s["fd_vgg"]:.1f} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  print(markdown_table([json.loads(open(p).read()) for p in sys.argv[1:]]))
