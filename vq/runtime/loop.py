"""The training loop every trainer shares: steps, logs, checkpoints, preemption, NaN guard.

Usage sketch::

  workdir = loop.prepare_workdir(workdir)                   # before anything compiles
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', keep=3, ...)
  state, start = loop.restore_or_init(ckpt, fresh_state, config_json, reinit=False)
  loop.write_config(config, workdir)
  last, last_eval = loop.run(
      loop.Loop(par=par, p_step=p_step, checkpointer=ckpt, writer=writer, meta=meta,
                num_steps=10_000, log_every=100, checkpoint_every=1000,
                throughput={'images_per_s': 64}),
      p_state=par.replicate(state), p_rng=par.replicate(rng), batches=batches,
      start_step=start,
      periodic=[loop.Periodic(1000, write_pictures), loop.Periodic(5000, evaluate)])

What `run` guarantees, for the tokenizer trainer and the token-prior trainer alike:
- metrics are averaged over each logging window on the host (one sync per window), with
  throughput per second of training (the compile of the first step is not counted);
- a non-finite `loss` or `grad_norm` stops the run before anything non-finite is saved,
  naming the step range and the last good checkpoint;
- SIGTERM/SIGINT finish the current step, save it, flush the logs and return; with several
  processes all of them stop at the same step (`agreed_stop`);
- checkpoints every `checkpoint_every` steps and at the end; `periodic` hooks (pictures,
  evaluations) run on the host state every N steps and at the end, never while stopping.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from vq.runtime import checkpointing

# Metrics that must stay finite; the others (e.g. a GAN's logits) are only logged.
FINITE_KEYS = ('loss', 'grad_norm')
# With several processes, a stop signal is acted on only at steps all processes check
# together (an allgather of the flag), so that they save the same step and leave together
# instead of one host waiting forever in the next step's collectives.
PREEMPTION_SYNC_EVERY = 10


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates `workdir` if needed and checks that it is writable (before any compile)."""
  path = pathlib.Path(workdir).expanduser().absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir={str(workdir)!r} cannot be created ({e.strerror}); '
                     'choose a directory you can write to.') from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir={str(workdir)!r} is not writable; choose a directory you '
                     'can write to or fix its permissions.')
  return path


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """The resolved config (overrides applied) as workdir/config.json."""
  if jax.process_index() == 0:
    tmp = workdir / 'config.json.tmp'
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
    os.replace(tmp, workdir / 'config.json')


def restore_or_init(ckpt: checkpointing.Checkpointer, fresh: Any, config_json: dict,
                    *, reinit_unusable: bool = False
                    ) -> tuple[checkpointing.Checkpointer, Any, int]:
  """(checkpointer, state, step) from the newest usable checkpoint, else `fresh` at 0.

  With `reinit_unusable`, checkpoints that exist but cannot be restored are moved to
  `checkpoints.unusable-<time>` (never deleted) and training starts from step 0; without
  it they raise `checkpointing.UnusableCheckpoints`.
  """
  try:
    state, start_step = ckpt.restore_or_init(fresh, config_json)
    return ckpt, state, start_step
  except checkpointing.UnusableCheckpoints:
    if not reinit_unusable:
      raise
  ckpt.close()
  ckpt_dir = ckpt.directory
  if jax.process_index() == 0:  # one process moves the shared directory; the others wait
    aside = ckpt_dir.with_name(f'checkpoints.unusable-{time.strftime("%Y%m%d-%H%M%S")}')
    ckpt_dir.rename(aside)
    logging.warning('vq: unusable checkpoints moved to %s; starting from step 0.', aside)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('vq: unusable checkpoints set aside')
  return ckpt.reopened(), fresh, 0


def param_counts(params: Any) -> dict[str, int]:
  """Parameters per top-level module."""
  return {k: int(sum(np.size(x) for x in jax.tree.leaves(v))) for k, v in params.items()}


@dataclasses.dataclass(frozen=True)
class Periodic:
  """`fn(done_steps, host_state)` every `every` steps and after the last (0: never)."""
  every: int
  fn: Callable[[int, Any], None]

  def due(self, done: int, num_steps: int) -> bool:
    return bool(self.every) and (done % self.every == 0 or done == num_steps)


@dataclasses.dataclass
class Loop:
  """What `run` needs besides the state and the data.

  Attributes:
    par: the `vq.runtime.parallel` implementation the step was wrapped with.
    p_step: the wrapped step, `(p_state, batch, p_rng) -> (p_state, metrics)`.
    checkpointer: where the state is saved.
    writer: clu metric writer (logs, TensorBoard, metrics.jsonl).
    meta: JSON saved next to each checkpoint (the config, the objective, ...).
    num_steps: the step count to reach.
    log_every: steps between metric logs (one host sync each).
    checkpoint_every: steps between checkpoints (and one at the end).
    throughput: {'images_per_s': items per step, ...}: logged as items per second.
    finite_keys: metrics that stop the run when not finite.
  """
  par: Any
  p_step: Callable
  checkpointer: checkpointing.Checkpointer
  writer: Any
  meta: dict
  num_steps: int
  log_every: int
  checkpoint_every: int
  throughput: dict[str, int]
  finite_keys: Sequence[str] = FINITE_KEYS


def run(spec: Loop, *, p_state: Any, p_rng: Any, batches: Iterator[Any], start_step: int,
        periodic: Sequence[Periodic] = ()) -> tuple[dict[str, float], Any]:
  """Runs steps `start_step + 1 .. spec.num_steps`; returns (last logged metrics, p_state).

  `batches` yields host batches for steps start_step, start_step + 1, ...; it is closed
  at the end. The returned state is the device state after the last step run.
  """
  par, ckpt, writer = spec.par, spec.checkpointer, spec.writer
  report = periodic_actions.ReportProgress(num_train_steps=spec.num_steps, writer=writer,
                                           every_secs=None, every_steps=spec.log_every)
  window: list[Any] = []
  window_first_step = start_step + 1
  window_start = time.perf_counter()
  window_steps = 0
  last: dict[str, float] = {}
  preemption = _PreemptionFlag()

  def flush_window(done: int) -> None:
    """Host sync: average the window's metrics, refuse non-finite ones, log them."""
    nonlocal window, window_steps, window_start, window_first_step, last
    if not window:
      return
    host = [par.to_host(m) for m in window]
    elapsed = time.perf_counter() - window_start
    bad = [k for k in spec.finite_keys
           if k in host[0] and not all(np.isfinite(m[k]) for m in host)]
    if bad:
      good = ckpt.latest_step()
      raise FloatingPointError(
          f'non-finite {" and ".join(bad)} between steps {window_first_step} and {done}; the '
          f'state was not saved; last good checkpoint: '
          f'{"step " + str(good) if good is not None else "none"} in {ckpt.directory}. Lower '
          'train.learning_rate or set train.grad_clip, then rerun to resume from it.')
    last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    if window_steps:
      for name, per_step in spec.throughput.items():
        last[name] = window_steps * per_step / elapsed
      last['steps_per_s'] = window_steps / elapsed
    writer.write_scalars(done, last)
    logging.info('step %d: %s', done, ', '.join(f'{k}={v:.4g}' for k, v in sorted(last.items())))
    window, window_steps, window_start = [], 0, time.perf_counter()
    window_first_step = done + 1

  try:
    with preemption:
      for step in range(start_step, spec.num_steps):
        batch = par.shard(next(batches))
        p_state, metrics = spec.p_step(p_state, batch, p_rng)
        window.append(metrics)
        done = step + 1
        if step == start_step:
          # The first call compiles; time the loop from here so the rates mean training.
          jax.block_until_ready(metrics)
          logging.info('vq: first step (compile + run) took %.1f s',
                       time.perf_counter() - window_start)
          window_start = time.perf_counter()
        else:
          window_steps += 1
        report(done)
        stopping = agreed_stop(preemption.requested, done)
        save_now = done % spec.checkpoint_every == 0 or done == spec.num_steps or stopping
        if done % spec.log_every == 0 or save_now:
          flush_window(done)  # raises before a non-finite state can be saved
        due = [p for p in periodic if p.due(done, spec.num_steps) and not stopping]
        host_state = par.to_host(p_state) if (due or save_now) else None
        if save_now:
          ckpt.save(done, host_state, spec.meta, force=stopping)
        for p in due:
          p.fn(done, host_state)
        if stopping:
          ckpt.wait()
          cause = preemption.requested or 'a stop signal on another process'
          message = (f'vq: received {cause}; saved checkpoint at step {done} '
                     f'in {ckpt.directory}; rerun the same command to resume.')
          logging.warning('%s', message)
          print(message, flush=True)
          break
  finally:
    writer.flush()
    ckpt.close()
    close = getattr(batches, 'close', None)
    if close is not None:
      close()
  return last, p_state


def agreed_stop(requested: str | None, done: int) -> bool:
  """Whether every process stops after step `done` (any process got a stop signal)."""
  if jax.process_count() == 1:
    return requested is not None
  if done % PREEMPTION_SYNC_EVERY:
    return False
  flags = multihost_utils.process_allgather(np.int32(requested is not None))
  return bool(np.any(flags))


class _PreemptionFlag:
  """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits cleanly."""

  def __init__(self):
    self.requested: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
