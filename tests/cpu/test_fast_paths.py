"""vq.cpu.fast_paths: the one switch, where JAX will run, and nothing restarts on import."""

import ast
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from vq.cpu import fast_paths
from vq.models import conv
from vq.models import norms

_REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize('value, on', [
    (None, True), ('1', True), ('', True), ('yes', True),
    ('0', False), ('false', False), ('OFF', False), (' no ', False)])
def test_enabled_reads_the_switch(value, on):
  environ = {} if value is None else {fast_paths.ENV: value}
  assert fast_paths.enabled(environ) is on
  assert (fast_paths.off_reason(environ) is None) is on


@pytest.mark.parametrize('environ, plugins, devices, expected', [
    ({'JAX_PLATFORMS': 'cpu'}, ['jax_cuda12_plugin'], {'cuda': ['/dev/nvidia0']}, 'cpu'),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, [], {}, 'cuda'),
    ({'JAX_PLATFORMS': 'tpu'}, [], {}, 'tpu'),
    ({'JAX_PLATFORM_NAME': 'gpu'}, [], {}, 'gpu'),
    ({}, [], {'cuda': ['/dev/nvidia0']}, 'cpu'),                  # a GPU, no plugin
    ({}, ['jax_cuda12_plugin'], {}, 'cpu'),                        # a plugin, no GPU
    ({}, ['jax_cuda12_plugin'], {'cuda': ['/dev/nvidia0']}, 'cuda'),
    ({}, ['xla_cuda13'], {'cuda': ['/dev/nvidia3']}, 'cuda'),
    ({}, ['libtpu'], {'tpu': ['/dev/accel0']}, 'tpu'),
    ({}, ['libtpu'], {'cuda': ['/dev/nvidia0']}, 'cpu'),
    ({}, ['jax_rocm7_plugin'], {'rocm': ['/dev/kfd']}, 'rocm'),
    ({}, ['jax_metal'], {}, 'jax_metal'),                         # unknown: never restart
    ({}, [], {}, 'cpu'),
])
def test_platform_guess(environ, plugins, devices, expected):
  assert fast_paths.platform_guess(environ, plugins, devices) == expected


def test_installed_plugins_reads_package_directories_only(tmp_path):
  site = tmp_path / 'site'
  for name in ('jax_cuda12_plugin', 'jax_cuda12_plugin-0.10.2.dist-info', 'jaxlib',
               'jax-0.10.2.dist-info', 'libtpu-0.0.20.dist-info', 'numpy'):
    (site / name).mkdir(parents=True)
  (site / 'jax_plugins' / 'xla_metal').mkdir(parents=True)
  assert fast_paths.installed_plugins([str(site), str(tmp_path / 'missing')]) == [
      'jax_cuda12_plugin', 'libtpu', 'xla_metal']
  # This test machine: no accelerator plugin, so JAX runs on the CPU.
  assert fast_paths.platform_guess({}) == 'cpu'


def test_cpu_fallback_warning_names_the_fix():
  assert fast_paths.cpu_fallback_warning('gpu', '/dev/nvidia0') is None
  assert fast_paths.cpu_fallback_warning('cpu', None) is None
  text = fast_paths.cpu_fallback_warning('cpu', '/dev/nvidia0')
  assert '/dev/nvidia0' in text and 'requirements-gpu.txt' in text
  assert 'requirements-tpu.txt' in text and '\n' not in text
  assert fast_paths.accelerator_seen({'JAX_PLATFORMS': 'cpu'}) is None  # CPU on purpose


def test_switch_off_routes_convolutions_and_group_norm_to_plain_xla(monkeypatch):
  args = ((1, 1, 64, 64), (1, 1), ((0, 0), (0, 0)), (32, 32))  # 1x1: im2col when on
  assert conv.select_impl('auto', *args, backend='cpu') == 'im2col'
  monkeypatch.setenv(fast_paths.ENV, '0')
  assert conv.select_impl('auto', *args, backend='cpu') == 'xla'
  assert conv.select_impl('im2col', *args, backend='cpu') == 'im2col'  # asked for by name
  x = jnp.ones((2, 8, 8, 64))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(norms.group_norm_swish(
      x, None, None, num_groups=32, swish=True))))(x))
  assert 'vq_group_norm' not in jaxpr and 'custom_call' not in jaxpr


def _import_time_calls(tree):
  """Names of the functions called by a module's top-level code (what runs on import)."""
  called = []
  for stmt in tree.body:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      nodes = [*stmt.decorator_list, *(getattr(stmt, 'bases', []))]
    else:
      nodes = [stmt]
    for node in nodes:
      for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
          called.append(ast.unparse(sub.func))
  return called


def test_no_module_of_vq_restarts_or_compiles_on_import():
  """Importing vq (a notebook, the tests, another program) must never restart the process
  or start a compiler: no module's top-level code calls anything that could."""
  suspicious = ('restart', 'exec', 'build', 'unavailable_reason', 'subprocess', 'system',
                '_load', 'supported')
  seen = {}
  for path in sorted((_REPO / 'vq').rglob('*.py')):
    calls = _import_time_calls(ast.parse(path.read_text()))
    bad = [c for c in calls if any(word in c.lower() for word in suspicious)]
    assert not bad, f'{path}: {bad} run on import'
    seen[path] = calls
  assert len(seen) > 40
  # The restart has exactly the callers it should: none inside vq besides its own module.
  callers = [p for p in (_REPO / 'vq').rglob('*.py')
             if 'restart_with_huge_pages(' in p.read_text() and p.name != 'host_memory.py']
  assert not callers, callers


def test_importing_vq_and_vq_cpu_changes_nothing(monkeypatch):
  code = ('import os; os.execve = os.execv = lambda *a: os._exit(3)\n'
          'import vq, vq.cpu.native, vq.cpu.devices, vq.cpu.host_memory, vq.cpu.fast_paths\n'
          'print("GLIBC_TUNABLES" in os.environ, "VQ_NATIVE" in os.environ)')
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'VQ_NATIVE')}
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=_REPO, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['False', 'False']
