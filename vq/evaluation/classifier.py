r"""A small CIFAR-10 classifier trained by vq, and the class-fidelity metrics built on it.

Usage sketch::

  from vq.evaluation import classifier

  net = classifier.load_classifier()               # the weights shipped in weights/
  probs = classifier.predict_probs(net, images)    # uint8 [N, 32, 32, 3] -> float64 [N, 10]
  classifier.classifier_accuracy(probs, labels)    # how often the asked-for class is the top-1
  classifier.classifier_score(probs)               # exp(E_x KL(p(y|x) || p(y))), in [1, 10]
  classifier.class_fidelity(net, images, labels)   # both, as a dict

The metrics are meant for class-conditional samples: `labels` are the classes the samples were
asked for. `classifier_score` is the Inception-Score formula evaluated on this classifier rather
than on Inception, over all samples at once (no splits); its numbers are not comparable with
published Inception Scores, only with each other.

Model (`Classifier`): a ResNet-9-style network for 32x32 inputs (after Page's DAWNBench ResNet-9
and Jordan's airbench): a 3x3 stem conv, then one block per width, each a 3x3 conv, 2x2 max
pool, BatchNorm and GELU followed by a residual branch (3x3 conv, BatchNorm, GELU) added back,
then a global max pool and a linear head scaled by 1/8. BatchNorm uses batch statistics while
training and its running averages otherwise, so prediction is deterministic and per-example.
Inputs are uint8 pixels mapped to [-1, 1] with `vq.data.to_float`.

Shipped weights (`DEFAULT_WEIGHTS`; `cifar10_classifier.json` beside them records the accuracy,
command, steps, seconds and machine): widths (24, 32, 64, 128), 295,480 parameters (1.2 MB),
trained for 6 epochs (1,170 steps of 256) in 3,813 s on the 2-core CPU dev machine while other
jobs shared it (load average 8-15) with::

  TFDS_DATA_DIR=/tmp/tfds python -m vq.evaluation.classifier_train \
      --out=/tmp/wte/run1/cifar10_classifier.npz --epochs=6

Test accuracy: 82.67% on all 10,000 CIFAR-10 test images (tfds 'cifar10:test'), per class
airplane 86.6, automobile 92.0, bird 72.5, cat 64.0, deer 81.0, dog 78.1, frog 86.8, horse 84.7,
ship 91.1, truck 89.9%. On those 10,000 real images `classifier_score` is 5.98; on the first 200,
accuracy 80.5% and score 5.61 (`python -m vq.evaluation.classifier_train --evaluate`, same
machine).
Accuracies of samples are best read against these per-class numbers.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, NamedTuple, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vq import data
from vq.core import weights
from vq.models import conv

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
DEFAULT_WIDTHS = (24, 32, 64, 128)
DEFAULT_WEIGHTS = pathlib.Path(__file__).resolve().parent / 'weights' / 'cifar10_classifier.npz'
# Keys of the stored file: the network's variables under these prefixes, the widths apart.
_WIDTHS_KEY = 'widths'
_COLLECTIONS = ('params', 'batch_stats')
# A logit scale below 1 keeps the initial softmax soft with BatchNorm'd features (airbench).
_HEAD_SCALE = 0.125


class Classifier(nn.Module):
  """ResNet-9-style CIFAR classifier; float images in [-1, 1] -> logits.

  Attributes:
    widths: channels of the stem, then of each block (each block halves the resolution).
    num_classes: outputs.
  """
  widths: Sequence[int] = DEFAULT_WIDTHS
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits [N, num_classes] for float32 images [N, H, W, 3] in [-1, 1]."""

    def conv_bn_gelu(y, width, pool=False):
      y = conv.Conv(width, (3, 3), use_bias=False)(y)
      if pool:  # Pooling before the norm: BatchNorm then sees the pooled statistics.
        y = nn.max_pool(y, (2, 2), (2, 2))
      y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(y)
      return nn.gelu(y)

    x = conv_bn_gelu(x, self.widths[0])
    for width in self.widths[1:]:
      x = conv_bn_gelu(x, width, pool=True)
      x = x + conv_bn_gelu(x, width)
    x = jnp.max(x, axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=False)(x) * _HEAD_SCALE


class LoadedClassifier(NamedTuple):
  """A `Classifier` with its variables ({'params', 'batch_stats'})."""
  model: Classifier
  variables: dict[str, Any]


def num_params(variables: dict[str, Any]) -> int:
  """Number of trainable parameters (BatchNorm running statistics excluded)."""
  return int(sum(np.size(p) for p in jax.tree.leaves(variables['params'])))


def save_classifier(path: str | os.PathLike[str], widths: Sequence[int],
                    variables: dict[str, Any]) -> None:
  """Writes the widths and variables to an .npz (no pickles; `vq.core.weights.save_npz`)."""
  flat = {_WIDTHS_KEY: np.asarray(widths, np.int32)}
  for name in _COLLECTIONS:
    for key, value in weights.flatten_tree({name: jax.device_get(variables[name])}).items():
      flat[key] = np.asarray(value, np.float32)
  weights.save_npz(path, flat)


def load_classifier(path: str | os.PathLike[str] | None = None) -> LoadedClassifier:
  """Reads weights written by `save_classifier`; the shipped ones by default.

  Args:
    path: an .npz file; None for `DEFAULT_WEIGHTS`.

  Returns:
    The model and its variables, ready for `predict_probs`.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: a pickle or a file that does not hold a classifier of the stored widths.
  """
  path = DEFAULT_WEIGHTS if path is None else pathlib.Path(path)
  flat = weights.load_npz(path)  # Refuses pickles by content before reading anything.
  if _WIDTHS_KEY not in flat:
    raise ValueError(f'{path} has no {_WIDTHS_KEY!r} entry, so it was not written by '
                     'save_classifier; train one with python -m vq.evaluation.classifier_train.')
  widths = tuple(int(w) for w in flat.pop(_WIDTHS_KEY))
  model = Classifier(widths=widths)
  stored = weights.unflatten_tree(flat)
  expected = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32))
  want = {k: v.shape for k, v in traverse_util.flatten_dict(dict(expected), sep='/').items()}
  have = {k: v.shape for k, v in flat.items()}
  if have != want:
    wrong = sorted(k for k in want.keys() | have.keys() if have.get(k) != want.get(k))
    raise ValueError(f'{path} does not match a Classifier with widths {widths}: {len(wrong)} '
                     f'arrays are missing, extra or differently shaped (e.g. {wrong[0]!r}: '
                     f'{have.get(wrong[0])} stored, {want.get(wrong[0])} expected); write it '
                     'again with save_classifier.')
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), stored)
  return LoadedClassifier(model, variables)


def check_images(images: Any) -> np.ndarray:
  """Returns `images` as a uint8 [N, 32, 32, 3] numpy array, or raises a one-line ValueError."""
  if not hasattr(images, 'dtype') or not hasattr(images, 'shape'):
    images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'The classifier takes uint8 images in [0, 255]; saw dtype {images.dtype}; '
                     'convert floats in [-1, 1] with vq.data.to_uint8 first.')
  if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE or images.shape[0] < 1:
    raise ValueError(f'The classifier takes images shaped [N, 32, 32, 3] with N >= 1; saw '
                     f'{tuple(images.shape)}; resize to 32x32 RGB and add a batch axis.')
  return np.asarray(images)


def check_labels(labels: Any, n: int) -> np.ndarray:
  """Returns `labels` as int64 [n] in [0, NUM_CLASSES), or raises a one-line ValueError."""
  labels = np.asarray(labels)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be {n} integers (one per sample); saw {labels.dtype} '
                     f'{labels.shape}; pass the class ids the samples were generated for.')
  if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f'labels must lie in [0, {NUM_CLASSES}); saw values in [{labels.min()}, '
                     f'{labels.max()}]; use CIFAR-10 class ids.')
  return labels.astype(np.int64)


def check_probs(probs: Any) -> np.ndarray:
  """Returns `probs` as float64 [N, K], rows on the simplex, or raises a one-line ValueError."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 2:
    raise ValueError(f'probs must be [N, K] class probabilities with N >= 1, K >= 2; saw shape '
                     f'{probs.shape}; pass predict_probs(...) output.')
  if not np.isfinite(probs).all() or probs.min() < 0:
    raise ValueError(f'probs must be finite and non-negative; saw min {np.nanmin(probs)}; pass '
                     'softmax outputs, not logits.')
  worst = float(np.max(np.abs(probs.sum(axis=1) - 1)))
  if worst > 1e-3:
    raise ValueError(f'each row of probs must sum to 1; one is off by {worst:.3g}; pass softmax '
                     'outputs, not logits.')
  return probs


@functools.partial(jax.jit, static_argnums=0)  # Flax modules hash by their fields.
def _probs(model: Classifier, variables: dict[str, Any], images: jax.Array) -> jax.Array:
  return jax.nn.softmax(model.apply(variables, data.to_float(images), train=False), axis=-1)


def predict_probs(classifier: LoadedClassifier, images: Any, *,
                  batch_size: int = 500) -> np.ndarray:
  """Class probabilities p(y|x) of uint8 images.

  Args:
    classifier: from `load_classifier`.
    images: uint8 [N, 32, 32, 3].
    batch_size: images per forward pass (the last batch is padded, so one compile serves all).

  Returns:
    float64 [N, 10], rows summing to 1.
  """
  images = check_images(images)
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'batch_size must be a positive int; saw {batch_size!r}.')
  n = images.shape[0]
  size = min(int(batch_size), n)
  out = []
  for begin in range(0, n, size):
    chunk = images[begin:begin + size]
    padded = np.zeros((size,) + IMAGE_SHAPE, np.uint8)
    padded[:len(chunk)] = chunk
    probs = _probs(classifier.model, classifier.variables, jnp.asarray(padded))
    out.append(np.asarray(probs)[:len(chunk)])
  probs = np.concatenate(out).astype(np.float64)
  return probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows are off by ~1e-7.


def classifier_accuracy(probs: Any, labels: Any) -> float:
  """Fraction of samples whose most probable class is the one asked for.

  Args:
    probs: [N, 10] class probabilities (`predict_probs`).
    labels: [N] integer classes in [0, 10) the samples were generated for.

  Returns:
    mean(argmax_y p(y|x_i) == labels_i), in [0, 1]; ties go to the lowest class id.
  """
  probs = check_probs(probs)
  labels = check_labels(labels, probs.shape[0])
  return float(np.mean(np.argmax(probs, axis=1) == labels))


def classifier_score(probs: Any) -> float:
  """exp(E_x[KL(p(y|x) || p(y))]) with p(y) the mean of p(y|x) over the samples.

  The Inception-Score formula on this classifier's predictions, over all samples at once, in
  float64, with 0 log 0 = 0. It lies in [1, K]: 1 when every sample gets the same prediction,
  K when predictions are confident (one-hot) and spread evenly over the K classes.

  Args:
    probs: [N, K] class probabilities (`predict_probs`).

  Returns:
    The score as a Python float.
  """
  probs = check_probs(probs)
  marginal = probs.mean(axis=0)
  # p log(p / m) with 0 wherever p = 0; m >= p / N > 0 wherever p > 0.
  ratio = np.divide(probs, marginal, out=np.ones_like(probs), where=probs > 0)
  kl = np.sum(probs * np.log(ratio), axis=1)
  return float(np.exp(np.mean(kl)))


def class_fidelity(classifier: LoadedClassifier, images: Any, labels: Any, *,
                   batch_size: int = 500) -> dict[str, float]:
  """Both metrics for class-conditional samples.

  Args:
    classifier: from `load_classifier`.
    images: uint8 [N, 32, 32, 3] samples.
    labels: [N] the classes they were generated for.
    batch_size: images per forward pass.

  Returns:
    {'classifier_accuracy', 'classifier_score'} (see those functions).
  """
  images = check_images(images)
  labels = check_labels(labels, images.shape[0])  # Checked before the forward passes.
  probs = predict_probs(classifier, images, batch_size=batch_size)
  return {'classifier_accuracy': classifier_accuracy(probs, labels),
          'classifier_score': classifier_score(probs)}
