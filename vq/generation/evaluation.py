"""Evaluation of a token prior: held-out bits/token and the quality of its samples.

Usage sketch::

  results = evaluate(config, '/tmp/gpt')       # writes /tmp/gpt/eval/step_<N>.json
  results['test_bits_per_token'], results['fd_vgg'], results['precision'],
  results['classifier_accuracy'], results['reference_reconstructions']['fd_vgg']

What it reports (`EVALUATOR` names the conventions in every result):
- GPT: `test_bits_per_token`, the exact negative log2-likelihood of every held-out token
  grid under teacher forcing, averaged over all tokens (each grid once, its class given).
- MaskGIT: `test_masked_bits_per_token`: the same average over the masked tokens when a
  fixed `eval.mask_ratio` of each grid (positions drawn from a fixed seed per grid) is
  masked and predicted from the rest. A reconstruction loss, never a likelihood.
- On `eval.num_samples` class-balanced samples (labels 0, 1, ..., C-1, 0, ...; key
  `sample.seed`) decoded by the tokenizer, against the held-out images
  (`vq.evaluation.image_sets`): fd_vgg, precision, recall (k = 3, same VGG features),
  gfid (Inception, when its weights are installed), classifier_accuracy and
  classifier_score (vq's CIFAR-10 classifier, 32x32 only; `classifier_accuracy_real` is
  its accuracy on the held-out images themselves: the ceiling).
- References computed the same way: `reference_reconstructions` (the tokenizer's
  reconstructions of the held-out images: what a perfect prior could reach) and
  `reference_unigram` (grids of independent tokens drawn from the training tokens'
  histogram: what "no structure" scores; its classifier accuracy uses the same balanced
  labels, which it ignores).
- `sample_images_per_s`: samples per second of the sampler alone, after its compile, on
  this host's devices; `network_evaluations_per_image`: transformer passes per image.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vq import data
from vq.evaluation import image_sets
from vq.generation import generator as gen_lib
from vq.generation import priors
from vq.generation import sampling
from vq.generation import tokens as token_data
from vq.runtime import parallel

AXIS = parallel.AXIS
EVALUATOR = ('vq-prior-eval-1: bits/token in log2 over held-out grids (GPT: teacher forcing; '
             'MaskGIT: masked tokens at eval.mask_ratio); samples class-balanced, seed '
             'sample.seed; fd_vgg/precision/recall(k=3) on VGG16 relu5_3 avg-pooled; gfid on '
             'pytorch-fid Inception pool3; classifier metrics from vq.evaluation.classifier')


def _token_nll_step(kind: str, model, layout: priors.TokenLayout, mask_ratio: float,
                    seed: int):
  """(params, batch) -> psum over 'batch' of (nats, counted tokens) over valid rows."""
  num_masked = priors.fixed_ratio_num_masked(layout.length, mask_ratio)

  def step(params, batch):
    tokens, labels, valid = batch['tokens'], batch['label'], batch['mask']
    if kind == 'gpt':
      nll = priors.gpt_token_nll(model, params, layout, tokens, labels)
      weights = jnp.ones_like(nll)
    else:
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(batch['index'])
      scores = jax.vmap(lambda k: jax.random.uniform(k, (layout.length,)))(keys)
      mask = jnp.argsort(jnp.argsort(scores, axis=1), axis=1) < num_masked
      nll = priors.maskgit_token_nll(model, params, layout, tokens, labels, mask)
      weights = mask.astype(jnp.float32)
    weights = weights * valid[:, None].astype(jnp.float32)
    return jax.lax.psum({'nats': jnp.sum(nll * weights), 'count': jnp.sum(weights)}, AXIS)

  return step


def held_out_bits(config: ml_collections.ConfigDict, model, layout: priors.TokenLayout,
                  params: Any, split: token_data.TokenSplit) -> dict[str, float]:
  """{'test_bits_per_token'} (GPT) or {'test_masked_bits_per_token'} (MaskGIT)."""
  par = parallel.get('pmap')
  d = jax.local_device_count()
  b = max(d, config.eval.batch_size // d * d)
  fn = par.eval_step(_token_nll_step(config.objective, model, layout, config.eval.mask_ratio,
                                     config.seed))
  p_params = par.replicate(params)
  nats = count = 0.0
  start = 0
  for batch in token_data.eval_batches(split, global_batch_size=b, num_local_devices=d):
    batch['index'] = (start + np.arange(b)).reshape(d, b // d).astype(np.int32)
    start += b
    sums = par.to_host(fn(p_params, par.shard(batch)))
    nats += float(sums['nats'])
    count += float(sums['count'])
  bits = nats / max(count, 1.0) / math.log(2)
  if config.objective == 'gpt':
    return {'test_bits_per_token': bits}
  return {'test_masked_bits_per_token': bits}


def _held_out_images(config: ml_collections.ConfigDict, image_size: int, resize: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
  source = data.open_source(config.eval.dataset, image_size=image_size,
                            data_dir=config.data.data_dir or None, resize=resize,
                            download=config.data.download)
  if config.eval.max_examples:
    source = data.take(source, config.eval.max_examples)
  return source.get_many(range(len(source)))


def unigram_grids(train: token_data.TokenSplit, num: int, num_codes: int, seed: int
                  ) -> np.ndarray:
  """`num` grids of independent tokens drawn from the training tokens' histogram."""
  counts = np.bincount(train.tokens.ravel(), minlength=num_codes).astype(np.float64)
  rng = np.random.default_rng(seed)
  flat = rng.choice(num_codes, size=(num,) + train.tokens.shape[1:], p=counts / counts.sum())
  return flat.astype(np.int32)


def _settings_tag(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
  """'' for the sampler settings the prior was trained with, else e.g. '_guidance2.0'."""
  saved_path = workdir / 'config.json'
  if not saved_path.is_file():
    return ''
  saved = json.loads(saved_path.read_text()).get('sample', {})
  parts = [f'{k}{v}' for k, v in sorted(config.sample.to_dict().items())
           if k in saved and saved[k] != v and k not in ('batch_size',)]
  return ('_' + '_'.join(parts)) if parts else ''


def _write(path: pathlib.Path, results: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(results, indent=2, sort_keys=True, allow_nan=False) + '\n')
  os.replace(tmp, path)


def _references(config, gen: gen_lib.Generator, scorer, real, held_out, train, workdir
                ) -> dict[str, Any]:
  """Reconstruction and unigram references, cached per tokenizer and eval setting."""
  key = json.dumps({'tokenizer': gen.tokenizer_identity, 'dataset': config.eval.dataset,
                    'max_examples': config.eval.max_examples,
                    'num_samples': config.eval.num_samples, 'seed': config.sample.seed,
                    'evaluator': EVALUATOR, 'networks': sorted(scorer.networks)},
                   sort_keys=True)
  import hashlib  # pylint: disable=g-import-not-at-top
  path = workdir / 'eval' / f'references-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json'
  if path.is_file():
    cached = json.loads(path.read_text())
    if cached.get('key') == key:
      return cached['references']
  recon = gen.tokenizer.decode(held_out.tokens)
  refs = {'reference_reconstructions': scorer.score(scorer.features(recon), real,
                                                     labels=held_out.labels)}
  labels = gen_lib.balanced_labels(config.eval.num_samples, gen.layout.num_classes)
  grids = unigram_grids(train, config.eval.num_samples, gen.layout.num_codes,
                        config.sample.seed)
  refs['reference_unigram'] = scorer.score(scorer.features(gen.tokenizer.decode(grids)),
                                           real, labels=labels)
  refs['reference_unigram']['test_bits_per_token'] = priors.unigram_bits_per_token(
      train.tokens, held_out.tokens, gen.layout.num_codes)
  if jax.process_index() == 0:
    _write(path, {'key': key, 'references': refs})
  return refs


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None
             ) -> dict[str, Any]:
  """Evaluates the prior in `workdir` (latest checkpoint); writes eval/step_<N>.json."""
  from vq.generation import validation  # pylint: disable=g-import-not-at-top
  validation.validate(config, num_devices=jax.local_device_count(),
                      process_count=jax.process_count())
  workdir = pathlib.Path(workdir).expanduser().absolute()
  gen = gen_lib.Generator.from_workdir(workdir, config, step=step)
  _, _, train, held_out = token_data.prepare(config, workdir,
                                             saved_identity=gen.tokenizer_identity)
  results: dict[str, Any] = {'step': gen.step, 'objective': config.objective,
                             'evaluator': EVALUATOR, 'num_held_out': len(held_out),
                             'tokenizer': gen.tokenizer_identity,
                             'sample': config.sample.to_dict()}
  start = time.perf_counter()
  results.update(held_out_bits(config, gen.model, gen.layout, gen.params, held_out))
  if config.objective == 'maskgit':
    results['mask_ratio'] = float(config.eval.mask_ratio)
  logging.info('vq: held-out bits in %.1f s: %s', time.perf_counter() - start, results)

  settings = gen_lib.settings_from(config)
  labels = gen_lib.balanced_labels(config.eval.num_samples, gen.layout.num_classes)
  key = jax.random.PRNGKey(config.sample.seed)
  gen.sampler(gen.params, labels[:1], key, settings)            # compile, not timed
  start = time.perf_counter()
  grids = gen.sampler(gen.params, labels, key, settings)
  elapsed = time.perf_counter() - start
  results['sample_images_per_s'] = len(labels) / elapsed
  results['network_evaluations_per_image'] = sampling.network_evaluations(
      config.objective, gen.layout, settings)
  samples = gen.tokenizer.decode(grids.reshape((-1,) + tuple(gen.layout.grid)))

  scorer = image_sets.ImageSetScorer.create(
      inception=config.eval.gfid, classifier=config.eval.classifier,
      image_size=gen.tokenizer.image_size, batch_size=config.eval.batch_size)
  real_images, real_labels = _held_out_images(config, gen.tokenizer.image_size,
                                              bool(gen.tokenizer.config.data.resize))
  real = scorer.features(real_images)
  results.update(scorer.score(scorer.features(samples), real,
                              labels=labels if gen.layout.num_classes else None))
  if 'probs' in real and gen.layout.num_classes:
    results['classifier_accuracy_real'] = float(
        np.mean(np.argmax(real['probs'], axis=1) == real_labels))
  if config.eval.references:
    results.update(_references(config, gen, scorer, real, held_out, train, workdir))
  if jax.process_index() == 0:
    path = workdir / 'eval' / f'step_{gen.step}{_settings_tag(config, workdir)}.json'
    _write(path, results)
    logging.info('vq: wrote %s', path)
  return results
