"""Throughput of training loops from their logs: the pure part of benchmarks/train_loop.py.

  rates = loop_stats.window_rates(records_of_metrics_jsonl, batch_size=64)
  loop_stats.summarize([rates_round0, rates_round1])
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def config_overrides(argv: Sequence[str]) -> list[str]:
  """The `--config.<field>=<value>` flags of `argv`, to hand on to run.py as they are."""
  return [a for a in argv if a.startswith('--config.') and '=' in a]


def window_rates(records: Sequence[dict], batch_size: int) -> dict[str, Any]:
  """Window and overall images/s from metrics.jsonl records of one run of vq's loop.

  Windows are the logged records with `steps_per_s`; a window ending at step s covers the
  steps after the previous logged step (after step 1 for the first: the loop's clock starts
  once the compiling first step is done). Eval-only records are skipped.

  Returns:
    {'window_images_per_s': [...], 'images_per_s_median': median of the windows,
     'images_per_s_overall': all windows' images over their summed time, 'timed_steps'}.
  """
  windows, seconds, steps, previous = [], 0.0, 0, 1
  for record in sorted((r for r in records if 'steps_per_s' in r), key=lambda r: r['step']):
    count = record['step'] - previous
    previous = record['step']
    if count <= 0 or record['steps_per_s'] <= 0:
      continue
    windows.append(record['steps_per_s'] * batch_size)
    seconds += count / record['steps_per_s']
    steps += count
  return {'window_images_per_s': [round(w, 2) for w in windows],
          'images_per_s_median': float(np.median(windows)) if windows else None,
          'images_per_s_overall': steps * batch_size / seconds if seconds else None,
          'timed_steps': steps}


def summarize(runs: Sequence[dict]) -> dict[str, Any]:
  """Medians over rounds of each run's window median and overall rate."""
  medians = [r['images_per_s_median'] for r in runs if r.get('images_per_s_median')]
  overall = [r['images_per_s_overall'] for r in runs if r.get('images_per_s_overall')]
  return {'images_per_s_median': float(np.median(medians)) if medians else None,
          'images_per_s_overall_median': float(np.median(overall)) if overall else None,
          'run_medians': [round(m, 2) for m in medians]}
