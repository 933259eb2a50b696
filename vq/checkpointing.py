"""Orbax checkpoints: periodic save, keep the last N, restore-or-init.

Usage sketch::

  ckpt = Checkpointer(workdir / 'checkpoints', keep=3)
  state, step = ckpt.restore_or_init(fresh_state)       # (fresh_state, 0) if nothing saved
  ckpt.save(step, state, meta={'config': config.to_dict()})
  ckpt.close()                                            # waits for async writes

The saved tree is `train_state.checkpointable(state)` (host numpy): params, optimizer
states, codebook statistics, discriminator and EMA weights, and the step, from which the
PRNG stream and the data position are derived. `meta` is a small JSON record.
"""

from __future__ import annotations

import pathlib
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from vq import train_state as ts


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for `TrainState`."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: ts.TrainState, meta: dict[str, Any] | None = None,
           *, force: bool = False) -> bool:
    """Saves `state` (unreplicated) at `step`; returns whether a save happened."""
    tree = jax.device_get(ts.checkpointable(state))
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                      meta=ocp.args.JsonSave(meta or {})), force=force)

  def restore(self, step: int, target: ts.TrainState) -> tuple[ts.TrainState, dict]:
    """Restores `step` into the structure of `target`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            jax.device_get(ts.checkpointable(target)))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return ts.restore_from(target, restored['state']), dict(restored['meta'] or {})

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'] or {})

  def restore_or_init(self, fresh: ts.TrainState) -> tuple[ts.TrainState, int]:
    """The latest checkpoint if there is one, else `fresh`; returns (state, step)."""
    step = self.latest_step()
    if step is None:
      return fresh, 0
    state, _ = self.restore(step, fresh)
    logging.info('Restored checkpoint at step %d from %s', step, self.directory)
    return state, int(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
