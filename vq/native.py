"""A native XLA:CPU kernel for the convolution kernel gradient, compiled on first use.

Usage sketch::

  from vq import native

  if native.kernel_grad_supported(x.dtype, cout):       # CPU, float32, AVX-512, compiled
    dw = native.conv_kernel_grad(x, dy, (3, 3), strides=(1, 1), pads_lo=(1, 1))

XLA:CPU has no fast convolution kernel gradient: its own is 1.6-1.9x slower than an
im2col matmul, and the im2col route (vq/conv.py) spends about 40% of its time building the
im2col blocks. `native/conv_kernel_grad.cc` reads x and dy in place (the padding is never
materialised) with AVX-512 register tiles and is called from the jitted step as an XLA
FFI custom call. It is the same sum in float32 (in another order).

The library is compiled once per source / jaxlib / compiler, by the C++ compiler in `$CXX`
(default `c++`), about 3 s, into `$VQ_NATIVE_CACHE` (default `~/.cache/vq/native`), and
loaded with ctypes. Nothing is compiled at import time, only when a CPU convolution first
asks for it. Without a compiler, on a CPU without AVX-512, on GPU/TPU, or with
`VQ_NATIVE=0`, `kernel_grad_supported` is False and vq/conv.py keeps its XLA path (the
reason is logged once and in `unavailable_reason()`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

ENV_SWITCH = 'VQ_NATIVE'          # '0' turns the native kernel off.
ENV_CACHE = 'VQ_NATIVE_CACHE'     # Where the compiled library goes.
TARGET = 'vq_conv_kernel_grad'
SOURCE = pathlib.Path(__file__).parent / 'native' / 'conv_kernel_grad.cc'
_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-w')

_lock = threading.Lock()
_state: dict = {}   # 'reason': None once loaded, else why not; 'path': the library.


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
      SOURCE.read_bytes(), jax.lib.__version__.encode(), compiler.encode(),
      version.encode(), ' '.join(_FLAGS).encode()])).hexdigest()[:16]
  return cache_dir() / f'vq_native_{key}.so'


def build(compiler: str, out: pathlib.Path) -> None:
  """Compiles SOURCE into `out`, atomically (a concurrent build of the same key is harmless)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_out = pathlib.Path(tmp) / out.name
    cmd = [compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', str(tmp_out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f'{" ".join(cmd)} failed: {result.stderr.strip()[-2000:]}')
    os.replace(tmp_out, out)


def _load() -> str | None:
  """Builds (if needed), loads and registers the kernel; returns why not, or None."""
  if os.environ.get(ENV_SWITCH, '1') == '0':
    return f'{ENV_SWITCH}=0'
  compiler = _compiler()
  if compiler is None:
    return (f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not on PATH); install g++ or "
            'set CXX')
  try:
    path = library_path(compiler)
    if not path.exists():
      build(compiler, path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    if not lib.vq_native_supported():
      return 'this CPU has no AVX-512'
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.VqConvKernelGrad),
                                platform='cpu')
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return f'building or loading {SOURCE.name} failed: {e}'
  _state['path'] = path
  return None


def unavailable_reason() -> str | None:
  """None if the native kernel is loaded (loading it on first call), else the reason."""
  with _lock:
    if 'reason' not in _state:
      _state['reason'] = _load()
      if _state['reason'] is None:
        logging.info('vq.native: %s loaded from %s', TARGET, _state['path'])
      else:
        logging.warning('vq.native: kernel gradient stays on XLA: %s', _state['reason'])
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
    raise RuntimeError(f'vq.native.conv_kernel_grad is unavailable: {reason}; check '
                       'kernel_grad_supported() first.')
  if jnp.dtype(x.dtype) != jnp.float32 or jnp.dtype(dy.dtype) != jnp.float32:
    raise ValueError(f'vq.native.conv_kernel_grad takes float32 x and dy, got {x.dtype} and '
                     f'{dy.dtype}; cast them or use vq.conv.conv2d.')
  if dy.shape[-1] % 16:
    raise ValueError(f'vq.native.conv_kernel_grad needs a multiple of 16 output channels, got '
                     f'{dy.shape[-1]}; use vq.conv.conv2d, which falls back to XLA.')
  kh, kw = (int(k) for k in kernel_hw)
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, out, vmap_method='sequential')
  return call(x, dy, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
              pt=np.int64(pads_lo[0]), pl=np.int64(pads_lo[1]))
