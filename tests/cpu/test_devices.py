"""vq.cpu.devices: the CPU plan (devices, threads, native kernels) and XLA's collective timeouts."""

import os
import pathlib
import subprocess
import sys

import pytest

from vq.cpu import devices as cpu_devices

_REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize('batch_sizes, cores, expected', [
    ([64, 250], 2, 2), ([64, 250], 8, 2), ([64, 256], 8, 8), ([64, 256], 6, 4),
    ([7], 4, 1), ([16], 1, 1), ([12, 18], 16, 6)])
def test_cpu_devices_for_is_the_largest_count_dividing_every_batch(batch_sizes, cores,
                                                                   expected):
  got = cpu_devices.cpu_devices_for(batch_sizes, cores)
  assert got == expected
  # Oracle: brute force over every count up to the cores.
  assert got == max(d for d in range(1, cores + 1) if not any(b % d for b in batch_sizes))


@pytest.mark.parametrize('cores, batch_sizes, devices, eigen, native', [
    (1, [64, 250], 1, False, True),      # one core: one device, nothing to share
    (2, [64, 250], 2, False, True),      # the 2-core dev machine: a device per core
    (4, [64, 250], 2, True, True),       # 2 cores per device: native still on
    (16, [64, 250], 2, True, False),     # 8 cores per device: XLA's threaded path
    (64, [64, 250], 2, True, False),
    (16, [64, 256], 8, True, True),      # the cap: 8 devices, 2 cores each
    (64, [64, 256], 8, True, False),     # 8 cores per device
    (8, [64, 256], 8, False, True),
    (3, [64], 2, True, True),
])
def test_plan_follows_the_documented_rule(cores, batch_sizes, devices, eigen, native):
  got = cpu_devices.plan(cores, batch_sizes)
  assert (got.devices, got.eigen_threads, got.native) == (devices, eigen, native), got
  # The rule, written out: the largest common divisor within min(cores, cap); native
  # kernels while each device has at most NATIVE_MAX_CORES_PER_DEVICE cores.
  limit = min(cores, cpu_devices.MAX_AUTO_DEVICES)
  d = max(n for n in range(1, limit + 1) if all(b % n == 0 for b in batch_sizes))
  assert got.devices == d
  assert got.native == (cores / d <= cpu_devices.NATIVE_MAX_CORES_PER_DEVICE)
  assert got.eigen_threads == (d < cores)
  assert str(cores) in got.describe() and str(d) in got.describe()


def test_plan_with_the_fast_paths_off_is_plain_xla():
  got = cpu_devices.plan(2, [64, 250], fast=False)
  assert (got.devices, got.eigen_threads, got.native) == (1, True, False)
  assert 'VQ_CPU_FAST_PATHS=0' in got.describe()
  assert cpu_devices.plan(2, [64], devices=4, fast=False).devices == 4  # a count as set


def test_resolve_plan_and_cpu_devices(monkeypatch):
  monkeypatch.setattr(cpu_devices, 'available_cores', lambda: 4)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv('VQ_CPU_FAST_PATHS', raising=False)
  assert cpu_devices.resolve_cpu_devices('auto', [64, 250]) == 2
  assert cpu_devices.resolve_cpu_devices(' 3 ', [64]) == 3
  with pytest.raises(ValueError, match="neither 'auto' nor a number"):
    cpu_devices.resolve_cpu_devices('many', [64])
  with pytest.raises(ValueError, match='must be >= 1'):
    cpu_devices.resolve_cpu_devices('0', [64])
  monkeypatch.setenv('VQ_CPU_FAST_PATHS', '0')
  assert cpu_devices.resolve_cpu_devices('auto', [64, 250]) == 1
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=3')
  assert cpu_devices.resolve_plan('auto', [64]).devices == 3  # XLA_FLAGS wins


def _device_count_after(xla_flags: str | None, count: int) -> str:
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
  code = ('from vq.cpu import devices; import jax; n = devices.set_cpu_devices(%d); '
          'print(n, jax.local_device_count())' % count)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=_REPO, timeout=120, check=True)
  return out.stdout.split()


def test_set_cpu_devices_before_jax_starts_and_xla_flags_win():
  assert _device_count_after(None, 3) == ['3', '3']
  assert _device_count_after('--xla_force_host_platform_device_count=2', 3) == ['2', '2']


@pytest.mark.parametrize('cores, count, existing, single_threaded', [
    (2, 2, '', True),    # a device per core: Eigen's own threads switched off
    (4, 2, '', False),   # spare cores: Eigen may use them
    (2, 2, '--xla_cpu_multi_thread_eigen=true', False),  # the user's choice stays
])
def test_set_cpu_devices_turns_off_eigen_threads_only_with_a_device_per_core(
    monkeypatch, cores, count, existing, single_threaded):
  monkeypatch.setattr(cpu_devices, 'available_cores', lambda: cores)
  monkeypatch.setenv('XLA_FLAGS', existing)
  assert cpu_devices.set_cpu_devices(count) == count
  flags = os.environ['XLA_FLAGS'].split()
  assert f'--xla_force_host_platform_device_count={count}' in flags
  assert ('--xla_cpu_multi_thread_eigen=false' in flags) == single_threaded
  assert sum(f.startswith('--xla_cpu_multi_thread_eigen') for f in flags) == bool(
      existing or single_threaded)


def test_apply_plan_sets_timeouts_and_native_off_but_the_users_settings_win(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_collective_call_warn_stuck_timeout_seconds=7')
  monkeypatch.setenv('VQ_NATIVE', '')
  monkeypatch.delenv('VQ_NATIVE')  # (recorded, so that the test's VQ_NATIVE=0 goes too)
  assert cpu_devices.apply_plan(cpu_devices.plan(16, [64, 250])) == 2
  flags = os.environ['XLA_FLAGS'].split()
  assert flags.count('--xla_cpu_collective_call_warn_stuck_timeout_seconds=7') == 1
  assert not any(f.startswith('--xla_cpu_collective_call_warn_stuck_timeout_seconds=3')
                 for f in flags)
  assert ('--xla_cpu_collective_call_terminate_timeout_seconds='
          f'{cpu_devices.COLLECTIVE_TERMINATE_S}') in flags
  assert os.environ['VQ_NATIVE'] == '0'  # 8 cores per device: no native kernels
  monkeypatch.setenv('VQ_NATIVE', '1')
  monkeypatch.setenv('XLA_FLAGS', '')
  cpu_devices.apply_plan(cpu_devices.plan(16, [64, 250]))
  assert os.environ['VQ_NATIVE'] == '1'
  assert len(os.environ['XLA_FLAGS'].split()) == 3  # count and the two timeouts


# A pmapped psum over 4 CPU devices where device 0 arrives 3 s late (a host callback
# sleeps). The timeouts come from `collective_timeout_flags` (the warning lowered to 1 s
# so that XLA says it waited): the step must finish, and XLA must have seen the flags.
_STRAGGLER = r'''
import os, sys, time
from vq.cpu import devices
devices.COLLECTIVE_WARN_S = 1
os.environ['XLA_FLAGS'] = ' '.join(devices.collective_timeout_flags(
    ['--xla_force_host_platform_device_count=4']))
import jax, jax.numpy as jnp, numpy as np
def late(i):
  if int(i) == 0:
    time.sleep(3)
  return np.float32(i)
def f(x):
  y = jax.pure_callback(late, jax.ShapeDtypeStruct((), jnp.float32), jax.lax.axis_index('b'))
  return jax.lax.psum(x + y, 'b')
print('sum', float(jax.pmap(f, axis_name='b')(jnp.arange(4.0))[0]))
'''


def test_collective_timeouts_are_xla_flags_this_jaxlib_honours():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', _STRAGGLER], env=env, cwd=_REPO,
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'sum 12.0' in out.stdout  # 0+1+2+3 twice
  # XLA read the lowered warning (an unknown flag would have aborted at start-up) and the
  # terminate limit let the late device in.
  assert 'may be stuck' in out.stderr and 'unstuck' in out.stderr, out.stderr[-3000:]


def test_run_py_auto_cpu_devices_trains_on_the_planned_devices(tmp_path):
  """run.py splits the smoke batch over the CPU devices 'auto' picks (2 on 2 cores)."""
  from experiments import vqvae_cifar  # pylint: disable=g-import-not-at-top
  smoke = vqvae_cifar.get_config('smoke')
  expected = cpu_devices.plan(cpu_devices.available_cores(),
                              [smoke.train.batch_size, smoke.eval.batch_size]).devices
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0'  # no device count: run.py plans it
  out = subprocess.run(
      [sys.executable, str(_REPO / 'run.py'),
       '--config=experiments/vqvae_cifar.py:smoke', f'--workdir={tmp_path}',
       '--config.train.num_steps=2', '--config.train.image_every=0'],
      env=env, capture_output=True, text=True, cwd=_REPO, timeout=240, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f'CPU platform shows {expected} device(s)' in out.stderr
  assert f'{expected} local device(s)' in out.stderr
  # The huge-page restart is never silent: one line says it happened and how to turn it
  # off, or why it did not.
  huge = [l for l in out.stderr.splitlines() if 'vq: host huge pages' in l]
  assert len(huge) == 1, huge
  assert ('restarted once' in huge[0] and '--nohost_huge_pages' in huge[0]) or (
      'no restart:' in huge[0]), huge[0]
