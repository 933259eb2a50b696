"""Preemption and NaN guard, proven with a real signal and a poisoned batch."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import vqvae_cifar
from vq.runtime import checkpointing
from vq import data
from vq.runtime import state as ts
from vq.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[2]


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


def _cli(workdir, *overrides):
  env = dict(os.environ)  # same forced device count as this process (tests/conftest.py)
  return ([sys.executable, str(REPO / 'run.py'), '--config=experiments/vqvae_cifar.py:smoke',
           f'--workdir={workdir}', '--config.train.image_every=0', *overrides],
          dict(cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def _restored(workdir):
  config = vqvae_cifar.get_config('smoke')
  ckpt = checkpointing.Checkpointer(pathlib.Path(workdir) / 'checkpoints')
  step = ckpt.latest_step()
  state, _ = ckpt.restore(step, trainer.build_state(config, (32, 32, 3)))
  ckpt.close()
  return step, ts.checkpointable(state)


def test_sigkill_then_rerun_is_bit_identical_to_uninterrupted_run(tmp_path):
  steps = ['--config.train.num_steps=40', '--config.train.checkpoint_every=4',
           '--config.train.log_every=1']
  killed = tmp_path / 'killed'
  args, kwargs = _cli(killed, *steps)
  proc = subprocess.Popen(args, **kwargs)
  metrics = killed / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and sum('loss' in l for l in metrics.read_text().splitlines()) >= 10:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  ckpt = checkpointing.Checkpointer(killed / 'checkpoints')
  killed_at = ckpt.latest_step()
  ckpt.close()
  assert killed_at is not None and killed_at < 40, f'kill landed at {killed_at}'

  result = subprocess.run(*[args], **kwargs, timeout=240, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  # The uninterrupted run happens in this process, on the same number of devices.
  straight = tmp_path / 'straight'
  config = vqvae_cifar.get_config('smoke')
  config.train.num_steps, config.train.checkpoint_every = 40, 4
  config.train.log_every, config.train.image_every = 1, 0
  trainer.train_and_evaluate(config, str(straight))
  step_a, a = _restored(killed)
  step_b, b = _restored(straight)
  assert step_a == step_b == 40
  chex.assert_trees_all_equal(a, b)


def _train(workdir, num_steps, **kwargs):
  config = vqvae_cifar.get_config('smoke')
  config.train.num_steps = num_steps
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  config.train.image_every = 0
  return trainer.train_and_evaluate(config, str(workdir), **kwargs)


def _damage(step_dir):
  for f in (step_dir / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'\x00garbage')


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path):
  _train(tmp_path, 4)
  _damage(tmp_path / 'checkpoints' / '4')
  _train(tmp_path, 6)
  ckpt = checkpointing.Checkpointer(tmp_path / 'checkpoints')
  assert ckpt.all_steps()[-1] == 6
  ckpt.close()
  assert (tmp_path / 'checkpoints.damaged-step4').is_dir()  # kept, not deleted
  logged = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
            if 'loss' in json.loads(l)]
  assert logged == [1, 2, 3, 4, 3, 4, 5, 6]  # resumed from step 2


def test_no_usable_checkpoint_refuses_unless_asked(tmp_path):
  _train(tmp_path, 4)
  for step in (2, 4):
    _damage(tmp_path / 'checkpoints' / str(step))
  with pytest.raises(checkpointing.UnusableCheckpoints,
                     match=r'none of the checkpoints .* --reinit_unusable_checkpoints'):
    _train(tmp_path, 6)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '4']
  _train(tmp_path, 2, reinit_unusable_checkpoints=True)
  aside = [p for p in tmp_path.iterdir() if p.name.startswith('checkpoints.unusable-')]
  assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ['2', '4']


def test_incompatible_checkpoint_names_the_differing_fields(tmp_path):
  _train(tmp_path, 2)
  config = vqvae_cifar.get_config('smoke')
  config.quantizer.num_codes = 32
  config.model.hidden = 48
  with pytest.raises(checkpointing.IncompatibleCheckpoint,
                     match=r'model.hidden: saved 32, now 48; quantizer.num_codes: saved 64, '
                           r'now 32'):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_checkpoint_from_before_usage_tracking_resumes_with_fresh_tracking(tmp_path):
  # Checkpoints written before `code_usage` joined the train state hold every other field.
  config = vqvae_cifar.get_config('smoke')
  fresh = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  old = ts.checkpointable(fresh.replace(step=np.int32(7)))
  old['params'] = jax.tree.map(lambda x: x + 1.0, old['params'])
  del old['code_usage']
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt._manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(old),  # pylint: disable=protected-access
                                                meta=ocp.args.JsonSave({})))
  ckpt.wait()
  state, step = ckpt.restore_or_init(fresh)
  ckpt.close()
  assert step == 7 and int(state.step) == 7
  chex.assert_trees_all_equal(state.params, old['params'])
  chex.assert_trees_all_equal(state.code_usage, fresh.code_usage)
