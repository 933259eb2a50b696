"""Where the train step's time goes on a CPU: per-category milliseconds from a jax.profiler trace.

  taskset -c 0 python -m benchmarks.profile_step --config=experiments/vqgan_cifar.py \\
      --config.objective=vqvae --per_device_batch=32

Compiles the step on one CPU device (`cpu_devices.set_cpu_devices(1)`, as run.py) with
`--per_device_batch` random images, runs `--warmup` steps, times `--steps` more, then
records `--traced` steps with `jax.profiler` (a Perfetto trace) and maps every XLA thunk in
it back to the JAX operation that produced it (the compiled HLO's `op_name` metadata). It
prints one JSON line: the step time, milliseconds per step for each category below, and the
`--top` costliest thunks. Categories, from the op_name: 'conv forward', 'conv input
gradient' (XLA/YNNPACK convolutions), 'conv kernel gradient and im2col' (the rest of a conv
layer's backward: vq.models.conv's blocked im2col matmuls, slices, pads), 'conv forward other' (bias
adds, im2col forward), 'groupnorm', 'swish', 'attention', 'lpips', 'discriminator',
'quantizer', 'other'. A `while` thunk's time is its body's, so it is not counted again.

Measured with it (2-core dev CPU, one core via taskset, batch 32, 2026-11-27): see docs/speed.md.
On other machines thunk names may differ; the categories depend only on op_name.
"""

import collections
import functools
import json
import os
import re
import statistics
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks.xla_trace import time_and_trace

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=False)
_PER_DEVICE_BATCH = flags.DEFINE_integer('per_device_batch', 32, 'Images in the step.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after the compile.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps (median reported).')
_TRACED = flags.DEFINE_integer('traced', 2, 'Steps recorded by the profiler (averaged).')
_TOP = flags.DEFINE_integer('top', 10, 'Costliest thunks to list.')
_TOP_CATEGORY = flags.DEFINE_string(
    'top_category', None, "List only the costliest thunks of this category (e.g. 'other').")
_HOST_HUGE_PAGES = flags.DEFINE_bool(
    'host_huge_pages', True, "As run.py's: restart once with glibc.malloc.hugetlb=1 where that "
    'changes anything (vq/cpu/host_memory.py).')
_LPIPS = flags.DEFINE_enum('lpips', 'random', ['random', 'pretrained'],
                           "VQ-GAN's LPIPS weights (the same work either way).")

_CONV_LAYER = re.compile(r'/conv\d?/|/conv_in/|/conv_out/|nin_shortcut|upsample/conv|'
                         r'downsample|/Conv_\d|/conv\d_\d|/deconv\d/|/res\d+_conv\d/')


def category(op_name: str) -> str:
  """The category of one XLA operation, from its JAX op_name metadata."""
  backward = 'transpose(' in op_name
  if re.search(r'LPIPS|lpips', op_name):
    return 'lpips'
  if re.search(r'[Dd]iscriminator|PatchGAN', op_name):
    return 'discriminator'
  if op_name.endswith('conv_general_dilated'):
    return 'conv input gradient' if backward else 'conv forward'
  if _CONV_LAYER.search(op_name):
    return 'conv kernel gradient and im2col' if backward else 'conv forward other'
  if 'attn' in op_name:
    return 'attention'
  if 'quantizer' in op_name.lower():
    return 'quantizer'
  if re.search(r'norm', op_name):
    return 'groupnorm'
  if re.search(r'silu|swish', op_name):
    return 'swish'
  return 'other'


def main(argv):
  del argv
  from vq.cpu import host_memory  # pylint: disable=g-import-not-at-top
  # As run.py does (re-executes this process, or returns saying why not).
  print(f'host huge pages: {host_memory.restart_with_huge_pages(_HOST_HUGE_PAGES.value)}',
        file=sys.stderr)
  from vq.cpu import devices as cpu_devices  # pylint: disable=g-import-not-at-top
  # One CPU device, as run.py would set it up (a count already in XLA_FLAGS wins).
  cpu_devices.set_cpu_devices(1)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
  from vq.runtime import parallel  # pylint: disable=g-import-not-at-top
  from vq.runtime import state as ts  # pylint: disable=g-import-not-at-top
  from vq.training import step as steps  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  size, batch = config.data.image_size, _PER_DEVICE_BATCH.value
  config.train.batch_size = config.eval.batch_size = batch
  if config.objective == 'vqgan':  # the full generator + discriminator step
    config.loss.disc_start, config.loss.disc_warmup = 0, 0
  lpips_params = None
  if ts.uses_lpips(config):
    lpips_params = (lpips.random_params() if _LPIPS.value == 'random'
                    else lpips.load_pretrained_params())
  state = ts.create_train_state(config, ts.init_key(config.seed), (size, size, 3), lpips_params)
  par = parallel.get('pmap')
  p_step = par.step(functools.partial(steps.train_step,
                                      settings=steps.StepSettings.from_config(config)))
  p_state, p_rng = par.replicate(state), par.replicate(jax.random.PRNGKey(0))
  images = np.random.default_rng(0).uniform(-1, 1, (1, batch, size, size, 3)).astype(np.float32)
  p_batch = par.shard({'image': images})
  compiled = p_step.lower(p_state, p_batch, p_rng).compile()

  times, per_thunk, names = time_and_trace(compiled, p_state, (p_batch, p_rng),
                                           warmup=_WARMUP.value, steps=_STEPS.value,
                                           traced=_TRACED.value)
  per_category = collections.Counter()
  for thunk, us in per_thunk.items():
    per_category[category(names.get(thunk, ''))] += us
  scale = 1e-3 / _TRACED.value  # microseconds over all traced steps -> ms per step
  print(json.dumps({
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'objective': config.objective, 'per_device_batch': batch,
      'step_s_median': statistics.median(times),
      'traced_ms_per_step': round(sum(per_thunk.values()) * scale, 1),
      'ms_per_step': {k: round(v * scale, 1) for k, v in per_category.most_common()},
      'top_thunks': [{'thunk': t, 'ms': round(us * scale, 1), 'op_name': names.get(t, '')[-90:]}
                     for t, us in per_thunk.most_common()
                     if _TOP_CATEGORY.value in (None, category(names.get(t, '')))][:_TOP.value],
      'xla_flags': os.environ['XLA_FLAGS'],
      'device_kind': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  app.run(main)
