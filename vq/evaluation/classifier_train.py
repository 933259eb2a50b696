r"""Trains `vq.evaluation.classifier.Classifier` on CIFAR-10 and writes its weights.

  TFDS_DATA_DIR=/tmp/tfds python -m vq.evaluation.classifier_train \
      --out=/tmp/cifar10_classifier.npz

writes the weights (`classifier.save_classifier`) and, beside them, a .json with the test
accuracy over the whole test split, the command, steps, seconds and machine.

  TFDS_DATA_DIR=/tmp/tfds python -m vq.evaluation.classifier_train --evaluate=default

prints the shipped weights' metrics on the real test images instead (accuracy overall and per
class, `classifier_score`, and both on the first 200 images), as one JSON line.

Recipe: the training split through `vq.data.train_batches` (a pure function of the seed and
step), augmented inside the jitted step with random 32x32 crops of the image padded by 4 black
pixels and random horizontal flips; SGD with Nesterov momentum 0.9 and L2 weight decay on
the kernels (added to the gradient, as torch's SGD does), the learning rate warmed up linearly
and then decayed to 0 on a cosine; softmax cross-entropy. One seed fixes the initialisation,
the data order and the augmentation. The test accuracy is measured through
`classifier.predict_probs` on the uint8 test images, the same path the metrics use.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vq import data
from vq.evaluation import classifier

_OUT = flags.DEFINE_string('out', None, 'Where to write the weights (.npz); a .json goes beside.')
_EVALUATE = flags.DEFINE_string('evaluate', None, 'Instead of training, print the metrics of '
                                "these weights ('default': the shipped ones) on --test_dataset.")
_TRAIN = flags.DEFINE_string('train_dataset', 'tfds:cifar10:train', 'Training data spec.')
_TEST = flags.DEFINE_string('test_dataset', 'tfds:cifar10:test', 'Test data spec.')
_EPOCHS = flags.DEFINE_float('epochs', 6.0, 'Passes over the training split.')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Examples per step.')
_LR = flags.DEFINE_float('lr', 0.2, 'Peak learning rate.')
_WARMUP = flags.DEFINE_float('warmup_epochs', 0.5, 'Linear warm-up, in epochs.')
_WD = flags.DEFINE_float('weight_decay', 5e-4, 'L2 weight decay on the kernels.')
_LABEL_SMOOTHING = flags.DEFINE_float('label_smoothing', 0.0, 'Label smoothing (0 keeps the '
                                      'predicted probabilities unsoftened for the score).')
_WIDTHS = flags.DEFINE_list('widths', [str(w) for w in classifier.DEFAULT_WIDTHS],
                            'Stem width, then one width per block.')
_SEED = flags.DEFINE_integer('seed', 0, 'Initialisation, data order and augmentation.')
_MAX_TRAIN = flags.DEFINE_integer('max_train_examples', 0, 'Use only the first N (0: all).')
_MAX_TEST = flags.DEFINE_integer('max_test_examples', 0, 'Test on the first N only (0: all).')
_LOG_EVERY = flags.DEFINE_integer('log_every', 50, 'Steps between progress lines.')
_MACHINE = flags.DEFINE_string('machine', None, 'What to record as the machine (default: '
                               'the CPU count and architecture, or the accelerator).')

# Black in [-1, 1]: what zero-padding a uint8 image before cropping gives.
_PAD_VALUE = -1.0


def augment(images: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
  """Random crops of the `pad`-padded images and random horizontal flips, per example.

  Args:
    images: float [N, H, W, C] in [-1, 1].
    key: PRNG key.
    pad: border width; offsets are uniform in [0, 2 * pad] on each axis.

  Returns:
    float [N, H, W, C].
  """
  n, h, w, c = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                   constant_values=_PAD_VALUE)
  offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
  crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (n,))
  return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int,
                   weight_decay: float) -> optax.GradientTransformation:
  """SGD (Nesterov, 0.9) with weight decay on >= 2-D parameters and a warm-up + cosine rate."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(1, warmup_steps), decay_steps=max(total_steps, warmup_steps + 1),
      end_value=0.0)
  # BatchNorm scales and biases stay undecayed: shrinking them only fights the normalisation.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=0.9, nesterov=True))


def init_state(model: classifier.Classifier, tx: optax.GradientTransformation,
               seed: int) -> dict[str, Any]:
  """{'params', 'batch_stats', 'opt_state', 'step'} for `model` initialised from `seed`."""
  variables = model.init(jax.random.key(seed),
                         jnp.zeros((1,) + classifier.IMAGE_SHAPE, jnp.float32))
  return state_from_variables(variables, tx)


def state_from_variables(variables: dict[str, Any],
                         tx: optax.GradientTransformation) -> dict[str, Any]:
  """The training state at step 0 for given {'params', 'batch_stats'}."""
  return {'params': variables['params'], 'batch_stats': variables['batch_stats'],
          'opt_state': tx.init(variables['params']), 'step': jnp.zeros((), jnp.int32)}


def make_train_step(model: classifier.Classifier, tx: optax.GradientTransformation, *,
                    label_smoothing: float = 0.0, seed: int = 0,
                    augment_images: bool = True) -> Callable:
  """Returns jitted `step(state, images, labels) -> (state, {'loss', 'accuracy'})`.

  Args:
    model: the network.
    tx: the optimizer (`make_optimizer`).
    label_smoothing: mass spread evenly over all classes in the targets.
    seed: the augmentation of step s uses fold_in(key(seed), s).
    augment_images: crop and flip (off for tests that need a fixed batch).
  """
  aug_key = jax.random.key(seed + 1)  # Not the initialisation's key.

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    targets = optax.smooth_labels(jax.nn.one_hot(labels, model.num_classes), label_smoothing)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, (updates['batch_stats'], accuracy)

  @jax.jit
  def step(state, images, labels):
    if augment_images:
      images = augment(images, jax.random.fold_in(aug_key, state['step']))
    (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['batch_stats'], images, labels)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'params': optax.apply_updates(state['params'], updates),
                 'batch_stats': batch_stats, 'opt_state': opt_state, 'step': state['step'] + 1}
    return new_state, {'loss': loss, 'accuracy': accuracy}

  return step


def test_predictions(net: classifier.LoadedClassifier, source: data.ImageSource, *,
                     batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """(probs [N, 10], labels [N]) over every example of `source`, via `predict_probs`."""
  probs, labels = [], []
  for batch in data.eval_batches(source, global_batch_size=batch_size, num_local_devices=1):
    mask = batch['mask'][0]
    images = data.to_uint8(batch['image'][0][mask])  # Exact inverse of the loader's to_float.
    probs.append(classifier.predict_probs(net, images, batch_size=batch_size))
    labels.append(batch['label'][0][mask])
  return np.concatenate(probs), np.concatenate(labels)


def test_accuracy(net: classifier.LoadedClassifier, source: data.ImageSource, *,
                  batch_size: int = 500) -> float:
  """Top-1 accuracy over every example of `source`, through `classifier.predict_probs`."""
  probs, labels = test_predictions(net, source, batch_size=batch_size)
  return float(np.mean(np.argmax(probs, axis=1) == labels))


def evaluate_weights(path: str | os.PathLike[str] | None, test_spec: str, *,
                     first: int = 200) -> dict[str, Any]:
  """The metrics of stored weights on real test images (what samples can be compared with).

  Returns:
    {'classifier_accuracy', 'classifier_score', 'per_class_accuracy' [10],
    'first_<first>_accuracy', 'first_<first>_score', 'test_examples', 'seconds'}.
  """
  start = time.time()
  net = classifier.load_classifier(path)
  probs, labels = test_predictions(net, data.open_source(test_spec, image_size=32))
  correct = np.argmax(probs, axis=1) == labels
  return {
      'classifier_accuracy': classifier.classifier_accuracy(probs, labels),
      'classifier_score': classifier.classifier_score(probs),
      'per_class_accuracy': [round(float(np.mean(correct[labels == c])), 4)
                             for c in range(classifier.NUM_CLASSES)],
      f'first_{first}_accuracy': classifier.classifier_accuracy(probs[:first], labels[:first]),
      f'first_{first}_score': classifier.classifier_score(probs[:first]),
      'test_examples': int(len(labels)),
      'seconds': round(time.time() - start, 1),
  }


def machine_description() -> str:
  """E.g. '2-core x86_64 CPU' or the accelerator's device kind."""
  if jax.default_backend() == 'cpu':
    return f'{os.cpu_count()}-core {platform.machine()} CPU'
  return f'{jax.device_count()} x {jax.devices()[0].device_kind}'


def train(*, out: str | os.PathLike[str], train_spec: str, test_spec: str, epochs: float,
          batch_size: int, lr: float, warmup_epochs: float, weight_decay: float,
          label_smoothing: float, widths: Sequence[int], seed: int,
          max_train_examples: int = 0, max_test_examples: int = 0, log_every: int = 50,
          machine: str | None = None, command: str = '') -> dict[str, Any]:
  """Trains, measures the test accuracy, writes the .npz and .json; returns the record."""
  widths = tuple(int(w) for w in widths)
  if len(widths) < 2 or min(widths) < 1:
    raise ValueError(f'widths must be a stem width and at least one block width, all >= 1; saw '
                     f'{widths}; e.g. --widths=24,32,64,128.')
  if not epochs > 0:
    raise ValueError(f'epochs must be > 0; saw {epochs}.')
  out = pathlib.Path(out)
  if out.suffix != '.npz':
    raise ValueError(f'--out must name an .npz file; saw {str(out)!r}; e.g. '
                     '--out=/tmp/cifar10_classifier.npz.')
  train_source = data.open_source(train_spec, image_size=32)
  test_source = data.open_source(test_spec, image_size=32)
  for name, source in (('train', train_source), ('test', test_source)):
    if source.num_classes != classifier.NUM_CLASSES:
      raise ValueError(f'The {name} data {source.description} has {source.num_classes} classes; '
                       f'the classifier needs {classifier.NUM_CLASSES} (CIFAR-10).')
  if max_train_examples:
    train_source = data.take(train_source, max_train_examples)
  if max_test_examples:
    test_source = data.take(test_source, max_test_examples)
  steps_per_epoch = len(train_source) // batch_size
  total_steps = max(1, round(epochs * steps_per_epoch))
  warmup_steps = round(warmup_epochs * steps_per_epoch)
  model = classifier.Classifier(widths=widths)
  tx = make_optimizer(lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                      weight_decay=weight_decay)
  state = init_state(model, tx, seed)
  step_fn = make_train_step(model, tx, label_smoothing=label_smoothing, seed=seed)
  logging.info('Classifier widths %s: %d parameters; %d steps of %d (%d per epoch).', widths,
               classifier.num_params(state), total_steps, batch_size, steps_per_epoch)
  batches = data.train_batches(train_source, global_batch_size=batch_size, num_local_devices=1,
                               seed=seed, num_threads=1)
  start = time.time()
  window_start, window = start, []
  for step, batch in zip(range(total_steps), batches):
    state, metrics = step_fn(state, jnp.asarray(batch['image'][0]),
                             jnp.asarray(batch['label'][0]))
    window.append(metrics)
    if (step + 1) % log_every == 0 or step + 1 == total_steps:
      means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      now = time.time()
      logging.info('step %d/%d (epoch %.2f) loss %.4f train_acc %.4f | %.1f img/s, %.0f s',
                   step + 1, total_steps, (step + 1) / steps_per_epoch, means['loss'],
                   means['accuracy'], len(window) * batch_size / (now - window_start),
                   now - start)
      window_start, window = now, []
  batches.close()
  train_seconds = time.time() - start
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  classifier.save_classifier(out, widths, variables)
  net = classifier.load_classifier(out)  # Measure exactly what was written.
  accuracy = test_accuracy(net, test_source)
  record = {
      'test_accuracy': accuracy,
      'test_examples': len(test_source),
      'test_dataset': test_spec,
      'train_dataset': train_spec,
      'train_examples': len(train_source),
      'command': command,
      'steps': total_steps,
      'batch_size': batch_size,
      'epochs': epochs,
      'widths': list(widths),
      'num_params': classifier.num_params(variables),
      'train_seconds': round(train_seconds, 1),
      'total_seconds': round(time.time() - start, 1),
      'machine': machine or machine_description(),
      'jax_version': jax.__version__,
  }
  out.with_suffix('.json').write_text(json.dumps(record, indent=2) + '\n')
  logging.info('Test accuracy %.4f on %d images; wrote %s', accuracy, len(test_source), out)
  return record


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _EVALUATE.value:
    path = None if _EVALUATE.value == 'default' else _EVALUATE.value
    print(json.dumps(evaluate_weights(path, _TEST.value)))
    return
  if not _OUT.value:
    raise app.UsageError('Pass --out=/tmp/cifar10_classifier.npz (or --evaluate=default).')
  command = ' '.join(['python -m vq.evaluation.classifier_train'] + sys.argv[1:])
  train(out=_OUT.value, train_spec=_TRAIN.value, test_spec=_TEST.value, epochs=_EPOCHS.value,
        batch_size=_BATCH.value, lr=_LR.value, warmup_epochs=_WARMUP.value,
        weight_decay=_WD.value, label_smoothing=_LABEL_SMOOTHING.value,
        widths=[int(w) for w in _WIDTHS.value], seed=_SEED.value,
        max_train_examples=_MAX_TRAIN.value, max_test_examples=_MAX_TEST.value,
        log_every=_LOG_EVERY.value, machine=_MACHINE.value, command=command)


if __name__ == '__main__':
  app.run(main)
