"""Training a token prior: `train_and_evaluate(config, workdir)` on `vq.runtime.loop`.

Usage sketch::

  config = vq.load_config('experiments/gpt_cifar.py',
                          {'prior.tokenizer_workdir': '/tmp/vqvae'})
  train_and_evaluate(config, '/tmp/gpt')     # resumes from /tmp/gpt when it has checkpoints

It reuses the tokenizer trainer's machinery: the same loop (pmapped or jitted step under
the 'batch' axis, orbax checkpoints, exact resume, SIGTERM save, the NaN guard, logs and
metrics.jsonl with progress and ETA), the same optimizer builder, the same data order
(`vq.data.train_plan`: batches are a function of seed and step). The tokenizer's grids
are encoded once into `<workdir>/tokens/` (`vq.generation.tokens`); every checkpoint
records which tokenizer made them, and a prior refuses to resume on another one.
Every `train.image_every` steps a class grid of samples (one row per class) goes to
`images/step_<N>.png` and TensorBoard; every `train.eval_every` steps the held-out
bits/token (`vq.generation.evaluation.token_nll`).
"""

from __future__ import annotations

import functools
import json

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from vq.core import images as vq_images
from vq.generation import evaluation
from vq.generation import generator as gen_lib
from vq.generation import priors
from vq.generation import tokens as token_data
from vq.generation import validation
from vq.runtime import loop
from vq.runtime import parallel
from vq.runtime import writers
from vq.training import step as tokenizer_step

AXIS = parallel.AXIS


def train_step(state: gen_lib.PriorState, batch: dict, rng: jax.Array, *, kind: str, model,
               layout: priors.TokenLayout, class_dropout: float
               ) -> tuple[gen_lib.PriorState, dict]:
  """One optimizer step on a batch of grids; gradients and metrics averaged over 'batch'."""
  key = tokenizer_step.step_rng(rng, state.step)

  def loss_fn(params):
    return priors.loss_and_metrics(kind, model, params, layout, batch['tokens'],
                                   batch['label'], key, class_dropout=class_dropout)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  metrics = jax.lax.pmean(metrics, AXIS)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                 param_norm=optax.global_norm(params))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       reinit_unusable_checkpoints: bool = False) -> dict[str, float]:
  """Trains the prior of `config` in `workdir` (resuming if checkpoints exist)."""
  num_devices = jax.local_device_count()
  validation.validate(config, num_devices=num_devices, process_count=jax.process_count())
  workdir = loop.prepare_workdir(workdir)
  is_main = jax.process_index() == 0
  ckpt = gen_lib.checkpointer(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
  latest = ckpt.latest_step()
  saved_identity = ckpt.read_meta(latest).get('tokenizer') if latest is not None else None
  tok, ident, train, held_out = token_data.prepare(config, workdir, saved_identity=saved_identity)
  layout = gen_lib.layout_for(config, tok)
  model = gen_lib.build_model(config, layout)
  state = gen_lib.create_state(config, model, layout, jax.random.PRNGKey(config.seed))
  config_json = json.loads(config.to_json_best_effort())
  ckpt, state, start_step = loop.restore_or_init(
      ckpt, state, config_json, reinit_unusable=reinit_unusable_checkpoints)
  loop.write_config(config, workdir)
  writer = writers.create_writer(workdir, is_main=is_main)

  batch = config.train.batch_size
  logging.info('vq: %s prior over %s tokens of %d codes (%d classes), %d parameters; %d '
               'training grids, %d held out; tokenizer step %d of %s', config.objective,
               'x'.join(map(str, layout.grid)), layout.num_codes, layout.num_classes,
               sum(loop.param_counts({'all': state.params}).values()), len(train),
               len(held_out), tok.step, config.prior.tokenizer_workdir)
  logging.info('vq: starting at step %d of %d (%s)', start_step, config.train.num_steps,
               'resumed' if start_step else 'fresh')

  par = parallel.get(config.train.parallel)
  p_step = par.step(functools.partial(train_step, kind=config.objective, model=model,
                                      layout=layout, class_dropout=config.prior.class_dropout))
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  sampler = gen_lib.Sampler(config.objective, model, layout, config.sample.batch_size)
  settings = gen_lib.settings_from(config)
  per_class = config.eval.grid_per_class
  grid_labels = (np.repeat(np.arange(layout.num_classes), per_class) if layout.num_classes
                 else gen_lib.balanced_labels(8 * per_class, 0))

  def write_samples(done: int, host_state: gen_lib.PriorState) -> None:
    grids = sampler(host_state.params, grid_labels,
                    jax.random.PRNGKey(config.sample.seed), settings)
    images = tok.decode(grids.reshape((-1,) + tuple(layout.grid)))
    if is_main:
      rows = max(layout.num_classes, 1)
      grid = vq_images.make_grid(list(images.reshape((rows, -1) + images.shape[1:])),
                                 max_columns=images.shape[0] // rows)
      vq_images.save_png(workdir / 'images' / f'step_{done:07d}.png', grid)
      writer.write_images(done, {'samples': grid[None]})

  last_eval: dict[str, float] = {}

  def evaluate_now(done: int, host_state: gen_lib.PriorState) -> None:
    nonlocal last_eval
    results = evaluation.held_out_bits(config, model, layout, host_state.params, held_out)
    last_eval = {f'eval/{k}': v for k, v in results.items()}
    writer.write_scalars(done, last_eval)
    logging.info('vq: eval at step %d: %s', done,
                 ', '.join(f'{k}={v:.4f}' for k, v in sorted(last_eval.items())))

  spec = loop.Loop(par=par, p_step=p_step, checkpointer=ckpt, writer=writer,
                   meta={'config': config_json, 'objective': config.objective,
                         'tokenizer': ident},
                   num_steps=config.train.num_steps, log_every=config.train.log_every,
                   checkpoint_every=config.train.checkpoint_every,
                   throughput={'images_per_s': batch, 'tokens_per_s': batch * layout.length})
  batches = token_data.token_batches(
      train, global_batch_size=batch, num_local_devices=num_devices, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  last, _ = loop.run(spec, p_state=par.replicate(state), p_rng=par.replicate(rng),
                     batches=batches, start_step=start_step,
                     periodic=[loop.Periodic(config.train.image_every, write_samples),
                               loop.Periodic(config.train.eval_every, evaluate_now)])
  return {**last, **last_eval}
