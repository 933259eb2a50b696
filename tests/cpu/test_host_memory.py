"""vq.cpu.host_memory: when to restart with glibc.malloc.hugetlb=1, and that the restart works."""

import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from vq.cpu import host_memory

_REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize('environ, glibc, thp, restarts', [
    ({}, (2, 36), 'madvise', True),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, (2, 35), 'madvise', True),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, (2, 36), 'madvise', False),  # user's choice
    ({}, (2, 34), 'madvise', False),   # no such tunable before 2.35
    ({}, None, 'madvise', False),      # musl, macOS, Windows
    ({}, (2, 36), 'always', False),    # the kernel already gives huge pages
    ({}, (2, 36), 'never', False),     # ... or never does
    ({}, (2, 36), None, False),        # no THP at all
])
def test_restart_reason(environ, glibc, thp, restarts):
  reason = host_memory.restart_reason(environ, glibc, thp)
  assert (reason is None) == restarts, reason


def test_with_tunable_keeps_the_users_tunables():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'OTHER': 'x'}
  out = host_memory.with_tunable(env)
  assert out['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert out['OTHER'] == 'x' and env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2'
  assert host_memory.with_tunable({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('text, mode', [
    ('always [madvise] never\n', 'madvise'), ('[always] madvise never\n', 'always'),
    ('always madvise [never]\n', 'never'), ('garbage\n', None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
  path = tmp_path / 'enabled'
  path.write_text(text)
  assert host_memory.thp_mode(str(path)) == mode
  assert host_memory.thp_mode(str(tmp_path / 'missing')) is None


def test_glibc_version_matches_platform():
  lib, version = platform.libc_ver()
  expected = tuple(int(v) for v in version.split('.')[:2]) if lib == 'glibc' else None
  assert host_memory.glibc_version() == expected


def test_disabled_does_nothing(monkeypatch):
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  assert 'disabled' in host_memory.restart_with_huge_pages(False)
  assert 'GLIBC_TUNABLES' not in os.environ


# The child records each start, restarts (conditions forced with 'on'), then reports its
# environment, what a subprocess of it sees, its arguments and how much of a freshly
# malloc'ed and touched 64 MiB block is in huge pages (plain malloc through ctypes: numpy
# would madvise huge pages by itself).
_CHILD = r'''
import ctypes, json, os, subprocess, sys
from vq.cpu import host_memory
with open(sys.argv[1], 'a') as f:
  f.write('start\n')
if sys.argv[2] == 'on':
  host_memory.thp_mode = lambda path=None: 'madvise'
  host_memory.glibc_version = lambda: (2, 36)
reason = host_memory.restart_with_huge_pages(sys.argv[2] == 'on')
def anon_huge_kb():
  for line in open('/proc/self/smaps_rollup'):
    if line.startswith('AnonHugePages:'):
      return int(line.split()[1])
  return 0
before = anon_huge_kb()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)  # every page touched
child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get("GLIBC_TUNABLES", "-"))'],
                       capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({'reason': reason, 'tunables': os.environ.get('GLIBC_TUNABLES', ''),
                  'started': host_memory.started_tunables(), 'child': child,
                  'argv': sys.argv[1:], 'huge_kb': anon_huge_kb() - before,
                  'tail': list(ctypes.string_at(block + (64 << 20) - 4, 4)),
                  'marker': [k for k in os.environ if k.startswith('VQ_HUGE')]}))
'''


def _run_child(tmp_path, mode, **environ):
  starts = tmp_path / f'starts-{mode}'
  starts.unlink(missing_ok=True)
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(environ)
  out = subprocess.run([sys.executable, '-c', _CHILD, str(starts), mode, 'x y'], env=env,
                       cwd=_REPO, capture_output=True, text=True, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1]), starts.read_text().count('start')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='os.execve restart: Linux')
def test_restart_reexecutes_once_says_so_and_keeps_children_clean(tmp_path):
  on, starts_on = _run_child(tmp_path, 'on')
  assert starts_on == 2  # the original start and exactly one restart
  assert on['reason'].startswith('restarted once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1')
  assert '--nohost_huge_pages' in on['reason']
  # This process runs with the tunable; its environment and its children do not carry it.
  assert on['started'] == 'glibc.malloc.hugetlb=1'
  assert on['tunables'] == '' and on['child'] == '-' and on['marker'] == []
  assert on['argv'][1:] == ['on', 'x y'] and on['tail'] == [1, 1, 1, 1]
  off, starts_off = _run_child(tmp_path, 'off')
  assert starts_off == 1 and 'disabled' in off['reason'] and off['tunables'] == ''
  real = host_memory.restart_reason({}, host_memory.glibc_version(), host_memory.thp_mode())
  if real is None:
    # This machine is one where the restart matters: huge pages only with the tunable.
    assert on['huge_kb'] >= 32 * 1024, on
    assert off['huge_kb'] == 0, off


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='os.execve restart: Linux')
def test_restart_gives_children_back_the_users_own_tunables(tmp_path):
  got, starts = _run_child(tmp_path, 'on', GLIBC_TUNABLES='glibc.malloc.arena_max=2')
  assert starts == 2
  assert got['started'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert got['tunables'] == got['child'] == 'glibc.malloc.arena_max=2'


@pytest.mark.parametrize('environ, expected', [
    ({'VQ_CPU_FAST_PATHS': '0'}, 'VQ_CPU_FAST_PATHS=0'),
    ({'JAX_PLATFORMS': 'cuda'}, 'JAX will run on cuda'),
    ({'JAX_PLATFORMS': 'tpu,cpu'}, 'JAX will run on tpu'),
])
def test_no_restart_off_the_cpu_or_with_the_fast_paths_off(tmp_path, environ, expected):
  got, starts = _run_child(tmp_path, 'on', **environ)
  assert starts == 1 and got['started'] == '' and expected in got['reason'], got


def test_without_tunable_takes_out_only_hugetlb():
  assert host_memory.without_tunable(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'A': 'b'}) == {
          'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'A': 'b'}
  assert host_memory.without_tunable({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}) == {}
  assert host_memory.without_tunable({'A': 'b'}) == {'A': 'b'}
  env = {'X': '1'}
  assert host_memory.without_tunable(host_memory.with_tunable(env)) == env
