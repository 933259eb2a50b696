"""Preemption and NaN guard, proven with a real signal and a poisoned batch."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import vqvae_cifar
from vq import checkpointing
from vq import data
from vq import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_sigterm_finishes_step_saves_and_exits_zero(tmp_path):
  workdir = tmp_path / 'wd'
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  proc = subprocess.Popen(
      [sys.executable, str(REPO / 'run.py'), '--config=experiments/vqvae_cifar.py:smoke',
       f'--workdir={workdir}', '--config.train.num_steps=100000',
       '--config.train.log_every=1', '--config.train.checkpoint_every=100000',
       '--config.train.image_every=0'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and sum('loss' in l for l in metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  lines = [l for l in out.splitlines() if 'received SIGTERM' in l]
  assert len(lines) == 1, out
  saved_step = int(lines[0].split('at step ')[1].split()[0])
  assert saved_step >= 3
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints')
  assert ckpt.latest_step() == saved_step
  ckpt.close()
  logged = [json.loads(l)['step'] for l in metrics.read_text().splitlines()
            if 'loss' in json.loads(l)]
  assert logged[-1] == saved_step  # logs flushed up to the saved step


def test_nan_stops_training_and_never_overwrites_the_good_checkpoint(tmp_path, monkeypatch):
  config = vqvae_cifar.get_config('smoke')
  config.train.num_steps = 8
  config.train.checkpoint_every = 2
  config.train.log_every = 2
  config.train.image_every = 0
  real_batches = data.train_batches

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real_batches(*args, **kwargs), start=kwargs['start_step']):
      if i == 4:  # step 5 sees a NaN image
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  monkeypatch.setattr(trainer.data, 'train_batches', poisoned)
  with pytest.raises(FloatingPointError,
                     match=r'non-finite loss.* between steps 5 and 6.*last good checkpoint: step 4'):
    trainer.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpointing.Checkpointer(tmp_path / 'checkpoints')
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
