"""The rotation trick (`base.rotate_to`, `gradient='rotation'`) against numpy oracles.

The forward value of `rotate_to` is patched to the code, so it says nothing about the
rotation; the Jacobian J does. Under stop-gradient `rotate_to` is linear in z, so J z must
be the code, J / lambda must be orthogonal with determinant 1, and it must equal the
rotation in the plane of z and e built here from the cosine and sine of their angle (not
from the Householder form the module uses).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq import quantizers
from tests import train_util

K = 8  # codebook size
D = 4  # code dimension
BETA = 0.25
CLASSES = [quantizers.VectorQuantizer, quantizers.EMAVectorQuantizer]

_apply = train_util.jit_apply


def np_plane_rotation(z, e):
  """The rotation by angle(z, e) in the plane of z and e (identity off it), float64.

  Needs z and e not parallel.
  """
  z = np.asarray(z, np.float64)
  e = np.asarray(e, np.float64)
  u = z / np.linalg.norm(z)
  w = e / np.linalg.norm(e)
  cos = u @ w
  v = w - cos * u
  sin = np.linalg.norm(v)
  v = v / sin
  return (np.eye(len(z)) + (cos - 1.0) * (np.outer(u, u) + np.outer(v, v))
          + sin * (np.outer(v, u) - np.outer(u, v)))


def _np_scaled_rotation(z, e):
  """lambda R with lambda = |e| / |z| and R the plane rotation taking z onto e."""
  return np.linalg.norm(e) / np.linalg.norm(z) * np_plane_rotation(z, e)


def test_rotate_to_jacobian_maps_z_onto_its_code_by_a_scaled_rotation():
  rng = np.random.default_rng(0)
  jacobian = jax.jit(jax.jacfwd(lambda z, e: quantizers.rotate_to(z[None], e[None])[0]))
  for _ in range(3):
    z = rng.normal(size=D).astype(np.float32)
    e = (3.0 * rng.normal(size=D)).astype(np.float32)
    jac = np.asarray(jacobian(z, e), np.float64)
    # Linear in z: the Jacobian applied to z is the rotated, rescaled z, which is e.
    np.testing.assert_allclose(jac @ z, e, rtol=1e-5, atol=1e-5)
    scale = np.linalg.norm(e.astype(np.float64)) / np.linalg.norm(z.astype(np.float64))
    rotation = jac / scale
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(D), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-5)  # not a reflection
    np.testing.assert_allclose(rotation, np_plane_rotation(z, e), atol=1e-5)
    assert np.max(np.abs(rotation - np.eye(D))) > 0.1  # not the straight-through identity


def test_rotate_to_degenerate_inputs_stay_finite():
  e = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  grad_fn = jax.jit(jax.jacobian(lambda v: quantizers.rotate_to(v[None], e[None])[0]))
  # Antipodal z: the guard uses the reflection I - 2 q q^T, which still maps u onto q.
  z = -0.5 * e
  jac = np.asarray(grad_fn(jnp.asarray(z)))
  q = e / np.linalg.norm(e)
  reflection = np.eye(D) - 2.0 * np.outer(q, q)
  np.testing.assert_allclose(jac, np.linalg.norm(e) / np.linalg.norm(z) * reflection,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jac @ z, e, rtol=1e-5, atol=1e-5)
  # z = 0: straight-through identity.
  jac0 = np.asarray(grad_fn(jnp.zeros(D)))
  np.testing.assert_allclose(jac0, np.eye(D), atol=1e-6)


def _vars_for(cls, codebook):
  if cls is quantizers.VectorQuantizer:
    return {'params': {'codebook': jnp.asarray(codebook)}}
  return {quantizers.STATS: {'codebook': jnp.asarray(codebook),
                             'ema_counts': jnp.zeros((K,), jnp.float32),
                             'ema_sums': jnp.zeros(codebook.shape, jnp.float32),
                             'ema_steps': jnp.zeros((), jnp.int32)}}


@pytest.mark.parametrize('cls', CLASSES)
def test_rotation_gradient_through_module_and_losses_unchanged(cls):
  cb = np.random.default_rng(1).normal(size=(K, D)).astype(np.float32)
  z = np.random.default_rng(2).normal(size=(1, D)).astype(np.float32)
  ste = cls(num_codes=K, code_dim=D, beta=BETA)
  rot = cls(num_codes=K, code_dim=D, beta=BETA, gradient='rotation')
  variables = _vars_for(cls, cb)
  idx = int(np.argmin(np.sum((z.astype(np.float64) - cb) ** 2, axis=-1)))

  out = _apply(rot, variables, z)
  assert int(out.indices[0]) == idx
  ste_out = _apply(ste, variables, z)
  for name in ('commitment_loss', 'codebook_loss', 'loss'):
    np.testing.assert_array_equal(getattr(out, name), getattr(ste_out, name), err_msg=name)

  jac = jax.jit(jax.jacfwd(lambda v: rot.apply(variables, v[None]).quantized[0]))(z[0])
  np.testing.assert_allclose(jac, _np_scaled_rotation(z[0], cb[idx]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jac, np.float64) @ z[0], cb[idx], rtol=1e-5,
                             atol=1e-5)
  if cls is quantizers.VectorQuantizer:
    # As with straight-through, the output sends no gradient to the codebook.
    g = jax.jit(jax.grad(lambda p: jnp.sum(rot.apply({'params': p}, z).quantized)))(
        variables['params'])
    np.testing.assert_array_equal(g['codebook'], 0.0)
