"""Native XLA:CPU kernels (C++, AVX-512) for the train step's slowest ops, built on first use.

Usage sketch::

  from vq.cpu import native

  if native.kernel_grad_supported(x.dtype, cout):       # CPU, float32, AVX-512, compiled
    dw = native.conv_kernel_grad(x, dy, (3, 3), strides=(1, 1), pads_lo=(1, 1))
  if native.group_norm_supported(x.dtype, channels, 32):
    y, mean, rstd = native.group_norm_fwd(x, scale, bias, num_groups=32, epsilon=1e-6,
                                          swish=True)

Two things XLA:CPU does slowly, found by `benchmarks/profile_step.py` on the taming CIFAR
step (docs/speed.md), each an XLA FFI custom call here:
- `native/conv_kernel_grad.cc`: the convolution kernel gradient. XLA's own is 1.6-1.9x
  slower than an im2col matmul, and the im2col route (vq/models/conv.py) spends about 40% of its
  time building im2col blocks; this reads x and dy in place (the padding is never
  materialised) with AVX-512 register tiles: 15.4 vs 29 ms for 3x3 64->64 at 32x32,
  batch 32, one core. vq/models/conv.py uses it for every float32 CPU kernel gradient.
- `native/group_norm.cc`: GroupNorm, optionally fused with the swish after it, and its
  gradient, in 3 + 2 passes over x with sums in double: value and gradient 6.8-9.1 vs
  9.8-14.9 ms at 32x32x64, 2.6-2.8 vs 4.4-4.5 ms at 16x16x128, 0.65 vs 0.93-0.98 ms at
  8x8x128 against vq/models/norms.py's XLA version (batch 32, one core, two runs of
  `taskset -c 0 python -m benchmarks.group_norm`). vq/models/norms.py uses it on CPU for float32.
Both compute the same sums in float32 (GroupNorm's in double) in another order: tests
compare them with float64 numpy oracles and with the XLA paths. First-order gradients run
natively; each native call also has a JVP written in plain JAX, so second-order gradients
(an R1 penalty) work, at XLA's speed.

The library is compiled once per source / jaxlib / compiler, by the C++ compiler in `$CXX`
(default `c++`), about 4 s, into `$VQ_NATIVE_CACHE` (default `~/.cache/vq/native`), and
loaded with ctypes. Nothing is compiled at import time, only when a CPU convolution or
GroupNorm is first traced, and only on x86-64 CPUs with AVX-512 (`/proc/cpuinfo` says
avx512f; elsewhere, e.g. on ARM, no compiler ever starts). A build that fails leaves a
marker beside the library (`vq_native_<key>.failed`, the same key, holding the error), so
later processes on the machine go straight to XLA instead of running the compiler again;
delete the marker, or set `VQ_NATIVE=1` (retry the build even so), to try again. Without
a compiler, on a CPU without AVX-512, on GPU/TPU, with `VQ_NATIVE=0` or with
`VQ_CPU_FAST_PATHS=0` (all CPU fast paths off, see `fast_paths`), the `*_supported`
functions say False and the XLA paths run. Which path runs, and why, is logged once (one
INFO line, a WARNING where a build just failed) and kept in `unavailable_reason()`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vq.cpu import fast_paths

ENV_SWITCH = 'VQ_NATIVE'          # '0' turns the native kernels off, '1' retries a failed build.
ENV_CACHE = 'VQ_NATIVE_CACHE'     # Where the compiled library goes.
TARGET = 'vq_conv_kernel_grad'
GROUP_NORM_TARGETS = ('vq_group_norm_fwd', 'vq_group_norm_bwd')
SOURCES = tuple(pathlib.Path(__file__).parent / 'kernels' / name
                for name in ('conv_kernel_grad.cc', 'group_norm.cc'))
_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-w')

_lock = threading.Lock()
_state: dict = {}   # 'reason': None once loaded, else why not; 'path': the library.
_X86_64 = ('x86_64', 'amd64', 'x64')


def cache_dir() -> pathlib.Path:
  if os.environ.get(ENV_CACHE):
    return pathlib.Path(os.environ[ENV_CACHE])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'vq' / 'native'


def _compiler() -> str | None:
  return shutil.which(os.environ.get('CXX', 'c++'))


def library_path(compiler: str) -> pathlib.Path:
  """Cache path of the library: keyed by source, jaxlib (the FFI headers), compiler, flags."""
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                           check=False).stdout
  key = hashlib.sha256(b'\0'.join([
      *(source.read_bytes() for source in SOURCES), jax.lib.__version__.encode(),
      compiler.encode(),
      version.encode(), ' '.join(_FLAGS).encode()])).hexdigest()[:16]
  return cache_dir() / f'vq_native_{key}.so'


def build(compiler: str, out: pathlib.Path) -> None:
  """Compiles SOURCES into `out`, atomically (a concurrent build of the same key is harmless)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_out = pathlib.Path(tmp) / out.name
    cmd = [compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', *map(str, SOURCES), '-o',
           str(tmp_out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f'{" ".join(cmd)} failed: {result.stderr.strip()[-2000:]}')
    os.replace(tmp_out, out)


def cpu_reason(machine: str | None = None, cpuinfo: str | None = None) -> str | None:
  """Why this CPU cannot run the kernels (x86-64 with AVX-512 only), or None if it can.

  Args:
    machine: `platform.machine()` (default: this machine's).
    cpuinfo: the text of /proc/cpuinfo (default: read it; where there is none, e.g. on
      macOS, the library's own run-time check decides after the build).
  """
  machine = (platform.machine() if machine is None else machine).lower()
  if machine not in _X86_64:
    return f'the kernels are x86-64 AVX-512 code and this CPU is {machine or "unknown"}'
  if cpuinfo is None:
    try:
      with open('/proc/cpuinfo') as f:
        cpuinfo = f.read()
    except OSError:
      return None
  flags = next((line.split(':', 1)[1].split() for line in cpuinfo.splitlines()
                if line.startswith('flags')), None)
  if flags is not None and 'avx512f' not in flags:
    return 'this CPU has no AVX-512 (no avx512f in /proc/cpuinfo)'
  return None


def failure_marker(path: pathlib.Path) -> pathlib.Path:
  """The file that records a failed build of the library at `path` (same cache key)."""
  return path.with_suffix('.failed')


def _load() -> tuple[str | None, bool]:
  """Builds (if needed), loads and registers the kernels.

  Returns:
    (why not, or None if loaded; whether a build failed just now).
  """
  switch = os.environ.get(ENV_SWITCH, '')
  reason = cpu_reason()
  if reason:
    return reason, False
  compiler = _compiler()
  if compiler is None:
    return (f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not on PATH); install g++ or "
            'set CXX', False)
  try:
    path = library_path(compiler)
    marker = failure_marker(path)
    if not path.exists():
      if marker.exists() and switch != '1':
        return (f'an earlier build failed (see {marker}); delete that file or set '
                f'{ENV_SWITCH}=1 to retry', False)
      try:
        build(compiler, path)
      except RuntimeError as e:
        try:  # later processes skip the compiler until the marker goes
          marker.write_text(f'{e}\n')
        except OSError:
          pass
        return f'building {", ".join(s.name for s in SOURCES)} failed: {e}', True
      marker.unlink(missing_ok=True)
    lib = ctypes.cdll.LoadLibrary(str(path))
    if not lib.vq_native_supported():
      return 'this CPU has no AVX-512', False
    for name, symbol in ((TARGET, lib.VqConvKernelGrad),
                         (GROUP_NORM_TARGETS[0], lib.VqGroupNormFwd),
                         (GROUP_NORM_TARGETS[1], lib.VqGroupNormBwd)):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform='cpu')
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return f'building or loading {", ".join(s.name for s in SOURCES)} failed: {e}', False
  _state['path'] = path
  return None, False


def switched_off() -> str | None:
  """'VQ_NATIVE=0' or 'VQ_CPU_FAST_PATHS=0' when a switch turns the kernels off, else None.

  Read on every call, so a switch set after the first use holds for everything traced
  after it (already compiled functions keep the path they were traced with).
  """
  if os.environ.get(ENV_SWITCH, '') == '0':
    return f'{ENV_SWITCH}=0'
  return fast_paths.off_reason()


def _log_once(level, message: str) -> None:
  logged = _state.setdefault('logged', set())
  if message not in logged:
    logged.add(message)
    level('%s', message)


def unavailable_reason() -> str | None:
  """None if the native kernels are loaded (loading them on first call), else the reason."""
  with _lock:
    off = switched_off()
    if off:
      _log_once(logging.info, f'vq.cpu.native: XLA paths run for conv kernel gradients and '
                f'GroupNorm: {off}')
      return off
    if 'reason' not in _state:
      _state['reason'], build_failed = _load()
      if _state['reason'] is None:
        _log_once(logging.info, f'vq.cpu.native: native kernels run ({TARGET}, '
                  f'{", ".join(GROUP_NORM_TARGETS)}) from {_state["path"]}')
      else:
        _log_once(logging.warning if build_failed else logging.info,
                  'vq.cpu.native: XLA paths run for conv kernel gradients and GroupNorm: '
                  f'{_state["reason"]}')
    return _state['reason']


def kernel_grad_supported(dtype, cout: int, backend: str | None = None) -> bool:
  """Whether `conv_kernel_grad` can run: CPU backend, float32, cout % 16 == 0, loaded."""
  backend = jax.default_backend() if backend is None else backend
  return (backend == 'cpu' and jnp.dtype(dtype) == jnp.float32 and cout % 16 == 0
          and unavailable_reason() is None)


def conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_hw: Sequence[int],
                     strides: Sequence[int] = (1, 1),
                     pads_lo: Sequence[int] = (0, 0)) -> jax.Array:
  """[kh, kw, Cin, Cout] gradient of conv(x, kernel) w.r.t. the kernel, given dy.

  x is the unpadded NHWC input, dy the [N, OH, OW, Cout] output cotangent; the convolution
  pads x by `pads_lo` at the top and left (the bottom and right padding follow from OH, OW).
  float32 only; call `kernel_grad_supported` first.
  """
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f'vq.cpu.native.conv_kernel_grad is unavailable: {reason}; check '
                       'kernel_grad_supported() first.')
  if jnp.dtype(x.dtype) != jnp.float32 or jnp.dtype(dy.dtype) != jnp.float32:
    raise ValueError(f'vq.cpu.native.conv_kernel_grad takes float32 x and dy, got {x.dtype} and '
                     f'{dy.dtype}; cast them or use vq.models.conv.conv2d.')
  if dy.shape[-1] % 16:
    raise ValueError(f'vq.cpu.native.conv_kernel_grad needs a multiple of 16 output channels, got '
                     f'{dy.shape[-1]}; use vq.models.conv.conv2d, which falls back to XLA.')
  return _kernel_grad(x, dy, tuple(int(k) for k in kernel_hw), tuple(int(s) for s in strides),
                      tuple(int(p) for p in pads_lo))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _kernel_grad(x, dy, kernel_hw, strides, pads_lo):
  kh, kw = kernel_hw
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, out, vmap_method='sequential')
  return call(x, dy, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
              pt=np.int64(pads_lo[0]), pl=np.int64(pads_lo[1]))


def kernel_grad_reference(x, dy, kernel_hw, strides=(1, 1), pads_lo=(0, 0)):
  """The same sum in plain JAX, tap by tap (slow; linear in x and in dy, so transposable)."""
  kh, kw = kernel_hw
  sh, sw = strides
  _, oh, ow, _ = dy.shape
  pt, pl = pads_lo
  # Pad (or crop) so that tap (i, j) of output (y, x) reads xp[y * sh + i, x * sw + j].
  need_h, need_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype), (
      (0, 0, 0), (pt, need_h - x.shape[1] - pt, 0), (pl, need_w - x.shape[2] - pl, 0),
      (0, 0, 0)))
  taps = [[jnp.einsum('nhwc,nhwo->co', jax.lax.slice(
      xp, (0, i, j, 0), (xp.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1,
                         xp.shape[3]), (1, sh, sw, 1)), dy,
      precision=jax.lax.Precision.HIGHEST) for j in range(kw)] for i in range(kh)]
  return jnp.stack([jnp.stack(row) for row in taps])


@_kernel_grad.defjvp
def _kernel_grad_jvp(kernel_hw, strides, pads_lo, primals, tangents):
  # Only higher-order derivatives (e.g. an R1 penalty's gradient) come here: the kernel
  # gradient is bilinear in (x, dy), and its tangent runs in plain JAX, which JAX can
  # transpose.
  x, dy = primals
  tx, tdy = tangents
  ref = functools.partial(kernel_grad_reference, kernel_hw=kernel_hw, strides=strides,
                          pads_lo=pads_lo)
  return _kernel_grad(x, dy, kernel_hw, strides, pads_lo), ref(tx, dy) + ref(x, tdy)


def group_norm_supported(dtype, channels: int, num_groups: int,
                         backend: str | None = None) -> bool:
  """Whether `group_norm` can run: CPU, float32, channels % 16 == 0 and % num_groups == 0."""
  backend = jax.default_backend() if backend is None else backend
  return (backend == 'cpu' and jnp.dtype(dtype) == jnp.float32 and channels % 16 == 0
          and channels % num_groups == 0 and unavailable_reason() is None)


def _check_group_norm(x, channels, num_groups):
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f'vq.cpu.native.group_norm is unavailable: {reason}; check '
                       'group_norm_supported() first.')
  if jnp.dtype(x.dtype) != jnp.float32 or channels % 16 or channels % num_groups:
    raise ValueError(f'vq.cpu.native.group_norm takes float32 x with channels a multiple of 16 '
                     f'and of num_groups, got {x.dtype}, {channels} channels, {num_groups} '
                     'groups; use vq.models.norms.group_norm, which falls back to XLA.')


def group_norm_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, *, num_groups: int,
                   epsilon: float, swish: bool):
  """GroupNorm (then swish) of x [N, ..., C]: (y, mean [N, G], rstd [N, G]), all float32."""
  _check_group_norm(x, x.shape[-1], num_groups)
  return _group_norm_fwd(x, scale.astype(jnp.float32), bias.astype(jnp.float32), num_groups,
                         float(epsilon), bool(swish))


def _group_stats(x, num_groups, epsilon):
  """Per-example, per-group mean and 1/sqrt(var + eps) of x [N, ..., C] (two-pass var)."""
  xg = x.reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)
  mean = jnp.mean(xg, axis=(1, 3))
  var = jnp.mean(jnp.square(xg - mean[:, None, :, None]), axis=(1, 3))
  return mean, jax.lax.rsqrt(var + epsilon)


def _to_channels(per_group, x):
  """[N, G] -> [N, 1.., C] broadcastable against x."""
  spread = jnp.repeat(per_group, x.shape[-1] // per_group.shape[1], axis=1)
  return spread.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


def group_norm_fwd_reference(x, scale, bias, num_groups, epsilon, swish):
  """`group_norm_fwd` in plain JAX."""
  mean, rstd = _group_stats(x, num_groups, epsilon)
  h = (x - _to_channels(mean, x)) * _to_channels(rstd, x) * scale + bias
  return (h * jax.nn.sigmoid(h) if swish else h), mean, rstd


def group_norm_bwd_reference(x, scale, bias, mean, rstd, dy, num_groups, swish):
  """`group_norm_bwd` in plain JAX, from the saved statistics (the formula of the C++)."""
  axes = tuple(range(1, x.ndim - 1))
  m, r = _to_channels(mean, x), _to_channels(rstd, x)
  a = r * scale
  h = x * a + (bias - m * a)
  dh = dy
  if swish:
    sig = jax.nn.sigmoid(h)
    dh = dy * sig * (1 + h * (1 - sig))
  count = x.size // (x.shape[0] * num_groups)
  def group_sum(v):  # [N, C] -> [N, 1.., C]: the sum over each channel's group
    g = v.reshape(v.shape[0], num_groups, -1).sum(axis=2)
    return _to_channels(g, x)
  centred = jnp.sum(dh * (x - m), axis=axes)            # [N, C]
  dbias = jnp.sum(dh, axis=(0,) + axes)
  dscale = jnp.sum(centred * rstd.repeat(x.shape[-1] // num_groups, axis=1), axis=0)
  m1 = group_sum(scale * jnp.sum(dh, axis=axes)) / count
  m2 = group_sum(scale * centred) * r / count
  dx = dh * a - r * m1 - (x - m) * r * r * m2
  return dx, dscale, dbias


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish):
  channels = x.shape[-1]
  x3 = x.reshape(x.shape[0], -1, channels)
  stats = jax.ShapeDtypeStruct((x.shape[0], num_groups), jnp.float32)
  call = jax.ffi.ffi_call(GROUP_NORM_TARGETS[0],
                          (jax.ShapeDtypeStruct(x3.shape, jnp.float32), stats, stats),
                          vmap_method='sequential')
  y, mean, rstd = call(x3, scale, bias, groups=np.int64(num_groups),
                       eps=np.float32(epsilon), swish=np.int64(swish))
  return y.reshape(x.shape), mean, rstd


@_group_norm_fwd.defjvp
def _group_norm_fwd_jvp(num_groups, epsilon, swish, primals, tangents):
  # Higher-order derivatives only (the first-order gradient is vq/models/norms.py's custom_vjp).
  out = _group_norm_fwd(*primals, num_groups, epsilon, swish)
  _, tangent = jax.jvp(lambda *a: group_norm_fwd_reference(*a, num_groups, epsilon, swish),
                       primals, tangents)
  return out, tangent


def group_norm_bwd(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array,
                   rstd: jax.Array, dy: jax.Array, *, num_groups: int, swish: bool):
  """Gradient of `group_norm_fwd`'s y w.r.t. (x, scale, bias), given its cotangent dy."""
  _check_group_norm(x, x.shape[-1], num_groups)
  return _group_norm_bwd(x, scale.astype(jnp.float32), bias.astype(jnp.float32), mean, rstd,
                         dy.astype(jnp.float32), num_groups, bool(swish))


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7))
def _group_norm_bwd(x, scale, bias, mean, rstd, dy, num_groups, swish):
  channels = x.shape[-1]
  x3 = x.reshape(x.shape[0], -1, channels)
  vec = jax.ShapeDtypeStruct((channels,), jnp.float32)
  call = jax.ffi.ffi_call(GROUP_NORM_TARGETS[1],
                          (jax.ShapeDtypeStruct(x3.shape, jnp.float32), vec, vec),
                          vmap_method='sequential')
  dx, dscale, dbias = call(x3, scale, bias, mean, rstd, dy.reshape(x3.shape),
                           groups=np.int64(num_groups), swish=np.int64(swish))
  return dx.reshape(x.shape), dscale, dbias


@_group_norm_bwd.defjvp
def _group_norm_bwd_jvp(num_groups, swish, primals, tangents):
  out = _group_norm_bwd(*primals, num_groups, swish)
  _, tangent = jax.jvp(lambda *a: group_norm_bwd_reference(*a, num_groups, swish),
                       primals, tangents)
  return out, tangent
