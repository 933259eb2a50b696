"""Token layout and objectives against numpy oracles; priors learn a known distribution."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vq.generation import priors
from vq.runtime import parallel
from vq.generation import generator as gen_lib
from vq.generation import trainer

LAYOUT = priors.TokenLayout(num_codes=8, num_classes=4, grid=(2, 2))


def test_layout_vocabulary():
  assert (LAYOUT.length, LAYOUT.null_token, LAYOUT.mask_token, LAYOUT.vocab_size) == (4, 12, 13, 14)
  np.testing.assert_array_equal(LAYOUT.class_tokens(jnp.array([0, 3, -1])), [8, 11, 12])
  uncond = priors.TokenLayout(num_codes=8, num_classes=0, grid=(2, 2))
  np.testing.assert_array_equal(uncond.class_tokens(jnp.array([-1, -1])), [8, 8])


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_gpt_nll_equals_a_numpy_log_softmax_of_the_shifted_sequence():
  model = priors.build_model('gpt', LAYOUT, width=16, depth=1, num_heads=2)
  tokens = jnp.array([[1, 2, 3, 4], [7, 0, 0, 5]])
  labels = jnp.array([2, -1])
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))['params']
  got = np.asarray(priors.gpt_token_nll(model, params, LAYOUT, tokens, labels))
  inputs = np.array([[10, 1, 2, 3], [12, 7, 0, 0]])            # class token, then t_0..t_2
  logits = np.asarray(model.apply({'params': params}, jnp.asarray(inputs)), np.float64)
  want = -np.take_along_axis(_log_softmax(logits), np.asarray(tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_maskgit_nll_reads_masked_inputs_and_scores_every_position():
  model = priors.build_model('maskgit', LAYOUT, width=16, depth=1, num_heads=2)
  tokens = jnp.array([[1, 2, 3, 4]])
  mask = jnp.array([[False, True, False, True]])
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))['params']
  got = np.asarray(priors.maskgit_token_nll(model, params, LAYOUT, tokens, jnp.array([1]), mask))
  logits = np.asarray(model.apply({'params': params}, jnp.array([[9, 1, 13, 3, 13]])),
                      np.float64)[:, 1:]
  want = -np.take_along_axis(_log_softmax(logits), np.asarray(tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_training_masks_follow_the_cosine_schedule():
  key = jax.random.PRNGKey(5)
  batch, length = 64, 16
  mask = np.asarray(priors.training_mask(key, batch, length))
  k_ratio, _ = jax.random.split(key)
  r = np.asarray(jax.random.uniform(k_ratio, (batch,)), np.float64)
  want = np.clip(np.ceil(np.cos(np.pi / 2 * r) * length), 1, length)
  # float32 against float64 may differ only where the product sits on an integer.
  close = np.abs(np.cos(np.pi / 2 * r) * length - np.round(np.cos(np.pi / 2 * r) * length)) < 1e-4
  np.testing.assert_array_equal(mask.sum(1)[~close], want[~close])


def test_label_dropout_rate():
  labels = jnp.zeros((20_000,), jnp.int32)
  dropped = np.asarray(priors.drop_labels(labels, 0.1, jax.random.PRNGKey(0)))
  assert set(np.unique(dropped)) == {-1, 0}
  assert abs((dropped == -1).mean() - 0.1) < 0.01  # 4.7 standard errors


def test_unigram_bits_per_token_by_hand():
  train = np.array([0, 0, 0, 1])                     # counts + 1: [4, 2, 1] over 3 codes
  got = priors.unigram_bits_per_token(train, np.array([0, 2]), num_codes=3)
  assert got == pytest.approx(-(math.log2(4 / 7) + math.log2(1 / 7)) / 2)


@pytest.mark.parametrize('kind', ['gpt', 'maskgit'])
def test_prior_learns_a_known_distribution_to_its_entropy(kind):
  """Tokens of class c are uniform over {2c, 2c + 1}: 1 bit per token given the class."""
  layout = priors.TokenLayout(num_codes=8, num_classes=4, grid=(2, 2))
  model = priors.build_model(kind, layout, width=32, depth=2, num_heads=4)
  tx = optax.adam(3e-3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))['params']
  state = gen_lib.PriorState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), tx=tx)
  par = parallel.get('pmap')
  step = par.step(lambda s, b, r: trainer.train_step(s, b, r, kind=kind, model=model,
                                                     layout=layout, class_dropout=0.0))
  d = jax.local_device_count()
  rng = np.random.default_rng(0)
  p_state, p_rng = par.replicate(state), par.replicate(jax.random.PRNGKey(1))

  def batch(n):
    labels = rng.integers(0, 4, n)
    tokens = 2 * labels[:, None] + rng.integers(0, 2, (n, 4))
    return labels, tokens

  for _ in range(250):
    labels, tokens = batch(64)
    p_state, _ = step(p_state, par.shard({'tokens': tokens.reshape(d, -1, 4).astype(np.int32),
                                          'label': labels.reshape(d, -1).astype(np.int32)}),
                      p_rng)
  params = par.to_host(p_state).params
  labels, tokens = batch(512)
  if kind == 'gpt':
    nll = priors.gpt_token_nll(model, params, layout, jnp.asarray(tokens), jnp.asarray(labels))
    bits = float(np.mean(nll)) / math.log(2)
  else:
    mask = priors.random_mask(jax.random.PRNGKey(2), 512, 4, jnp.full((512,), 2))
    nll = priors.maskgit_token_nll(model, params, layout, jnp.asarray(tokens),
                                   jnp.asarray(labels), mask)
    bits = float(np.sum(np.asarray(nll) * np.asarray(mask)) / np.sum(mask)) / math.log(2)
  assert 0.95 < bits < 1.1, bits
