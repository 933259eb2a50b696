"""The transformer: causality, bidirectionality and KV-cached decoding against the full pass."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.generation import transformer


def _model(causal=True, **kw):
  return transformer.Transformer(vocab_size=23, num_outputs=17, max_len=10, width=32, depth=2,
                                 num_heads=4, causal=causal, **kw)


def _tokens(seed=0, batch=3, length=10):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, 23)


@pytest.mark.parametrize('t', [0, 4, 8])
def test_causal_output_at_t_ignores_tokens_after_t(t):
  model = _model()
  tokens = _tokens()
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % 23)
  a = model.apply({'params': params}, tokens)
  b = model.apply({'params': params}, changed)
  np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
  assert np.abs(np.asarray(a[:, t + 1:] - b[:, t + 1:])).max() > 1e-4  # later outputs do see them


def test_causal_gradient_of_position_t_is_zero_for_later_embeddings():
  model = _model()
  tokens = _tokens(batch=1)
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  t = 5

  def out_t(embedding):
    p = dict(params, embed={'embedding': embedding})
    return model.apply({'params': p}, tokens)[0, t].sum()

  grad = jax.grad(out_t)(params['embed']['embedding'])
  later = np.unique(np.asarray(tokens[0, t + 1:]))
  earlier = np.unique(np.asarray(tokens[0, :t + 1]))
  only_later = np.setdiff1d(later, earlier)
  assert only_later.size, 'the random tokens should include some that appear only after t'
  assert np.all(np.asarray(grad)[only_later] == 0)
  assert np.abs(np.asarray(grad)[earlier]).max() > 0


def test_bidirectional_output_sees_every_position():
  model = _model(causal=False)
  tokens = _tokens()
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  changed = tokens.at[:, -1].set((tokens[:, -1] + 5) % 23)
  a = model.apply({'params': params}, tokens)
  b = model.apply({'params': params}, changed)
  assert np.abs(np.asarray(a[:, 0] - b[:, 0])).max() > 1e-4


@pytest.mark.parametrize('dtype', [jnp.float32])
def test_kv_cached_decoding_equals_the_full_pass_at_every_position(dtype):
  model = _model(dtype=dtype)
  tokens = _tokens(batch=4)
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  full = model.apply({'params': params}, tokens)
  decoder = model.clone(decode=True)
  cache = transformer.init_cache(decoder, 4)
  step = jax.jit(lambda c, x: decoder.apply({'params': params, 'cache': c}, x, mutable=['cache']))
  outs = []
  for i in range(tokens.shape[1]):
    logits, updates = step(cache, tokens[:, i:i + 1])
    cache = updates['cache']
    outs.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)


def test_cache_can_take_several_positions_per_call():
  model = _model()
  tokens = _tokens(batch=2)
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  full = model.apply({'params': params}, tokens)
  decoder = model.clone(decode=True)
  cache = transformer.init_cache(decoder, 2)
  first, updates = decoder.apply({'params': params, 'cache': cache}, tokens[:, :6],
                                 mutable=['cache'])
  second, _ = decoder.apply({'params': params, 'cache': updates['cache']}, tokens[:, 6:],
                            mutable=['cache'])
  chex.assert_trees_all_close(jnp.concatenate([first, second], axis=1), full, atol=1e-5)


def test_bad_shapes_are_one_line_errors():
  with pytest.raises(ValueError, match='not divisible by num_heads'):
    transformer.Transformer(vocab_size=5, num_outputs=5, max_len=4, width=30,
                            num_heads=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match='longer than max_len'):
    _model().init(jax.random.PRNGKey(0), jnp.zeros((1, 11), jnp.int32))
  with pytest.raises(ValueError, match='needs causal=True'):
    _model(causal=False, decode=True).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
