"""On-device codebook-usage tracking: when each code was last chosen, and how often.

Usage sketch::

  from vq.quantizers import usage as codebook_usage

  usage = codebook_usage.init(quantizer.usage_size)             # lives in the train state
  # inside the (pmapped) train step, counts = QuantizerOutput.counts (already psum'd):
  usage = codebook_usage.update(usage, out.counts, step + 1, decay=0.99)
  used = codebook_usage.window_usage(usage, step + 1, window=1000)    # fraction in [0, 1]
  dead = codebook_usage.dead_mask(usage, step + 1, restart_after=500)  # bool [V]
  usage = codebook_usage.mark_restarted(usage, dead, step + 1)         # after re-seeding
  # dead_mask counts idle steps from the later of last use and last restart.
  # on the host, for TensorBoard:
  image = codebook_usage.histogram_image(np.asarray(usage['counts_ema']))  # uint8 [H, W, 3]

The tracker is a plain dict of arrays so it sits in any pytree state, replicates under
pmap and checkpoints with everything else. Every function except `histogram_image` is pure
jax.numpy with static shapes. Steps are counted as `steps_done = step + 1`, so 0 is free to
mean "never chosen": a code with `last_used == 0` has not been chosen since `init`.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

Usage = Dict[str, jax.Array]

# Histogram palette (RGB), public so tests and readers can decode the image.
BACKGROUND_COLOR = (255, 255, 255)
BAR_COLOR = (31, 119, 180)
UNUSED_COLOR = (214, 39, 40)
USED_COLOR = (60, 60, 60)
UNIFORM_COLOR = (255, 150, 30)
DECADE_COLOR = (225, 225, 225)
# Bar heights are log10-scaled over this many decades below the most used code: a usage
# distribution is heavy-tailed, and a linear scale hides every code below ~1% of the top.
DECADES = 4
BASELINE_PX = 4  # height of the strip marking unused codes under the bars


def init(size: int) -> Usage:
  """A tracker for `size` codes (= QuantizerOutput.counts length), nothing used yet.

  Args:
    size: V, the usage vocabulary (`quantizer.usage_size`).

  Returns:
    {'last_used': int32 zeros [V], 'last_refreshed': int32 zeros [V] (the step a restart or
    k-means last rewrote the code), 'counts_ema': float32 zeros [V]}.

  Raises:
    ValueError: if `size` is not a positive int.
  """
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f'codebook_usage.init: size must be a positive int, got {size!r}; '
                     'pass quantizer.usage_size.')
  return {'last_used': jnp.zeros((size,), jnp.int32),
          'last_refreshed': jnp.zeros((size,), jnp.int32),
          'counts_ema': jnp.zeros((size,), jnp.float32)}


def update(usage: Usage, counts: jax.Array, steps_done: jax.Array, *,
           decay: float = 0.99) -> Usage:
  """Records one step's code counts.

  `last_used` becomes `steps_done` for every code with a positive count. `counts_ema` is
  an exponential moving average of usage *frequencies* (counts / sum(counts)), started
  from zero and not debiased: after t updates its entries sum to 1 - decay**t rather
  than 1. Ratios between codes (all `histogram_image` shows) are unaffected.

  Args:
    usage: the tracker from `init` or a previous `update`.
    counts: float [V] how often each code was chosen this step (`QuantizerOutput.counts`).
      A step with no counts at all leaves the frequencies decaying towards zero.
    steps_done: int32 scalar, `step + 1` (so it is >= 1).
    decay: EMA decay in [0, 1).

  Returns:
    The updated tracker.

  Raises:
    ValueError: if `counts` does not have the tracker's shape.
  """
  last_used = usage['last_used']
  if counts.shape != last_used.shape:
    raise ValueError(
        f'codebook_usage.update: counts has shape {counts.shape} but the tracker holds '
        f'{last_used.shape}; build it with init(len(QuantizerOutput.counts)).')
  counts = jnp.asarray(counts, jnp.float32)
  steps_done = jnp.asarray(steps_done, jnp.int32)
  total = jnp.sum(counts)
  freq = counts / jnp.where(total > 0, total, 1.0)
  return {
      **usage,
      'last_used': jnp.where(counts > 0, steps_done, last_used),
      'counts_ema': decay * usage['counts_ema'] + (1.0 - decay) * freq,
  }


def idle_steps(usage: Usage, steps_done: jax.Array) -> jax.Array:
  """int32 [V]: steps since each code was last chosen (`steps_done` if never chosen)."""
  return jnp.asarray(steps_done, jnp.int32) - usage['last_used']


def window_usage(usage: Usage, steps_done: jax.Array, window: int) -> jax.Array:
  """Fraction of the V codes chosen at least once in the last `window` steps.

  With `window=1` only the codes chosen at step `steps_done` count. A code never chosen
  (`last_used == 0`) never counts.

  Args:
    usage: the tracker.
    steps_done: int32 scalar, `step + 1` of the latest `update`.
    window: number of most recent steps to look back over (>= 1).

  Returns:
    float32 scalar in [0, 1].

  Raises:
    ValueError: if `window` is a Python int below 1.
  """
  if isinstance(window, (int, np.integer)) and window < 1:
    raise ValueError(f'codebook_usage.window_usage: window must be >= 1 step, got {window}; '
                     'set quantizer.usage_window to a positive number of steps.')
  used = (usage['last_used'] > 0) & (idle_steps(usage, steps_done) < window)
  return jnp.mean(used.astype(jnp.float32))


def dead_mask(usage: Usage, steps_done: jax.Array, restart_after: int) -> jax.Array:
  """bool [V]: codes idle for at least `restart_after` steps (candidates for a restart).

  Idle counts from the later of the code's last use and its last restart
  (`mark_restarted`), so a fresh code gets `restart_after` steps to be chosen. A code
  never chosen nor restarted becomes dead once `steps_done >= restart_after`.

  Raises:
    ValueError: if `restart_after` is a Python int below 1 (every code would be dead).
  """
  if isinstance(restart_after, (int, np.integer)) and restart_after < 1:
    raise ValueError(
        f'codebook_usage.dead_mask: restart_after must be >= 1 step, got {restart_after}; '
        'every code would count as dead.')
  since = jnp.maximum(usage['last_used'], usage['last_refreshed'])
  return jnp.asarray(steps_done, jnp.int32) - since >= restart_after


def mark_restarted(usage: Usage, mask: jax.Array, steps_done: jax.Array) -> Usage:
  """Records that the codes in `mask` were rewritten at `steps_done`.

  They are not dead again before `restart_after` more idle steps, but they do not count
  as *used* (window usage and `last_used` only change when a code is chosen).
  """
  steps_done = jnp.asarray(steps_done, jnp.int32)
  return {**usage, 'last_refreshed': jnp.where(mask, steps_done, usage['last_refreshed'])}


def histogram_image(counts_ema: np.ndarray, *, height: int = 96,
                    max_width: int = 512) -> np.ndarray:
  """A bar chart of per-code usage frequency, most used code on the left.

  Codes are sorted by frequency, descending, so the image shows how many codes carry the
  mass. Bar heights are log10-scaled: the full height is the most used code and the
  bottom is 4 decades below it (a used code below that still gets a 1-pixel bar); faint
  grey lines mark each decade. An orange line marks the uniform frequency 1/V, the
  height every bar would have if the codebook were used evenly. A strip along the
  bottom is red under codes whose frequency is exactly 0 (never chosen, or idle so long
  that the float32 EMA underflowed) and dark grey under used codes.

  With V <= max_width each code is a column `max_width // V` pixels wide; with more codes
  they are binned into `max_width` columns (mean frequency per column; a column is red
  only when all its codes are unused).

  Args:
    counts_ema: [V] non-negative usage frequencies (the tracker's `counts_ema`).
    height: image height in pixels (>= 16).
    max_width: image width limit in pixels (>= 1).

  Returns:
    uint8 [height, W, 3] RGB image, W <= max_width.

  Raises:
    ValueError: on a non-1-D, empty, negative or non-finite `counts_ema`, or sizes out of
      range.
  """
  freq = np.asarray(counts_ema, np.float64)
  if freq.ndim != 1 or freq.size == 0:
    raise ValueError(f'histogram_image: counts_ema must be a non-empty [V] vector, got shape '
                     f'{freq.shape}; pass usage["counts_ema"].')
  if not np.all(np.isfinite(freq)) or np.any(freq < 0):
    raise ValueError(f'histogram_image: counts_ema must be finite and >= 0, got min '
                     f'{np.min(freq)} and max {np.max(freq)}; pass usage frequencies.')
  if height < 16:
    raise ValueError(f'histogram_image: height must be >= 16 pixels, got {height}.')
  if max_width < 1:
    raise ValueError(f'histogram_image: max_width must be >= 1 pixel, got {max_width}.')
  num_codes = freq.size
  freq = np.sort(freq)[::-1]

  if num_codes > max_width:
    edges = np.linspace(0, num_codes, max_width + 1).astype(np.int64)
    sizes = np.diff(edges)
    columns = np.add.reduceat(freq, edges[:-1]) / sizes
    repeat = 1
  else:
    columns = freq
    repeat = max_width // num_codes
  unused = columns == 0.0

  bar_px = height - BASELINE_PX
  top = columns.max()

  def to_px(f):
    """Bar height in pixels of frequency f (log scale, `DECADES` below `top`)."""
    rel = (np.log10(np.maximum(f, 1e-300)) - np.log10(top) + DECADES) / DECADES
    return np.clip(np.round(rel * bar_px), 0, bar_px).astype(np.int64)

  image = np.empty((height, columns.size, 3), np.uint8)
  image[:] = BACKGROUND_COLOR
  rows = np.arange(bar_px)[:, None]  # row 0 is the top of the bar area
  if top > 0:
    for decade in range(1, DECADES):
      image[bar_px - to_px(top * 10.0**-decade), :] = DECADE_COLOR
    bars = np.where(unused, 0, np.maximum(to_px(columns), 1))
    image[:bar_px][rows >= bar_px - bars[None, :]] = BAR_COLOR
    uniform = 1.0 / num_codes
    if top * 10.0**-DECADES < uniform <= top:
      image[min(bar_px - to_px(uniform), bar_px - 1), :] = UNIFORM_COLOR
  image[bar_px:, :] = np.where(unused[:, None], UNUSED_COLOR, USED_COLOR)[None]
  return np.repeat(image, repeat, axis=1)
