"""Tests for vq.quantizers.scalar (FSQ, LFQ) against numpy oracles.

The oracles are written here independently of the module: itertools enumerations of the
FSQ grid and of the LFQ sign codes, the FSQ bound and its derivative in float64 numpy,
the LFQ entropy penalty from softmax(-||z - c||^2 / T) over enumerated codes, and its
closed form for one bit (a Bernoulli with p = sigmoid(4 z / T)).
"""

import functools
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.quantizers import scalar as scalar_quantizers
from vq.models import tokenizer
from tests import train_util

FSQ = scalar_quantizers.FSQ
LFQ = scalar_quantizers.LFQ
LEVELS = (8, 5, 3)  # even and odd levels; 120 codes


_apply = train_util.jit_apply


@functools.partial(jax.jit, static_argnames=('module',))
def _init(module, x):
  return module.init(jax.random.key(0), x)


# ---------------------------------------------------------------------------------------
# Numpy oracles.


def _np_fsq_grid(levels):
  """All codes, index order = mixed radix with dimension 0 least significant."""
  digit_tuples = [t[::-1] for t in itertools.product(*[range(l) for l in reversed(levels)])]
  digits = np.asarray(digit_tuples, np.float64)
  half = np.asarray(levels) // 2
  return (digits - half) / half


def _np_fsq_bound(z, levels):
  levels = np.asarray(levels, np.float64)
  half_l = (levels - 1) * (1 - 1e-3) / 2
  offset = np.where(levels % 2 == 0, 0.5, 0.0)
  shift = np.arctanh(offset / half_l)
  return np.tanh(np.asarray(z, np.float64) + shift) * half_l - offset


def _np_lfq_codes(bits):
  """Code k has +1 in dimension i iff bit i of k is set."""
  return np.asarray([[1.0 if (k >> i) & 1 else -1.0 for i in range(bits)]
                     for k in range(2**bits)])


def _np_entropy(p, axis=-1):
  p = np.asarray(p, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def _np_lfq_entropy_loss(z, bits, temperature):
  """mean_m H(softmax(-||z_m - c||^2 / T)) - H(mean_m softmax(...)), float64."""
  flat = np.asarray(z, np.float64).reshape(-1, bits)
  codes = _np_lfq_codes(bits)
  logits = -np.sum((flat[:, None, :] - codes[None]) ** 2, axis=-1) / temperature
  logits -= logits.max(axis=-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=-1, keepdims=True)
  return np.mean(_np_entropy(p)) - _np_entropy(p.mean(axis=0))


def _np_perplexity(counts):
  return np.exp(_np_entropy(np.asarray(counts) / np.sum(counts)))


# ---------------------------------------------------------------------------------------
# FSQ.


def test_fsq_codes_grid_equals_numpy_enumeration():
  fsq = FSQ(levels=LEVELS, code_dim=len(LEVELS))
  grid = _np_fsq_grid(LEVELS)
  assert grid.shape == (120, 3) and fsq.vocab_size == 120
  np.testing.assert_array_equal(fsq.indices_to_codes(jnp.arange(120)), grid)
  # Every value the forward pass produces, over a sweep far past the bound, is a grid value
  # of its dimension, and every grid value is reached.
  sweep = np.repeat(np.linspace(-8, 8, 801, dtype=np.float32)[:, None], 3, axis=1)
  out = _apply(fsq, {}, sweep)
  for i, l in enumerate(LEVELS):
    expected = (np.arange(l) - l // 2) / (l // 2)
    np.testing.assert_array_equal(np.unique(np.asarray(out.quantized)[:, i]), expected)
  assert np.all(np.abs(out.quantized) <= 1.0)


def test_fsq_index_code_bijection_over_whole_grid():
  fsq = FSQ(levels=LEVELS, code_dim=len(LEVELS))
  grid = _np_fsq_grid(LEVELS).astype(np.float32)
  indices = np.asarray(fsq.codes_to_indices(jnp.asarray(grid)))
  assert indices.dtype == np.int32
  np.testing.assert_array_equal(indices, np.arange(120))
  np.testing.assert_array_equal(fsq.indices_to_codes(fsq.codes_to_indices(grid)), grid)


def test_fsq_forward_matches_numpy_and_losses_are_zero():
  fsq = FSQ(levels=LEVELS, code_dim=len(LEVELS))
  z = (2.0 * np.random.default_rng(0).normal(size=(2, 5, 7, 3))).astype(np.float32)
  bounded = _np_fsq_bound(z, LEVELS)
  frac = np.abs(bounded - np.floor(bounded) - 0.5)
  assert frac.min() > 1e-4, 'test data sits on a rounding boundary; choose another seed'
  half = np.asarray(LEVELS) // 2
  expected_codes = np.round(bounded) / half
  digits = np.round(bounded) + half
  expected_idx = (digits[..., 0] + 8 * digits[..., 1] + 40 * digits[..., 2]).astype(int)

  out = _apply(fsq, {}, z)
  chex.assert_shape([out.quantized, out.indices], [z.shape, (2, 5, 7)])
  assert out.indices.dtype == jnp.int32
  np.testing.assert_array_equal(out.quantized, expected_codes.astype(np.float32))
  np.testing.assert_array_equal(out.indices, expected_idx)
  np.testing.assert_array_equal(_apply(fsq, {}, z, method='encode_to_indices'), expected_idx)
  np.testing.assert_array_equal(_apply(fsq, {}, out.indices, method='lookup'), out.quantized)
  counts = np.bincount(expected_idx.ravel(), minlength=120)
  np.testing.assert_array_equal(out.counts, counts)
  np.testing.assert_allclose(out.perplexity, _np_perplexity(counts), rtol=1e-5)
  for loss in (out.codebook_loss, out.commitment_loss, out.loss, out.entropy_loss):
    assert float(loss) == 0.0


def test_fsq_zero_input_is_the_centre_code():
  fsq = FSQ(levels=LEVELS, code_dim=len(LEVELS))
  out = _apply(fsq, {}, np.zeros((1, 3), np.float32))
  np.testing.assert_array_equal(out.quantized, [[0.0, 0.0, 0.0]])
  np.testing.assert_allclose(fsq.bound(jnp.zeros(3)), 0.0, atol=1e-7)


def test_fsq_straight_through_gradient_is_identity_on_the_bounded_value():
  fsq = FSQ(levels=LEVELS, code_dim=len(LEVELS))
  rng = np.random.default_rng(1)
  z = rng.normal(size=(6, 3)).astype(np.float32)
  w = rng.normal(size=(6, 3)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(w * fsq.apply({}, z).quantized)))(z)
  # Straight-through: the gradient of the code f(z) / (L // 2) with rounding taken as the
  # identity. Oracle: central finite differences of the float64 bound, element by element
  # (each dimension is bounded on its own, so the Jacobian is diagonal).
  eps = 1e-6
  surrogate = lambda z: _np_fsq_bound(z, LEVELS) / (np.asarray(LEVELS) // 2)
  z64 = z.astype(np.float64)
  slope = (surrogate(z64 + eps) - surrogate(z64 - eps)) / (2 * eps)
  np.testing.assert_allclose(grad, w * slope, rtol=1e-5, atol=1e-7)
  # Not the identity: the tanh bound scales the gradient (down to ~0 where it saturates).
  assert np.max(np.abs(slope - 1.0)) > 0.1


def test_fsq_projections_when_code_dim_differs():
  fsq = FSQ(levels=LEVELS, code_dim=6)
  z = np.random.default_rng(2).normal(size=(4, 5, 6)).astype(np.float32)
  variables = _init(fsq, z)
  params = variables['params']
  chex.assert_shape([params['project_in']['kernel'], params['project_out']['kernel']],
                    [(6, 3), (3, 6)])
  out = _apply(fsq, variables, z)
  chex.assert_shape(out.quantized, z.shape)
  # The decoder sees the projected code; lookup must give the same vectors.
  kernel, bias = params['project_in']['kernel'], params['project_in']['bias']
  grid_z = z.astype(np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias)
  codes = np.round(_np_fsq_bound(grid_z, LEVELS)) / (np.asarray(LEVELS) // 2)
  out_k, out_b = params['project_out']['kernel'], params['project_out']['bias']
  np.testing.assert_allclose(out.quantized, codes @ np.asarray(out_k) + np.asarray(out_b),
                             atol=1e-5)
  np.testing.assert_allclose(_apply(fsq, variables, out.indices, method='lookup'),
                             out.quantized, atol=1e-6)


# ---------------------------------------------------------------------------------------
# LFQ.


def test_lfq_index_round_trip_over_all_codes():
  lfq = LFQ(num_codes=16, code_dim=4)
  codes = _np_lfq_codes(4).astype(np.float32)
  np.testing.assert_array_equal(lfq.indices_to_codes(jnp.arange(16)), codes)
  np.testing.assert_array_equal(lfq.codes_to_indices(jnp.asarray(codes)), np.arange(16))
  # Any point in a code's orthant maps to that code's index and value.
  z = (0.3 + np.random.default_rng(3).uniform(size=(16, 4))) * codes
  out = _apply(lfq, {}, z.astype(np.float32))
  np.testing.assert_array_equal(out.indices, np.arange(16))
  np.testing.assert_array_equal(out.quantized, codes)
  np.testing.assert_array_equal(out.counts, np.ones(16))
  np.testing.assert_allclose(out.perplexity, 16.0, rtol=1e-5)


def test_lfq_losses_match_numpy():
  beta, weight, temperature = 0.3, 0.7, 0.5
  lfq = LFQ(num_codes=8, code_dim=3, beta=beta, entropy_weight=weight,
            entropy_temperature=temperature)
  z = np.random.default_rng(4).normal(size=(3, 5, 3)).astype(np.float32)
  out = _apply(lfq, {}, z, train=True)
  signs = np.where(z > 0, 1.0, -1.0)
  np.testing.assert_array_equal(out.quantized, signs)
  np.testing.assert_array_equal(out.indices, np.sum((z > 0) * np.array([1, 2, 4]), axis=-1))
  commitment = np.mean((z.astype(np.float64) - signs) ** 2)
  entropy = _np_lfq_entropy_loss(z, 3, temperature)
  assert float(out.codebook_loss) == 0.0
  np.testing.assert_allclose(out.commitment_loss, commitment, rtol=1e-5)
  np.testing.assert_allclose(out.entropy_loss, entropy, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.loss, beta * commitment + weight * entropy, rtol=1e-4,
                             atol=1e-6)


def test_lfq_one_bit_entropy_closed_form():
  # One bit: p(+1 | z) = sigmoid(4 z / T), so the loss is mean H_2(s_m) - H_2(mean s_m).
  temperature = 2.0
  lfq = LFQ(num_codes=2, code_dim=1, entropy_weight=1.0, entropy_temperature=temperature)
  z = np.random.default_rng(5).normal(size=(9, 1)).astype(np.float32)
  s = 1.0 / (1.0 + np.exp(-4.0 * z[:, 0].astype(np.float64) / temperature))
  h2 = lambda q: -(q * np.log(q) + (1 - q) * np.log(1 - q))
  expected = np.mean(h2(s)) - h2(np.mean(s))
  np.testing.assert_allclose(_apply(lfq, {}, z, train=True).entropy_loss, expected, rtol=1e-5)


def test_lfq_entropy_penalty_only_in_training():
  # Evaluation and tokenizing (train=False) use only the codes: no O(positions * codes)
  # penalty is computed, and the loss is the commitment term alone.
  beta = 0.3
  lfq = LFQ(num_codes=8, code_dim=3, beta=beta, entropy_weight=0.7, entropy_temperature=0.5)
  z = np.random.default_rng(4).normal(size=(3, 5, 3)).astype(np.float32)
  commitment = np.mean((z.astype(np.float64) - np.where(z > 0, 1.0, -1.0)) ** 2)
  out = _apply(lfq, {}, z, train=False)
  assert float(out.entropy_loss) == 0.0
  np.testing.assert_allclose(out.loss, beta * commitment, rtol=1e-5)
  np.testing.assert_array_equal(out.indices, _apply(lfq, {}, z, train=True).indices)
  # The penalty's softmax over all codes ([positions, codes]) is absent from the trace.
  trace = lambda train: str(jax.make_jaxpr(lambda z: lfq.apply({}, z, train=train))(z))
  assert 'f32[15,8]' in trace(True) and 'f32[15,8]' not in trace(False)


def test_lfq_gradients_straight_through_and_finite_with_unused_codes():
  lfq = LFQ(num_codes=8, code_dim=3, entropy_weight=1.0, entropy_temperature=0.01)
  rng = np.random.default_rng(6)
  # All positions in one orthant: at T = 0.01 most codes get exactly zero probability.
  z = (0.5 + rng.uniform(size=(10, 3))).astype(np.float32)
  w = rng.normal(size=(10, 3)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(w * lfq.apply({}, z).quantized)))(z)
  np.testing.assert_array_equal(grad, w)
  loss_grad = jax.jit(jax.grad(lambda z: lfq.apply({}, z, train=True).loss))(z)
  chex.assert_tree_all_finite(loss_grad)
  # Commitment gradient alone: 2 beta (z - sign z) / N, with N every element.
  off = LFQ(num_codes=8, code_dim=3, entropy_weight=0.0)
  commit_grad = jax.jit(jax.grad(lambda z: off.apply({}, z).loss))(z)
  np.testing.assert_allclose(commit_grad, 2 * 0.25 * (z - 1.0) / z.size, rtol=1e-5)
  assert float(_apply(off, {}, z).entropy_loss) == 0.0


def test_lfq_projection_and_lookup():
  lfq = LFQ(num_codes=8, code_dim=5)
  z = np.random.default_rng(7).normal(size=(2, 4, 5)).astype(np.float32)
  variables = _init(lfq, z)
  chex.assert_shape(variables['params']['project_in']['kernel'], (5, 3))
  out = _apply(lfq, variables, z)
  chex.assert_shape(out.quantized, z.shape)
  np.testing.assert_allclose(_apply(lfq, variables, out.indices, method='lookup'),
                             out.quantized, atol=1e-6)
  np.testing.assert_array_equal(_apply(lfq, variables, z, method='encode_to_indices'),
                                out.indices)


# ---------------------------------------------------------------------------------------
# Interface, errors, pmap, tokenizer.


def test_properties_on_unbound_modules():
  fsq = FSQ(levels=[8, 5, 5, 5], code_dim=16)
  assert fsq.levels == (8, 5, 5, 5)
  assert (fsq.vocab_size, fsq.index_depth, fsq.usage_size) == (1000, 1, 1000)
  np.testing.assert_allclose(fsq.bits_per_token, np.log2(1000))
  lfq = LFQ(num_codes=1024, code_dim=16)
  assert (lfq.vocab_size, lfq.index_depth, lfq.usage_size, lfq.bits_per_token) == (
      1024, 1, 1024, 10.0)


@pytest.mark.parametrize('make', [
    lambda: FSQ(levels=(8, 2), code_dim=2),
    lambda: FSQ(levels=(), code_dim=2),
    lambda: LFQ(num_codes=12, code_dim=4),
    lambda: LFQ(num_codes=1, code_dim=4),
    lambda: LFQ(num_codes=8, code_dim=4, entropy_temperature=0.0),
])
def test_bad_fields_raise_one_line_errors(make):
  with pytest.raises(ValueError) as info:
    make()
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('module', [FSQ(levels=(5, 3), code_dim=2), LFQ(num_codes=4, code_dim=2)])
def test_wrong_code_dim_raises(module):
  with pytest.raises(ValueError, match='code_dim is 2'):
    module.apply({}, jnp.zeros((3, 5)))


def _pmap_vs_single(single, sharded, z):
  """Applies `sharded` under pmap to z split in device shards and `single` to all of z."""
  n = jax.local_device_count()
  assert n >= 2, f'need >= 2 local devices for the pmap test, found {n}; see tests/conftest.py'
  variables = _init(single, z)
  # train=True: the entropy penalty is a training term (no statistics change here).
  reference = _apply(single, variables, z, train=True)
  shards = z.reshape((n, -1) + z.shape[1:])
  replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), variables)
  per_device = jax.pmap(lambda v, x: sharded.apply(v, x, train=True),
                        axis_name='batch')(replicated, shards)
  return n, variables, reference, per_device, shards


@pytest.mark.parametrize('make', [
    lambda axis: FSQ(levels=(5, 3), code_dim=4, axis_name=axis),
    lambda axis: LFQ(num_codes=8, code_dim=4, entropy_weight=0.5, entropy_temperature=0.3,
                     axis_name=axis),
])
def test_pmap_equals_single_device_on_concatenated_batch(make):
  z = np.random.default_rng(8).normal(size=(16, 3, 4)).astype(np.float32)
  n, _, ref, out, _ = _pmap_vs_single(make(None), make('batch'), z)
  np.testing.assert_allclose(out.quantized.reshape(z.shape), ref.quantized, atol=1e-6)
  np.testing.assert_array_equal(out.indices.reshape(ref.indices.shape), ref.indices)
  for name in ('counts', 'perplexity', 'entropy_loss'):
    got = np.asarray(getattr(out, name))
    for d in range(1, n):  # the same on every device ...
      np.testing.assert_array_equal(got[d], got[0], err_msg=name)
    np.testing.assert_allclose(got[0], getattr(ref, name), rtol=1e-5, atol=1e-6,
                               err_msg=name)  # ... and equal to the whole batch's
  # Local means over equal shards average to the global mean.
  np.testing.assert_allclose(np.mean(out.commitment_loss), ref.commitment_loss, rtol=1e-5)


def test_lfq_pmean_gradient_equals_single_device_gradient():
  # The train step averages per-device gradients; the psum'd entropy statistics must make
  # that average the gradient of the whole-batch loss.
  make = lambda axis: LFQ(num_codes=8, code_dim=4, entropy_weight=1.0,
                          entropy_temperature=0.5, axis_name=axis)
  z = np.random.default_rng(9).normal(size=(8, 4)).astype(np.float32)
  n, variables, _, _, shards = _pmap_vs_single(make(None), make('batch'), z)
  single_grad = jax.jit(jax.grad(lambda v: make(None).apply(v, z, train=True).loss))(variables)

  def device_grad(v, x):
    return jax.lax.pmean(jax.grad(lambda v: make('batch').apply(v, x, train=True).loss)(v),
                         'batch')

  replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), variables)
  pmapped = jax.pmap(device_grad, axis_name='batch')(replicated, shards)
  chex.assert_trees_all_close(jax.tree.map(lambda g: g[0], pmapped), single_grad,
                              rtol=1e-4, atol=1e-6)


class _TinyEncoder(nn.Module):
  code_dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.code_dim, (2, 2), strides=(2, 2))(x)


class _TinyDecoder(nn.Module):

  @nn.compact
  def __call__(self, z):
    return nn.ConvTranspose(3, (2, 2), strides=(2, 2), name='conv_out')(z)


@pytest.mark.parametrize('quantizer', [FSQ(levels=(5, 3), code_dim=4),
                                       LFQ(num_codes=16, code_dim=4)])
def test_works_inside_vq_tokenizer(quantizer):
  model = tokenizer.VQTokenizer(encoder=_TinyEncoder(4), quantizer=quantizer,
                                decoder=_TinyDecoder())
  images = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.key(0), images)
  recon, q = model.apply(variables, images)
  tokens = model.apply(variables, images, method=tokenizer.VQTokenizer.tokenize)
  chex.assert_shape([recon, tokens], [images.shape, (2, 2, 2)])
  np.testing.assert_array_equal(tokens, q.indices)
  again = model.apply(variables, tokens, method=tokenizer.VQTokenizer.detokenize)
  np.testing.assert_allclose(again, recon, atol=1e-5)
