"""`run.py` editing modes of a token prior: inpaint, edit, sample_large, eval_inpaint.

Usage sketch (PRIOR = a prior's --workdir, its --config as trained)::

  python run.py --config=experiments/maskgit_cifar.py --workdir=PRIOR --mode=inpaint \\
      --dataset=folder:/tmp/photos --mask=center --out=/tmp/inpaint [--samples_per_image=4]
  python run.py ... --mode=edit --target_label=3 [--ratios=0.25,0.5,0.75,1] --out=/tmp/edit
  python run.py ... --mode=sample_large --token_grid=16,16 --out=/tmp/large
  python run.py ... --mode=eval_inpaint [--mask=center,right] [--out=/tmp/eval]

- inpaint: `--mask` (`vq.generation.masks`: center, left|right|top|bottom, box:x0,y0,x1,y1,
  file:PATH, npz:PATH) over the first `--max_images` (default 16; 0: all) images of
  `--dataset` (default `config.eval.dataset`); writes `inpaint.png` (per line of up to 8
  images: originals, masked inputs, then one line per sample) and `completions.npz`
  (`images` uint8 [N, H, W, 3], or [N, S, H, W, 3] with S = --samples_per_image > 1;
  `masks` bool [N, H, W]; `tokens`, `regions`, `labels`).
- edit: MaskGIT; resamples a fraction r of each image's tokens (of the token region of
  `--mask` when given, blended as for inpainting) under `--target_label` for every r of
  `--ratios` (r = 0, the reconstruction, always included); images already of the target
  class are left out when the dataset has labels. Writes `edit.png` (sources,
  then one line per r), `edits.npz` (`images` [N, R, H, W, 3], `ratios`, ...) and
  `edit.json`: per r the classifier's target-class accuracy and the LPIPS to the source.
- sample_large: `--num_samples` (default 8 per class) grids of `--token_grid` tokens
  (`vq.generation.large`), `large.png`, `large.npz`, and `large.json` with the FD-VGG of one
  random training-size crop per image against `config.eval.dataset`, next to the FD-VGG
  of as many ordinary samples.
- eval_inpaint: every image of `--dataset` (default `config.eval.dataset`) once, for each
  mask of `--mask` (default center,right); `vq.generation.edit_eval`; writes
  `<workdir>/eval/inpaint_step_<N>.json` (or `--out/eval_inpaint.json` and a picture per
  mask).
`--labels`: none (the null class), `dataset` (the images' labels), one class for all, or
one per image. `--feather` (default 2) pixels of soft border (`masks.blend`). `--widen`
(default 0) tokens the token region grows by beyond the cells the mask touches
(`masks.token_region`; the encoder never sees the masked pixels, `masks.telea`). The key is
`config.sample.seed`; sampler settings are `config.sample.*`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from vq import data
from vq.core import images as vq_images
from vq.core import weights
from vq.generation import editing
from vq.generation import generator as gen_lib
from vq.generation import masks as masks_lib
from vq.generation import priors
from vq.generation import tokens as token_data
from vq.generation import validation

MODES = ('inpaint', 'edit', 'sample_large', 'eval_inpaint')
DEFAULT_RATIOS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_EVAL_MASKS = ('center', 'right')


def _load_images(config: ml_collections.ConfigDict, spec: str | None, max_images: int, *,
                 skip_label: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
  """(uint8 images, int labels, image size) of a dataset at the tokenizer's image size:
  the first `max_images` (0: all), leaving out those labelled `skip_label`."""
  tok_config = token_data.tokenizer_config(config.prior.tokenizer_workdir)
  size = int(tok_config.data.image_size)
  if max_images is not None and max_images < 0:
    raise ValueError(f'--max_images={max_images} must be >= 0 (0: every image).')
  source = data.open_source(spec or config.eval.dataset, image_size=size,
                            data_dir=config.data.data_dir or None,
                            resize=bool(tok_config.data.resize), download=config.data.download)
  if skip_label is not None:
    chunks, labels, found = [], [], 0
    for lo in range(0, len(source), 1024):
      batch, batch_labels = source.get_many(range(lo, min(len(source), lo + 1024)))
      keep = np.asarray(batch_labels) != skip_label
      chunks.append(np.asarray(batch)[keep])
      labels.append(np.asarray(batch_labels)[keep])
      found += int(keep.sum())
      if max_images and found >= max_images:
        break
    n = max_images or found
    return (np.concatenate(chunks)[:n].astype(np.uint8), np.concatenate(labels)[:n].astype(
        np.int64), size)
  if max_images:
    source = data.take(source, max_images)
  images, labels = source.get_many(range(len(source)))
  return np.asarray(images, np.uint8), np.asarray(labels, np.int64), size


def resolve_labels(text: str | None, dataset_labels: np.ndarray, num_classes: int
                   ) -> np.ndarray:
  """int32 [N] class ids for the prior from --labels (module docstring); -1 = null class."""
  n = len(dataset_labels)
  if not text or text == 'none':
    return np.full(n, priors.NULL_LABEL, np.int32)
  if num_classes == 0:
    raise ValueError(f'--labels={text} was given, but this prior is unconditional '
                     '(data.num_classes=0); leave --labels out.')
  if text == 'dataset':
    if np.any(dataset_labels < 0):
      raise ValueError('--labels=dataset, but the dataset has unlabelled images; pass class '
                       'ids (--labels=3 or one per image) or leave --labels out.')
    return validation.check_labels(dataset_labels, num_classes)
  parsed = validation.parse_labels(text)
  if len(parsed) == 1:
    parsed = parsed * n
  if len(parsed) != n:
    raise ValueError(f'--labels names {len(parsed)} classes for {n} images; give one class '
                     'for all, one per image, dataset or none.')
  return validation.check_labels(parsed, num_classes)


def _out_dir(out: str | None, mode: str) -> pathlib.Path:
  if not out:
    raise ValueError(f'--mode={mode} needs --out=DIR (a folder for its pictures and arrays).')
  path = pathlib.Path(out).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def _border(feather: int | None, widen: int | None) -> tuple[int, int]:
  """--feather and --widen with their defaults, checked before anything loads."""
  return (masks_lib.check_feather(masks_lib.DEFAULT_FEATHER if feather is None else feather),
          masks_lib.check_widen(masks_lib.DEFAULT_WIDEN if widen is None else widen))


def _load(config, workdir) -> gen_lib.Generator:
  return gen_lib.Generator.from_workdir(workdir, config)


def inpaint_to_dir(config, workdir: str, out: str | None, *, mask: str | None,
                   dataset: str | None = None, labels: str | None = None,
                   samples_per_image: int | None = None, max_images: int | None = None,
                   feather: int | None = None, widen: int | None = None) -> dict[str, Any]:
  """--mode=inpaint (module docstring); returns what it wrote."""
  out_dir = _out_dir(out, 'inpaint')
  if not mask:
    raise ValueError('--mode=inpaint needs --mask=SPEC (center, left|right|top|bottom, '
                     'box:x0,y0,x1,y1, file:PATH or npz:PATH).')
  spec = masks_lib.check_spec(mask)
  samples = 1 if samples_per_image is None else samples_per_image
  if samples < 1:
    raise ValueError(f'--samples_per_image={samples} must be >= 1.')
  feather, widen = _border(feather, widen)
  images, ds_labels, size = _load_images(config, dataset, 16 if max_images is None
                                         else max_images)
  masks = masks_lib.pixel_masks(spec, len(images), (size, size))
  gen = _load(config, workdir)
  label_ids = resolve_labels(labels, ds_labels, gen.layout.num_classes)
  editor = editing.Editor(gen, widen=widen)   # inpaint refuses what GPT cannot complete
  done = editor.inpaint(images, masks, label_ids, jax.random.PRNGKey(config.sample.seed),
                        samples_per_image=samples, feather=feather, spec=spec)
  rows = [images, masks_lib.masked_view(images, masks)]
  rows += [done.images[:, s] for s in range(samples)]
  vq_images.save_png(out_dir / 'inpaint.png', vq_images.make_grid(rows, max_columns=8))
  arrays = {'images': done.images[:, 0] if samples == 1 else done.images,
            'masks': np.ascontiguousarray(masks), 'tokens': done.tokens,
            'regions': done.regions[:, 0], 'labels': label_ids}
  weights.save_npz(out_dir / 'completions.npz', arrays)
  return {'inpaint_png': str(out_dir / 'inpaint.png'),
          'completions_npz': str(out_dir / 'completions.npz'), 'num_images': len(images),
          'samples_per_image': samples, 'mask': spec, 'feather': feather, 'widen': widen,
          'step': gen.step,
          'token_region_fraction': float(done.regions.mean())}


def _parse_floats(text: str | None, default: tuple[float, ...], flag: str) -> tuple[float, ...]:
  if not text:
    return default
  try:
    return tuple(float(x) for x in text.split(',') if x.strip())
  except ValueError:
    raise ValueError(f'--{flag}={text!r} is not a comma-separated list of numbers; use e.g. '
                     f'--{flag}={",".join(map(str, default))}.') from None


def edit_to_dir(config, workdir: str, out: str | None, *, target_label: int | None,
                ratios: str | None = None, dataset: str | None = None,
                max_images: int | None = None, mask: str | None = None,
                feather: int | None = None, widen: int | None = None) -> dict[str, Any]:
  """--mode=edit (module docstring); returns its metrics."""
  out_dir = _out_dir(out, 'edit')
  if config.objective != 'maskgit':
    raise ValueError('--mode=edit resamples scattered tokens, which only a MaskGIT prior can '
                     'do (a GPT prior decodes in raster order); use a prior trained with '
                     'experiments/maskgit_cifar.py.')
  if target_label is None:
    raise ValueError('--mode=edit needs --target_label=C, the class to turn the images to.')
  validation.check_labels([target_label], int(config.data.num_classes))
  schedule = editing.check_ratios(sorted(set((0.0,) + _parse_floats(ratios, DEFAULT_RATIOS,
                                                                    'ratios'))))
  feather, widen = _border(feather, widen)
  spec = masks_lib.check_spec(mask) if mask else None
  images, ds_labels, size = _load_images(config, dataset,
                                         16 if max_images is None else max_images,
                                         skip_label=target_label)
  if not len(images):
    raise ValueError(f'every image of the dataset is already of class {target_label}; pick '
                     'another --target_label or --dataset.')
  masks = masks_lib.pixel_masks(spec, len(images), (size, size)) if spec else None
  gen = _load(config, workdir)
  editor = editing.Editor(gen, widen=widen)
  done = editor.edit(images, target_label, schedule, jax.random.PRNGKey(config.sample.seed),
                     masks=masks, feather=feather, seed=config.sample.seed)
  rows = [images] + [done.images[:, j] for j in range(len(schedule))]
  vq_images.save_png(out_dir / 'edit.png', vq_images.make_grid(rows, max_columns=8))
  weights.save_npz(out_dir / 'edits.npz', {
      'images': done.images, 'ratios': schedule.astype(np.float32), 'sources': images,
      'source_labels': ds_labels.astype(np.int32), 'target_label': np.int32(target_label)})
  from vq.generation import edit_eval  # pylint: disable=g-import-not-at-top
  scorer, missing = edit_eval.vgg_scorer(size, editor.batch_size, classifier=True)
  lpips_fn = edit_eval.MaskedLPIPS()
  sources = lpips_fn.reference(images)
  rows_out = []
  for j, r in enumerate(schedule):
    row = {'ratio': float(r),
           'lpips_to_source': float(np.mean(lpips_fn.distance(sources, done.images[:, j])))}
    if missing is None:
      probs = scorer.features(done.images[:, j])['probs']
      row['classifier_target_accuracy'] = float(np.mean(np.argmax(probs, axis=1) ==
                                                        target_label))
    rows_out.append(row)
  results = {'target_label': int(target_label), 'num_images': len(images), 'mask': spec,
             'widen': widen if spec else None, 'step': gen.step, 'schedule': rows_out,
             'edit_png': str(out_dir / 'edit.png'),
             'edits_npz': str(out_dir / 'edits.npz'),
             'settings': editor.settings._asdict()}
  if missing is not None:
    results['classifier_unavailable'] = missing
  (out_dir / 'edit.json').write_text(json.dumps(results, indent=2, sort_keys=True) + '\n')
  return results


def sample_large_to_dir(config, workdir: str, out: str | None, *, token_grid: str | None,
                        labels: str | None = None, num_samples: int | None = None
                        ) -> dict[str, Any]:
  """--mode=sample_large (module docstring); returns its measurements."""
  from vq.generation import edit_eval  # pylint: disable=g-import-not-at-top
  from vq.generation import large  # pylint: disable=g-import-not-at-top
  out_dir = _out_dir(out, 'sample_large')
  if not token_grid:
    raise ValueError('--mode=sample_large needs --token_grid=H,W (token rows and columns, at '
                     'least the training grid; e.g. 16,16 for 64x64 CIFAR images).')
  if num_samples is not None and num_samples < 2:
    raise ValueError(f'--num_samples={num_samples} must be >= 2 (a Fréchet distance needs a '
                     'covariance).')
  grid = tuple(int(g) if g.strip().isdigit() else -1 for g in token_grid.split(','))
  gen = _load(config, workdir)
  grid = large.check_grid(grid, gen.layout.grid)
  num_classes = gen.layout.num_classes
  label_ids = (validation.check_labels(validation.parse_labels(labels), num_classes)
               if labels else gen_lib.balanced_labels(num_samples or 8 * max(num_classes, 1),
                                                      num_classes))
  key = jax.random.PRNGKey(config.sample.seed)
  sampler = large.LargeSampler(gen, grid)
  tokens = sampler(label_ids, key)
  images = large.decode_grid(gen.tokenizer, tokens)
  shown = images[:16]
  vq_images.save_png(out_dir / 'large.png', vq_images.make_grid([shown], max_columns=8))
  weights.save_npz(out_dir / 'large.npz',
                   {'images': images, 'tokens': tokens, 'labels': label_ids})
  size = gen.tokenizer.image_size
  crops = large.random_crops(images, size, config.sample.seed)
  ordinary = gen.sample(label_ids, key)
  real, _, _ = _load_images(config, config.eval.dataset, int(config.eval.max_examples))
  scorer, _ = edit_eval.vgg_scorer(size, config.eval.batch_size)
  real_vgg = scorer.features(real)['vgg']
  results = {'token_grid': list(grid), 'image_shape': list(images.shape[1:3]),
             'num_samples': len(label_ids), 'num_real': len(real), 'step': gen.step,
             'fd_vgg_random_crops': edit_eval.frechet(scorer.features(crops)['vgg'], real_vgg),
             'fd_vgg_ordinary_samples': edit_eval.frechet(scorer.features(ordinary)['vgg'],
                                                          real_vgg),
             'method': ('sliding attention window' if config.objective == 'gpt' else
                        'overlapping MaskGIT windows'),
             'large_png': str(out_dir / 'large.png'), 'large_npz': str(out_dir / 'large.npz')}
  (out_dir / 'large.json').write_text(json.dumps(results, indent=2, sort_keys=True) + '\n')
  return results


def eval_inpaint(config, workdir: str, out: str | None, *, mask: str | None = None,
                 dataset: str | None = None, labels: str | None = None,
                 max_images: int | None = None, feather: int | None = None,
                 widen: int | None = None) -> dict[str, Any]:
  """--mode=eval_inpaint (module docstring); returns the results it wrote."""
  from vq.generation import edit_eval  # pylint: disable=g-import-not-at-top
  specs = masks_lib.split_specs(mask) if mask else list(DEFAULT_EVAL_MASKS)
  feather, widen = _border(feather, widen)
  images, ds_labels, size = _load_images(config, dataset, max_images or 0)
  masks = {s: np.ascontiguousarray(masks_lib.pixel_masks(s, len(images), (size, size)))
           for s in specs}
  gen = _load(config, workdir)
  label_ids = resolve_labels(labels, ds_labels, gen.layout.num_classes)
  train = token_data.encoded_split(
      gen.tokenizer, gen.tokenizer_identity, config.data.dataset,
      pathlib.Path(workdir).expanduser().absolute() / 'tokens', flip=config.prior.flip,
      data_dir=config.data.data_dir or None, max_examples=config.data.max_examples,
      download=config.data.download)
  code = edit_eval.most_frequent_code(train.tokens, gen.layout.num_codes)
  editor = editing.Editor(gen, widen=widen)
  pictures: dict[str, dict[str, np.ndarray]] = {}

  def keep_first(spec, outputs, lo):
    if lo == 0:
      pictures[spec] = {k: v[:8] for k, v in outputs.items()}

  scores = edit_eval.evaluate_inpainting(
      editor, images, masks, label_ids, jax.random.PRNGKey(config.sample.seed),
      most_frequent=code, feather=feather, on_chunk=keep_first)
  results = {'step': gen.step, 'objective': config.objective, 'num_images': len(images),
             'dataset': dataset or config.eval.dataset, 'labels': labels or 'none',
             'feather': feather, 'widen': widen, 'most_frequent_code': code, 'telea_radius':
             masks_lib.TELEA_RADIUS, 'settings': editor.settings._asdict(),
             'tokenizer': gen.tokenizer_identity, **scores}
  if out:
    out_dir = _out_dir(out, 'eval_inpaint')
    path = out_dir / 'eval_inpaint.json'
    for spec, outputs in pictures.items():
      first = images[:8]
      rows = [first, masks_lib.masked_view(first, masks[spec][:8])] + list(outputs.values())
      name = spec.replace(':', '_').replace('/', '_').replace(',', '_')
      vq_images.save_png(out_dir / f'inpaint_{name}.png',
                         vq_images.make_grid(rows, max_columns=8))
      results.setdefault('picture_rows', {})[spec] = ['original', 'masked'] + list(outputs)
  else:
    path = pathlib.Path(workdir).expanduser() / 'eval' / f'inpaint_step_{gen.step}.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2, sort_keys=True) + '\n')
  results['written'] = str(path)
  return results


def run(config: ml_collections.ConfigDict, mode: str, workdir: str, *, out: str | None,
        **flags) -> dict[str, Any]:
  """Dispatches an editing `mode` with run.py's flags (None when not given)."""
  if mode == 'inpaint':
    return inpaint_to_dir(config, workdir, out, mask=flags.get('mask'),
                          dataset=flags.get('dataset'), labels=flags.get('labels'),
                          samples_per_image=flags.get('samples_per_image'),
                          max_images=flags.get('max_images'), feather=flags.get('feather'),
                          widen=flags.get('widen'))
  if mode == 'edit':
    return edit_to_dir(config, workdir, out, target_label=flags.get('target_label'),
                       ratios=flags.get('ratios'), dataset=flags.get('dataset'),
                       max_images=flags.get('max_images'), mask=flags.get('mask'),
                       feather=flags.get('feather'), widen=flags.get('widen'))
  if mode == 'sample_large':
    return sample_large_to_dir(config, workdir, out, token_grid=flags.get('token_grid'),
                               labels=flags.get('labels'),
                               num_samples=flags.get('num_samples'))
  return eval_inpaint(config, workdir, out, mask=flags.get('mask'),
                      dataset=flags.get('dataset'), labels=flags.get('labels'),
                      max_images=flags.get('max_images'), feather=flags.get('feather'),
                      widen=flags.get('widen'))
