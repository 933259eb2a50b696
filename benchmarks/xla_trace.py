"""Timing and tracing a compiled step on XLA:CPU: time per thunk, each thunk's JAX op_name.

  names = op_names(compiled.as_text())     # HLO instruction -> op_name metadata
  per_thunk = thunk_times(trace_dir)       # thunk -> summed microseconds
  times, per_thunk, names = time_and_trace(compiled, p_state, (p_batch, p_rng), warmup=2,
                                           steps=3, traced=2)   # a compiled train step

Shared by benchmarks/profile_step.py (the tokenizer's step) and
benchmarks/profile_prior_step.py (a token prior's); defines no flags.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

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


def time_and_trace(compiled, state, args: tuple, *, warmup: int, steps: int, traced: int
                   ) -> tuple[list[float], dict[str, float], dict[str, str]]:
  """Runs `compiled(state, *args) -> (state, metrics)` 1 + `warmup` times untimed, `steps`
  times timed (seconds each, to the metrics' readiness), then `traced` times under
  `jax.profiler`. Returns (step seconds, `thunk_times` over the traced steps, `op_names`)."""
  import jax  # pylint: disable=g-import-not-at-top

  def run():
    nonlocal state
    state, metrics = compiled(state, *args)
    jax.block_until_ready(metrics)

  for _ in range(1 + warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(traced):
      run()
    jax.profiler.stop_trace()
    per_thunk = thunk_times(trace_dir)
  return times, per_thunk, op_names(compiled.as_text())


def per_op(per_thunk: dict[str, float], names: dict[str, str], traced: int
           ) -> tuple[collections.Counter, collections.Counter, float]:
  """(ms per call by op_name's last part, ms per call by thunk, traced ms per call) from
  `time_and_trace`'s microseconds over `traced` calls."""
  scale = 1e-3 / traced  # microseconds over the traced calls -> ms per call
  by_op = collections.Counter()
  for thunk, us in per_thunk.items():
    name = names.get(thunk, '')
    by_op[name.rsplit('/', 1)[-1] if name else thunk] += us * scale
  by_thunk = collections.Counter({t: us * scale for t, us in per_thunk.items()})
  return by_op, by_thunk, sum(by_op.values())
