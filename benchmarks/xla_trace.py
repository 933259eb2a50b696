"""Reading a jax.profiler trace of XLA:CPU: time per thunk, and each thunk's JAX op_name.

  names = op_names(compiled.as_text())     # HLO instruction -> op_name metadata
  per_thunk = thunk_times(trace_dir)       # thunk -> summed microseconds

Shared by benchmarks/profile_step.py (the tokenizer's step) and
benchmarks/profile_prior_step.py (a token prior's); defines no flags.
"""

import collections
import glob
import gzip
import json
import os
import re

_SKIP = ('ThunkExecutor', '$', 'PjitFunction', 'CommonPjRt', 'ParseArguments', 'end:',
         'while', 'Handle inputs', 'AllocateOutput')


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> op_name metadata (instructions without metadata are left out)."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', line)
    if m:
      names.setdefault(m.group(1), m.group(2))
  return names


def thunk_times(trace_dir: str) -> dict[str, float]:
  """Summed microseconds per thunk name in the Perfetto trace under `trace_dir`."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}: the profiler wrote none.')
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  out = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and not e['name'].startswith(_SKIP) and 'block_until' not in e['name']:
      out[e['name']] += e['dur']
  return out
