"""Tests for vq.evaluation.classifier (the shipped CIFAR-10 classifier, its metrics) and
vq.evaluation.classifier_train (its training program)."""

import json
import math
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq import data
from vq.evaluation import classifier
from vq.evaluation import classifier_train

_TINY = (4, 8)  # A stem and one block: compiles in seconds.
# Accuracy of the shipped weights on the first 200 test images, measured with
# `classifier.predict_probs` when they were trained (see the docstring); the test allows 10
# points less so that numerical differences across machines cannot fail it.
_FIRST_200_MEASURED = 0.805
_FIRST_200_THRESHOLD = 0.70


def _tiny_variables(seed=0):
  """Random variables of the right shapes, without compiling the initialisers (threefry is
  slow to compile on CPU)."""
  model = classifier.Classifier(widths=_TINY)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(shapes))[0]:
    name = path[-1].key
    if name == 'kernel':  # lecun_normal's scale.
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.uniform(-0.5, 0.5, leaf.shape)
    flat[path] = jnp.asarray(value, jnp.float32)
  variables = jax.tree_util.tree_map_with_path(lambda p, _: flat[p], dict(shapes))
  return model, variables


# --- Storage ---


def test_save_load_round_trip(tmp_path):
  model, variables = _tiny_variables()
  path = tmp_path / 'c.npz'
  classifier.save_classifier(path, _TINY, variables)
  loaded = classifier.load_classifier(path)
  assert loaded.model.widths == _TINY
  chex.assert_trees_all_equal(loaded.variables, jax.tree.map(np.asarray, variables))
  images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  # Independent of predict_probs' padding and batching: one apply on x / 127.5 - 1.
  logits = jax.jit(model.apply)(variables, jnp.asarray(images / 127.5 - 1, jnp.float32))
  want = np.asarray(jax.nn.softmax(logits), np.float64)
  got = classifier.predict_probs(loaded, images, batch_size=3)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)


def test_load_refuses_a_pickle(tmp_path):
  path = tmp_path / 'c.npz'
  path.write_bytes(pickle.dumps({'widths': np.array([4, 8])}))
  with pytest.raises(ValueError, match='pickle'):
    classifier.load_classifier(path)


def test_load_rejects_files_of_other_shapes(tmp_path):
  _, variables = _tiny_variables()
  path = tmp_path / 'c.npz'
  classifier.save_classifier(path, (4, 16), variables)  # Stored widths disagree with arrays.
  with pytest.raises(ValueError, match=r'does not match a Classifier with widths \(4, 16\)'):
    classifier.load_classifier(path)
  np.savez(path, a=np.zeros(3))
  with pytest.raises(ValueError, match="no 'widths' entry"):
    classifier.load_classifier(path)


# --- The shipped weights ---


def test_shipped_weights_load_with_the_expected_shapes():
  assert classifier.DEFAULT_WEIGHTS.stat().st_size < 5 * 2**20
  net = classifier.load_classifier()
  assert net.model.widths == classifier.DEFAULT_WIDTHS == (24, 32, 64, 128)
  params = net.variables['params']
  assert params['Conv_0']['kernel'].shape == (3, 3, 3, 24)
  assert params['Dense_0']['kernel'].shape == (128, 10)
  assert classifier.num_params(net.variables) == 295480
  record = json.loads(classifier.DEFAULT_WEIGHTS.with_suffix('.json').read_text())
  assert record['test_examples'] == 10000 and record['num_params'] == 295480
  assert 'python -m vq.evaluation.classifier_train' in record['command']


def test_shipped_weights_classify_real_test_images():
  source = data.take(data.open_source('tfds:cifar10:test'), 200)
  batch = next(data.eval_batches(source, global_batch_size=200, num_local_devices=1))
  images, labels = data.to_uint8(batch['image'][0]), batch['label'][0]
  probs = classifier.predict_probs(classifier.load_classifier(), images, batch_size=200)
  accuracy = classifier.classifier_accuracy(probs, labels)
  assert accuracy >= _FIRST_200_THRESHOLD, (accuracy, _FIRST_200_MEASURED)
  # Confident, varied predictions on real data: well above the score's floor of 1.
  assert classifier.classifier_score(probs) > 4.0


# --- Metrics against numpy oracles ---


def _random_probs(rng, n, k=10):
  logits = 3.0 * rng.normal(size=(n, k))
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  return p / p.sum(axis=1, keepdims=True)


def test_classifier_accuracy_matches_a_loop():
  rng = np.random.default_rng(1)
  probs = _random_probs(rng, 300)
  labels = rng.integers(0, 10, 300)
  labels[:100] = np.argmax(probs[:100], axis=1)  # A third right by construction.
  want = sum(max(range(10), key=lambda c: probs[i, c]) == labels[i] for i in range(300)) / 300
  assert classifier.classifier_accuracy(probs, labels) == pytest.approx(want, abs=0)
  assert want > 1 / 3


def test_classifier_accuracy_hand_made():
  probs = np.array([[0.9, 0.1] + [0.0] * 8, [0.2, 0.7, 0.1] + [0.0] * 7,
                    [0.1] * 10, [0.0] * 9 + [1.0]])
  # Row 2 is a 10-way tie: argmax takes class 0.
  assert classifier.classifier_accuracy(probs, [0, 0, 0, 9]) == 0.75


def _score_oracle(probs):
  n, k = probs.shape
  marginal = [sum(probs[i, c] for i in range(n)) / n for c in range(k)]
  kl = [sum(probs[i, c] * math.log(probs[i, c] / marginal[c]) for c in range(k)
            if probs[i, c] > 0) for i in range(n)]
  return math.exp(sum(kl) / n)


def test_classifier_score_matches_the_formula():
  probs = _random_probs(np.random.default_rng(2), 64)
  probs[:5, :3] = 0.0  # Zeros follow 0 log 0 = 0.
  probs /= probs.sum(axis=1, keepdims=True)
  assert classifier.classifier_score(probs) == pytest.approx(_score_oracle(probs), rel=1e-12)


def test_classifier_score_extremes():
  assert classifier.classifier_score(np.full((50, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
  one_hot_spread = np.eye(10)[np.arange(200) % 10]
  assert classifier.classifier_score(one_hot_spread) == pytest.approx(10.0, rel=1e-12)
  one_hot_same = np.eye(10)[np.full(30, 4)]
  assert classifier.classifier_score(one_hot_same) == pytest.approx(1.0, abs=1e-12)
  # Confident over 5 classes only: 5.
  assert classifier.classifier_score(np.eye(10)[np.arange(50) % 5]) == pytest.approx(5.0)


# --- Bad inputs: one-line ValueErrors ---


@pytest.mark.parametrize('images,match', [
    (np.zeros((2, 32, 32, 3), np.float32), 'uint8 images'),
    (np.zeros((2, 64, 64, 3), np.uint8), r'\[N, 32, 32, 3\]'),
    (np.zeros((32, 32, 3), np.uint8), r'\[N, 32, 32, 3\]'),
])
def test_bad_images(images, match):
  model, variables = _tiny_variables()
  net = classifier.LoadedClassifier(model, variables)
  with pytest.raises(ValueError, match=match) as info:
    classifier.class_fidelity(net, images, np.zeros(len(images), int))
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('labels,match', [
    (np.array([0, 10]), r'in \[0, 10\)'),
    (np.array([-1, 3]), r'in \[0, 10\)'),
    (np.array([0, 1, 2]), '2 integers'),
    (np.array([0.0, 1.0]), '2 integers'),
])
def test_bad_labels(labels, match):
  with pytest.raises(ValueError, match=match):
    classifier.classifier_accuracy(np.full((2, 10), 0.1), labels)


def test_bad_probs():
  with pytest.raises(ValueError, match='sum to 1'):
    classifier.classifier_score(np.ones((3, 10)))
  with pytest.raises(ValueError, match='non-negative'):
    classifier.classifier_score(np.array([[1.5, -0.5]]))
  with pytest.raises(ValueError, match=r'\[N, K\]'):
    classifier.classifier_score(np.full(10, 0.1))


# --- Training ---


def test_augment_gives_padded_crops_and_flips():
  rng = np.random.default_rng(3)
  images = rng.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
  out = np.asarray(classifier_train.augment(jnp.asarray(images), jax.random.key(0), pad=2))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
  for i in range(6):
    crops = [padded[i, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
    candidates = crops + [c[:, ::-1] for c in crops]
    assert any(np.array_equal(out[i], c) for c in candidates), i


def test_train_step_fits_a_fixed_batch():
  model, variables = _tiny_variables()
  tx = classifier_train.make_optimizer(lr=0.5, total_steps=40, warmup_steps=2,
                                       weight_decay=5e-4)
  state = classifier_train.state_from_variables(variables, tx)
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.uniform(-1, 1, (16, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(np.arange(16) % 10, jnp.int32)
  step = classifier_train.make_train_step(model, tx, augment_images=False)
  losses = []
  for _ in range(40):
    state, metrics = step(state, images, labels)
    losses.append(float(metrics['loss']))
  assert losses[0] == pytest.approx(math.log(10), abs=0.3)  # Starts near chance.
  assert losses[-1] < 0.1, losses  # Memorised: 16 examples, 10 classes.
  assert int(state['step']) == 40
