"""Transparent huge pages for XLA:CPU's per-step scratch memory (Linux, glibc >= 2.35).

Usage sketch (the first thing an entry point does, before JAX starts)::

  from vq.cpu import host_memory
  host_memory.restart_with_huge_pages()   # re-executes this process once, or returns

Why: XLA:CPU allocates one scratch buffer per execution (all of the step's temporaries;
799 MB per device for the taming CIFAR step at batch 32), with `malloc`, and frees it when
the step ends. glibc serves an allocation that large with a fresh `mmap`, so every step
page-faults all of it back in, 4 KiB at a time: about 200,000 faults per device per step,
and with one device per core both devices fault at once in the same address space. With
the glibc tunable `glibc.malloc.hugetlb=1`, malloc asks the kernel for transparent huge
pages on those mappings (`madvise(MADV_HUGEPAGE)`), and the faults come 2 MiB at a time.

Measured with `python -m benchmarks.train_step --config=experiments/vqgan_cifar.py
--config.objective=vqvae --steps=9` (2 CPU devices, batch 64, 2-core x86 dev machine,
kernel THP mode 'madvise'): 2.46 s per step with the tunable against 2.68-2.75 s without
(two runs each); minor page faults over the whole run 0.33 M against 5.1 M. The catch: on
a VM that hands free memory back to its host after ~2 s (free page reporting, as on the
Firecracker dev machine), a step after such a pause costs more with huge pages (3.2-3.4 s
against 2.4-2.5 s back to back; without huge pages the pause costs nothing measurable).
Training runs its steps back to back; only the first step after an evaluation pays it.

glibc reads its tunables once, when a program starts, so setting them means re-executing
the process with `GLIBC_TUNABLES` extended. `restart_with_huge_pages` does that only where
it changes something and only where it was asked to:
- only when called: nothing in vq calls it on import; run.py and the benchmarks call it
  first thing in `main` (library users, notebooks and tests never restart);
- only where JAX will run on the CPU (`fast_paths.platform_guess`, decided from the
  environment, installed plugins and /dev without starting JAX): GPU/TPU hosts never
  restart, and only while the CPU fast paths are on (`VQ_CPU_FAST_PATHS`);
- only on Linux with glibc >= 2.35 (where the tunable exists), the kernel's THP mode
  'madvise' (with 'always' the kernel already uses huge pages, with 'never' it cannot),
  and no `glibc.malloc.hugetlb` setting already in `GLIBC_TUNABLES` (the user's wins);
- never silently: the restarted process returns a message saying so, and how to turn it
  off (`--nohost_huge_pages`), which run.py logs.
The restarted process takes the tunable back out of `os.environ` (restoring the caller's
`GLIBC_TUNABLES`, or removing it): glibc has already read it, so this process keeps huge
pages, while its subprocesses (data workers, compilers, peers) start with the environment
the user gave, unless the user set the tunable themselves.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Mapping

from vq.cpu import fast_paths

TUNABLE = 'glibc.malloc.hugetlb'
# Set only in the environment of the restarted process: the caller's GLIBC_TUNABLES
# ('=' + value) or '' if it had none, so that the restarted process can put it back.
_MARKER = 'VQ_HUGE_PAGES_RESTARTED'
OFF_HINT = '--nohost_huge_pages (or VQ_CPU_FAST_PATHS=0) turns this off'
_started_with: str | None = None  # GLIBC_TUNABLES this process was started with, if restarted
_THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library if it is glibc, else None."""
  try:
    name = os.confstr('CS_GNU_LIBC_VERSION')  # e.g. 'glibc 2.36'
  except (AttributeError, ValueError, OSError):
    return None
  match = re.fullmatch(r'glibc (\d+)\.(\d+).*', name or '')
  return (int(match.group(1)), int(match.group(2))) if match else None


def thp_mode(path: str = _THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never') or None."""
  try:
    with open(path) as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def restart_reason(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                   thp: str | None) -> str | None:
  """Why a restart with huge pages is not needed (a short phrase), or None if it is."""
  if glibc is None:
    return 'not glibc'
  if glibc < (2, 35):
    return f'glibc {glibc[0]}.{glibc[1]} has no {TUNABLE} tunable (needs 2.35+)'
  if thp != 'madvise':
    return f'kernel transparent huge pages are {thp!r}, not madvise'
  if TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return f'GLIBC_TUNABLES already sets {TUNABLE}'
  return None


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` whose GLIBC_TUNABLES also sets glibc.malloc.hugetlb=1."""
  env = dict(environ)
  tunables = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t]
  env['GLIBC_TUNABLES'] = ':'.join(tunables + [f'{TUNABLE}=1'])
  return env


def without_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` with any glibc.malloc.hugetlb setting taken out of GLIBC_TUNABLES."""
  env = dict(environ)
  tunables = [t for t in env.pop('GLIBC_TUNABLES', '').split(':')
              if t and t.split('=', 1)[0] != TUNABLE]
  if tunables:
    env['GLIBC_TUNABLES'] = ':'.join(tunables)
  return env


def started_tunables() -> str:
  """GLIBC_TUNABLES this process started with (after a restart no longer in os.environ)."""
  return _started_with if _started_with is not None else os.environ.get('GLIBC_TUNABLES', '')


def finish_restart(environ=None) -> str | None:
  """In the restarted process: restores the caller's GLIBC_TUNABLES in `environ`.

  Returns the tunables this process runs with, or None if this is no restarted process.
  """
  global _started_with
  environ = os.environ if environ is None else environ
  if _MARKER not in environ:
    return None
  saved = environ.pop(_MARKER)
  _started_with = environ.get('GLIBC_TUNABLES', '')
  if saved.startswith('='):
    environ['GLIBC_TUNABLES'] = saved[1:]
  else:
    environ.pop('GLIBC_TUNABLES', None)
  return _started_with


def restart_with_huge_pages(enabled: bool = True) -> str:
  """Re-executes this process with huge pages for large mallocs, if that changes anything.

  Call it before JAX or any thread starts: the process is replaced (`os.execve`, same
  interpreter and command line, `sys.orig_argv`) and starts again from the top; there the
  call returns, says so, and takes the tunable out of `os.environ` again (see the module
  doc).

  Args:
    enabled: False does nothing (run.py's `--nohost_huge_pages`).

  Returns:
    One line for the log: that this process was restarted (and how to turn that off), or
    why it was not (it returns only in those two cases).
  """
  tunables = finish_restart()
  if tunables is not None:
    return (f'restarted once with GLIBC_TUNABLES={tunables} (huge pages for XLA:CPU\'s '
            f'scratch memory; child processes do not inherit it); {OFF_HINT}')
  if not enabled:
    return 'no restart: disabled (--nohost_huge_pages)'
  reason = fast_paths.off_reason()
  if reason is None:
    platform = fast_paths.platform_guess()
    if platform != 'cpu':
      reason = f'JAX will run on {platform}, not the CPU'
  reason = reason or restart_reason(os.environ, glibc_version(), thp_mode())
  if reason:
    return f'no restart: {reason}'
  if not sys.executable:
    return 'no restart: no interpreter path to re-execute'
  env = with_tunable(os.environ)
  env[_MARKER] = '=' + os.environ['GLIBC_TUNABLES'] if 'GLIBC_TUNABLES' in os.environ else ''
  sys.stdout.flush()
  sys.stderr.flush()
  # Does not return: the process starts again, and the next call finds the marker.
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
