"""Evaluation over a whole split: every example exactly once (padded, masked batches).

Usage sketch::

  results = evaluation.evaluate(config, workdir)   # latest checkpoint in workdir
  results['psnr'], results['ssim'], results['codebook_usage']
  # also written to workdir/eval/step_<N>.json

Conventions (so numbers can be quoted):
- Reconstructions are quantised exactly like a saved uint8 PNG
  (`metrics.to_pixel_range`), and originals are the dataset's uint8 pixels.
- PSNR: per image, 10 log10(255^2 / MSE) with the MSE over H, W, C, then averaged over
  images. SSIM: scikit-image's `structural_similarity(channel_axis=-1, data_range=255)`
  defaults (7x7 uniform window, K1 0.01, K2 0.03, sample covariance), per image, averaged.
  MSE: per image on the [0, 255] scale, averaged. LPIPS: VGG16 LPIPS v0.1 on [-1, 1].
- Codebook usage: fraction of codes chosen at least once over the split; perplexity:
  exp(entropy) of the code histogram over the split.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vq import builders
from vq import checkpointing
from vq import config_validation
from vq import data
from vq import metrics
from vq import parallel
from vq import train_state as ts

AXIS = parallel.AXIS


def make_eval_step(config: ml_collections.ConfigDict, *, with_lpips: bool):
  """(params, vq_stats, lpips_params, batch) -> summed metrics over 'batch'."""
  model = builders.build_tokenizer(config)
  num_codes = config.quantizer.num_codes
  lpips_module = None
  if with_lpips:
    from vq import lpips  # pylint: disable=g-import-not-at-top
    lpips_module = lpips.LPIPS()

  def eval_step(params, vq_stats, lpips_params, batch):
    images, mask = batch['image'], batch['mask'].astype(jnp.float32)
    recon, q = model.apply({'params': params, 'vq_stats': vq_stats}, images)
    x, y = metrics.to_pixel_range(images), metrics.to_pixel_range(recon)
    per_image = {'psnr': metrics.psnr(x, y), 'ssim': metrics.ssim(x, y),
                 'mse': metrics.mse(x, y)}
    if lpips_module is not None:
      y_float = y / 127.5 - 1.0  # LPIPS on the reconstruction as it would be saved
      per_image['lpips'] = lpips_module.apply({'params': lpips_params}, y_float, images)
    sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
    sums['num_examples'] = jnp.sum(mask)
    one_hot = jax.nn.one_hot(q.indices.reshape(mask.shape[0], -1), num_codes)
    sums['code_counts'] = jnp.einsum('nlk,n->k', one_hot, mask)
    return jax.lax.psum(sums, AXIS)

  return eval_step


def evaluate_params(config: ml_collections.ConfigDict, params: Any, vq_stats: Any, *,
                    lpips_params: Any = None, source: data.ImageSource | None = None
                    ) -> dict[str, Any]:
  """Metrics of (params, vq_stats) over `config.eval.dataset` (or `source`)."""
  num_devices = jax.local_device_count()
  if source is None:
    source = data.open_source(config.eval.dataset, image_size=config.data.image_size,
                              data_dir=config.data.data_dir or None,
                              resize=config.data.resize, download=config.data.download)
  config_validation.validate_eval_size(config, len(source))
  if config.eval.max_examples:
    source = data.take(source, config.eval.max_examples)
  with_lpips = lpips_params is not None
  p_eval = parallel.pmap_eval_step(make_eval_step(config, with_lpips=with_lpips))
  replicated = parallel.replicate((params, vq_stats, lpips_params if with_lpips else {}))
  totals = None
  n_batches = data.num_eval_batches(len(source), config.eval.batch_size)
  start = time.perf_counter()
  for i, batch in enumerate(data.eval_batches(
      source, global_batch_size=config.eval.batch_size, num_local_devices=num_devices,
      process_index=jax.process_index(), process_count=jax.process_count())):
    sums = p_eval(*replicated, parallel.shard(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if (i + 1) % max(1, n_batches // 10) == 0 or i + 1 == n_batches:
      rate = (i + 1) * config.eval.batch_size / (time.perf_counter() - start)
      logging.info('eval: batch %d/%d (%.0f images/s, ETA %.0f s)', i + 1, n_batches, rate,
                   (n_batches - i - 1) * config.eval.batch_size / max(rate, 1e-9))
  totals = jax.device_get(parallel.unreplicate(totals))
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
  }
  if with_lpips:
    results['lpips'] = float(totals['lpips'] / n)
  return results


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
    from vq import lpips  # pylint: disable=g-import-not-at-top
    lpips_params = lpips.load_pretrained_params()
  target = ts.create_train_state(config, ts.init_key(0),
                                 (config.data.image_size, config.data.image_size, 3),
                                 lpips_params if ts.uses_lpips(config) else None)
  state, _ = ckpt.restore(step, target)
  ckpt.close()
  results = {'step': int(step), **evaluate_params(config, ts.eval_params(state), state.vq_stats,
                                                   lpips_params=lpips_params)}
  if jax.process_index() == 0:
    path = write_results(workdir, results)
    logging.info('eval results written to %s', path)
  return results
