"""vq's GPT token prior as a side of the token-prior benchmark (benchmarks/token_prior.py).

`VqGPTSide` trains, scores and samples with the code `run.py` runs for
`experiments/gpt_cifar.py`: the model, optimizer and state of `vq.generation.generator`,
the pmapped `vq.generation.trainer.train_step` under the 'batch' axis, the held-out
bits/token of `vq.generation.evaluation.held_out_bits` and the KV-cached sampler of
`vq.generation.generator.Sampler`. The CPU device plan is run.py's (`vq.cpu.devices`),
chosen before JAX starts; the side runs in a process of its own
(`benchmarks.peer_process.PeerProcess`), so its JAX threads and peak RSS are its own.

What differs from the peer, by design: vq's GPT keeps its recipe's class dropout
(`--vq_class_dropout`, 0.1 as in experiments/gpt_cifar.py: the null class that guidance
needs), so its vocabulary has one more input token; its output layer scores the image codes
only. Sampling is timed after one untimed call that compiles the sampler for the batch
(`sample_compile_s`), as `sample_images_per_s` in `--mode=eval` is.

Each `sample` call also times vq's MaskGIT sampler of the same size on the same class
tokens (`--maskgit_iterations` parallel decoding iterations; a bidirectional transformer of
the same width, depth and heads with freshly initialised weights: the decoding loop has a
fixed trip count and fixed shapes, so its time does not depend on the weights' values).
`describe()` then reports `maskgit_sample_images_per_s` (median over the calls) beside the
GPT figure `run_sides` reports.
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any

import numpy as np

from benchmarks.token_prior import GPTSpec

_REPO = pathlib.Path(__file__).resolve().parent.parent


class VqGPTSide:
  """vq's GPT prior on the terms of `token_prior.Side`.

  Args:
    spec: the prior's size, optimizer and vocabulary.
    train_seq, test_seq: int64 [N, 1 + seq_len] from `token_prior.sequences`.
    grid: the token grid (h, w), h * w == spec.seq_len.
    seed: initialisation and training randomness.
    class_dropout: labels dropped to the null class in training.
    eval_batch: test grids per scoring batch.
    maskgit_iterations: decoding iterations of the MaskGIT sampler timed beside (0: none).
    cpu_devices: run.py's --cpu_devices ('auto' or a count).
    matmul_dtype: `prior.matmul_dtype` ('float32' or 'bfloat16').
  """

  def __init__(self, spec: GPTSpec, train_seq: np.ndarray, test_seq: np.ndarray, *,
               grid: tuple[int, int], seed: int = 0, class_dropout: float = 0.1,
               eval_batch: int = 500, maskgit_iterations: int = 10,
               cpu_devices: str = 'auto', matmul_dtype: str = 'float32'):
    if int(np.prod(grid)) != spec.seq_len:
      raise ValueError(f'grid {tuple(grid)} does not hold seq_len={spec.seq_len} tokens.')
    from vq.cpu import devices as cpu_devices_lib  # pylint: disable=g-import-not-at-top
    # Before JAX starts its backends, as run.py does.
    self._plan = cpu_devices_lib.resolve_plan(cpu_devices, [spec.batch_size, eval_batch])
    cpu_devices_lib.apply_plan(self._plan)
    import jax  # pylint: disable=g-import-not-at-top
    from vq.config import loading  # pylint: disable=g-import-not-at-top
    from vq.generation import evaluation  # pylint: disable=g-import-not-at-top
    from vq.generation import generator as gen_lib  # pylint: disable=g-import-not-at-top
    from vq.generation import priors  # pylint: disable=g-import-not-at-top
    from vq.generation import tokens as token_data  # pylint: disable=g-import-not-at-top
    from vq.generation import trainer  # pylint: disable=g-import-not-at-top
    from vq.runtime import parallel  # pylint: disable=g-import-not-at-top
    self._jax = jax
    self.spec, self.grid = spec, tuple(int(g) for g in grid)
    overrides = {
        'seed': seed, 'data.num_classes': spec.num_classes, 'prior.width': spec.width,
        'prior.depth': spec.layers, 'prior.num_heads': spec.heads, 'prior.dropout': 0.0,
        'prior.class_dropout': class_dropout, 'train.batch_size': spec.batch_size,
        'train.learning_rate': spec.learning_rate, 'train.b1': spec.b1, 'train.b2': spec.b2,
        'train.weight_decay': spec.weight_decay, 'train.schedule': 'constant',
        'train.warmup_steps': 0, 'train.grad_clip': 0.0, 'eval.batch_size': eval_batch,
        'prior.matmul_dtype': matmul_dtype}
    self.config = loading.load_config(_REPO / 'experiments' / 'gpt_cifar.py', overrides)
    self.layout = priors.TokenLayout(num_codes=spec.num_codes, num_classes=spec.num_classes,
                                     grid=self.grid)
    self.model = gen_lib.build_model(self.config, self.layout)
    state = gen_lib.create_state(self.config, self.model, self.layout,
                                 jax.random.PRNGKey(seed))
    self._par = parallel.get('pmap')
    self._devices = jax.local_device_count()
    if spec.batch_size % self._devices:
      raise ValueError(f'batch_size={spec.batch_size} is not divisible by the '
                       f'{self._devices} CPU devices; pass --vq_cpu_devices.')
    self._p_step = self._par.step(functools.partial(
        trainer.train_step, kind='gpt', model=self.model, layout=self.layout,
        class_dropout=class_dropout))
    self._p_state = self._par.replicate(state)
    self._p_rng = self._par.replicate(jax.random.fold_in(jax.random.PRNGKey(seed), 1))
    self._num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
    self._train_tokens = np.ascontiguousarray(train_seq[:, 1:], np.int32)
    self._train_labels = np.ascontiguousarray(train_seq[:, 0] - spec.num_codes, np.int32)
    self._test = token_data.TokenSplit(
        tokens=np.ascontiguousarray(test_seq[:, 1:], np.int32).reshape((-1,) + self.grid),
        labels=np.ascontiguousarray(test_seq[:, 0] - spec.num_codes, np.int32), spec='test')
    self._settings = gen_lib.settings_from(self.config, temperature=1.0, top_k=0, top_p=1.0,
                                           guidance=1.0, num_iterations=maskgit_iterations)
    self._gen_lib, self._evaluation = gen_lib, evaluation
    self._samplers: dict[tuple[str, int], Any] = {}
    self._compile_s: dict[str, float] = {}
    self._maskgit_s: list[float] = []
    self._maskgit_images = 0
    self._maskgit_iterations = int(maskgit_iterations)
    self._maskgit_params = None
    if maskgit_iterations:
      mg_config = self.config.copy_and_resolve_references()
      with mg_config.unlocked():
        mg_config.objective = 'maskgit'
      self._maskgit_model = gen_lib.build_model(mg_config, self.layout)
      self._maskgit_params = gen_lib.create_state(
          mg_config, self._maskgit_model, self.layout, jax.random.PRNGKey(seed + 1)).params

  def num_params(self) -> int:
    return self._num_params

  def describe(self) -> dict[str, Any]:
    from vq.generation import sampling  # pylint: disable=g-import-not-at-top
    out = {'impl': 'vq.generation (experiments/gpt_cifar.py)',
           'jax_version': self._jax.__version__, 'cpu_plan': self._plan.describe(),
           'devices': self._devices, 'class_dropout': float(self.config.prior.class_dropout),
           'matmul_dtype': self.config.prior.matmul_dtype,
           'sample_compile_s': self._compile_s.get('gpt')}
    if self._maskgit_iterations and self._maskgit_s:
      out.update({
          'maskgit_iterations': self._maskgit_iterations,
          'maskgit_network_evaluations': sampling.network_evaluations(
              'maskgit', self.layout, self._settings),
          'maskgit_sample_s': [round(s, 4) for s in self._maskgit_s],
          'maskgit_sample_compile_s': self._compile_s.get('maskgit'),
          'maskgit_images': self._maskgit_images,
          'maskgit_sample_images_per_s': self._maskgit_images / float(
              np.median(self._maskgit_s))})
    return out

  def train(self, rows: np.ndarray) -> dict[str, list[float]]:
    step_s, losses = [], []
    d = self._devices
    for row in rows:
      start = time.perf_counter()
      batch = {'tokens': self._train_tokens[row].reshape(d, -1, self.spec.seq_len),
               'label': self._train_labels[row].reshape(d, -1)}
      self._p_state, metrics = self._p_step(self._p_state, self._par.shard(batch),
                                            self._p_rng)
      losses.append(float(self._par.to_host(metrics['loss'])))
      step_s.append(time.perf_counter() - start)
    return {'step_s': step_s, 'loss': losses}

  def _params(self):
    return self._par.unreplicate(self._p_state).params

  def bits_per_token(self) -> float:
    return self._evaluation.held_out_bits(self.config, self.model, self.layout,
                                          self._params(), self._test)['test_bits_per_token']

  def _timed_sample(self, kind: str, params, labels: np.ndarray, seed: int
                    ) -> tuple[np.ndarray, float]:
    key = (kind, len(labels))
    if key not in self._samplers:
      model = self.model if kind == 'gpt' else self._maskgit_model
      rows = -(-len(labels) // self._devices) * self._devices  # padded to the devices
      self._samplers[key] = self._gen_lib.Sampler(kind, model, self.layout, rows)
      start = time.perf_counter()  # compiles for this batch; not part of the timing
      self._samplers[key](params, labels, self._jax.random.PRNGKey(seed), self._settings)
      self._compile_s[kind] = time.perf_counter() - start
    start = time.perf_counter()
    tokens = self._samplers[key](params, labels, self._jax.random.PRNGKey(seed),
                                 self._settings)
    return tokens, time.perf_counter() - start

  def sample(self, class_tokens: np.ndarray, temperature: float, seed: int) -> dict[str, Any]:
    if temperature != self._settings.temperature:
      self._settings = self._settings._replace(temperature=float(temperature))
    labels = (np.asarray(class_tokens, np.int64) - self.spec.num_codes).astype(np.int32)
    tokens, seconds = self._timed_sample('gpt', self._params(), labels, seed)
    if self._maskgit_iterations:
      _, mg_seconds = self._timed_sample('maskgit', self._maskgit_params, labels, seed)
      self._maskgit_s.append(mg_seconds)
      self._maskgit_images = len(labels)
    return {'tokens': tokens, 'seconds': seconds}

  def close(self) -> float:
    return 0.0  # PeerProcess reports the process's peak RSS
