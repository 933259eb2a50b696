"""Two JAX processes on localhost train as one job and agree with a one-process run.

Each process has one CPU device (gloo collectives between them). They train the smoke
VQ-VAE for 3 steps under 'pmap', then resume from the shared checkpoint for a 4th step
under 'jit'. A single process with two devices trains the same 4 steps on the same
global batches without stopping. Checks: both processes hold identical states, equal to
the one-process run at steps 3 and 4 (so per-process data sharding, cross-process
collectives, multi-process orbax save and restore, and both parallel implementations
across processes all line up).
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from vq.runtime import distributed
from vq.runtime import loop



_WORKER = pathlib.Path(__file__).with_name('multiprocess_worker.py')
_TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  # Two processes share 2 cores: keep each one's thread pools from oversubscribing.
  env.setdefault('OMP_NUM_THREADS', '1')
  return env


def _launch(args: list[str], num_devices: int, log: pathlib.Path) -> subprocess.Popen:
  out = open(log, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, str(_WORKER), *args], env=_env(num_devices),
                          stdout=out, stderr=subprocess.STDOUT)


def _wait_all(procs: list[tuple[subprocess.Popen, pathlib.Path]]) -> None:
  try:
    for proc, _ in procs:
      proc.wait(timeout=_TIMEOUT_S)
  finally:
    for proc, _ in procs:
      if proc.poll() is None:  # one died: the other waits at a barrier forever
        proc.kill()
        proc.wait()
  for proc, log in procs:
    assert proc.returncode == 0, f'worker failed ({proc.returncode}):\n' + (
        log.read_text()[-4000:])


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.slow  # several processes
def test_two_processes_equal_each_other_and_one_process(tmp_path):
  port = _free_port()
  shared = tmp_path / 'two_processes'  # one workdir, as on a shared filesystem
  procs = []
  for pid in range(2):
    out = tmp_path / f'process{pid}.npz'
    procs.append((_launch(
        [f'--workdir={shared}', f'--out={out}', '--num_processes=2', f'--process_id={pid}',
         f'--coordinator_address=localhost:{port}', '--phases=pmap:3,jit:4',
         '--eval_every=4'],
        num_devices=1, log=tmp_path / f'process{pid}.log'), tmp_path / f'process{pid}.log'))
  single_out = tmp_path / 'single.npz'
  # The reference runs after the pair so three compiles do not share 2 cores at once.
  _wait_all(procs)
  single = _launch([f'--workdir={tmp_path / "one_process"}', f'--out={single_out}',
                    '--phases=pmap:4', '--eval_every=4'], num_devices=2,
                   log=tmp_path / 'single.log')
  _wait_all([(single, tmp_path / 'single.log')])

  p0, p1 = _load(tmp_path / 'process0.npz'), _load(tmp_path / 'process1.npz')
  ref = _load(single_out)
  assert sorted({k.split('/')[0] for k in p0}) == ['final_eval', 'step3', 'step4']
  assert p0.keys() == p1.keys() == ref.keys()
  # Evaluation at step 4: each process evaluates its share of the 48 test images, and
  # both report the metrics of all 48, as the one-process run does.
  assert int(p0['final_eval/num_examples']) == 48
  assert {'final_eval/psnr', 'final_eval/ssim', 'final_eval/perplexity'} <= p0.keys()
  assert any('codebook' in k for k in p0) and any('opt_state' in k for k in p0)
  for key in p0:
    # Same program, same inputs, same collectives: bit-identical on both processes.
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
    # The 2-device all-reduce inside one process and gloo's across two processes add
    # the same two numbers, so only compilation differences could separate these.
    np.testing.assert_allclose(p0[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert int(p0['step4/step']) == 4
  # Training moved the weights between the two saves (the comparison is not vacuous).
  moved = [k for k in p0 if k.startswith('step4/params/')
           and not np.allclose(p0[k], p0['step3/' + k[len('step4/'):]])]
  assert moved
  # Only process 0 writes logs and the config; both wrote the checkpoints through orbax.
  assert (shared / 'config.json').exists()
  assert sorted(int(p.name) for p in (shared / 'checkpoints').iterdir()
                if p.name.isdigit()) == [3, 4]


@pytest.mark.slow  # several processes
def test_stop_signal_on_one_process_stops_both_at_the_same_step(tmp_path):
  port = _free_port()
  shared = tmp_path / 'shared'
  procs = []
  for pid in range(2):
    log = tmp_path / f'process{pid}.log'
    procs.append((_launch(
        [f'--workdir={shared}', f'--out={tmp_path / f"process{pid}.npz"}',
         '--num_processes=2', f'--process_id={pid}',
         f'--coordinator_address=localhost:{port}', '--phases=pmap:2000'],
        num_devices=1, log=log), log))
  # Training is under way once the first checkpoint (step 3) exists; then only process 1
  # gets SIGTERM, as when one host of a job is preempted.
  deadline = time.monotonic() + _TIMEOUT_S
  while not (shared / 'checkpoints' / '3').is_dir():
    assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), (
        'training did not start:\n' + procs[0][1].read_text()[-2000:])
    time.sleep(0.2)
  procs[1][0].send_signal(signal.SIGTERM)
  _wait_all(procs)  # both exit 0: no process is left waiting in a collective

  p0, p1 = _load(tmp_path / 'process0.npz'), _load(tmp_path / 'process1.npz')
  last = max(int(k.split('/')[0][4:]) for k in p0)
  assert last == max(int(k.split('/')[0][4:]) for k in p1)
  assert last < 2000 and last % loop.PREEMPTION_SYNC_EVERY == 0
  for key in (k for k in p0 if k.startswith(f'step{last}/')):
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
  assert 'another process' in procs[0][1].read_text()


_SRUN = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_PROCID': '0',
         'SLURM_LOCALID': '0'}
_LAUNCHER_VARS = ('JAX_COORDINATOR_ADDRESS', *_SRUN, 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                  'TPU_WORKER_HOSTNAMES')


@pytest.mark.parametrize('env, expected', [
    ({}, None),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'JAX_COORDINATOR_ADDRESS'),
    ({**_SRUN, 'SLURM_NTASKS': '4'}, 'slurm'),
    ({**_SRUN, 'SLURM_NTASKS': '1'}, None),  # one task
    ({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '4'}, None),  # sbatch, no srun
    ({'OMPI_COMM_WORLD_SIZE': '2'}, 'openmpi'),
    ({'OMPI_COMM_WORLD_SIZE': '1'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1'}, 'tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'w0'}, None),  # a single-host slice
])
def test_launcher_in_env(monkeypatch, env, expected):
  for name in _LAUNCHER_VARS:
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.launcher_in_env() == expected


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  for name in _LAUNCHER_VARS:
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  # An explicit single process wins over a launcher in the environment.
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '2')
  assert distributed.initialize(num_processes=1, process_id=0) is False


@pytest.mark.parametrize('kwargs, message', [
    ({'num_processes': 0}, r'--num_processes=0 must be >= 1'),
    ({'num_processes': 2, 'process_id': 2}, r'--process_id=2 must be in \[0, 2\)'),
    ({'num_processes': 1, 'process_id': 1}, r'--process_id=1 must be in \[0, 1\)'),
])
def test_initialize_rejects_inconsistent_flags(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)


@pytest.mark.parametrize('kwargs, env, expected', [
    ({}, {}, False),
    ({'num_processes': 1}, _SRUN, False),  # one process, whatever the launcher says
    ({}, _SRUN | {'SLURM_NTASKS': '2'}, True),
    ({'num_processes': 2}, {}, True),
    ({'coordinator_address': 'localhost:1'}, {}, True),
])
def test_joins_processes_decides_what_run_py_and_initialize_do(monkeypatch, kwargs, env,
                                                               expected):
  for key in list(os.environ):
    if key.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR', 'TPU_WORKER')):
      monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert distributed.joins_processes(**kwargs) is expected
  if not expected:  # then initialize must be a no-op too
    assert distributed.initialize(**kwargs) is False
