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


def _decode_one_by_one(model, params, tokens):
  """Logits [B, T] from the KV-cached decoder fed one position per call."""
  decoder = model.clone(decode=True)
  cache = transformer.init_cache(decoder, tokens.shape[0])
  step = jax.jit(lambda c, x: decoder.apply({'params': params, 'cache': c}, x, mutable=['cache']))
  outs = []
  for i in range(tokens.shape[1]):
    logits, updates = step(cache, tokens[:, i:i + 1])
    cache = updates['cache']
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize('dtype', [jnp.float32])
def test_kv_cached_decoding_equals_the_full_pass_at_every_position(dtype):
  model = _model(dtype=dtype)
  tokens = _tokens(batch=4)
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  full = model.apply({'params': params}, tokens)
  chex.assert_trees_all_close(_decode_one_by_one(model, params, tokens), full, atol=1e-5,
                              rtol=1e-5)


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


def _bf16(a):
  """float32 -> bfloat16 (round to nearest even) -> float64, by numpy bit arithmetic."""
  bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
  return bits.astype(np.uint32).view(np.float32).astype(np.float64)


# (x shape, w shape, contracted axes): Dense, the qkv DenseGeneral, the attention output's.
@pytest.mark.parametrize('x_shape,w_shape,n', [((5, 7), (7, 3), 1),
                                               ((2, 3, 16), (16, 3, 2, 4), 1),
                                               ((2, 3, 2, 8), (2, 8, 5), 2)])
def test_bf16_dot_general_is_the_product_of_rounded_inputs_and_so_are_its_gradients(
    x_shape, w_shape, n):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(w_shape).astype(np.float32)
  dims = ((tuple(range(len(x_shape) - n, len(x_shape))), tuple(range(n))), ((), ()))
  out_shape = x_shape[:len(x_shape) - n] + w_shape[n:]
  g = rng.standard_normal(out_shape).astype(np.float32)
  y, vjp = jax.vjp(lambda x, w: transformer.bf16_dot_general(x, w, dims), x, w)
  dx, dw = vjp(g)
  # The oracle: float64 products of the bfloat16-rounded x, w and cotangent.
  k = int(np.prod(w_shape[:n]))
  xm, wm = _bf16(x).reshape(-1, k), _bf16(w).reshape(k, -1)
  gm = _bf16(g).reshape(xm.shape[0], -1)
  np.testing.assert_allclose(y, (xm @ wm).reshape(out_shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, (gm @ wm.T).reshape(x_shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, (xm.T @ gm).reshape(w_shape), rtol=1e-5, atol=1e-5)
  # And it is not the float32 product: the rounding is really there.
  assert np.abs(np.asarray(y) - (x.reshape(-1, k).astype(np.float64) @ w.reshape(k, -1)
                                 ).reshape(out_shape)).max() > 1e-4
  assert y.dtype == jnp.float32 and dx.dtype == jnp.float32 and dw.dtype == jnp.float32


def test_bfloat16_products_train_with_bfloat16_blocks_too():
  model = _model(dtype=jnp.bfloat16, matmul_dtype='bfloat16')
  tokens = _tokens(batch=2)
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  grads = jax.grad(lambda p: model.apply({'params': p}, tokens).sum())(params)
  for leaf in jax.tree.leaves(grads):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(leaf)))
  assert float(jnp.abs(grads['block0']['fc']['kernel']).max()) > 0


@pytest.mark.parametrize('x_shape,w_shape,dims', [
    ((3, 4), (3, 5), (((0,), (0,)), ((), ()))),          # contracts x's first axis
    ((3, 2, 8), (4, 4, 5), (((1, 2), (0, 1)), ((), ()))),  # sizes differ, products agree
    ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))),  # batch dimensions
])
def test_bf16_dot_general_refuses_other_contractions(x_shape, w_shape, dims):
  with pytest.raises(ValueError, match='handles x'):
    transformer.bf16_dot_general(jnp.ones(x_shape), jnp.ones(w_shape), dims)


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
  """The operand dtypes of every dot_general in a closed jaxpr, sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          out += _dot_operand_dtypes(getattr(inner, 'jaxpr', inner))
  return out


@pytest.mark.parametrize('matmul_dtype', ['float32', 'bfloat16'])
def test_every_dense_layer_and_only_they_take_the_matmul_dtype(matmul_dtype):
  model = _model(matmul_dtype=matmul_dtype)   # depth 2
  tokens = _tokens(batch=2)
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  dots = _dot_operand_dtypes(jax.make_jaxpr(lambda p: model.apply({'params': p}, tokens))(
      params).jaxpr)
  bf16 = [d for d in dots if d == ('bfloat16', 'bfloat16')]
  f32 = [d for d in dots if d == ('float32', 'float32')]
  # qkv, out, fc and proj in each of 2 blocks, the head; attention's two per block.
  assert len(dots) == 4 * 2 + 1 + 2 * 2
  assert len(bf16) == (4 * 2 + 1 if matmul_dtype == 'bfloat16' else 0)
  assert len(f32) == len(dots) - len(bf16)


def test_bfloat16_matmuls_stay_close_to_float32_and_decode_like_the_full_pass():
  tokens = _tokens(batch=4)
  model32 = _model()
  params = model32.init(jax.random.PRNGKey(1), tokens)['params']
  model16 = _model(matmul_dtype='bfloat16')
  full32 = model32.apply({'params': params}, tokens)
  full16 = model16.apply({'params': params}, tokens)   # the same parameters
  scale = float(jnp.abs(full32).max())
  err = float(jnp.abs(full16 - full32).max())
  assert 1e-6 * scale < err < 3e-2 * scale, (err, scale)
  # Attention sums in another order when decoding, and a float32 difference that tips a
  # bfloat16 rounding in the next layer moves a logit by about bfloat16's resolution.
  chex.assert_trees_all_close(_decode_one_by_one(model16, params, tokens), full16,
                              atol=5e-3 * scale)
  with pytest.raises(ValueError, match="matmul_dtype='float16' is not one of"):
    _model(matmul_dtype='float16').init(jax.random.PRNGKey(0), tokens)


def test_bad_shapes_are_one_line_errors():
  with pytest.raises(ValueError, match='not divisible by num_heads'):
    transformer.Transformer(vocab_size=5, num_outputs=5, max_len=4, width=30,
                            num_heads=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match='longer than max_len'):
    _model().init(jax.random.PRNGKey(0), jnp.zeros((1, 11), jnp.int32))
  with pytest.raises(ValueError, match='needs causal=True'):
    _model(causal=False, decode=True).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
