"""The one switch for every CPU fast path, and where JAX will run, decided before it starts.

Usage sketch::

  from vq.cpu import fast_paths

  if fast_paths.enabled():                  # VQ_CPU_FAST_PATHS unset or not 0/false/off/no
    ...
  fast_paths.platform_guess()               # 'cpu' or e.g. 'cuda', without starting JAX
  fast_paths.accelerator_seen()             # e.g. '/dev/nvidia0' where JAX ran on the CPU

`VQ_CPU_FAST_PATHS=0` (run.py: `--nocpu_fast_paths`, which sets it) turns off, together:
the native kernels (`native`), the im2col/mixed convolution routing of `impl='auto'`
(vq/models/conv.py), the native GroupNorm (vq/models/norms.py, which then runs its XLA
version), the one-device-per-core default of `--cpu_devices=auto` (`devices`: one device,
XLA's own threads) and run.py's huge-page restart (`host_memory`). What runs then is the
plain XLA program a GPU or TPU runs. `VQ_NATIVE=0` turns off only the native kernels.

`platform_guess` is the rule that decides, before JAX starts, whether JAX will run on the
CPU (only then does run.py restart itself for huge pages):
1. `JAX_PLATFORMS` (or the older `JAX_PLATFORM_NAME`) set: its first platform, in JAX's
   order of preference ('cpu' means the CPU; anything else an accelerator).
2. Otherwise an accelerator if JAX has a plugin for it AND the machine has its device:
   a CUDA plugin (`jax_plugins` package or entry point named *cuda*) and `/dev/nvidia0`..;
   a ROCm plugin and `/dev/kfd`; `libtpu` and `/dev/accel*` or `/dev/vfio/<n>`. Any other
   plugin (e.g. Metal) counts as an accelerator, so an unknown setup never restarts.
3. Otherwise the CPU: with a plugin but no device, or a device but no plugin, JAX falls
   back to the CPU (the second case is what `accelerator_seen` warns about).
The check reads only the environment, installed package metadata and /dev: no JAX backend
starts, no driver library loads.

Imports: nothing from vq, no JAX.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from typing import Iterable, Mapping

ENV = 'VQ_CPU_FAST_PATHS'
_OFF = ('0', 'false', 'off', 'no')

# Device nodes per accelerator family (Linux).
_DEVICE_GLOBS = {
    'cuda': ('/dev/nvidia[0-9]*',),
    'rocm': ('/dev/kfd',),
    'tpu': ('/dev/accel[0-9]*', '/dev/vfio/[0-9]*'),
}


def enabled(environ: Mapping[str, str] | None = None) -> bool:
  """Whether the CPU fast paths may run: `VQ_CPU_FAST_PATHS` unset, or not 0/false/off/no."""
  environ = os.environ if environ is None else environ
  return environ.get(ENV, '1').strip().lower() not in _OFF


def off_reason(environ: Mapping[str, str] | None = None) -> str | None:
  """'VQ_CPU_FAST_PATHS=0' (as set) when the switch is off, else None."""
  environ = os.environ if environ is None else environ
  return None if enabled(environ) else f'{ENV}={environ[ENV]}'


def _family(plugin: str) -> str:
  """'cuda', 'rocm', 'tpu' or the plugin's own name, from a plugin or package name."""
  name = plugin.lower()
  for family in ('cuda', 'rocm', 'tpu'):
    if family in name:
      return family
  return name


def installed_plugins(paths: Iterable[str] | None = None) -> list[str]:
  """Names of the JAX accelerator plugins installed on `paths` (default sys.path).

  Looks at directory names only (a plugin's package or its .dist-info: jax_cuda12_plugin,
  jax_rocm*, libtpu, jax_metal, jax_plugins/<name>), one listing per path entry: reading
  every package's entry points, as JAX does when it starts, takes 0.1-0.4 s.
  """
  names = set()
  for entry in sys.path if paths is None else paths:
    try:
      listing = os.listdir(entry or '.')
    except OSError:
      continue
    for name in listing:
      base = re.split(r'[-.]', name, maxsplit=1)[0].lower()
      if base == 'jax_plugins' and not name.endswith(('.dist-info', '.egg-info')):
        try:
          names.update(n for n in os.listdir(os.path.join(entry, name))
                       if not n.startswith(('_', '.')))
        except OSError:
          pass
      elif base.startswith(('jax_cuda', 'jax_rocm', 'jax_metal', 'libtpu')) or (
          base.startswith('jax_') and base.endswith('_plugin')):
        names.add(base)
  return sorted(names)


def device_nodes(family: str) -> list[str]:
  """The device files of an accelerator family present on this machine."""
  return sorted(p for pattern in _DEVICE_GLOBS.get(family, ()) for p in glob.glob(pattern))


def platform_guess(environ: Mapping[str, str] | None = None,
                   plugins: Iterable[str] | None = None,
                   devices: Mapping[str, list[str]] | None = None) -> str:
  """'cpu' if JAX will run on the CPU, else the accelerator family; see the module doc.

  Args:
    environ: the environment (default os.environ).
    plugins: installed plugin names (default `installed_plugins()`).
    devices: family -> device files present (default: looked up in /dev).
  """
  environ = os.environ if environ is None else environ
  chosen = environ.get('JAX_PLATFORMS') or environ.get('JAX_PLATFORM_NAME')
  if chosen and chosen.strip():
    first = chosen.split(',')[0].strip().lower()
    return 'cpu' if first in ('cpu', 'host') else _family(first)
  plugins = installed_plugins() if plugins is None else list(plugins)
  for plugin in plugins:
    family = _family(plugin)
    if family not in _DEVICE_GLOBS:
      return family  # a plugin we cannot check for: assume it runs
    present = device_nodes(family) if devices is None else devices.get(family, [])
    if present:
      return family
  return 'cpu'


def accelerator_seen(environ: Mapping[str, str] | None = None) -> str | None:
  """An accelerator this machine shows (a device file, or nvidia-smi on PATH), or None.

  None too when `JAX_PLATFORMS` asks for the CPU: then the CPU is the user's choice.
  """
  environ = os.environ if environ is None else environ
  if (environ.get('JAX_PLATFORMS') or '').split(',')[0].strip().lower() == 'cpu':
    return None
  for family in _DEVICE_GLOBS:
    found = device_nodes(family)
    if found:
      return found[0]
  return 'nvidia-smi on PATH' if shutil.which('nvidia-smi') else None


def cpu_fallback_warning(backend: str, seen: str | None) -> str | None:
  """The one-line warning run.py logs when JAX runs on the CPU beside an accelerator."""
  if backend != 'cpu' or not seen:
    return None
  return (f'vq: JAX runs on the CPU, but this machine has an accelerator ({seen}): the '
          'installed jaxlib has no plugin for it. Install the accelerator build of the same '
          'JAX version (pip install -r requirements-gpu.txt for NVIDIA GPUs, -r '
          'requirements-tpu.txt for TPUs), or set JAX_PLATFORMS=cpu to train on the CPU '
          'on purpose.')
