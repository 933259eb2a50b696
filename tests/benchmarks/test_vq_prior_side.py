"""benchmarks/vq_prior_side.py: vq's GPT on the token-prior benchmark's terms, tiny sizes."""

import math
import os

import jax
import numpy as np
import pytest

from benchmarks import token_prior
from benchmarks import vq_prior_side

_SPEC = token_prior.GPTSpec(num_codes=8, num_classes=3, seq_len=4, layers=1, heads=2,
                            width=16, batch_size=4)


@pytest.fixture(name='side')
def _side(monkeypatch):
  # The side applies run.py's CPU plan to this process's environment; keep ours.
  for name in ('XLA_FLAGS', 'VQ_NATIVE'):
    if name in os.environ:
      monkeypatch.setenv(name, os.environ[name])
    else:
      monkeypatch.delenv(name, raising=False)
  rng = np.random.default_rng(0)
  labels = np.arange(12) % 3
  grids = rng.integers(0, 8, (12, 4))
  seq = np.concatenate([(8 + labels)[:, None], grids], axis=1).astype(np.int64)
  return vq_prior_side.VqGPTSide(_SPEC, seq, seq[:6], grid=(2, 2), seed=0, class_dropout=0.0,
                                 eval_batch=4, maskgit_iterations=2,
                                 cpu_devices=str(jax.local_device_count())), seq


def test_bits_per_token_matches_a_numpy_log_softmax(side):
  side, seq = side
  side.train(np.array([[0, 1, 2, 3], [4, 5, 6, 7]]))
  params = side._params()
  test = seq[:6]
  inputs = test[:, :-1].astype(np.int32)  # the class token, then all image tokens but the last
  logits = np.asarray(side.model.apply({'params': params}, inputs), np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nats = -np.take_along_axis(logp, test[:, 1:, None], axis=-1).mean()
  assert side.bits_per_token() == pytest.approx(nats / math.log(2), rel=1e-5)


def test_train_runs_the_side_on_the_given_rows(side):
  side, _ = side
  out = side.train(np.array([[0, 1, 2, 3]] * 3))
  assert len(out['step_s']) == 3 and len(out['loss']) == 3
  assert all(s > 0 for s in out['step_s'])
  # One batch, three steps of Adam on it: the loss on that batch goes down.
  assert out['loss'][2] < out['loss'][0]
  assert out['loss'][0] == pytest.approx(math.log(8), rel=0.2)  # ~uniform over the 8 codes at init


def test_sample_is_reproducible_and_times_maskgit_beside(side):
  side, _ = side
  class_tokens = np.array([8, 9, 10, 8], np.int64)
  a = side.sample(class_tokens, 1.0, seed=3)
  b = side.sample(class_tokens, 1.0, seed=3)
  c = side.sample(class_tokens, 1.0, seed=4)
  assert a['tokens'].shape == (4, 4) and a['seconds'] > 0
  assert ((a['tokens'] >= 0) & (a['tokens'] < 8)).all()
  np.testing.assert_array_equal(a['tokens'], b['tokens'])
  assert not np.array_equal(a['tokens'], c['tokens'])
  info = side.describe()
  assert len(info['maskgit_sample_s']) == 3 and info['maskgit_network_evaluations'] == 2
  assert info['maskgit_sample_images_per_s'] > 0 and info['sample_compile_s'] > 0


def test_sample_pads_a_batch_smaller_than_the_devices(side):
  side, _ = side
  out = side.sample(np.array([9], np.int64), 1.0, seed=0)
  assert out['tokens'].shape == (1, 4)


def test_grid_must_hold_the_sequence():
  with pytest.raises(ValueError, match='does not hold seq_len=4'):
    vq_prior_side.VqGPTSide(_SPEC, np.zeros((2, 5), np.int64), np.zeros((2, 5), np.int64),
                            grid=(3, 2), cpu_devices=str(jax.local_device_count()))
