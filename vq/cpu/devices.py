"""XLA:CPU settings of a single-process CPU run: devices, threads, native kernels, timeouts.

Usage sketch (before JAX starts its backends)::

  from vq.cpu import devices
  plan = devices.resolve_plan('auto', [train_batch_size, eval_batch_size])
  devices.apply_plan(plan)   # XLA_FLAGS (a setting already there wins); VQ_NATIVE=0 if off
  print(plan.describe())

Why several devices on one CPU: XLA:CPU runs one convolution on about one core (value and
gradient of a 3x3 64->64 conv at 32x32, batch 64: 219 ms on 2 cores, 263 ms on 1; a
matmul: 33 vs 59 ms), so a CPU host trains faster with the batch split over devices, one
per core: the same step, the same global batch and the same mathematics (means over
devices of equal shares). The native kernels (`native`) are single-threaded too: they run
on their device's thread.

The rule of `plan` (`--cpu_devices=auto`), for `cores` usable cores (the affinity mask):
- devices: the most that every batch size divides evenly over, at most
  min(cores, MAX_AUTO_DEVICES);
- native kernels: on while each device has at most NATIVE_MAX_CORES_PER_DEVICE cores;
  beyond that a device's other cores can only help XLA's own threaded ops, and a
  single-threaded kernel would leave them idle, so XLA's threaded path runs instead;
- XLA's Eigen intra-op threads: off only with a device per core (they would contend with
  the other devices: taming VQ-VAE step, 2 devices on 2 cores, 24.4 / 23.8 vs 23.3 / 23.2
  images/s in two interleaved pairs), on otherwise (spare cores).
`VQ_CPU_FAST_PATHS=0` gives one device, Eigen threads on and no native kernels: plain XLA,
as on GPU/TPU. docs/cpu.md has the measurements (2-core CPU dev machine, `taskset -c 0`
against `-c 0,1`, 1 and 2 devices, native on and off: native kernels 1.15-1.44x faster on
the taming VQ-VAE step in all four settings) and the reasoning for many cores, which
could not be measured here: the batch sizes usually allow only 2 devices (64 and 250
share no factor above 2), each then with 8 or 32 of a 16- or 64-core host's cores, where
a single-threaded kernel would leave the others idle while XLA's own versions use them,
so the rule falls back to XLA there; a batch that divides by 8 gets 8 devices (the cap:
8 images per device at batch 64), with native kernels up to 16 cores.

In-process collectives: with several CPU devices, every step's `psum`s wait in XLA:CPU's
rendezvous for all devices; XLA aborts the process (SIGABRT, `AwaitAndLogIfStuck` in
`InProcessCommunicator`) when one device arrives more than 20 + 40 s after the first
(the test suite hit it once, 4 devices on 2 busy cores; a host callback that holds one
device back 75 s reproduces it, docs/cpu.md). `apply_plan` and
`collective_timeout_flags` raise both limits (COLLECTIVE_WARN_S, COLLECTIVE_TERMINATE_S):
a slow step then waits, and only a rendezvous stuck for half an hour ends the process.
On GPU/TPU hosts all of this only changes the CPU platform, which does not train.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from vq.cpu import fast_paths

_CPU_DEVICES_FLAG = '--xla_force_host_platform_device_count'
_EIGEN_THREADS_FLAG = '--xla_cpu_multi_thread_eigen'
_WARN_FLAG = '--xla_cpu_collective_call_warn_stuck_timeout_seconds'
_TERMINATE_FLAG = '--xla_cpu_collective_call_terminate_timeout_seconds'

MAX_AUTO_DEVICES = 8
NATIVE_MAX_CORES_PER_DEVICE = 2
# XLA's defaults (jaxlib 0.10.2) are 20 s and 40 s.
COLLECTIVE_WARN_S = 300
COLLECTIVE_TERMINATE_S = 1800


class CpuPlan(NamedTuple):
  """What a CPU run uses: XLA devices, Eigen threads, native kernels; and why."""
  devices: int
  cores: int
  eigen_threads: bool
  native: bool
  why: str

  def describe(self) -> str:
    return (f'{self.devices} CPU device(s) on {self.cores} core(s), XLA intra-op threads '
            f'{"on" if self.eigen_threads else "off"}, native kernels '
            f'{"allowed" if self.native else "off"} ({self.why})')


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask), at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return max(1, os.cpu_count() or 1)


def cpu_devices_for(batch_sizes: list[int], cores: int) -> int:
  """The most CPU devices, at most `cores`, that every batch size divides evenly over."""
  return max(d for d in range(1, max(1, cores) + 1) if all(b % d == 0 for b in batch_sizes))


def plan(cores: int, batch_sizes: list[int], devices: int | None = None,
         fast: bool = True) -> CpuPlan:
  """The CPU settings for `cores` cores and these batch sizes (the rule in the module doc).

  Args:
    cores: usable cores.
    batch_sizes: every global batch size the run splits over the devices.
    devices: a device count chosen by the user (or XLA_FLAGS), or None for the rule's.
    fast: the CPU fast paths are on (`fast_paths.enabled()`).
  """
  cores = max(1, int(cores))
  if not fast:
    return CpuPlan(devices or 1, cores, True, False,
                   f'{fast_paths.ENV}=0: plain XLA, as on GPU/TPU')
  if devices is None:
    devices = cpu_devices_for(batch_sizes, min(cores, MAX_AUTO_DEVICES))
    why = (f'the most devices, at most min(cores, {MAX_AUTO_DEVICES}), that batch sizes '
           f'{sorted(set(batch_sizes))} divide over')
  else:
    why = 'device count as set'
  native = cores <= NATIVE_MAX_CORES_PER_DEVICE * devices
  if not native:
    why += (f'; {cores // devices} cores per device: XLA\'s threaded ops instead of '
            'single-threaded native kernels')
  return CpuPlan(devices, cores, devices < cores, native, why)


def cpu_devices_in_xla_flags() -> int | None:
  """The CPU device count XLA_FLAGS already sets, or None."""
  for flag in os.environ.get('XLA_FLAGS', '').split():
    if flag.startswith(_CPU_DEVICES_FLAG + '='):
      return int(flag.split('=', 1)[1])
  return None


def resolve_plan(value: str, batch_sizes: list[int]) -> CpuPlan:
  """`--cpu_devices` ('auto' or a count) -> the plan; a count in XLA_FLAGS wins."""
  value = str(value).strip().lower()
  count = None
  if value != 'auto':
    try:
      count = int(value)
    except ValueError:
      raise ValueError(f"--cpu_devices={value!r} is neither 'auto' nor a number; use e.g. "
                       '--cpu_devices=2.') from None
    if count < 1:
      raise ValueError(f'--cpu_devices={count} must be >= 1 (or auto).')
  existing = cpu_devices_in_xla_flags()
  if existing is not None:
    count = existing
  return plan(available_cores(), batch_sizes, count, fast_paths.enabled())


def resolve_cpu_devices(value: str, batch_sizes: list[int]) -> int:
  """`--cpu_devices`: 'auto' -> the plan's device count, or a count."""
  return resolve_plan(value, batch_sizes).devices


def collective_timeout_flags(flags: list[str]) -> list[str]:
  """`flags` plus vq's in-process collective timeouts, unless they already set them."""
  out = list(flags)
  for name, seconds in ((_WARN_FLAG, COLLECTIVE_WARN_S),
                        (_TERMINATE_FLAG, COLLECTIVE_TERMINATE_S)):
    if not any(f.startswith(name + '=') for f in out):
      out.append(f'{name}={seconds}')
  return out


def add_collective_timeouts() -> None:
  """Adds vq's collective timeouts to XLA_FLAGS (before JAX starts; the user's win)."""
  os.environ['XLA_FLAGS'] = ' '.join(
      collective_timeout_flags(os.environ.get('XLA_FLAGS', '').split()))


def apply_plan(cpu_plan: CpuPlan) -> int:
  """Puts `cpu_plan` into XLA_FLAGS (and VQ_NATIVE=0 if it has no native kernels).

  Call before JAX starts its backends. Settings already in XLA_FLAGS (device count, Eigen
  threads, collective timeouts) and a VQ_NATIVE the user set win.

  Returns:
    The CPU device count in effect.
  """
  flags = os.environ.get('XLA_FLAGS', '').split()
  count = cpu_devices_in_xla_flags()
  if count is None:
    count = cpu_plan.devices
    flags.append(f'{_CPU_DEVICES_FLAG}={count}')
  if not cpu_plan.eigen_threads and not any(f.startswith(_EIGEN_THREADS_FLAG) for f in flags):
    flags.append(f'{_EIGEN_THREADS_FLAG}=false')
  os.environ['XLA_FLAGS'] = ' '.join(collective_timeout_flags(flags))
  if not cpu_plan.native:
    os.environ.setdefault('VQ_NATIVE', '0')
  return count


def set_cpu_devices(count: int) -> int:
  """Makes XLA's CPU platform show `count` devices (the plan for them); before JAX starts.

  Returns:
    The CPU device count in effect (a count already in XLA_FLAGS wins).
  """
  if count < 1:
    raise ValueError(f'--cpu_devices={count} must be >= 1 (or auto).')
  existing = cpu_devices_in_xla_flags()
  return apply_plan(plan(available_cores(), [], existing or count, fast_paths.enabled()))
