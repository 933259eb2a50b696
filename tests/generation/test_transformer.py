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
  apply = jax.jit(lambda x: model.apply({'params': params}, x))
  a, b = apply(tokens), apply(changed)
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

  grad = jax.jit(jax.grad(out_t))(params['embed']['embedding'])
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
  apply = jax.jit(lambda x: model.apply({'params': params}, x))
  a, b = apply(tokens), apply(changed)
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
  full = jax.jit(lambda x: model.apply({'params': params}, x))(tokens)
  decoder = model.clone(decode=True)
  cache = transformer.init_cache(decoder, 2)
  step = jax.jit(lambda c, x: decoder.apply({'params': params, 'cache': c}, x, mutable=['cache']))
  first, updates = step(cache, tokens[:, :6])
  second, _ = step(updates['cache'], tokens[:, 6:])
  chex.assert_trees_all_close(jnp.concatenate([first, second], axis=1), full, atol=1e-5)


def test_cache_is_head_major_and_holds_each_positions_keys_and_values():
  # [B, H, max_len, D], the layout the attention matmuls read (see SelfAttention).
  model = _model()
  tokens = _tokens(batch=2)
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  decoder = model.clone(decode=True)
  cache = transformer.init_cache(decoder, 2)
  assert cache['block0']['attn']['key'].shape == (2, 4, 10, 8)
  _, updates = decoder.apply({'params': params, 'cache': cache}, tokens[:, :3], mutable=['cache'])
  # The keys of block 0 at positions 0..2, recomputed from its input by hand.
  _, state = model.apply({'params': params}, tokens, capture_intermediates=True,
                         mutable=['intermediates'])
  qkv = state['intermediates']['block0']['attn']['qkv']['__call__'][0]   # [B, T, 3, H, D]
  cached = updates['cache']['block0']['attn']
  np.testing.assert_allclose(cached['key'][:, :, :3], qkv[:, :3, 1].transpose(0, 2, 1, 3),
                             atol=1e-6)
  np.testing.assert_allclose(cached['value'][:, :, :3], qkv[:, :3, 2].transpose(0, 2, 1, 3),
                             atol=1e-6)
  assert not np.any(np.asarray(cached['key'][:, :, 3:]))   # positions not written yet


def test_bad_shapes_are_one_line_errors():
  with pytest.raises(ValueError, match='not divisible by num_heads'):
    transformer.Transformer(vocab_size=5, num_outputs=5, max_len=4, width=30,
                            num_heads=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match='longer than max_len'):
    _model().init(jax.random.PRNGKey(0), jnp.zeros((1, 11), jnp.int32))
  with pytest.raises(ValueError, match='needs causal=True'):
    _model(causal=False, decode=True).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
