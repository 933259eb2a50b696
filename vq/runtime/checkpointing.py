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
from typing import Any, Callable

from absl import logging
import jax
import orbax.checkpoint as ocp

from vq.runtime import state as ts


class UnusableCheckpoints(RuntimeError):
  """Checkpoints exist but none can be read."""


class IncompatibleCheckpoint(ValueError):
  """The checkpoint was written under a config with other shapes."""


# Config fields that change the shapes or structure of the saved state.
STRUCTURAL_FIELDS = (
    'objective', 'data.image_size', 'model.arch', 'model.ch', 'model.ch_mult',
    'model.num_res_blocks', 'model.attn_resolutions', 'model.hidden', 'model.res_hidden',
    'model.num_res_layers', 'quantizer.kind', 'quantizer.num_codes', 'quantizer.code_dim',
    'quantizer.lookup_dim', 'quantizer.fsq_levels', 'quantizer.rvq_depth', 'disc.name', 'disc.ndf', 'disc.n_layers', 'disc.norm')
# State fields added after checkpoints already existed; a checkpoint without them resumes
# with their fresh values (usage tracking restarts; nothing the model computes changes).
FRESH_IF_ABSENT = ('code_usage',)

# Quantizer fields that shape the state only for some kinds.
QUANTIZER_SHAPES = {'lookup_dim': ('vq', 'ema'), 'fsq_levels': ('fsq',), 'rvq_depth': ('rvq',)}
# Fields whose being zero or not changes the optimizer or EMA state structure.
STRUCTURAL_SWITCHES = ('train.grad_clip', 'train.weight_decay', 'train.ema_decay')


def _lookup(tree: dict[str, Any], field: str) -> Any:
  for part in field.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def incompatible_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field: saved X, now Y' for every shape-relevant difference (JSON config dicts)."""
  out = []
  arch = _lookup(current, 'model.arch')
  gan = _lookup(current, 'objective') == 'vqgan'
  for field in STRUCTURAL_FIELDS:
    if field.startswith('disc.') and not gan:
      continue
    if field in ('model.hidden', 'model.res_hidden', 'model.num_res_layers') and arch != 'sonnet':
      continue
    if field.startswith('model.') and field[6:] in ('ch', 'ch_mult', 'num_res_blocks',
                                                     'attn_resolutions') and arch != 'taming':
      continue
    a, b = _lookup(saved, field), _lookup(current, field)
    if field.startswith('quantizer.') and field[10:] in QUANTIZER_SHAPES:
      if _lookup(current, 'quantizer.kind') not in QUANTIZER_SHAPES[field[10:]]:
        continue
    if a != b:
      out.append(f'{field}: saved {a!r}, now {b!r}')
  for field in STRUCTURAL_SWITCHES:
    a, b = _lookup(saved, field), _lookup(current, field)
    if a is not None and b is not None and (a > 0) != (b > 0):
      out.append(f'{field}: saved {a!r}, now {b!r} (on/off changes the saved state)')
  return out


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for a state dataclass.

  By default the state is the tokenizer's `TrainState`; another state (a token prior's)
  passes its own `to_tree` (state -> nested dict of arrays to save) and `from_tree`
  (target state, restored dict -> state).
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3,
               to_tree: Callable[[Any], dict] = ts.checkpointable,
               from_tree: Callable[[Any, dict], Any] = ts.restore_from,
               incompatible: Callable[[dict, dict], list[str]] | None = None):
    self.directory = pathlib.Path(directory).absolute()
    self._keep = keep
    self._to_tree, self._from_tree = to_tree, from_tree
    self._incompatible = incompatible or incompatible_fields
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def reopened(self) -> Checkpointer:
    """A new manager over the same directory and settings (after it was moved aside)."""
    return Checkpointer(self.directory, keep=self._keep, to_tree=self._to_tree,
                        from_tree=self._from_tree, incompatible=self._incompatible)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any] | None = None,
           *, force: bool = False) -> bool:
    """Saves `state` (unreplicated) at `step`; returns whether a save happened."""
    tree = jax.device_get(self._to_tree(state))
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                      meta=ocp.args.JsonSave(meta or {})), force=force)

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores `step` into the structure of `target`.

    State fields in `FRESH_IF_ABSENT` that a checkpoint predates keep `target`'s values
    (so checkpoints written before such a field existed still resume).
    """
    tree = jax.device_get(self._to_tree(target))
    absent = [k for k in FRESH_IF_ABSENT
              if k in tree and k not in self._saved_fields(step, tree)]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {k: v for k, v in tree.items() if k not in absent})
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    state = dict(restored['state'])
    for k in absent:
      logging.info('Checkpoint at step %d predates %s; starting it fresh.', step, k)
      state[k] = tree[k]
    return self._from_tree(target, state), dict(restored['meta'] or {})

  def _saved_fields(self, step: int, default: dict[str, Any]) -> set[str]:
    """Top-level state fields stored at `step` (those of `default` if unreadable)."""
    try:
      metadata = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / 'state')
      return set(getattr(metadata, 'tree', metadata).keys())
    except Exception:  # pylint: disable=broad-except
      return set(default)  # the restore itself will then say what is wrong

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'] or {})

  def restore_or_init(self, fresh: Any, config: dict[str, Any] | None = None
                      ) -> tuple[Any, int]:
    """The newest usable checkpoint, else `fresh`; returns (state, step).

    A checkpoint that cannot be read (truncated, corrupt) is skipped with a warning and
    the previous one is tried. If checkpoints exist but none is usable, raises
    `UnusableCheckpoints` rather than silently starting over. If `config` (the resolved
    config as a JSON dict) is given, a checkpoint written under a config with different
    shapes raises `IncompatibleCheckpoint` naming the fields.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return fresh, 0
    errors = []
    for step in steps:
      try:
        meta = self.read_meta(step)
        if config is not None and 'config' in meta:
          diff = self._incompatible(meta['config'], config)
          if diff:
            raise IncompatibleCheckpoint(
                f'the checkpoint at step {step} in {self.directory} was made with a different '
                f'model: {"; ".join(diff)}; use another --workdir or the original config.')
        state, _ = self.restore(step, fresh)
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # pylint: disable=broad-except
        message = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0]}'[:300]
        logging.warning('Checkpoint at step %d in %s is unusable (%s).', step, self.directory,
                        message)
        errors.append((step, message))
        continue
      # Damaged newer steps are moved out (kept for inspection) so they can be rewritten.
      for bad_step, message in errors:
        logging.warning('Moved the unusable checkpoint of step %d to %s; resuming from step %d.',
                        bad_step, self._set_aside(bad_step), step)
      if errors:
        self._manager.reload()
      logging.info('Restored checkpoint at step %d from %s', step, self.directory)
      return state, int(step)
    details = '; '.join(f'step {s}: {m}' for s, m in errors)
    raise UnusableCheckpoints(
        f'none of the checkpoints in {self.directory} can be restored ({details}); move them '
        'away, or rerun with --reinit_unusable_checkpoints to set them aside and start from '
        'step 0.')

  def _set_aside(self, step: int) -> pathlib.Path:
    """Moves a damaged step out of the manager's directory (kept for inspection)."""
    src = self.directory / str(step)
    dst = self.directory.with_name(f'{self.directory.name}.damaged-step{step}')
    n = 0
    while dst.exists():
      n += 1
      dst = self.directory.with_name(f'{self.directory.name}.damaged-step{step}-{n}')
    src.rename(dst)
    return dst

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
