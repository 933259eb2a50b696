r"""Train-step throughput for a config: one JSON line.

  python -m benchmarks.train_step --config=experiments/vqvae_cifar.py
  python -m benchmarks.train_step --config=experiments/vqgan_cifar.py --config.loss.disc_start=0

Takes the same config file and overrides as run.py. Times the real pmapped train step on
random images already on the device (the input pipeline is measured separately by
benchmarks/input_pipeline.py), after a compile step and warm-up steps; reports the median
over timed steps. For VQ-GAN, set disc_start=0 to time the full generator + discriminator
step (before disc_start the step still runs the discriminator; only the update is masked).
"""

import functools
import json
import resource
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from vq import config_validation
from vq import parallel
from vq import train_state as ts
from vq import train_step as steps
from vq import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after the compile step.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  config = _CONFIG.value
  num_devices = jax.local_device_count()
  config_validation.validate(config, num_devices=num_devices)
  size = config.data.image_size
  lpips_params = trainer.load_lpips_if_needed(config) if ts.uses_lpips(config) else None
  state = ts.create_train_state(config, ts.init_key(config.seed), (size, size, 3), lpips_params)
  settings = steps.StepSettings.from_config(config)
  p_step = parallel.pmap_train_step(functools.partial(steps.train_step, settings=settings))
  p_state = parallel.replicate(state)
  p_rng = parallel.replicate(jax.random.PRNGKey(0))
  per_device = config.train.batch_size // num_devices
  images = np.random.default_rng(0).uniform(
      -1, 1, (num_devices, per_device, size, size, 3)).astype(np.float32)
  batch = parallel.shard({'image': images})

  start = time.perf_counter()
  p_state, metrics = p_step(p_state, batch, p_rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    p_state, metrics = p_step(p_state, batch, p_rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    p_state, metrics = p_step(p_state, batch, p_rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  print(json.dumps({
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'objective': config.objective,
      'arch': config.model.arch,
      'batch_size': config.train.batch_size,
      'images_per_s': config.train.batch_size / step_s,
      'step_s_median': step_s,
      'step_s_min': float(np.min(times)),
      'compile_plus_first_step_s': compile_s,
      'timed_steps': len(times),
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'device_kind': jax.local_devices()[0].device_kind,
      'num_devices': num_devices,
      'backend': jax.default_backend(),
  }))


if __name__ == '__main__':
  app.run(main)
