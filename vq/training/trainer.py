"""Tokenizer training: `train_and_evaluate(config, workdir)` on top of `vq.runtime.loop`.

It builds the state, the step and the data, then runs the shared loop (restore-or-init,
pmapped steps, logging, checkpoints, preemption, the NaN guard) with two periodic hooks:
reconstruction pictures every `train.image_every` steps and test-split evaluations every
`train.eval_every` steps.

Usage sketch::

  from experiments import vqvae_cifar
  final_metrics = trainer.train_and_evaluate(vqvae_cifar.get_config('smoke'), '/tmp/vq')

Rerunning with the same workdir resumes from the latest checkpoint: the step, all
weights and optimizer/codebook/discriminator states come from the checkpoint, and the
PRNG stream and data order are functions of (seed, step), so they continue exactly.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from vq import data
from vq.config import builders
from vq.config import validation as config_validation
from vq.core import images as vq_images
from vq.evaluation import evaluator
from vq.quantizers import usage as codebook_usage
from vq.runtime import checkpointing
from vq.runtime import loop
from vq.runtime import parallel
from vq.runtime import state as ts
from vq.runtime import writers
from vq.training import step as steps


def load_lpips_if_needed(config: ml_collections.ConfigDict) -> Any:
  """LPIPS weights when the training loss uses them, else None."""
  if not ts.uses_lpips(config):
    return None
  from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
  return lpips.load_pretrained_params()


def open_train_source(config: ml_collections.ConfigDict) -> data.ImageSource:
  source = data.open_source(config.data.dataset, image_size=config.data.image_size,
                            data_dir=config.data.data_dir or None, resize=config.data.resize,
                            download=config.data.download)
  return data.in_memory(source, config.data.cache_mb * 2**20)


def open_eval_source(config: ml_collections.ConfigDict) -> data.ImageSource:
  source = data.open_source(config.eval.dataset, image_size=config.data.image_size,
                            data_dir=config.data.data_dir or None, resize=config.data.resize,
                            download=config.data.download)
  return data.in_memory(source, config.data.cache_mb * 2**20)


def build_state(config: ml_collections.ConfigDict, image_shape, lpips_params=None
                ) -> ts.TrainState:
  return ts.create_train_state(config, ts.init_key(config.seed), image_shape, lpips_params)


class Reconstructor:
  """Jitted single-device reconstruction for pictures (originals above reconstructions)."""

  def __init__(self, config: ml_collections.ConfigDict):
    model = builders.build_tokenizer(config)
    self._fn = jax.jit(lambda p, s, x: model.apply({'params': p, 'vq_stats': s}, x)[0])

  def __call__(self, params, vq_stats, images: np.ndarray) -> np.ndarray:
    return np.asarray(self._fn(params, vq_stats, images))


def evaluate_during_training(config: ml_collections.ConfigDict, state: ts.TrainState,
                             step: int, workdir: pathlib.Path, writer: Any,
                             eval_source: data.ImageSource, lpips_params: Any
                             ) -> dict[str, float]:
  """Test-split evaluation at `step` (train.eval_every): every process takes part.

  The metrics of `--mode=eval` (vq/evaluation/evaluator.py) on the EMA/plain eval params, with
  LPIPS and fd_vgg when `config.eval.lpips` (then `lpips_params` must be given); process 0
  writes eval/step_<N>.json and the numeric results as 'eval/<name>' scalars.

  Returns:
    The numeric results as {'eval/<name>': value}.
  """
  start = time.perf_counter()
  results = {'step': int(step), **evaluator.evaluate_params(
      config, ts.eval_params(state), state.vq_stats,
      lpips_params=lpips_params if config.eval.lpips else None, source=eval_source)}
  scalars = {f'eval/{k}': float(v) for k, v in results.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != 'step'}
  if jax.process_index() == 0:
    evaluator.write_results(workdir, results)
    writer.write_scalars(step, scalars)
  logging.info('vq: eval at step %d (%.1f s): %s', step, time.perf_counter() - start,
               ', '.join(f'{k}={v:.4g}' for k, v in sorted(scalars.items())))
  return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       reinit_unusable_checkpoints: bool = False) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if checkpoints exist); returns last metrics.

  Args:
    config: the experiment config.
    workdir: checkpoints, logs and images go here.
    reinit_unusable_checkpoints: if checkpoints exist but none can be restored, move them
      to `checkpoints.unusable-<time>` and start from step 0 (otherwise: an error).
  """
  num_devices = jax.local_device_count()
  config_validation.validate(config, num_devices=num_devices,
                             process_count=jax.process_count())
  workdir = loop.prepare_workdir(workdir)
  is_main = jax.process_index() == 0
  writer = writers.create_writer(workdir, is_main=is_main)

  train_source = open_train_source(config)
  eval_source = open_eval_source(config)
  config_validation.validate_eval_size(config, len(eval_source))
  lpips_params = load_lpips_if_needed(config)
  image_shape = train_source.image_shape
  state = build_state(config, image_shape, lpips_params)
  config_json = json.loads(config.to_json_best_effort())
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
  ckpt, state, start_step = loop.restore_or_init(
      ckpt, state, config_json, reinit_unusable=reinit_unusable_checkpoints)
  loop.write_config(config, workdir)

  global_batch = config.train.batch_size
  logging.info('vq: %d process(es), %d local device(s) of kind %s; global batch %d, %d per '
               'device; workdir %s', jax.process_count(), num_devices,
               jax.local_devices()[0].device_kind, global_batch,
               global_batch // (num_devices * jax.process_count()), workdir)
  logging.info('vq: objective %s; parameters per module: %s%s', config.objective,
               loop.param_counts(state.params),
               f'; discriminator {loop.param_counts(state.disc_params)}' if state.disc_params else '')
  logging.info('vq: starting at step %d of %d (%s)', start_step, config.train.num_steps,
               'resumed' if start_step else 'fresh')

  settings = steps.StepSettings.from_config(config)
  par = parallel.get(config.train.parallel)  # 'pmap' or 'jit': the same step either way
  p_step = par.step(functools.partial(steps.train_step, settings=settings))
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)

  grid_originals = np.stack([eval_source[i]['image'] for i in
                             range(min(config.eval.grid_images, len(eval_source)))])
  grid_originals = data.to_float(grid_originals)
  reconstruct = Reconstructor(config)

  def write_pictures(done: int, host_state: ts.TrainState) -> None:
    recons = reconstruct(ts.eval_params(host_state), host_state.vq_stats, grid_originals)
    if is_main:
      grid = vq_images.make_grid([grid_originals, recons], max_columns=8)
      vq_images.save_png(workdir / 'images' / f'step_{done:07d}.png', grid)
      usage_image = codebook_usage.histogram_image(
          np.asarray(host_state.code_usage['counts_ema']))
      writer.write_images(done, {'reconstructions': grid[None],
                                 'codebook_usage': usage_image[None]})

  last_eval: dict[str, float] = {}
  eval_lpips = lpips_params  # the training loss's LPIPS, or loaded once for evaluation
  if config.train.eval_every and config.eval.lpips and eval_lpips is None:
    from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
    eval_lpips = lpips.load_pretrained_params()

  def evaluate_now(done: int, host_state: ts.TrainState) -> None:
    nonlocal last_eval
    last_eval = evaluate_during_training(config, host_state, done, workdir, writer,
                                         eval_source, eval_lpips)

  batches = data.train_batches(
      train_source, global_batch_size=global_batch, num_local_devices=num_devices,
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), prefetch=config.data.prefetch)
  spec = loop.Loop(par=par, p_step=p_step, checkpointer=ckpt, writer=writer,
                   meta={'config': config_json, 'objective': config.objective},
                   num_steps=config.train.num_steps, log_every=config.train.log_every,
                   checkpoint_every=config.train.checkpoint_every,
                   throughput={'images_per_s': global_batch})
  last, _ = loop.run(spec, p_state=par.replicate(state), p_rng=par.replicate(rng),
                     batches=batches, start_step=start_step,
                     periodic=[loop.Periodic(config.train.image_every, write_pictures),
                               loop.Periodic(config.train.eval_every, evaluate_now)])
  return {**last, **last_eval}
