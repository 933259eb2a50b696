"""InceptionV3 pool3 features for FID, the network and weights of pytorch-fid.

  params = inception.load_params()        # raises InceptionWeightsMissing until converted
  net = inception.InceptionV3FID()
  feats = net.apply({'params': params}, images)  # [N, H, W, 3] in [-1, 1] or uint8 -> [N, 2048]

The network is pytorch-fid's `InceptionV3` up to the final average pool: torchvision's Inception
v3 with the FID patches of TF's 2015-12-05 graph (average pools in Mixed_5*, Mixed_6b-e and
Mixed_7b ignore padded zeros; Mixed_7c pools by max). Inputs are resized to 299x299 as pytorch-fid
does (`F.interpolate(mode='bilinear', align_corners=False)`, no antialiasing); batch norm runs in
eval mode (eps 0.001), folded into a per-channel scale and shift.

Weights. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (`WEIGHTS_URL`, release
'fid_weights' of mseitzer/pytorch-fid) is a torch pickle, which vq never loads. Convert it once
on a machine with torch and vq installed:

  python -m vq.perceptual.inception --convert path/to/pt_inception-2015-12-05-6726825d.pth

which writes `inception_fid.npz` into $VQ_CACHE_DIR (default ~/.cache/vq); copy that file to the
same place on the machines that compute FID, or point $VQ_INCEPTION_WEIGHTS at it. Without vq on
the torch machine, an .npz of the raw state dict works too:
`numpy.savez('inception_fid.npz', **{k: v.numpy() for k, v in torch.load(pth,
weights_only=True).items()})`.
"""

import argparse
import functools
import hashlib
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vq.models import conv
from vq.core import weights

FEATURE_DIM = 2048
INPUT_SIZE = 299
# The smallest input the network maps to a non-empty pool3 (with `resize_input=False`).
MIN_SIZE = 75
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')
WEIGHTS_ENV = 'VQ_INCEPTION_WEIGHTS'
CACHE_FILE = 'inception_fid.npz'
_TORCH_FILE_SHA256_PREFIX = '6726825d'  # torch hub names files <name>-<sha256 prefix>.pth.
_BN_EPS = 1e-3
# The 2015-12-05 graph classifies into 1008 classes; the head is unused for pool3 but is part of
# the checkpoint, so the converter checks it.
_NUM_CLASSES = 1008
_CONVERT_COMMAND = 'python -m vq.perceptual.inception --convert pt_inception-2015-12-05-6726825d.pth'


class InceptionWeightsMissing(FileNotFoundError):
  """No converted Inception weights were found; FID cannot be computed."""


# --- Resize and pools (static index arithmetic, so they compile to slices and matmuls) ---


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of torch's bilinear weights with align_corners=False.

  Follows `F.interpolate(size=..., mode='bilinear', align_corners=False)` without antialiasing:
  the source coordinate is (dst + 0.5) * in / out - 0.5, clamped at 0, and blends the two
  nearest pixels (the upper one clamped at the last index).
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), 1.0 - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix.astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes [N, H, W, C] to [N, size[0], size[1], C] like torch bilinear, align_corners=False.

  Unlike `jax.image.resize`, this never antialiases when shrinking, matching pytorch-fid.
  """
  out_h, out_w = size
  _, h, w, _ = x.shape
  if (h, w) == (out_h, out_w):
    return x
  hp = jax.lax.Precision.HIGHEST  # Keep TPU/GPU from rounding the blend to bf16/tf32.
  x = jnp.einsum('oh,nhwc->nowc', bilinear_matrix(h, out_h), x, precision=hp)
  return jnp.einsum('pw,nowc->nopc', bilinear_matrix(w, out_w), x, precision=hp)


def _window_slices(x: jax.Array, stride: int, out_h: int, out_w: int) -> list[jax.Array]:
  """The nine [N, out_h, out_w, C] views a 3x3 window with `stride` reads from (padded) x."""
  return [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
          for i in range(3) for j in range(3)]


def max_pool_3x3(x: jax.Array, stride: int, padding: int) -> jax.Array:
  """torch `F.max_pool2d(kernel_size=3, stride, padding)`: padding never wins the max."""
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=-jnp.inf)
  out_h, out_w = (x.shape[1] - 3) // stride + 1, (x.shape[2] - 3) // stride + 1
  return functools.reduce(jnp.maximum, _window_slices(x, stride, out_h, out_w))


def _valid_counts(n: int) -> np.ndarray:
  """Pixels a 3-wide window (stride 1, padding 1) covers inside a length-n axis, per output."""
  i = np.arange(n)
  return (np.minimum(i + 1, n - 1) - np.maximum(i - 1, 0) + 1).astype(np.float32)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """torch `F.avg_pool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)`.

  TF's average pool, which the FID graph used, divides by the number of real pixels in each
  window; torchvision's Inception divides by 9.
  """
  _, h, w, _ = x.shape
  total = sum(_window_slices(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), 1, h, w))
  counts = np.outer(_valid_counts(h), _valid_counts(w))[None, :, :, None]
  return total / counts


# --- Network ---


class BasicConv(nn.Module):
  """torchvision's BasicConv2d in eval mode: bias-free conv, batch norm as scale/shift, ReLU.

  Parameters: 'kernel' [kh, kw, Cin, Cout] (HWIO), 'scale' and 'shift' [Cout], where
  scale = gamma / sqrt(running_var + 0.001) and shift = beta - running_mean * scale.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: stride in both directions.
    padding: torch-style symmetric zero padding (ph, pw).
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (self.features,), jnp.float32)
    shift = self.param('shift', nn.initializers.zeros, (self.features,), jnp.float32)
    ph, pw = self.padding
    # conv2d's 'auto' runs XLA:CPU's slow cases (1x1, maps <= 3 pixels wide) as matmuls.
    y = conv.conv2d(x, kernel, strides=(self.strides,) * 2, padding=((ph, ph), (pw, pw)))
    return nn.relu(y * scale + shift)


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: torchvision's InceptionA with a pad-excluding average pool."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: torchvision's InceptionB (grid reduction 35 -> 17)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3(x, 2, 0)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b-e: torchvision's InceptionC (factorised 7x7) with a pad-excluding average pool."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c7, name='branch7x7_1')(x)
    b7 = BasicConv(c7, **row, name='branch7x7_2')(b7)
    b7 = BasicConv(192, **col, name='branch7x7_3')(b7)
    bd = BasicConv(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, **col, name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, **row, name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, **col, name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, **row, name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, name='branch_pool')(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: torchvision's InceptionD (grid reduction 17 -> 8)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3(x, 2, 0)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pytorch-fid's FIDInceptionE_1, pool='avg') and Mixed_7c (FIDInceptionE_2, 'max').

  Attributes:
    pool: 'avg' (3x3 average excluding padding) or 'max' (3x3 max, stride 1, padding 1): the FID
      graph's last block max-pools, likely a bug in that graph, kept for comparable scores.
  """
  pool: str = 'avg'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool not in ('avg', 'max'):
      raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {self.pool!r}.")
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = BasicConv(384, name='branch3x3_1')(x)
    b3 = [BasicConv(384, **row, name='branch3x3_2a')(b3),
          BasicConv(384, **col, name='branch3x3_2b')(b3)]
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = [BasicConv(384, **row, name='branch3x3dbl_3a')(bd),
          BasicConv(384, **col, name='branch3x3dbl_3b')(bd)]
    pooled = avg_pool_3x3_exclude_pad(x) if self.pool == 'avg' else max_pool_3x3(x, 1, 1)
    bp = BasicConv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """pytorch-fid's InceptionV3 (use_fid_inception=True) up to pool3: images -> [N, 2048].

  Parameter names follow the torch modules ('Conv2d_1a_3x3', 'Mixed_5b/branch1x1', ...), each a
  `BasicConv`; build them with `load_params` or `convert_torch_state_dict`.

  Attributes:
    resize_input: resize to 299x299 first, as pytorch-fid does (its default). Without it the
      network runs at the input size (at least 75x75).
  """
  resize_input: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Pool3 features.

    Args:
      x: [N, H, W, 3] images, float in [-1, 1] or uint8 in [0, 255].

    Returns:
      [N, 2048] float32 features (non-negative: the mean of ReLU outputs).
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'InceptionV3FID needs [N, H, W, 3] RGB images, got shape {x.shape}; '
                       'pass NHWC batches (convert grayscale to RGB first).')
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) / 127.5 - 1.0
    x = x.astype(jnp.float32)
    # pytorch-fid resizes [0, 1] images and then maps to [-1, 1]; bilinear weights sum to one,
    # so resizing the [-1, 1] images gives the same result.
    if self.resize_input:
      x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    elif min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f'InceptionV3FID with resize_input=False needs H, W >= {MIN_SIZE}, got '
                       f'shape {x.shape}; keep resize_input=True (pytorch-fid resizes to 299).')
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = max_pool_3x3(x, 2, 0)
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = max_pool_3x3(x, 2, 0)
    x = FIDInceptionA(32, name='Mixed_5b')(x)
    x = FIDInceptionA(64, name='Mixed_5c')(x)
    x = FIDInceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = FIDInceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = FIDInceptionE('avg', name='Mixed_7b')(x)
    x = FIDInceptionE('max', name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


# --- Weights ---


@functools.lru_cache(maxsize=1)
def _traced_param_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
  # Traced from the module itself (no compile, ~1 s), so the converter cannot drift from it.
  x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
  tree = jax.eval_shape(InceptionV3FID(resize_input=False).init, jax.random.key(0), x)['params']
  flat = traverse_util.flatten_dict(tree, sep='/')
  return tuple((key, tuple(leaf.shape)) for key, leaf in flat.items())


def param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat 'Mixed_5b/branch1x1/kernel'-style keys of `InceptionV3FID` params and their shapes."""
  return dict(_traced_param_shapes())


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Keys of `pt_inception-2015-12-05-6726825d.pth` and their shapes (num_batches_tracked aside).

  Every BasicConv2d 'P' has 'P.conv.weight' [Cout, Cin, kh, kw] and 'P.bn.weight', 'P.bn.bias',
  'P.bn.running_mean', 'P.bn.running_var' [Cout]; the classifier is 'fc.weight' [1008, 2048]
  and 'fc.bias' [1008].
  """
  shapes = {}
  for key, shape in param_shapes().items():
    prefix, leaf = key.rsplit('/', 1)
    torch_prefix = prefix.replace('/', '.')
    if leaf == 'kernel':
      kh, kw, cin, cout = shape
      shapes[f'{torch_prefix}.conv.weight'] = (cout, cin, kh, kw)
      for bn_leaf in ('weight', 'bias', 'running_mean', 'running_var'):
        shapes[f'{torch_prefix}.bn.{bn_leaf}'] = (cout,)
  shapes['fc.weight'] = (_NUM_CLASSES, FEATURE_DIM)
  shapes['fc.bias'] = (_NUM_CLASSES,)
  return shapes


def _check_keys_and_shapes(given: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                           optional: Mapping[str, tuple[int, ...]], source: str,
                           hint: str) -> None:
  """Raises ValueError naming the first missing/unexpected key or wrong shape."""
  missing = sorted(set(expected) - set(given))
  if missing:
    raise ValueError(f'{source}: missing key {missing[0]!r} ({len(missing)} missing in all); '
                     f'{hint}.')
  unexpected = sorted(set(given) - set(expected) - set(optional))
  if unexpected:
    raise ValueError(f'{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected '
                     f'in all); {hint}.')
  for key in sorted(given):
    shape = expected.get(key, optional.get(key))
    seen = tuple(np.shape(given[key]))
    if seen != shape:
      raise ValueError(f'{source}: key {key!r} has shape {seen}, expected {shape}; {hint}.')


def convert_torch_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Builds `InceptionV3FID` params from pytorch-fid's Inception state dict as numpy arrays.

  Args:
    sd: the entries of `pt_inception-2015-12-05-6726825d.pth` (see `torch_state_dict_shapes`),
      e.g. `{k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}`. Batch
      norm 'num_batches_tracked' counters, which newer torch versions save, are allowed and
      ignored; 'fc.*' is checked but unused.

  Returns:
    The params tree of `InceptionV3FID`, float32, with each batch norm folded (in float64) into
    'scale' = weight / sqrt(running_var + 0.001) and 'shift' = bias - running_mean * scale.

  Raises:
    ValueError: on a missing or unexpected key or an array of the wrong shape, naming the key.
  """
  expected = torch_state_dict_shapes()
  optional = {k.replace('.conv.weight', '.bn.num_batches_tracked'): ()
              for k in expected if k.endswith('.conv.weight')}
  _check_keys_and_shapes(sd, expected, optional, 'Inception state dict',
                         'pass the entries of pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth '
                         'as numpy arrays')
  flat = {}
  for key in param_shapes():
    prefix, leaf = key.rsplit('/', 1)
    p = prefix.replace('/', '.')
    if leaf == 'kernel':
      # OIHW -> HWIO; no flip, both frameworks cross-correlate.
      flat[key] = np.transpose(np.asarray(sd[f'{p}.conv.weight'], np.float32), (2, 3, 1, 0))
    else:
      gamma, beta, mean, var = (np.asarray(sd[f'{p}.bn.{n}'], np.float64)
                                for n in ('weight', 'bias', 'running_mean', 'running_var'))
      scale = gamma / np.sqrt(var + _BN_EPS)
      flat[key] = (scale if leaf == 'scale' else beta - mean * scale).astype(np.float32)
  return weights.unflatten_tree(flat)


def default_cache_dir() -> pathlib.Path:
  """$VQ_CACHE_DIR if set, else ~/.cache/vq."""
  return pathlib.Path(os.environ.get('VQ_CACHE_DIR') or pathlib.Path.home() / '.cache' / 'vq')


def weights_path(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Where `load_params` looks: `path`, else $VQ_INCEPTION_WEIGHTS, else the cache's npz."""
  chosen = path or os.environ.get(WEIGHTS_ENV)
  return pathlib.Path(chosen) if chosen else default_cache_dir() / CACHE_FILE


def load_params(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
  """Converted pytorch-fid Inception params, read from a pickle-free .npz.

  Args:
    path: the .npz; default `weights_path()` ($VQ_INCEPTION_WEIGHTS, else
      $VQ_CACHE_DIR/inception_fid.npz, else ~/.cache/vq/inception_fid.npz). It may hold our
      params (as written by `python -m vq.perceptual.inception --convert`) or the raw torch state dict.

  Returns:
    The params tree of `InceptionV3FID`.

  Raises:
    InceptionWeightsMissing: if there is no file at the path (the message says how to make it).
    ValueError: if the file is a pickle/torch checkpoint, not an .npz, or holds other arrays.
  """
  path = weights_path(path)
  if not path.is_file():
    raise InceptionWeightsMissing(
        f'No Inception FID weights at {path}: on a machine with torch run `{_CONVERT_COMMAND}` '
        f'(file from {WEIGHTS_URL}) and copy the {CACHE_FILE} it writes there, or set '
        f'{WEIGHTS_ENV} to its path.')
  if path.suffix in ('.pth', '.pt'):
    raise ValueError(f'{path} is a torch checkpoint, which vq does not unpickle; convert it once '
                     f'with `{_CONVERT_COMMAND}` on a machine with torch and use the .npz.')
  flat = weights.load_npz(path)
  if any('/' in key for key in flat):
    _check_keys_and_shapes(flat, param_shapes(), {}, f'Inception weights {path}',
                           f'write the file again with `{_CONVERT_COMMAND}`')
    return weights.unflatten_tree({k: np.asarray(v, np.float32) for k, v in flat.items()})
  try:
    return convert_torch_state_dict(flat)
  except ValueError as e:
    raise ValueError(f'{path} (read as a torch state dict): {e}') from e


def _convert_cli(pth: pathlib.Path, out: pathlib.Path) -> None:
  """Reads the torch checkpoint with torch (tensors only), writes our params npz."""
  import torch  # pylint: disable=g-import-not-at-top  # Only this one-off command needs torch.

  digest = hashlib.sha256(pth.read_bytes()).hexdigest()
  if not digest.startswith(_TORCH_FILE_SHA256_PREFIX):
    print(f'warning: {pth} has sha256 {digest[:16]}..., while the name of pytorch-fid\'s file '
          f'says {_TORCH_FILE_SHA256_PREFIX}...; FID from other weights is not comparable.',
          file=sys.stderr)
  sd = torch.load(pth, map_location='cpu', weights_only=True)
  params = convert_torch_state_dict({k: v.detach().cpu().numpy() for k, v in sd.items()})
  weights.save_npz(out, weights.flatten_tree(params))
  where = ('load_params() finds it there' if out == default_cache_dir() / CACHE_FILE
           else f'set {WEIGHTS_ENV}={out} for load_params() to find it')
  print(f'wrote {out} ({len(param_shapes())} arrays); {where}.')


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m vq.perceptual.inception --convert PTH [--out NPZ]`: the one-off weight conversion."""
  parser = argparse.ArgumentParser(
      prog='python -m vq.perceptual.inception',
      description='Convert pytorch-fid\'s Inception weights (.pth) to the .npz vq loads.')
  parser.add_argument('--convert', type=pathlib.Path, required=True, metavar='PTH',
                      help=f'path to pt_inception-2015-12-05-6726825d.pth ({WEIGHTS_URL})')
  parser.add_argument('--out', type=pathlib.Path, default=None,
                      help=f'output .npz (default: {CACHE_FILE} in $VQ_CACHE_DIR, else '
                      '~/.cache/vq)')
  args = parser.parse_args(argv)
  if not args.convert.is_file():
    parser.error(f'no file at {args.convert}; download it from {WEIGHTS_URL}')
  _convert_cli(args.convert, args.out or default_cache_dir() / CACHE_FILE)


if __name__ == '__main__':
  main()
