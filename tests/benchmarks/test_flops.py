"""benchmarks/flops.py against hand-counted multiply-adds."""

import functools
import json
import os
import pathlib
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from benchmarks import flops


def _conv(x, w, strides=(1, 1), padding='SAME', rhs_dilation=(1, 1), groups=1):
  return jax.lax.conv_general_dilated(
      x, w, strides, padding, rhs_dilation=rhs_dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


class FlopsTest(parameterized.TestCase):

  def test_matmul_and_batched_einsum(self):
    a, b = jnp.ones((5, 7)), jnp.ones((7, 3))
    self.assertEqual(flops.count(jnp.matmul, a, b), 2 * 5 * 7 * 3)
    x, y = jnp.ones((4, 6, 8)), jnp.ones((4, 8, 2))
    self.assertEqual(flops.count(lambda x, y: jnp.einsum('bij,bjk->bik', x, y), x, y),
                     2 * 4 * 6 * 8 * 2)

  def test_elementwise_work_is_not_counted(self):
    x = jnp.ones((64, 64))
    self.assertEqual(flops.count(lambda x: jnp.exp(x) * 2 + x.sum(), x), 0)

  @parameterized.named_parameters(
      # name, input hw, kernel (kh, kw, cin, cout), strides, padding, dilation, groups, out hw
      ('same', 9, (3, 3, 4, 6), (1, 1), 'SAME', (1, 1), 1, 9),
      ('valid_strided', 11, (3, 3, 4, 6), (2, 2), 'VALID', (1, 1), 1, 5),
      ('atrous', 9, (3, 3, 4, 6), (1, 1), 'VALID', (2, 2), 1, 5),
      ('grouped', 8, (3, 3, 2, 6), (1, 1), 'SAME', (1, 1), 2, 8),
      ('asymmetric_1x4', 8, (1, 4, 3, 5), (1, 1), 'SAME', (1, 1), 1, 8),
  )
  def test_conv_forward(self, hw, kshape, strides, padding, dilation, groups, out_hw):
    n = 3
    kh, kw, cin_per_group, cout = kshape
    x = jnp.ones((n, hw, hw, cin_per_group * groups))
    w = jnp.ones(kshape)
    fn = functools.partial(_conv, strides=strides, padding=padding, rhs_dilation=dilation,
                           groups=groups)
    self.assertEqual(fn(x, w).shape, (n, out_hw, out_hw, cout))
    expected = 2 * n * out_hw * out_hw * cout * cin_per_group * kh * kw
    self.assertEqual(flops.count(fn, x, w), expected)

  def test_gradient_of_stride_one_conv_is_three_forward_passes(self):
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
    loss = lambda x, w: _conv(x, w).sum()
    forward = 2 * 2 * 8 * 8 * 5 * 4 * 9
    self.assertEqual(flops.count(loss, x, w), forward)
    self.assertEqual(flops.count(jax.value_and_grad(loss, argnums=(0, 1)), x, w), 3 * forward)

  def test_input_gradient_of_strided_conv_counts_real_pixels_only(self):
    # Exact real-pixel multiply-adds of the forward pass: every (output pixel, tap) pair
    # whose input index lies inside the image; the input gradient does the same ones.
    n, hw, cin, cout, k, s = 2, 64, 3, 4, 3, 2
    x, w = jnp.ones((n, hw, hw, cin)), jnp.ones((k, k, cin, cout))
    conv = functools.partial(_conv, strides=(s, s), padding='VALID')
    out_hw = conv(x, w).shape[1]
    forward = 2 * n * out_hw * out_hw * cout * cin * k * k
    input_grad = flops.count(jax.value_and_grad(lambda x: conv(x, w).sum()), x) - forward
    # Dividing by the dilation is exact away from the edges (here within 7%); counting
    # over the zero-dilated input would give s*s times more.
    self.assertLessEqual(abs(input_grad - forward), 0.1 * forward)
    self.assertLess(input_grad, 0.5 * s * s * forward)

  def test_unused_results_do_not_count(self):
    a, b = jnp.ones((6, 6)), jnp.ones((6, 4))

    def f(a, b):
      out, vjp = jax.vjp(lambda a, b: a @ b, a, b)
      _, b_cot = vjp(jnp.ones_like(out))  # the cotangent of `a` is dropped
      _ = a @ a  # computed, never used
      return out, b_cot

    self.assertEqual(flops.count(f, a, b), 2 * 6 * 6 * 4 * 2)  # forward + b's cotangent

  def test_per_device_body_with_collectives(self):
    x = jnp.ones((3, 5))
    body = lambda x: jax.lax.psum(x @ x.T, 'batch')
    self.assertEqual(flops.count(body, x, axis_env=[('batch', 4)]), 2 * 3 * 5 * 3)

  def test_scan_counts_every_iteration_and_cond_its_costliest_branch(self):
    a = jnp.ones((4, 4))

    def scanned(a):
      return jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]

    self.assertEqual(flops.count(scanned, a), 5 * 2 * 4 ** 3)

    def branchy(p, a):
      return jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a)

    self.assertEqual(flops.count(branchy, True, a), 2 * 2 * 4 ** 3)

  def test_remat_recomputation_counts(self):
    a = jnp.ones((8, 8))
    f = lambda x: jnp.sum(jnp.tanh(x @ a) @ a)
    plain = flops.count(jax.value_and_grad(f), a)
    remat = flops.count(jax.value_and_grad(jax.checkpoint(f)), a)
    # x @ a again; the backward pass needs only the inputs of the last matmul.
    self.assertEqual(remat - plain, 2 * 8 ** 3)

  def test_mapped_functions_count_per_device(self):
    devices = np.array(jax.devices()[:2])
    self.assertLen(devices, 2)
    x, w = jnp.ones((2, 4, 6, 6, 3)), jnp.ones((3, 3, 3, 5))
    per_device = flops.count(_conv, x[0], w)
    pmapped = jax.pmap(_conv, in_axes=(0, None), devices=list(devices))
    self.assertEqual(flops.count(pmapped, x, w), per_device)
    mesh = Mesh(devices, ('batch',))
    sharded = jax.jit(jax.shard_map(lambda x, w: _conv(x[0], w)[None], mesh=mesh,
                                    in_specs=(P('batch'), P()), out_specs=P('batch')))
    self.assertEqual(flops.count(sharded, x, w), per_device)


class TrainStepBenchmarkTest(absltest.TestCase):
  """benchmarks/train_step.py end to end: its FLOP count is the one the timing run uses."""

  def _run(self, *args):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.train_step', *args],
                          cwd=pathlib.Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    self.assertLen(lines, 1)
    return json.loads(lines[0])

  @pytest.mark.slow
  def test_flops_only_matches_the_timed_run_and_scales_with_the_batch(self):
    config = '--config=experiments/vqvae_cifar.py:smoke'
    timed = self._run(config, '--steps=1', '--warmup=0', '--parallel=jit')
    counted = self._run(config, '--flops_only')
    doubled = self._run(config, '--flops_only', '--per_device_batch=16')
    self.assertEqual(timed['num_devices'], 2)
    self.assertEqual(timed['flops_per_device_step'], counted['flops_per_device_step'])
    self.assertGreater(timed['images_per_s'], 0)
    self.assertEqual(counted['per_device_batch'], 8)
    # Convolutions scale with the batch; the codebook-distance matmuls too, so ~2x.
    ratio = doubled['flops_per_device_step'] / counted['flops_per_device_step']
    self.assertAlmostEqual(ratio, 2.0, delta=0.05)

  @pytest.mark.slow
  def test_vqgan_flops_with_random_lpips_weights(self):
    out = self._run('--config=experiments/vqgan_cifar.py:smoke', '--flops_only',
                    '--lpips=random')
    self.assertEqual(out['lpips_weights'], 'random')
    self.assertEqual(out['num_params']['lpips'], 14716160)
    self.assertGreater(out['flops_per_device_step'], 0)


# benchmarks/train_step.py defines absl flags (as profile_step.py does), so it is imported in
# a child process of its own.
_INTERLEAVE = r'''
import json, sys
from benchmarks import train_step
calls, clock = [], iter(range(1, 100))
def timer(fn):
  fn()
  return float(next(clock))  # call k is "timed" as k seconds
out = train_step.interleave(lambda: calls.append('o'), lambda: calls.append('p'), rounds=3,
                            pairs=sys.argv[1] == 'pairs', timer=timer)
print(json.dumps([''.join(calls)] + list(out)))
'''


@pytest.mark.parametrize('pairs, order', [
    (True, 'oo pp oo pp oo pp'),   # each side's first step follows the other side's
    (False, 'op po op'),           # one step each, alternating who goes first
])
def test_peer_rounds_interleave_in_the_documented_order(pairs, order):
  proc = subprocess.run([sys.executable, '-c', _INTERLEAVE, 'pairs' if pairs else 'single'],
                        cwd=pathlib.Path(__file__).resolve().parents[2], capture_output=True,
                        text=True, timeout=120, check=True)
  calls, ours, peer, ours_first, peer_first = json.loads(proc.stdout.strip().splitlines()[-1])
  assert calls == order.replace(' ', '')
  if pairs:  # the second step of each pair is the timed one
    assert (ours_first, ours, peer_first, peer) == (
        [1., 5., 9.], [2., 6., 10.], [3., 7., 11.], [4., 8., 12.])
  else:
    assert (ours, peer, ours_first, peer_first) == ([1., 4., 5.], [2., 3., 6.], [], [])
