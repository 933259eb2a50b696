"""Multi-controller JAX: join the processes of one training job before JAX starts.

Usage sketch::

  from vq.runtime import distributed
  distributed.initialize()                       # from the environment, or a no-op
  distributed.initialize('10.0.0.1:1234', num_processes=2, process_id=0)   # by hand
  # ... then train exactly as on one machine: every process runs the same program.

Call it first, before anything touches a JAX device. What it does:

* `num_processes=1`, or nothing given and no launcher in the environment: nothing
  (one process, all its local devices).
* Any of the three arguments given: `jax.distributed.initialize` with them; JAX fills in
  the missing ones from the cluster environment when it can (Slurm, Open MPI, Cloud TPU
  metadata, Kubernetes), otherwise it raises.
* Nothing given, but a launcher is visible in the environment (see `launcher_in_env`):
  `jax.distributed.initialize()` and JAX's own auto-detection.

On Cloud TPU pod slices the TPU runtime also joins the hosts without this call (JAX
recommends making it anyway); pass `--num_processes=<hosts>` to `run.py` there, and JAX
reads the coordinator and this host's id from the TPU metadata. On GPUs it is required.

On CPU, processes exchange collectives through gloo
(`jax_cpu_collectives_implementation`: the default of the pinned JAX 0.10, set here
before initializing unless another one, e.g. 'mpi', was chosen, because with none CPU
processes cannot run a single cross-process `psum`).
"""

from __future__ import annotations

import os

from absl import logging
import jax


def launcher_in_env() -> str | None:
  """The multi-process launcher the environment shows, or None for a single process.

  Only cheap environment-variable checks (no network): JAX's own
  `JAX_COORDINATOR_ADDRESS`; a Slurm job step (`srun`: the variables JAX's Slurm
  detection reads, with more than one task; a bare batch script has no
  SLURM_STEP_NODELIST); Open MPI with more than one rank (`mpirun`); a multi-host TPU
  slice on GKE (`TPU_WORKER_HOSTNAMES`).
  """
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(v in env for v in slurm) and _as_int(env.get('SLURM_NTASKS')) > 1:
    return 'slurm'
  if _as_int(env.get('OMPI_COMM_WORLD_SIZE')) > 1:
    return 'openmpi'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return 'tpu'
  return None


def _as_int(value: str | None) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0


def joins_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> bool:
  """Whether `initialize` with these arguments joins a multi-process job (no side effects)."""
  if num_processes == 1:
    return False
  given = (coordinator_address, num_processes, process_id)
  return any(v is not None for v in given) or launcher_in_env() is not None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins this process to the job if it has several processes; see the module docstring.

  Args:
    coordinator_address: 'host:port' of process 0, reachable from every process.
    num_processes: processes in the job (1: single process, nothing to do).
    process_id: this process, in [0, num_processes).

  Returns:
    Whether `jax.distributed.initialize` was called.

  Raises:
    ValueError: inconsistent arguments (said in one line with the fix).
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes} must be >= 1 (1: a single process).')
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f'--process_id={process_id} must be in [0, {num_processes}) for '
                     f'--num_processes={num_processes}; number processes 0, 1, ...')
  if not joins_processes(coordinator_address, num_processes, process_id):
    return False
  launcher = launcher_in_env()
  if jax.distributed.is_initialized():
    return True
  _use_gloo_on_cpu()
  logging.info('vq: jax.distributed.initialize(coordinator_address=%r, num_processes=%r, '
               'process_id=%r) (launcher in environment: %s)', coordinator_address,
               num_processes, process_id, launcher)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('vq: process %d of %d; %d local and %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _use_gloo_on_cpu() -> None:
  """CPU processes need a cross-process collectives backend; keep the user's if set."""
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
