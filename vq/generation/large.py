"""Token grids larger than a prior was trained on, and their images.

Usage sketch::

  gen = Generator.from_workdir('/tmp/gpt')                   # trained on 8x8 grids
  sampler = LargeSampler(gen, grid=(16, 16))
  tokens = sampler(labels, jax.random.PRNGKey(0))           # int32 [N, 16, 16]
  images = decode_grid(gen.tokenizer, tokens)               # uint8 [N, 64, 64, 3]

GPT: taming-transformers' sliding attention window. Tokens are sampled in raster order of
the large grid; the logits of position (i, j) come from one pass of the prior over the
training-size window (h x w tokens) that contains it, placed at rows
  y0 = clip(i - h // 2, 0, H - h)  (and x0 likewise with j, w, W),
which is taming's `local_i` rule (`i` if i <= h/2, `h - (H - i)` near the far edge, else
h/2) written as one clip. The window is read in its own raster order behind the class
token, so every token before (i, j) in the window is already sampled and the causal mask
hides the rest; the logits are those at (i - y0, j - x0). On a grid equal to the training
grid the window is the whole grid, and the logits are exactly the ordinary sampler's.
Each position costs a full window pass (no key/value cache): H * W passes per image.

MaskGIT: overlapping windows. Windows of the training size start every `stride` tokens
(default half a window; the last one flush with the far edge) and are visited in raster
order; each is decoded by the prior's iterative decoder with the tokens earlier windows
already decided kept as known, so every window continues what its neighbours drew.

A grid of H x W tokens decodes to f H x f W pixels with a convolutional tokenizer
(`decode_grid`; f = 4 for CIFAR's tokenizers).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vq.core import metrics
from vq.generation import priors
from vq.generation import sampling
from vq.generation import transformer

_with_uncond = sampling._with_uncond  # pylint: disable=protected-access
_combine = sampling._combine  # pylint: disable=protected-access
_categorical = sampling._categorical  # pylint: disable=protected-access


def check_grid(grid: Sequence[int], trained: Sequence[int]) -> tuple[int, int]:
  """(H, W) of a larger grid, with a one-line error when it is smaller than `trained`."""
  try:
    big = tuple(int(g) for g in grid)
  except (TypeError, ValueError):
    big = ()
  if len(big) != 2 or big[0] < trained[0] or big[1] < trained[1]:
    raise ValueError(f'--token_grid={",".join(map(str, grid)) if grid else grid} must be two '
                     f'sizes of at least the prior\'s {trained[0]},{trained[1]} training grid; '
                     f'use e.g. --token_grid={2 * trained[0]},{2 * trained[1]}.')
  return big


def window_start(i: jax.Array, size: int, window: int) -> jax.Array:
  """First row (or column) of the training-size window around position i."""
  return jnp.clip(i - window // 2, 0, size - window)


def _window_logits(model, params, layout: priors.TokenLayout, first: jax.Array,
                   flat: jax.Array, p: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Raw logits [rows of `first`, K] for position p of the large grid `flat` [B, H * W]."""
  (big_h, big_w), (h, w) = grid, layout.grid
  i, j = p // big_w, p % big_w
  y0, x0 = window_start(i, big_h, h), window_start(j, big_w, w)
  tokens = flat.reshape(flat.shape[0], big_h, big_w)
  window = jax.lax.dynamic_slice(tokens, (0, y0, x0), (flat.shape[0], h, w))
  window = window.reshape(flat.shape[0], h * w)
  copies = first.shape[0] // flat.shape[0]
  inputs = jnp.concatenate([first[:, None], jnp.tile(window[:, :-1], (copies, 1))], axis=1)
  logits = model.apply({'params': params}, inputs)
  local = (i - y0) * w + (j - x0)
  return jax.lax.dynamic_index_in_dim(logits, local, axis=1, keepdims=False)


def sliding_window_logits(model, params, layout: priors.TokenLayout, labels: jax.Array,
                          tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """float32 [B, H * W, K]: each position's logits given the grid `tokens` [B, H * W]
  (teacher forcing: what the sliding-window sampler sees at every step)."""
  first = layout.class_tokens(jnp.asarray(labels, jnp.int32))
  fn = lambda p: _window_logits(model, params, layout, first, tokens, p, grid)
  return jnp.moveaxis(jax.lax.map(fn, jnp.arange(grid[0] * grid[1])), 0, 1)


def sample_gpt_sliding(model: transformer.Transformer, params: Any,
                       layout: priors.TokenLayout, labels: jax.Array, keys: jax.Array,
                       settings: sampling.Settings, grid: tuple[int, int]) -> jax.Array:
  """int32 [B, H * W] sampled in raster order with the sliding window (module docstring).

  Position p draws with fold_in(keys[b], p), as `sampling.sample_gpt` does.
  """
  labels = jnp.asarray(labels, jnp.int32)
  first, copies = _with_uncond(layout, labels, settings.guidance)

  def body(p, flat):
    logits = _window_logits(model, params, layout, first, flat, p, grid)
    logits = _combine(logits, copies, settings.guidance) / settings.temperature
    logits = sampling.filter_logits(logits, settings.top_k, settings.top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, p))(keys)
    return flat.at[:, p].set(_categorical(step_keys, logits))

  flat = jnp.zeros((labels.shape[0], grid[0] * grid[1]), jnp.int32)
  return jax.lax.fori_loop(0, grid[0] * grid[1], body, flat)


def window_origins(size: int, window: int, stride: int) -> list[int]:
  """Starts 0, stride, 2 stride, ... of windows covering [0, size), the last at size - window."""
  starts = list(range(0, size - window + 1, stride))
  if starts[-1] != size - window:
    starts.append(size - window)
  return starts


def sample_maskgit_windows(model: transformer.Transformer, params: Any,
                           layout: priors.TokenLayout, labels: jax.Array, keys: jax.Array,
                           settings: sampling.Settings, grid: tuple[int, int],
                           stride: tuple[int, int] | None = None) -> jax.Array:
  """int32 [B, H * W] decoded window by window (module docstring); window k of the raster
  order draws with fold_in(keys[b], k)."""
  (big_h, big_w), (h, w) = grid, layout.grid
  stride = stride or (max(1, h // 2), max(1, w // 2))
  b = keys.shape[0]
  origins = jnp.asarray([(y, x) for y in window_origins(big_h, h, stride[0])
                         for x in window_origins(big_w, w, stride[1])], jnp.int32)

  def body(k, tokens):   # one compiled window step, however many windows
    y0, x0 = origins[k, 0], origins[k, 1]
    window = jax.lax.dynamic_slice(tokens, (0, y0, x0), (b, h, w)).reshape(b, h * w)
    window_keys = jax.vmap(lambda key: jax.random.fold_in(key, k))(keys)
    done = sampling.sample_maskgit(model, params, layout, labels, window_keys, settings,
                                   tokens=window)
    return jax.lax.dynamic_update_slice(tokens, done.reshape(b, h, w), (0, y0, x0))

  tokens = jnp.full((b, big_h, big_w), layout.mask_token, jnp.int32)
  tokens = jax.lax.fori_loop(0, origins.shape[0], body, tokens)
  return tokens.reshape(b, big_h * big_w)


class LargeSampler:
  """Grids of `grid` tokens from a `Generator`'s prior, jitted, in chunks of `batch_size`."""

  def __init__(self, generator, grid: Sequence[int], settings: sampling.Settings | None = None,
               batch_size: int | None = None):
    from vq.generation import generator as gen_lib  # pylint: disable=g-import-not-at-top
    self.gen = generator
    self.grid = check_grid(grid, generator.layout.grid)
    self.settings = settings or gen_lib.settings_from(generator.config)
    self.batch_size = int(batch_size or generator.config.sample.batch_size)
    kind, model, layout = generator.config.objective, generator.model, generator.layout
    sample = sample_gpt_sliding if kind == 'gpt' else sample_maskgit_windows
    self._fn = jax.jit(lambda params, labels, keys: sample(
        model, params, layout, labels, keys, self.settings, self.grid))

  def __call__(self, labels: np.ndarray, key: jax.Array) -> np.ndarray:
    """int32 [N, H, W] for labels [N]; row n draws from fold_in(key, n)."""
    labels = np.asarray(labels, np.int32)
    n, b = len(labels), self.batch_size
    keys = sampling.row_keys(key, n)
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.key_data(keys)
    keys = np.asarray(keys)
    out = np.zeros((n, self.grid[0] * self.grid[1]), np.int32)
    for lo in range(0, n, b):
      rows = min(b, n - lo)
      pad = lambda x: np.concatenate([x[lo:lo + rows],
                                      np.zeros((b - rows,) + x.shape[1:], x.dtype)])
      out[lo:lo + rows] = np.asarray(self._fn(self.gen.params, pad(labels), pad(keys)))[:rows]
    return out.reshape(n, *self.grid)


def decode_grid(tok, tokens: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """uint8 [N, f H, f W, 3] for int32 grids [N, H, W] of any size (convolutional decoders)."""
  tokens = np.asarray(tokens, np.int32)
  if tuple(tokens.shape[1:]) == tuple(tok.token_shape):
    return tok.decode(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= tok.num_codes):
    raise ValueError(f'decode_grid: tokens must lie in [0, {tok.num_codes}); saw '
                     f'[{tokens.min()}, {tokens.max()}].')
  from vq.config import builders  # pylint: disable=g-import-not-at-top
  from vq.models import tokenizer as vq_tokenizer  # pylint: disable=g-import-not-at-top
  model = builders.build_tokenizer(tok.config)
  variables = tok._variables  # pylint: disable=protected-access
  fn = jax.jit(lambda v, t: metrics.to_pixel_range(
      model.apply(v, t, method=vq_tokenizer.VQTokenizer.detokenize)).astype(jnp.uint8))
  out = []
  for lo in range(0, len(tokens), batch_size):
    chunk = tokens[lo:lo + batch_size]
    rows = len(chunk)
    if rows < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - rows,) + chunk.shape[1:],
                                              np.int32)])
    out.append(np.asarray(fn(variables, chunk))[:rows])
  return np.concatenate(out)


def random_crops(images: np.ndarray, size: int, seed: int) -> np.ndarray:
  """One size x size crop per image at a uniformly random position (numpy rng `seed`)."""
  rng = np.random.default_rng(seed)
  n, height, width = images.shape[:3]
  ys = rng.integers(0, height - size + 1, n)
  xs = rng.integers(0, width - size + 1, n)
  return np.stack([images[i, y:y + size, x:x + size] for i, (y, x) in enumerate(zip(ys, xs))])
