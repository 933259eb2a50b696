"""The quantizers' CPU-only formulations (nearest index, per-code sums) against numpy, and
the EMA quantizer's training update on them against the plain XLA program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq.quantizers import base
from vq.quantizers import vector

BACKENDS = ['cpu', 'gpu']  # 'gpu': the program every other backend runs (traced on CPU)


@pytest.mark.parametrize('backend', BACKENDS)
def test_nearest_index_is_numpy_argmin_with_first_index_on_ties(backend):
  rng = np.random.default_rng(0)
  # Small integers: many exact ties within a row, where argmin takes the first index.
  d = rng.integers(0, 4, size=(3, 50, 7)).astype(np.float32)
  d[0, 0] = 5.0  # a row of equal values
  got = jax.jit(lambda d: base.nearest_index(d, backend=backend))(d)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmin(d, axis=-1))


@pytest.mark.parametrize('backend', BACKENDS)
def test_code_sums_match_numpy_scatter_add(backend):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 5)).astype(np.float32)
  indices = rng.integers(0, 6, size=200).astype(np.int32)
  indices[indices == 4] = 5  # code 4 unused: its sums stay zero
  expected = np.zeros((7, 5))
  np.add.at(expected, indices, x.astype(np.float64))
  got = jax.jit(lambda x, i: base.code_sums(x, i, 7, backend=backend))(x, indices)
  assert got.dtype == jnp.float32 and got.shape == (7, 5)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_ema_training_update_equals_the_plain_program(monkeypatch):
  module = vector.EMAVectorQuantizer(num_codes=16, code_dim=4)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 4))
  variables = module.init(jax.random.PRNGKey(1), z)

  def train(z):
    return module.apply(variables, z, train=True, mutable=[base.STATS])

  out, stats = jax.jit(train)(z)
  monkeypatch.setattr(base, 'cpu_fast_path', lambda backend=None: False)
  # A new function object, so that jit traces again with the plain program.
  ref_out, ref_stats = jax.jit(lambda z: train(z))(z)
  np.testing.assert_array_equal(out.indices, ref_out.indices)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               (out, stats), (ref_out, ref_stats))
