r"""Whole training loops, input pipeline included: vq's run.py against the PyTorch twin.

  python -m benchmarks.train_loop --config=experiments/vqvae_cifar.py --steps=600 --rounds=3
  python -m benchmarks.train_loop --config=experiments/vqvae_cifar.py --peer=none   # vq alone

The figure compared is the one a user sees: `images_per_s` in `metrics.jsonl`, which vq's
loop (vq/runtime/loop.py) logs every `train.log_every` steps as the images of that window
over its wall clock, the first (compiling) step left out. Each round runs, in fresh
processes and one after the other:
- ours: `run.py --config=... --workdir=<fresh> --config.train.num_steps=N` with the
  `--config.*` overrides given here and run.py's defaults otherwise (CPU devices, huge pages,
  the tfds input pipeline, the checkpoint and pictures at the end, which no window counts);
- the peer: `python -m benchmarks.peer_sonnet` (the Sonnet VQ-VAE's PyTorch twin), its loop
  over the same training split held in memory as float32 (decoded once per benchmark into
  a .npy, `--peer_data` to reuse one), timed in the same windows from the end of its first
  step; with its own default malloc and `--peer_threads` torch threads.
The two sides alternate which goes first from round to round, so slow changes in the load
of a shared machine hit both alike. Reported per side: each run's window medians and its
overall rate (all windows' images over all windows' time), and the medians over rounds;
`ratio_ours_over_peer` divides the medians of the runs' window medians, and
`ratio_per_round` gives the ratio within each round. The 1-minute load average is recorded
before and after every run. Needs the bench venv with PyTorch (see peer_sonnet.py) unless
`--peer=none`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from benchmarks import loop_stats

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 600, 'Training steps per run (each side, each round).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds; each runs both sides once.')
_PEER = flags.DEFINE_enum('peer', 'sonnet', ['sonnet', 'none'],
                          "The loop compared with ours: 'sonnet' (benchmarks/peer_sonnet.py) "
                          "or 'none' (ours alone).")
_PEER_THREADS = flags.DEFINE_integer('peer_threads', 2, 'torch intra-op threads of the peer.')
_PEER_DATA = flags.DEFINE_string(
    'peer_data', None, 'uint8 NHWC training images (.npy) for the peer; default: the '
    "config's data.dataset decoded once into the benchmark's temporary directory.")
_RUN_FLAGS = flags.DEFINE_list('run_flags', [], 'Extra flags for run.py, e.g. --cpu_devices=1.')
_KEEP = flags.DEFINE_string('keep', None, "Keep each run's workdir and log under this "
                            'directory (default: a temporary one, removed at the end).')
flags.mark_flags_as_required(['config'])

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: pathlib.Path, env: dict[str, str]) -> tuple[float, float, float]:
  """Runs `cmd` with stdout+stderr to `log`; returns (load before, load after, wall s)."""
  load_before, start = os.getloadavg()[0], time.perf_counter()
  with open(log, 'w') as f:
    rc = subprocess.run(cmd, cwd=_REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                        check=False).returncode
  if rc:
    tail = log.read_text().strip().splitlines()[-5:]
    raise RuntimeError(f'{cmd[:4]}... exited with {rc}; the end of {log}:\n' + '\n'.join(tail))
  return load_before, os.getloadavg()[0], time.perf_counter() - start


def _ours(config, argv, workdir: pathlib.Path) -> dict[str, Any]:
  cmd = [sys.executable, 'run.py', f'--config={config_flags.get_config_filename(flags.FLAGS["config"])}',
         f'--workdir={workdir}', f'--config.train.num_steps={_STEPS.value}',
         *loop_stats.config_overrides(argv), *_RUN_FLAGS.value]
  load_before, load_after, wall = _run(cmd, workdir.with_suffix('.log'), dict(os.environ))
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {**loop_stats.window_rates(records, config.train.batch_size), 'wall_s': round(wall, 1),
          'load_before': load_before, 'load_after': load_after}


def _peer(config, data: pathlib.Path, log: pathlib.Path) -> dict[str, Any]:
  from vq.cpu import host_memory  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, '-m', 'benchmarks.peer_sonnet', f'--data={data}',
         f'--config_json={config.to_json_best_effort()}', f'--steps={_STEPS.value}',
         f'--log_every={config.train.log_every}', f'--threads={_PEER_THREADS.value}',
         f'--seed={config.seed}']
  load_before, load_after, wall = _run(cmd, log, host_memory.without_tunable(os.environ))
  result = json.loads(log.read_text().strip().splitlines()[-1])
  return {**result, 'wall_s': round(wall, 1), 'load_before': load_before,
          'load_after': load_after}


def _peer_data(config, directory: pathlib.Path) -> pathlib.Path:
  """The training split as one uint8 .npy (decoded with vq's own reader)."""
  from vq import data  # pylint: disable=g-import-not-at-top
  if _PEER_DATA.value:
    return pathlib.Path(_PEER_DATA.value)
  source = data.open_source(config.data.dataset, image_size=config.data.image_size,
                            data_dir=config.data.data_dir or None, resize=config.data.resize,
                            download=config.data.download)
  images, _ = source.get_many(range(len(source)))
  path = directory / 'peer_train_uint8.npy'
  np.save(path, images)
  return path


def main(argv):
  config = _CONFIG.value
  if _PEER.value == 'sonnet':
    # Only the config check here (no torch in this process): the peer runs as its own child.
    import importlib.util  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec('torch') is None:
      raise app.UsageError('--peer=sonnet needs PyTorch in this venv (see '
                           'benchmarks/peer_sonnet.py), or pass --peer=none.')
  with tempfile.TemporaryDirectory(prefix='vq_train_loop_') as tmp:
    directory = pathlib.Path(_KEEP.value or tmp)
    directory.mkdir(parents=True, exist_ok=True)
    data = _peer_data(config, directory) if _PEER.value == 'sonnet' else None
    ours_runs, peer_runs = [], []
    for r in range(_ROUNDS.value):
      sides = ['ours', 'peer'] if _PEER.value == 'sonnet' else ['ours']
      for side in sides if r % 2 == 0 else sides[::-1]:
        if side == 'ours':
          ours_runs.append(_ours(config, sys.argv, directory / f'ours_round{r}'))
        else:
          peer_runs.append(_peer(config, data, directory / f'peer_round{r}.log'))
    result = {'config': config_flags.get_config_filename(flags.FLAGS['config']),
              'overrides': loop_stats.config_overrides(sys.argv), 'run_flags': _RUN_FLAGS.value,
              'steps': _STEPS.value, 'log_every': config.train.log_every,
              'batch_size': config.train.batch_size, 'rounds': _ROUNDS.value,
              'ours': loop_stats.summarize(ours_runs), 'ours_runs': ours_runs}
    if peer_runs:
      ours_m, peer_m = result['ours']['images_per_s_median'], loop_stats.summarize(peer_runs)
      result.update({
          'peer': 'sonnet', 'peer_threads': _PEER_THREADS.value, 'peer_summary': peer_m,
          'ratio_ours_over_peer': ours_m / peer_m['images_per_s_median'],
          'ratio_overall': (result['ours']['images_per_s_overall_median']
                            / peer_m['images_per_s_overall_median']),
          'ratio_per_round': [round(o['images_per_s_median'] / p['images_per_s_median'], 3)
                              for o, p in zip(ours_runs, peer_runs)],
          'peer_runs': peer_runs})
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
