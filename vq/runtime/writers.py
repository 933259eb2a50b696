"""Metric writers: TensorBoard (clu) plus a machine-readable `metrics.jsonl`.

Usage sketch::

  writer = create_writer(workdir, is_main=jax.process_index() == 0)
  writer.write_scalars(step, {'loss': 0.1})      # -> TensorBoard and metrics.jsonl
  writer.flush()
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping

from clu import metric_writers
import numpy as np


def _jsonable(v: Any) -> Any:
  v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep them visible rather than dropping the key
  return v


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call: {"step": N, name: value, ...}."""

  def __init__(self, path: str | pathlib.Path):
    self._path = pathlib.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self._path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {'step': int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + '\n')

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


def create_writer(workdir: str | pathlib.Path, *, is_main: bool) -> metric_writers.MetricWriter:
  """TensorBoard + logging + metrics.jsonl on the main process; logging only elsewhere."""
  workdir = pathlib.Path(workdir)
  default = metric_writers.create_default_writer(
      str(workdir), just_logging=not is_main, asynchronous=False)
  if not is_main:
    return default
  return metric_writers.MultiWriter([default, JsonlWriter(workdir / 'metrics.jsonl')])
