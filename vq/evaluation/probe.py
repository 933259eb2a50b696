"""Linear classification probe: how much class information frozen features carry.

  result = probe.linear_probe(train_feats, train_labels, test_feats, test_labels,
                              num_classes=10)
  result['accuracy'], result['train_accuracy']    # test and train top-1, in [0, 1]

The probe is multinomial logistic regression (softmax + bias) on features standardised with the
training set's per-dimension mean and standard deviation, with an L2 penalty on the weights
(not the bias), trained full-batch by L-BFGS (optax's zoom line search) for a fixed number of
iterations inside one jitted `lax.scan`. The objective is convex, so the result depends on the
starting point (drawn from `seed`) only through the finite number of iterations.
`vq.evaluation.evaluator` feeds it the tokenizer's quantized latents (see `eval.probe` in the config).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Standard deviations below this count as constant dimensions (scaled by 1, not blown up).
_MIN_STD = 1e-6


def _check_split(features: Any, labels: Any, num_classes: int, name: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if features.ndim != 2:
    raise ValueError(f'linear_probe: {name}_features must be [N, D], got shape {features.shape}; '
                     'flatten each example first.')
  if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'linear_probe: {name}_labels must be {features.shape[0]} integers, got '
                     f'{labels.dtype} {labels.shape}; pass one class id per feature row.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'linear_probe: {name}_labels range over [{labels.min()}, {labels.max()}], '
                     f'outside [0, num_classes={num_classes}); drop unlabeled (-1) rows or '
                     'raise num_classes.')
  if features.shape[0] < 1:
    raise ValueError(f'linear_probe: {name} split is empty; pass at least one example.')
  if not np.isfinite(features).all():
    raise ValueError(f'linear_probe: {name}_features contain NaN or inf; check the encoder.')
  return features, labels.astype(np.int32)


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps'))
def _fit(x: jax.Array, y: jax.Array, w0: jax.Array, *, num_classes: int, l2: float,
         steps: int) -> dict[str, jax.Array]:
  """L-BFGS on the mean cross-entropy + l2 / 2 ||W||^2; returns {'w', 'b'}."""
  one_hot = jax.nn.one_hot(y, num_classes)

  def loss_fn(params):
    logits = x @ params['w'] + params['b']
    ce = jnp.mean(optax.softmax_cross_entropy(logits, one_hot))
    return ce + 0.5 * l2 * jnp.sum(jnp.square(params['w']))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, new_state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=loss_fn)
    new_params = optax.apply_updates(params, updates)
    # Once converged, a zero curvature pair can make the next update non-finite; keep the last
    # finite iterate instead of letting NaN through.
    ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(l)) for l in jax.tree.leaves(new_params)]))
    params = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_params, params)
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return (params, state), None

  params = {'w': w0, 'b': jnp.zeros((num_classes,), jnp.float32)}
  (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=steps)
  return params


def linear_probe(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                 *, num_classes: int, l2: float = 1e-4, steps: int = 200,
                 seed: int = 0) -> dict[str, float]:
  """Trains a softmax classifier on frozen features; returns its test and train accuracy.

  Args:
    train_features: [N, D] features of the training examples.
    train_labels: [N] integer class ids in [0, num_classes).
    test_features: [M, D] features of the held-out examples.
    test_labels: [M] integer class ids in [0, num_classes).
    num_classes: number of classes K (>= 2).
    l2: weight of 0.5 * ||W||^2 added to the mean cross-entropy (1 / (N C) in scikit-learn's
      terms); keeps the solution finite on separable data.
    steps: L-BFGS iterations (each with its own line search).
    seed: seeds the starting weights.

  Returns:
    {'accuracy': top-1 on the test split, 'train_accuracy': top-1 on the training split}.

  Raises:
    ValueError: on mismatched shapes, labels outside [0, num_classes), or non-finite features.
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f'linear_probe: num_classes must be an int >= 2, got {num_classes!r}.')
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f'linear_probe: steps must be a positive int, got {steps!r}.')
  if not l2 >= 0:
    raise ValueError(f'linear_probe: l2 must be >= 0, got {l2!r}.')
  x_train, y_train = _check_split(train_features, train_labels, num_classes, 'train')
  x_test, y_test = _check_split(test_features, test_labels, num_classes, 'test')
  if x_train.shape[1] != x_test.shape[1]:
    raise ValueError(f'linear_probe: train features have {x_train.shape[1]} dimensions, test '
                     f'features {x_test.shape[1]}; extract both with the same encoder.')
  # Standardise in float64 on the host: a large common offset would eat float32 precision.
  mean = x_train.astype(np.float64).mean(axis=0)
  std = x_train.astype(np.float64).std(axis=0)
  std = np.where(std < _MIN_STD, 1.0, std)
  x_train = ((x_train - mean) / std).astype(np.float32)
  x_test = ((x_test - mean) / std).astype(np.float32)
  d = x_train.shape[1]
  w0 = 0.01 * jax.random.normal(jax.random.key(seed), (d, int(num_classes)), jnp.float32)
  params = _fit(jnp.asarray(x_train), jnp.asarray(y_train), w0, num_classes=int(num_classes),
                l2=float(l2), steps=int(steps))
  params = jax.device_get(params)

  def accuracy(x, y):
    predictions = np.argmax(x @ params['w'] + params['b'], axis=-1)
    return float(np.mean(predictions == y))

  return {'accuracy': accuracy(x_test, y_test), 'train_accuracy': accuracy(x_train, y_train)}
