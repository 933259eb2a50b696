"""The training loop: restore-or-init, pmapped steps, logging, pictures, checkpoints and
test-split evaluations every `train.eval_every` steps.

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
import os
import pathlib
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from vq.config import builders
from vq.runtime import checkpointing
from vq.quantizers import usage as codebook_usage
from vq.config import validation as config_validation
from vq import data
from vq.evaluation import evaluator
from vq.core import images as vq_images
from vq.runtime import parallel
from vq.runtime import state as ts
from vq.training import step as steps
from vq.runtime import writers


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates `workdir` if needed and checks that it is writable (before any compile)."""
  path = pathlib.Path(workdir).expanduser().absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir={str(workdir)!r} cannot be created ({e.strerror}); '
                     'choose a directory you can write to.') from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir={str(workdir)!r} is not writable; choose a directory you '
                     'can write to or fix its permissions.')
  return path


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """The resolved config (overrides applied) as workdir/config.json."""
  if jax.process_index() == 0:
    tmp = workdir / 'config.json.tmp'
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
    os.replace(tmp, workdir / 'config.json')


def load_lpips_if_needed(config: ml_collections.ConfigDict) -> Any:
  """LPIPS weights when the training loss uses them, else None."""
  if not ts.uses_lpips(config):
    return None
  from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
  return lpips.load_pretrained_params()


def param_counts(params: Any) -> dict[str, int]:
  return {k: int(sum(np.size(x) for x in jax.tree.leaves(v))) for k, v in params.items()}


def open_train_source(config: ml_collections.ConfigDict) -> data.ImageSource:
  return data.open_source(config.data.dataset, image_size=config.data.image_size,
                          data_dir=config.data.data_dir or None, resize=config.data.resize,
                          download=config.data.download)


def open_eval_source(config: ml_collections.ConfigDict) -> data.ImageSource:
  return data.open_source(config.eval.dataset, image_size=config.data.image_size,
                          data_dir=config.data.data_dir or None, resize=config.data.resize,
                          download=config.data.download)


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
  workdir = prepare_workdir(workdir)
  is_main = jax.process_index() == 0
  writer = writers.create_writer(workdir, is_main=is_main)

  train_source = open_train_source(config)
  eval_source = open_eval_source(config)
  config_validation.validate_eval_size(config, len(eval_source))
  lpips_params = load_lpips_if_needed(config)
  image_shape = train_source.image_shape
  state = build_state(config, image_shape, lpips_params)
  config_json = json.loads(config.to_json_best_effort())
  ckpt_dir = workdir / 'checkpoints'
  ckpt = checkpointing.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints)
  try:
    state, start_step = ckpt.restore_or_init(state, config_json)
  except checkpointing.UnusableCheckpoints:
    if not reinit_unusable_checkpoints:
      raise
    ckpt.close()
    if is_main:  # one process moves the shared directory; the others wait for it
      aside = ckpt_dir.with_name(f'checkpoints.unusable-{time.strftime("%Y%m%d-%H%M%S")}')
      ckpt_dir.rename(aside)  # set aside, never deleted
      logging.warning('vq: unusable checkpoints moved to %s; starting from step 0.', aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('vq: unusable checkpoints set aside')
    ckpt = checkpointing.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints)
    start_step = 0
  write_config(config, workdir)

  global_batch = config.train.batch_size
  logging.info('vq: %d process(es), %d local device(s) of kind %s; global batch %d, %d per '
               'device; workdir %s', jax.process_count(), num_devices,
               jax.local_devices()[0].device_kind, global_batch,
               global_batch // (num_devices * jax.process_count()), workdir)
  logging.info('vq: objective %s; parameters per module: %s%s', config.objective,
               param_counts(state.params),
               f'; discriminator {param_counts(state.disc_params)}' if state.disc_params else '')
  logging.info('vq: starting at step %d of %d (%s)', start_step, config.train.num_steps,
               'resumed' if start_step else 'fresh')

  settings = steps.StepSettings.from_config(config)
  par = parallel.get(config.train.parallel)  # 'pmap' or 'jit': the same step either way
  p_step = par.step(functools.partial(steps.train_step, settings=settings))
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  p_rng = par.replicate(rng)
  p_state = par.replicate(state)
  del state

  grid_originals = np.stack([eval_source[i]['image'] for i in
                             range(min(config.eval.grid_images, len(eval_source)))])
  grid_originals = data.to_float(grid_originals)
  reconstruct = Reconstructor(config)

  batches = data.train_batches(
      train_source, global_batch_size=global_batch, num_local_devices=num_devices,
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), prefetch=config.data.prefetch)
  num_steps = config.train.num_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_secs=None, every_steps=config.train.log_every)
  meta = {'config': config_json, 'objective': config.objective}

  window: list[Any] = []
  window_first_step = start_step + 1
  window_start = time.perf_counter()
  window_steps = 0
  last: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  eval_lpips = lpips_params  # the training loss's LPIPS, or loaded once for evaluation
  if config.train.eval_every and config.eval.lpips and eval_lpips is None:
    from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
    eval_lpips = lpips.load_pretrained_params()
  preemption = _PreemptionFlag()

  def flush_window(done: int) -> None:
    """Host sync: average the window's metrics, refuse non-finite ones, log them."""
    nonlocal window, window_steps, window_start, window_first_step, last
    if not window:
      return
    host = jax.device_get([par.unreplicate(m) for m in window])
    elapsed = time.perf_counter() - window_start
    bad = [k for k in ('loss', 'grad_norm') if not all(np.isfinite(m[k]) for m in host)]
    if bad:
      good = ckpt.latest_step()
      raise FloatingPointError(
          f'non-finite {" and ".join(bad)} between steps {window_first_step} and {done}; the '
          f'state was not saved; last good checkpoint: '
          f'{"step " + str(good) if good is not None else "none"} in {ckpt.directory}. Lower '
          'train.learning_rate or set train.grad_clip, then rerun to resume from it.')
    last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    if window_steps:
      last['images_per_s'] = window_steps * global_batch / elapsed
      last['steps_per_s'] = window_steps / elapsed
    writer.write_scalars(done, last)
    logging.info('step %d: %s', done, ', '.join(f'{k}={v:.4g}' for k, v in sorted(last.items())))
    window, window_steps, window_start = [], 0, time.perf_counter()
    window_first_step = done + 1

  try:
    with preemption:
      for step in range(start_step, num_steps):
        batch = par.shard(next(batches))
        p_state, metrics = p_step(p_state, batch, p_rng)
        window.append(metrics)
        done = step + 1
        if step == start_step:
          # The first call compiles; time the loop from here so images/s means training.
          jax.block_until_ready(metrics)
          logging.info('vq: first step (compile + run) took %.1f s',
                       time.perf_counter() - window_start)
          window_start = time.perf_counter()
        else:
          window_steps += 1
        report(done)
        stopping = agreed_stop(preemption.requested, done)
        save_now = done % config.train.checkpoint_every == 0 or done == num_steps or stopping
        if done % config.train.log_every == 0 or save_now:
          flush_window(done)  # raises before a non-finite state can be saved
        if config.train.image_every and (done % config.train.image_every == 0
                                         or done == num_steps):
          host_state = par.to_host(p_state)
          recons = reconstruct(ts.eval_params(host_state), host_state.vq_stats, grid_originals)
          if is_main:
            grid = vq_images.make_grid([grid_originals, recons], max_columns=8)
            vq_images.save_png(workdir / 'images' / f'step_{done:07d}.png', grid)
            usage_image = codebook_usage.histogram_image(
                np.asarray(host_state.code_usage['counts_ema']))
            writer.write_images(done, {'reconstructions': grid[None],
                                       'codebook_usage': usage_image[None]})
        if save_now:
          ckpt.save(done, par.to_host(p_state), meta, force=stopping)
        if config.train.eval_every and not stopping and (
            done % config.train.eval_every == 0 or done == num_steps):
          last_eval = evaluate_during_training(config, par.to_host(p_state), done, workdir,
                                               writer, eval_source, eval_lpips)
        if stopping:
          ckpt.wait()
          cause = preemption.requested or 'a stop signal on another process'
          message = (f'vq: received {cause}; saved checkpoint at step {done} '
                     f'in {ckpt.directory}; rerun the same command to resume.')
          logging.warning('%s', message)
          print(message, flush=True)
          break
  finally:
    writer.flush()
    ckpt.close()
    batches.close()
  return {**last, **last_eval}


# With several processes, a stop signal is acted on only at steps all processes check
# together (an allgather of the flag), so that they save the same step and leave together
# instead of one host waiting forever in the next step's collectives.
PREEMPTION_SYNC_EVERY = 10


def agreed_stop(requested: str | None, done: int) -> bool:
  """Whether every process stops after step `done` (any process got a stop signal)."""
  if jax.process_count() == 1:
    return requested is not None
  if done % PREEMPTION_SYNC_EVERY:
    return False
  flags = multihost_utils.process_allgather(np.int32(requested is not None))
  return bool(np.any(flags))


class _PreemptionFlag:
  """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits cleanly."""

  def __init__(self):
    self.requested: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
