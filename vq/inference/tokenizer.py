"""A trained tokenizer as a tool: images <-> tokens, reconstructions, token files.

Usage sketch::

  from experiments import vqvae_cifar
  from vq import inference

  tok = inference.Tokenizer.from_workdir(vqvae_cifar.get_config(), '/tmp/vqvae')
  tokens = tok.encode(images_uint8)            # uint8 [N, 32, 32, 3] -> int32 [N, 8, 8]
  pixels = tok.decode(tokens)                  # -> uint8 [N, 32, 32, 3]
  assert (pixels == tok.reconstruct(images_uint8)).all()

  inference.reconstruct_dataset(tok, 'tfds:cifar10:test', '/tmp/recon')  # grid + psnr.json
  inference.encode_dataset(tok, 'tfds:cifar10:test', '/tmp/test_tokens.npz')
  inference.decode_file(tok, '/tmp/test_tokens.npz', '/tmp/decoded')   # image_00000.png ...

Token files are plain `.npz` archives (no pickles) that carry the hash of the config and
the checkpoint step that made them, so decoding them with another model is an error
instead of a picture of noise.

Every call runs jitted on one device, in batches padded to a fixed size: a call compiles
one shape, `min(batch_size, next power of two >= N)`, so small requests stay cheap and
repeated requests never recompile.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vq.config import builders
from vq.runtime import checkpointing
from vq import data
from vq.core import images as vq_images
from vq.core import metrics
from vq.core import weights
from vq.models import tokenizer as vq_tokenizer
from vq.runtime import state as ts

PathLike = str | os.PathLike


def config_hash(config: ml_collections.ConfigDict) -> str:
  """First 16 hex digits of the sha256 of the resolved config as sorted JSON."""
  text = config.to_json_best_effort(sort_keys=True)
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


def _architecture(config_dict: dict[str, Any]) -> dict[str, Any]:
  """The config fields that decide the network and the meaning of each token."""
  quantizer = config_dict.get('quantizer', {})
  return {
      **{f'model.{k}': v for k, v in config_dict.get('model', {}).items()},
      **{f'quantizer.{k}': quantizer.get(k) for k in (
          'kind', 'num_codes', 'code_dim', 'lookup_dim', 'l2_normalize', 'fsq_levels',
          'rvq_depth')},
      'data.image_size': config_dict.get('data', {}).get('image_size'),
  }


def _check_matches_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Names the differing fields instead of letting orbax fail on a shape mismatch."""
  saved_path = workdir / 'config.json'
  if not saved_path.is_file():
    return
  saved = _architecture(json.loads(saved_path.read_text()))
  given = _architecture(json.loads(config.to_json_best_effort()))
  diff = [f'{k}={given[k]!r} (trained with {saved[k]!r})' for k in sorted(given)
          if k in saved and saved[k] != given[k]]
  if diff:
    raise ValueError(f'The config does not describe the model in {workdir}: '
                     f'{"; ".join(diff)}; pass the --config and overrides it was trained with.')


def _bucket(n: int, batch_size: int) -> int:
  """The fixed batch a call of `n` rows runs at: min(batch_size, next power of two >= n)."""
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


def _check_batch_size(batch_size: Any) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise ValueError(f'batch_size must be an int >= 1; saw {batch_size!r}.')
  return int(batch_size)


class Tokenizer:
  """A trained tokenizer restored from a workdir: images <-> tokens, jitted, batched.

  Attributes:
    config: the experiment config the model was built from.
    step: the checkpoint step the weights come from.
    config_hash: `config_hash(config)`; written into token files by `encode_dataset`.
    image_size: side of the square uint8 images it takes and returns.
    token_shape: (h, w), the token grid of one image ((h, w, depth) for residual VQ).
    num_codes: codes per token; tokens lie in [0, num_codes) (the quantizer's vocab_size:
      prod(fsq_levels) for FSQ).
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, vq_stats: Any, *,
               step: int):
    """Wraps weights already in memory; most callers want `from_workdir`.

    Args:
      config: the experiment config the weights belong to.
      params: tokenizer parameters (the EMA weights, if kept, are what `from_workdir` uses).
      vq_stats: the codebook statistics collection ({} for gradient-learned codebooks).
      step: the training step the weights come from (recorded in token files).
    """
    self.config = config
    self.step = int(step)
    self.config_hash = config_hash(config)
    self.image_size = int(config.data.image_size)
    model = builders.build_tokenizer(config)
    self.num_codes = int(model.quantizer.vocab_size)
    variables = {'params': params}
    if vq_stats:
      variables['vq_stats'] = vq_stats
    self._variables = jax.device_put(variables)

    def tokenize(variables, images_uint8):
      return model.apply(variables, data.to_float(images_uint8),
                         method=vq_tokenizer.VQTokenizer.tokenize)

    def detokenize(variables, tokens):
      out = model.apply(variables, tokens, method=vq_tokenizer.VQTokenizer.detokenize)
      # The pixels a saved PNG would hold, exactly as evaluation scores them.
      return metrics.to_pixel_range(out).astype(jnp.uint8)

    self._tokenize = jax.jit(tokenize)
    self._detokenize = jax.jit(detokenize)
    dummy = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.uint8)
    grid = jax.eval_shape(tokenize, self._variables, dummy).shape
    self.token_shape = tuple(int(d) for d in grid[1:])

  @classmethod
  def from_workdir(cls, config: ml_collections.ConfigDict, workdir: PathLike,
                   step: int | None = None) -> Tokenizer:
    """Restores the latest (or the given) checkpoint of `workdir`.

    Uses the EMA weights when training kept them (`train_state.eval_params`), as
    evaluation does.

    Args:
      config: the config the workdir was trained with (same overrides).
      workdir: the training workdir (holds `checkpoints/<step>/`).
      step: a checkpoint step to load; None for the latest.

    Returns:
      The restored tokenizer.

    Raises:
      FileNotFoundError: no checkpoint in `workdir`, or no checkpoint at `step`.
      ValueError: `config` describes another network than the one trained there.
    """
    workdir = pathlib.Path(workdir).expanduser().absolute()
    ckpt_dir = workdir / 'checkpoints'
    if not ckpt_dir.is_dir():
      raise FileNotFoundError(f'No checkpoints in {ckpt_dir}; train first with the same '
                              f'--config and --workdir={workdir}.')
    _check_matches_workdir(config, workdir)
    ckpt = checkpointing.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints)
    try:
      steps = ckpt.all_steps()
      if not steps:
        raise FileNotFoundError(f'No checkpoints in {ckpt_dir}; train first with the same '
                                f'--config and --workdir={workdir}.')
      if step is None:
        step = max(steps)
      elif step not in steps:
        raise FileNotFoundError(f'No checkpoint at step={step} in {ckpt_dir}; saved steps '
                                f'are {sorted(steps)}; pick one of them or None for the latest.')
      size = config.data.image_size
      # Restoring needs only the state's structure: an abstract one skips compiling and
      # running the initialisers (~4 s for the smoke model on CPU). The frozen LPIPS
      # weights are never checkpointed and inference does not use them, so an empty
      # stand-in satisfies the VQ-GAN state without loading VGG16.
      target = jax.eval_shape(lambda: ts.create_train_state(
          config, ts.init_key(0), (size, size, 3), {} if ts.uses_lpips(config) else None))
      state, _ = ckpt.restore(step, target)
    finally:
      ckpt.close()
    return cls(config, ts.eval_params(state), state.vq_stats, step=int(step))

  def _run(self, fn: Callable[..., jax.Array], inputs: np.ndarray, b: int,
           out_tail: tuple[int, ...], out_dtype: Any) -> np.ndarray:
    """Applies `fn` in batches of exactly `b` rows, zero-padding the last one."""
    n = len(inputs)
    out = np.empty((n,) + out_tail, out_dtype)
    for lo in range(0, n, b):
      chunk = inputs[lo:lo + b]
      rows = len(chunk)
      if rows < b:
        pad = np.zeros((b - rows,) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      out[lo:lo + rows] = np.asarray(fn(self._variables, chunk))[:rows]
    return out

  def _check_images(self, images: Any, where: str) -> np.ndarray:
    images = np.asarray(images)
    s = self.image_size
    expected = f'uint8 images [N, {s}, {s}, 3]'
    if images.dtype != np.uint8:
      raise ValueError(f'{where} expects {expected}; saw dtype {images.dtype}. Convert floats '
                       'in [-1, 1] with vq.data.to_uint8 first.')
    if images.ndim != 4:
      raise ValueError(f'{where} expects {expected}; saw shape {images.shape}. Add a batch '
                       'axis with x[None] for a single image.')
    if images.shape[-1] != 3:
      raise ValueError(f'{where} expects {expected}; saw {images.shape[-1]} channels. '
                       'Convert to RGB first (np.repeat(x, 3, -1) for grey images).')
    if images.shape[1:3] != (s, s):
      raise ValueError(f'{where} expects {expected} (config.data.image_size={s}); saw '
                       f'{images.shape[1]}x{images.shape[2]}. Resize the images to {s}x{s} '
                       '(datasets: data.resize=true).')
    return images

  def _check_tokens(self, tokens: Any, where: str) -> np.ndarray:
    tokens = np.asarray(tokens)
    shape = ', '.join(map(str, self.token_shape))
    expected = f'integer tokens [N, {shape}] in [0, {self.num_codes})'
    if tokens.dtype == np.bool_ or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f'{where} expects {expected}; saw dtype {tokens.dtype}. Pass the '
                       'output of encode (int32).')
    if tokens.ndim != 1 + len(self.token_shape) or tokens.shape[1:] != self.token_shape:
      raise ValueError(f'{where} expects {expected}; saw shape {tokens.shape}. Pass token '
                       'grids from this model (add a batch axis with t[None] for one grid).')
    if tokens.size:
      lo, hi = int(tokens.min()), int(tokens.max())
      if lo < 0 or hi >= self.num_codes:
        raise ValueError(f'{where} expects {expected}; saw values in [{lo}, {hi}]. These '
                         'tokens come from another codebook; encode with this model.')
    return tokens.astype(np.int32)

  def encode(self, images_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Images -> token grids.

    Args:
      images_uint8: uint8 [N, H, W, 3] with H = W = `image_size`.
      batch_size: the most images run at once.

    Returns:
      int32 [N, h, w] code indices.
    """
    images = self._check_images(images_uint8, 'encode')
    b = _bucket(len(images), _check_batch_size(batch_size))
    return self._run(self._tokenize, images, b, self.token_shape, np.int32)

  def decode(self, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Token grids -> images.

    Args:
      tokens: integers [N, h, w] in [0, num_codes).
      batch_size: the most grids run at once.

    Returns:
      uint8 [N, H, W, 3], rounded exactly as a saved PNG (and evaluation) would.
    """
    tokens = self._check_tokens(tokens, 'decode')
    return self._decode_at(tokens, _bucket(len(tokens), _check_batch_size(batch_size)))

  def _encode_padded(self, images_uint8: np.ndarray) -> np.ndarray:
    """Tokens of one already padded, already validated batch."""
    return np.asarray(self._tokenize(self._variables, images_uint8))

  def _decode_at(self, tokens: np.ndarray, b: int) -> np.ndarray:
    s = self.image_size
    return self._run(self._detokenize, tokens, b, (s, s, 3), np.uint8)

  def reconstruct(self, images_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's reconstruction: what `decode(encode(images))` returns.

    Tokens stay on the device between the halves, and because both run the same compiled
    programs, `reconstruct` equals `decode(encode(x))` pixel for pixel.

    Args:
      images_uint8: uint8 [N, H, W, 3] with H = W = `image_size`.
      batch_size: the most images run at once.

    Returns:
      uint8 [N, H, W, 3].
    """
    images = self._check_images(images_uint8, 'reconstruct')
    s = self.image_size
    b = _bucket(len(images), _check_batch_size(batch_size))
    return self._run(lambda v, x: self._detokenize(v, self._tokenize(v, x)), images, b,
                     (s, s, 3), np.uint8)


def _open(tok: Tokenizer, spec: str, data_dir: str | None) -> data.ImageSource:
  d = tok.config.data
  return data.open_source(spec, image_size=tok.image_size,
                          data_dir=data_dir if data_dir is not None else (d.data_dir or None),
                          resize=d.resize, download=d.download)


def _check_max_images(max_images: Any, *, allow_all: bool) -> int:
  least = 0 if allow_all else 1
  if isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer)) or (
      max_images < least):
    meaning = 'an int >= 0 (0: every image)' if allow_all else 'an int >= 1'
    raise ValueError(f'max_images must be {meaning}; saw {max_images!r}.')
  return int(max_images)


def _write_json(path: pathlib.Path, record: dict[str, Any]) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + '\n')
  os.replace(tmp, path)


def reconstruct_dataset(tok: Tokenizer, spec: str, out_dir: PathLike, *, max_images: int = 64,
                        data_dir: str | None = None) -> dict[str, Any]:
  """Reconstructs the first `max_images` images of a dataset; writes a grid and PSNRs.

  Writes `out_dir/reconstructions.png` (originals above their reconstructions, 8 per line,
  `vq.core.images.make_grid`) and `out_dir/psnr.json`.

  Args:
    tok: the tokenizer.
    spec: any dataset spec (`tfds:cifar10:test`, `npz:/x.npz`, `folder:/imgs`).
    out_dir: output directory (created).
    max_images: how many leading images to reconstruct, >= 1.
    data_dir: tfds data directory; None for `config.data.data_dir` / $TFDS_DATA_DIR.

  Returns:
    The psnr.json record: `psnr` (mean over images, dB), `psnr_per_image` (per image,
    10 log10(255^2 / MSE) on uint8 pixels as `vq.core.metrics.psnr`; null where the
    reconstruction is exact, and such images are left out of the mean), `num_images`,
    `num_exact`, `dataset`, `step`, `config_hash`.
  """
  max_images = _check_max_images(max_images, allow_all=False)
  source = data.take(_open(tok, spec, data_dir), max_images)
  originals = np.stack([source[i]['image'] for i in range(len(source))])
  recons = tok.reconstruct(originals)
  x, y = originals.astype(np.float32), recons.astype(np.float32)
  per_image = np.asarray(metrics.psnr(x, y), np.float64)
  # psnr caps an exact reconstruction at metrics.MAX_PSNR; this record marks it null instead.
  inexact = np.asarray(metrics.mse(x, y)) > 0
  record = {
      'dataset': spec,
      'step': tok.step,
      'config_hash': tok.config_hash,
      'num_images': int(len(per_image)),
      'num_exact': int(np.sum(~inexact)),
      'psnr': float(np.mean(per_image[inexact])) if inexact.any() else None,
      'psnr_per_image': [float(p) if f else None for p, f in zip(per_image, inexact)],
  }
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  vq_images.save_png(out_dir / 'reconstructions.png',
                     vq_images.make_grid([originals, recons], max_columns=8))
  _write_json(out_dir / 'psnr.json', record)
  return record


def encode_dataset(tok: Tokenizer, spec: str, out_path: PathLike, *, max_images: int = 0,
                   data_dir: str | None = None, batch_size: int = 256) -> dict[str, Any]:
  """Tokenizes a dataset into an `.npz` file (written atomically, no pickles).

  Keys: `tokens` int32 [N, h, w]; `labels` int32 [N] when the dataset has labels; and
  metadata `config_hash` (str), `checkpoint_step`, `num_codes`, `image_size`, `dataset`.

  Args:
    tok: the tokenizer.
    spec: any dataset spec.
    out_path: the .npz file to write (parent directories are created).
    max_images: tokenize only the first `max_images` images; 0 for all of them.
    data_dir: tfds data directory; None for `config.data.data_dir` / $TFDS_DATA_DIR.
    batch_size: images decoded and tokenized at once.

  Returns:
    {'path', 'num_images', 'token_shape', 'config_hash', 'checkpoint_step'}.
  """
  max_images = _check_max_images(max_images, allow_all=True)
  batch_size = _check_batch_size(batch_size)
  source = _open(tok, spec, data_dir)
  if max_images:
    source = data.take(source, max_images)
  n = len(source)
  b = _bucket(n, batch_size)
  tokens = np.empty((n,) + tok.token_shape, np.int32)
  labels = np.empty((n,), np.int32)
  # eval_batches decodes ahead on threads and pads the last batch to `b` already.
  for j, batch in enumerate(data.eval_batches(source, global_batch_size=b,
                                              num_local_devices=1)):
    rows, lo = int(batch['mask'].sum()), j * b
    pixels = data.to_uint8(batch['image'][0])  # exact inverse of the loader's to_float
    tokens[lo:lo + rows] = tok._encode_padded(pixels)[:rows]  # pylint: disable=protected-access
    labels[lo:lo + rows] = batch['label'][0][:rows]
  arrays = {
      'tokens': tokens,
      'config_hash': np.array(tok.config_hash),
      'checkpoint_step': np.array(tok.step, np.int64),
      'num_codes': np.array(tok.num_codes, np.int64),
      'image_size': np.array(tok.image_size, np.int64),
      'dataset': np.array(spec),
  }
  if source.num_classes is not None:
    arrays['labels'] = labels
  out_path = pathlib.Path(out_path)
  weights.save_npz(out_path, arrays)
  return {'path': str(out_path), 'num_images': n, 'token_shape': tok.token_shape,
          'config_hash': tok.config_hash, 'checkpoint_step': tok.step}


def decode_file(tok: Tokenizer, tokens_npz: PathLike, out_dir: PathLike, *,
                batch_size: int = 256) -> list[str]:
  """Decodes a token file from `encode_dataset` into `out_dir/image_00000.png`, ...

  Args:
    tok: the tokenizer; must be the model (config and checkpoint step) that made the file.
    tokens_npz: the .npz file.
    out_dir: output directory (created).
    batch_size: token grids decoded at once.

  Returns:
    The written PNG paths, in token order.

  Raises:
    FileNotFoundError: no file at `tokens_npz`.
    ValueError: not a token file, or tokens made by another config or checkpoint.
  """
  path = pathlib.Path(tokens_npz)
  if not path.is_file():
    raise FileNotFoundError(f'No token file at {path}; write one with encode_dataset.')
  with np.load(path, allow_pickle=False) as npz:
    missing = [k for k in ('tokens', 'config_hash', 'checkpoint_step') if k not in npz.files]
    if missing:
      raise ValueError(f'{path} lacks {missing} (keys: {npz.files}); decode files written by '
                       'encode_dataset.')
    tokens = npz['tokens']
    file_hash = str(npz['config_hash'])
    file_step = int(npz['checkpoint_step'])
  if file_hash != tok.config_hash:
    raise ValueError(f'{path} holds tokens made with config hash {file_hash}, but this '
                     f'tokenizer has config hash {tok.config_hash}: the tokens were made by '
                     'another model/config; load the tokenizer with the config that made them.')
  if file_step != tok.step:
    raise ValueError(f'{path} holds tokens from checkpoint step {file_step}, but this '
                     f'tokenizer was restored at step {tok.step}: its codebook differs; load '
                     f'it with step={file_step}.')
  tokens = tok._check_tokens(tokens, f'decode_file({path})')  # pylint: disable=protected-access
  # The same padded batch as `tok.decode(tokens, batch_size)`, so the files hold its pixels.
  b = _bucket(len(tokens), _check_batch_size(batch_size))
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for lo in range(0, len(tokens), b):
    pixels = tok._decode_at(tokens[lo:lo + b], b)  # pylint: disable=protected-access
    for i, image in enumerate(pixels, start=lo):
      name = str(out_dir / f'image_{i:05d}.png')
      vq_images.save_png(name, image)
      paths.append(name)
  return paths
