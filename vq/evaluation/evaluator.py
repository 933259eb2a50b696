"""Evaluation over a whole split: every example exactly once (padded, masked batches).

Usage sketch::

  results = evaluation.evaluate(config, workdir)   # latest checkpoint in workdir
  results['psnr'], results['lpips'], results['fd_vgg'], results['rfid'], results['evaluator']
  # also written to workdir/eval/step_<N>.json

Conventions (so numbers can be quoted; `EVALUATOR` names them in every result):
- Reconstructions are quantised exactly like a saved uint8 PNG
  (`metrics.to_pixel_range`), and originals are the dataset's uint8 pixels.
- PSNR: per image, 10 log10(255^2 / MSE) with the MSE over H, W, C, capped at 100 dB
  (`metrics.MAX_PSNR`, also the value of an exact reconstruction, so the mean stays finite),
  then averaged over images. SSIM: scikit-image's `structural_similarity(channel_axis=-1,
  data_range=255)` defaults (7x7 uniform window, K1 0.01, K2 0.03, sample covariance), per
  image, averaged. MSE: per image on the [0, 255] scale, averaged. LPIPS: VGG16 LPIPS v0.1 on [-1, 1].
- fd_vgg: Fréchet distance (`vq.evaluation.fid`, float64) between the originals' and the reconstructions'
  VGG16 relu5_3 activations, average-pooled over space (`LPIPS.pooled_features`, 512-d); the
  same VGG pass as LPIPS, so it comes with `eval.lpips`.
- rfid: the same distance on pytorch-fid's Inception pool3 (2048-d, inputs resized bilinearly
  to 299x299), in a second pass that runs only when the converted weights exist
  (`vq.perceptual.inception.load_params`); otherwise `rfid` is null and `rfid_unavailable` says why.
  With few examples (fewer than the feature dimension) the covariances are singular and these
  distances are biased upwards; compare them only at equal `num_examples`.
- bits_per_image: token grid h * w * bits per token (log2(num_codes) for VQ);
  compression_ratio: H * W * 24 bits of
  the uint8 RGB image over bits_per_image.
- Codebook usage: fraction of codes chosen at least once over the split; perplexity:
  exp(entropy) of the code histogram over the split.
- probe_accuracy (`eval.probe`): test top-1 of a linear softmax probe (`vq.evaluation.probe`) on the
  frozen quantized latents z_q, average-pooled to an `eval.probe_grid` square grid and
  flattened, trained on `eval.probe_train_dataset` (first `eval.probe_max_train` examples).

The originals' statistics for fd_vgg and rfid depend only on the data and the feature network,
so they are cached as .npz in `ref_stats_dir()` (keyed by the evaluator version, the feature
network's weights, the dataset spec, its size and `eval.max_examples`). When cached, the rfid pass
runs Inception on the reconstructions alone; the originals still go through VGG for LPIPS, so for
fd_vgg the cache only saves their transfer and accumulation.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vq.config import builders
from vq.runtime import checkpointing
from vq.config import validation as config_validation
from vq import data
from vq.evaluation import fid
from vq.perceptual import inception
from vq.core import metrics
from vq.runtime import parallel
from vq.evaluation import probe
from vq.evaluation import references
from vq.models import tokenizer
from vq.runtime import state as ts

AXIS = parallel.AXIS
EVALUATOR_VERSION = references.EVALUATOR_VERSION
EVALUATOR = (f'{EVALUATOR_VERSION}: psnr/ssim/mse on uint8 pixels, psnr capped at '
             f'{metrics.MAX_PSNR:g} dB (mse 0), ssim skimage-default; '
             'lpips vgg16 v0.1; fd_vgg vgg16 relu5_3 avgpool float64; rfid pytorch-fid '
             'inception pool3 bilinear-299; probe softmax l-bfgs on avg-pooled z_q')
FEATURE_VGG = 'vgg16_relu5_3_avgpool'
FEATURE_INCEPTION = 'inception_pool3'


# --- Steps (pure functions of replicated params and one sharded batch) ---


def _pool_latents(z_q: jax.Array, grid: int) -> jax.Array:
  """[N, h, w, D] -> [N, grid * grid * D]: mean over non-overlapping windows (0: no pooling)."""
  n, h, w, d = z_q.shape
  if grid:
    z_q = z_q.reshape(n, grid, h // grid, grid, w // grid, d).mean(axis=(2, 4))
  return z_q.reshape(n, -1)


def _gather(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
  # Over all devices of all processes, so every process sees every row of the batch.
  return jax.lax.all_gather(tree, AXIS, tiled=True)


def make_eval_step(config: ml_collections.ConfigDict, *, with_lpips: bool,
                   vgg_real: bool = True, probe_grid: int | None = None) -> Callable:
  """(params, vq_stats, lpips_params, batch) -> (metric sums over 'batch', gathered rows).

  Args:
    config: the experiment config (model and quantizer fields).
    with_lpips: compute LPIPS and the reconstructions' pooled VGG features ('vgg_fake').
    vgg_real: also return the originals' pooled VGG features ('vgg_real'); off when their
      statistics are cached.
    probe_grid: if not None, return pooled quantized latents ('probe') and labels.

  Returns:
    The step. Gathered rows (keys 'mask', plus the features above) are [global batch, ...],
    identical on every device.
  """
  model = builders.build_tokenizer(config)
  vocab, depth = model.quantizer.vocab_size, model.quantizer.index_depth
  lpips_module = None
  if with_lpips:
    from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
    lpips_module = lpips.LPIPS()

  def eval_step(params, vq_stats, lpips_params, batch):
    images, mask = batch['image'], batch['mask']
    recon, q = model.apply({'params': params, 'vq_stats': vq_stats}, images)
    x, y = metrics.to_pixel_range(images), metrics.to_pixel_range(recon)
    per_image = {'psnr': metrics.psnr(x, y), 'ssim': metrics.ssim(x, y),
                 'mse': metrics.mse(x, y)}
    rows = {'mask': batch['mask']}
    if lpips_module is not None:
      y_float = y / 127.5 - 1.0  # LPIPS on the reconstruction as it would be saved
      per_image['lpips'], rows['vgg_fake'], vgg_real_feats = lpips_module.apply(
          {'params': lpips_params}, y_float, images, method=lpips_module.distance_and_pooled)
      if vgg_real:
        rows['vgg_real'] = vgg_real_feats
    if probe_grid is not None:
      rows['probe'] = _pool_latents(q.quantized, probe_grid)
      rows['label'] = batch['label']
    # where, not a product: a padding row's value may be inf or NaN, and inf * 0 is NaN.
    sums = {k: jnp.sum(jnp.where(mask, v, 0.0)) for k, v in per_image.items()}
    mask = mask.astype(jnp.float32)
    sums['num_examples'] = jnp.sum(mask)
    # Residual VQ: level l's code k counts as entry l * vocab + k (as in QuantizerOutput.counts).
    flat = q.indices.reshape(mask.shape[0], -1, depth) + vocab * jnp.arange(depth)
    one_hot = jax.nn.one_hot(flat.reshape(mask.shape[0], -1), vocab * depth)
    sums['code_counts'] = jnp.einsum('nlk,n->k', one_hot, mask)
    return jax.lax.psum(sums, AXIS), _gather(rows)

  return eval_step


def _inception_features(inception_params: Any, images: jax.Array) -> jax.Array:
  """pytorch-fid pool3 features [N, 2048] of [-1, 1] images (resized to 299 inside)."""
  return inception.InceptionV3FID().apply({'params': inception_params}, images)


def make_inception_step(config: ml_collections.ConfigDict, *, with_real: bool) -> Callable:
  """(params, vq_stats, inception_params, batch) -> ({}, gathered 'fake'/'real'/'mask')."""
  model = builders.build_tokenizer(config)

  def step(params, vq_stats, inception_params, batch):
    images = batch['image']
    n = images.shape[0]
    recon, _ = model.apply({'params': params, 'vq_stats': vq_stats}, images)
    fake = metrics.to_pixel_range(recon) / 127.5 - 1.0
    # One joint batch: a single (large) trace of the network and bigger matmuls.
    feats = _inception_features(inception_params,
                                jnp.concatenate([images, fake]) if with_real else fake)
    rows = {'mask': batch['mask'], 'fake': feats[-n:]}
    if with_real:
      rows['real'] = feats[:n]
    return {}, _gather(rows)

  return step


def make_probe_step(config: ml_collections.ConfigDict, grid: int) -> Callable:
  """(params, vq_stats, batch) -> ({}, gathered 'probe'/'label'/'mask'): frozen z_q only."""
  model = builders.build_tokenizer(config)

  def step(params, vq_stats, batch):
    q = model.apply({'params': params, 'vq_stats': vq_stats}, batch['image'],
                    method=tokenizer.VQTokenizer.encode)
    return {}, _gather({'probe': _pool_latents(q.quantized, grid), 'label': batch['label'],
                        'mask': batch['mask']})

  return step


def _run_pass(name: str, p_step: Callable, replicated: tuple, source: data.ImageSource,
              batch_size: int, consume: Callable[[dict[str, np.ndarray]], None]) -> Any:
  """Streams `source` through `p_step`; returns the summed metrics (numpy).

  Each batch's gathered rows reach `consume` as host arrays one batch late, so the device
  works on batch i + 1 while the host accumulates batch i.
  """
  num_devices = jax.local_device_count()
  totals, pending = None, None
  n_batches = data.num_eval_batches(len(source), batch_size)
  start = time.perf_counter()
  for i, batch in enumerate(data.eval_batches(
      source, global_batch_size=batch_size, num_local_devices=num_devices,
      process_index=jax.process_index(), process_count=jax.process_count())):
    sums, gathered = p_step(*replicated, parallel.shard(batch))
    # Summed on the host: adding stacked arrays is a program on every device, which on
    # several CPU devices can deadlock (vq/runtime/parallel.py).
    sums = parallel.to_host(sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if pending is not None:
      consume(parallel.to_host(pending))
    pending = gathered
    if (i + 1) % max(1, n_batches // 10) == 0 or i + 1 == n_batches:
      rate = (i + 1) * batch_size / (time.perf_counter() - start)
      logging.info('eval %s: batch %d/%d (%.0f images/s, ETA %.0f s)', name, i + 1, n_batches,
                   rate, (n_batches - i - 1) * batch_size / max(rate, 1e-9))
  if pending is not None:
    consume(parallel.to_host(pending))
  return totals


# --- Results ---


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())


def _accumulate(accs: dict[str, fid.StatsAccumulator], name: str, feats: np.ndarray,
                mask: np.ndarray) -> None:
  if name not in accs:
    accs[name] = fid.StatsAccumulator(feats.shape[1])
  accs[name].add(feats, mask)


def _distance(accs: dict[str, fid.StatsAccumulator], cached: Any, key: str, prefix: str,
              results: dict[str, Any], name: str) -> None:
  """results[name] = FD(fake, real) from `accs`, caching the real statistics; null on failure."""
  try:
    if cached is None:
      mu_real, sigma_real = accs[f'{prefix}real'].statistics()
      references.save_reference_stats(key, mu_real, sigma_real, accs[f'{prefix}real'].count)
    else:
      mu_real, sigma_real = cached
    mu_fake, sigma_fake = accs[f'{prefix}fake'].statistics()
    results[name] = fid.frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)
  except ValueError as e:
    results[name] = None
    results[f'{name}_unavailable'] = _one_line(e)


def token_bits(config: ml_collections.ConfigDict, params: Any, vq_stats: Any,
               image_shape: tuple[int, int, int]) -> tuple[tuple[int, int], float, float]:
  """((h, w) token grid, bits per image, H * W * 24 / bits).

  Bits per image are h * w * the quantizer's `bits_per_token`: log2(K) for VQ, log2 of the
  product of the levels for FSQ, the number of bits for LFQ, depth * log2(K) for residual VQ.
  """
  model = builders.build_tokenizer(config)
  tokens = jax.eval_shape(
      lambda p, s, x: model.apply({'params': p, 'vq_stats': s}, x,
                                  method=tokenizer.VQTokenizer.tokenize),
      params, vq_stats, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))
  h, w = tokens.shape[1:3]
  bits = h * w * model.quantizer.bits_per_token
  return (h, w), bits, image_shape[0] * image_shape[1] * 24 / bits


def _check_eval_fields(config: ml_collections.ConfigDict) -> None:
  if not config.eval.probe:
    return
  grid = config.eval.probe_grid
  if not isinstance(grid, int) or grid < 0:
    raise ValueError(f'config.eval.probe_grid={grid!r} must be an int >= 0 (0: no pooling); '
                     'use e.g. 4.')
  if not isinstance(config.eval.probe_max_train, int) or config.eval.probe_max_train < 0:
    raise ValueError(f'config.eval.probe_max_train={config.eval.probe_max_train!r} must be an '
                     'int >= 0 (0: the whole split); use e.g. 10000.')


def _check_probe_grid(grid: int, token_grid: tuple[int, int]) -> None:
  h, w = token_grid
  if grid and (h % grid or w % grid):
    raise ValueError(f'config.eval.probe_grid={grid} does not divide the {h}x{w} token grid; '
                     'use a divisor of both sides, or 0 for no pooling.')


def _probe(config: ml_collections.ConfigDict, replicated: tuple, test_rows: list,
           test_labels: list, results: dict[str, Any]) -> None:
  """Adds probe_accuracy (or probe_unavailable) to `results`."""
  test_x, test_y = np.concatenate(test_rows), np.concatenate(test_labels)
  if not (test_y >= 0).any():
    results['probe_unavailable'] = f'{config.eval.dataset} has no labels (all -1)'
    return
  train_source = data.open_source(config.eval.probe_train_dataset,
                                  image_size=config.data.image_size,
                                  data_dir=config.data.data_dir or None,
                                  resize=config.data.resize, download=config.data.download)
  if config.eval.probe_max_train:
    train_source = data.take(train_source, config.eval.probe_max_train)
  rows, labels = [], []

  def consume(g):
    rows.append(g['probe'][g['mask']])
    labels.append(g['label'][g['mask']])

  p_step = parallel.pmap_eval_step(make_probe_step(config, config.eval.probe_grid))
  _run_pass('probe features', p_step, replicated, train_source, config.eval.batch_size, consume)
  train_x, train_y = np.concatenate(rows), np.concatenate(labels)
  if not (train_y >= 0).any():
    results['probe_unavailable'] = f'{config.eval.probe_train_dataset} has no labels (all -1)'
    return
  train_keep, test_keep = train_y >= 0, test_y >= 0
  num_classes = max(2, int(max(train_y.max(), test_y.max())) + 1)
  out = probe.linear_probe(train_x[train_keep], train_y[train_keep], test_x[test_keep],
                           test_y[test_keep], num_classes=num_classes)
  results['probe_accuracy'] = out['accuracy']
  results['probe_train_accuracy'] = out['train_accuracy']
  results['probe_num_train'] = int(train_keep.sum())
  results['probe_features'] = int(train_x.shape[1])


def evaluate_params(config: ml_collections.ConfigDict, params: Any, vq_stats: Any, *,
                    lpips_params: Any = None, inception_params: Any = None,
                    source: data.ImageSource | None = None) -> dict[str, Any]:
  """Metrics of (params, vq_stats) over `config.eval.dataset` (or `source`).

  Args:
    config: the experiment config.
    params: tokenizer params.
    vq_stats: the quantizer's statistics collection.
    lpips_params: LPIPS params (`vq.perceptual.lpips.load_pretrained_params()`); None skips lpips and
      fd_vgg.
    inception_params: Inception params; None loads them with `vq.perceptual.inception.load_params()`
      when `config.eval.rfid` is on.
    source: evaluate this source instead of opening `config.eval.dataset`.

  Returns:
    The results dict (keys in the module docstring and README).
  """
  if source is None:
    source = data.open_source(config.eval.dataset, image_size=config.data.image_size,
                              data_dir=config.data.data_dir or None,
                              resize=config.data.resize, download=config.data.download)
  config_validation.validate_eval_size(config, len(source))
  _check_eval_fields(config)
  if config.eval.max_examples:
    source = data.take(source, config.eval.max_examples)
  token_grid, bits, ratio = token_bits(config, params, vq_stats, source.image_shape)
  probe_grid = config.eval.probe_grid if config.eval.probe else None
  if probe_grid is not None:
    _check_probe_grid(probe_grid, token_grid)

  with_lpips = lpips_params is not None
  vgg_key, vgg_cached = None, None
  if with_lpips:
    vgg_key = references.reference_key(config, source, FEATURE_VGG, references.params_fingerprint(lpips_params))
    vgg_cached = references.load_reference_stats(vgg_key)
  p_eval = parallel.pmap_eval_step(make_eval_step(
      config, with_lpips=with_lpips, vgg_real=vgg_cached is None, probe_grid=probe_grid))
  replicated = parallel.replicate((params, vq_stats))
  accs: dict[str, fid.StatsAccumulator] = {}
  probe_rows, probe_labels = [], []

  def consume(g):
    if with_lpips:
      _accumulate(accs, 'vgg_fake', g['vgg_fake'], g['mask'])
      if 'vgg_real' in g:
        _accumulate(accs, 'vgg_real', g['vgg_real'], g['mask'])
    if probe_grid is not None:
      probe_rows.append(g['probe'][g['mask']])
      probe_labels.append(g['label'][g['mask']])

  totals = _run_pass('metrics', p_eval,
                     replicated + parallel.replicate((lpips_params if with_lpips else {},)),
                     source, config.eval.batch_size, consume)
  n = float(totals['num_examples'])
  counts = np.asarray(totals['code_counts'])
  results = {
      'dataset': config.eval.dataset,
      'num_examples': int(round(n)),
      'psnr': float(totals['psnr'] / n),
      'ssim': float(totals['ssim'] / n),
      'mse': float(totals['mse'] / n),
      'codebook_usage': float(metrics.codebook_usage(counts)),
      'perplexity': float(metrics.perplexity(counts)),
      'num_codes': int(counts.shape[0]),
      'token_grid': list(token_grid),
      'bits_per_image': float(bits),
      'compression_ratio': float(ratio),
      'evaluator': EVALUATOR,
  }
  if with_lpips:
    results['lpips'] = float(totals['lpips'] / n)
    _distance(accs, vgg_cached, vgg_key, 'vgg_', results, 'fd_vgg')
  if config.eval.rfid:
    _rfid(config, replicated, inception_params, source, results)
  if probe_grid is not None:
    _probe(config, replicated, probe_rows, probe_labels, results)
  return results


def _rfid(config: ml_collections.ConfigDict, replicated: tuple, inception_params: Any,
          source: data.ImageSource, results: dict[str, Any]) -> None:
  """Adds rfid (or rfid: None and rfid_unavailable) to `results`; never raises for weights."""
  if inception_params is None:
    try:
      inception_params = inception.load_params()
    except (inception.InceptionWeightsMissing, ValueError) as e:
      logging.warning('rfid skipped: %s', _one_line(e))
      results['rfid'] = None
      results['rfid_unavailable'] = _one_line(e)
      return
  key = references.reference_key(config, source, FEATURE_INCEPTION, references.params_fingerprint(inception_params))
  cached = references.load_reference_stats(key)
  accs: dict[str, fid.StatsAccumulator] = {}

  def consume(g):
    _accumulate(accs, 'fake', g['fake'], g['mask'])
    if 'real' in g:
      _accumulate(accs, 'real', g['real'], g['mask'])

  p_step = parallel.pmap_eval_step(make_inception_step(config, with_real=cached is None))
  _run_pass('rfid', p_step, replicated + parallel.replicate((inception_params,)), source,
            config.eval.batch_size, consume)
  _distance(accs, cached, key, '', results, 'rfid')


def write_results(workdir: pathlib.Path, results: dict[str, Any]) -> pathlib.Path:
  out_dir = workdir / 'eval'
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"step_{results['step']}.json"
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + '\n')
  os.replace(tmp, path)
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the latest checkpoint in `workdir`, evaluates, writes eval/step_<N>.json."""
  config_validation.validate(config, num_devices=jax.local_device_count(),
                             process_count=jax.process_count())
  workdir = pathlib.Path(workdir).expanduser().absolute()
  ckpt_dir = workdir / 'checkpoints'
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(
        f'--mode=eval: no checkpoints in {ckpt_dir}; train first with the same --config '
        f'and --workdir={workdir}.')
  ckpt = checkpointing.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(
        f'--mode=eval: no checkpoints in {ckpt_dir}; train first with the same --config '
        f'and --workdir={workdir}.')
  lpips_params = None
  if config.eval.lpips:
    from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
    lpips_params = lpips.load_pretrained_params()
  size = config.data.image_size
  # Only the structure is needed to restore (no initialiser runs); the frozen LPIPS
  # weights are never checkpointed, so an empty stand-in fills the VQ-GAN state.
  target = jax.eval_shape(lambda: ts.create_train_state(
      config, ts.init_key(0), (size, size, 3), {} if ts.uses_lpips(config) else None))
  state, _ = ckpt.restore(step, target)
  ckpt.close()
  results = {'step': int(step), **evaluate_params(config, ts.eval_params(state), state.vq_stats,
                                                   lpips_params=lpips_params)}
  if jax.process_index() == 0:
    path = write_results(workdir, results)
    logging.info('eval results written to %s', path)
  return results
