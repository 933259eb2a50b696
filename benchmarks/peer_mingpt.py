r"""Class-conditional GPT token prior: taming-transformers' minGPT (PyTorch) as the peer.

  /tmp/venv-bench/bin/python -m benchmarks.peer_mingpt \
      --train_tokens=/tmp/vq-runs/tokens_train.npz --test_tokens=/tmp/vq-runs/tokens_test.npz
  /tmp/venv-bench/bin/python -m benchmarks.peer_mingpt --steps=50 ...   # throughput only
  ... --sides=vq                                                          # vq alone
  ... --vq_matmul_dtype=bfloat16 [--peer_autocast]     # bfloat16 products on both sides

Needs the bench venv of requirements-bench.txt (PyTorch, taming-transformers); torch is
imported only in the peer's own process. Token files, sequences, batches, the unigram
baseline and the loop over sides are benchmarks/token_prior.py's.

The peer is taming's `taming.modules.transformer.mingpt.GPT` as taming's
`Net2NetTransformer` trains it, with taming's code wherever taming has it:
- the model reads the class token and the first h*w - 1 image tokens and predicts the h*w
  image tokens (taming feeds `cz_indices[:, :-1]` and scores `z_indices`), so block_size is
  h*w; no dropout (embd_pdrop = resid_pdrop = attn_pdrop = 0); taming's init.
- AdamW(lr 4.5e-4, betas (0.9, 0.95)) over taming's `configure_optimizers` split: weight
  decay 0.01 on the weights of Linear layers, none on biases, LayerNorm and Embedding weights
  and `pos_emb` (`_taming_param_groups`, the same walk over `named_modules`). No
  learning-rate schedule and no gradient clipping (taming's Lightning trainer sets none).
- `--peer_autocast` trains it under `torch.autocast('cpu', torch.bfloat16)` (PyTorch's mixed
  precision; the loss in float32), the counterpart of vq's `--vq_matmul_dtype=bfloat16`.
- sampling: taming's KV-cached `sample_with_past` (temperature 1, no top-k) from the class
  tokens, all `--sample_images` grids at once. minGPT imports
  `transformers.top_k_top_p_filtering` at module level for top-k alone, so the peer imports
  it beside a stand-in `transformers` that refuses to be called.

vq's side (benchmarks/vq_prior_side.py) is vq's GPT as run.py trains and samples it, at
the same size, on the same batches, with the same optimizer settings; each of its sampling
calls also times vq's MaskGIT sampler of the same size (`maskgit_*` in its figures).

JSON lines on stdout: one per side and round ("event": "train": the round's loss in bits and
tokens/s), then one "event": "result" line with the run's settings, `unigram_bits_per_token`,
`wall_s` (loading included), under each side's name ("vq", "peer") the figures listed in
benchmarks/token_prior.py, and the ratios vq / peer (`ratios`). Each side runs in a process
of its own (`ProcessSide`) with its own threads (the peer: `torch.set_num_threads(--threads)`;
vq: run.py's CPU device plan) and peak RSS; rounds alternate which side goes first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import types
from typing import Any

import numpy as np

from benchmarks import peer_process
from benchmarks import token_prior
from benchmarks import vq_prior_side
from benchmarks.token_prior import GPTSpec
from vq.cpu import host_memory

_INSTALL = ('the peer needs PyTorch and taming-transformers in a separate venv: python3 -m venv '
            '/tmp/venv-bench && /tmp/venv-bench/bin/pip install -r requirements.txt -r '
            'requirements-bench.txt && /tmp/venv-bench/bin/pip install --no-deps '
            'taming-transformers-rom1504==0.0.6')


def _transformers_stand_in() -> types.ModuleType:
  """A `transformers` whose `top_k_top_p_filtering` refuses to run: top-k is never used."""

  def top_k_top_p_filtering(*args, **kwargs):
    raise RuntimeError('benchmarks.peer_mingpt samples without top-k; '
                       f'transformers.top_k_top_p_filtering is a stand-in ({args}, {kwargs}).')

  mod = types.ModuleType('transformers')
  mod.top_k_top_p_filtering = top_k_top_p_filtering
  return mod


def _import_mingpt():
  from unittest import mock  # pylint: disable=g-import-not-at-top
  try:
    with mock.patch.dict(sys.modules, {'transformers': _transformers_stand_in()}):
      from taming.modules.transformer import mingpt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'importing taming minGPT failed ({e}); {_INSTALL}') from e
  return mingpt


def _taming_param_groups(gpt, weight_decay: float) -> list[dict[str, Any]]:
  """taming's `Net2NetTransformer.configure_optimizers` split, over `gpt` itself."""
  import torch  # pylint: disable=g-import-not-at-top
  decay, no_decay = set(), set()
  for mn, m in gpt.named_modules():
    for pn, _ in m.named_parameters():
      fpn = f'{mn}.{pn}' if mn else pn
      if pn.endswith('bias'):
        no_decay.add(fpn)
      elif pn.endswith('weight') and isinstance(m, torch.nn.Linear):
        decay.add(fpn)
      elif pn.endswith('weight') and isinstance(m, (torch.nn.LayerNorm, torch.nn.Embedding)):
        no_decay.add(fpn)
  no_decay.add('pos_emb')
  params = dict(gpt.named_parameters())
  if decay & no_decay or params.keys() != decay | no_decay:
    raise RuntimeError(f'parameter split failed: both {decay & no_decay}, neither '
                       f'{params.keys() - (decay | no_decay)}')
  return [{'params': [params[n] for n in sorted(decay)], 'weight_decay': weight_decay},
          {'params': [params[n] for n in sorted(no_decay)], 'weight_decay': 0.0}]


class MinGPTPeer:
  """taming's minGPT trained as taming's Net2NetTransformer trains it (a side, run by `ProcessSide`).

  Args:
    spec: the prior's size, optimizer and vocabulary.
    train_seq, test_seq: int64 [N, 1 + seq_len] from `sequences`.
    seed: torch seed of the initialisation.
    num_threads: torch intra-op threads.
    eval_batch: test sequences per forward pass in `bits_per_token`.
    autocast: train under torch.autocast('cpu', torch.bfloat16) (the loss in float32).
  """

  def __init__(self, spec: GPTSpec, train_seq: np.ndarray, test_seq: np.ndarray, *,
               seed: int = 0, num_threads: int = 2, eval_batch: int = 500,
               autocast: bool = False):
    import torch  # pylint: disable=g-import-not-at-top
    self._mingpt = _import_mingpt()
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    self.spec = spec
    self.eval_batch = eval_batch
    self.autocast = bool(autocast)
    self.model = self._mingpt.GPT(
        vocab_size=spec.vocab_size, block_size=spec.block_size, n_layer=spec.layers,
        n_head=spec.heads, n_embd=spec.width, embd_pdrop=0.0, resid_pdrop=0.0,
        attn_pdrop=0.0).train()
    groups = _taming_param_groups(self.model, spec.weight_decay)
    self._decayed = sum(p.numel() for p in groups[0]['params'])
    self.opt = torch.optim.AdamW(groups, lr=spec.learning_rate, betas=(spec.b1, spec.b2))
    self.train_seq = torch.from_numpy(np.ascontiguousarray(train_seq, np.int64))
    self.test_seq = torch.from_numpy(np.ascontiguousarray(test_seq, np.int64))

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def describe(self) -> dict[str, Any]:
    import torch  # pylint: disable=g-import-not-at-top
    return {'impl': 'taming.modules.transformer.mingpt.GPT', 'torch_version': torch.__version__,
            'torch_threads': torch.get_num_threads(),
            'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', 'default'),
            'weight_decayed_params': self._decayed, 'block_size': self.spec.block_size,
            'autocast_bfloat16': self.autocast}

  def _loss(self, seq):
    from torch.nn import functional as F  # pylint: disable=g-import-not-at-top,invalid-name
    logits, _ = self.model(seq[:, :-1])  # taming: logits[:, c_len - 1:] with c_len = 1
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), seq[:, 1:].reshape(-1),
                           reduction='mean')

  def train(self, rows: np.ndarray) -> dict[str, list[float]]:
    import torch  # pylint: disable=g-import-not-at-top
    step_s, losses = [], []
    for row in rows:
      start = time.perf_counter()
      with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.autocast):
        loss = self._loss(self.train_seq[torch.from_numpy(np.asarray(row, np.int64))])
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
      losses.append(loss.item())
      step_s.append(time.perf_counter() - start)
    return {'step_s': step_s, 'loss': losses}

  def bits_per_token(self) -> float:
    import torch  # pylint: disable=g-import-not-at-top
    self.model.eval()
    total = 0.0
    with torch.no_grad():
      for lo in range(0, len(self.test_seq), self.eval_batch):
        seq = self.test_seq[lo:lo + self.eval_batch]
        total += self._loss(seq).item() * seq[:, 1:].numel()
    self.model.train()
    return total / (self.test_seq[:, 1:].numel() * math.log(2))

  def sample(self, class_tokens: np.ndarray, temperature: float, seed: int) -> dict[str, Any]:
    import torch  # pylint: disable=g-import-not-at-top
    self.model.eval()
    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(class_tokens, np.int64)[:, None])
    start = time.perf_counter()
    out = self._mingpt.sample_with_past(x, self.model, steps=self.spec.seq_len,
                                        temperature=temperature, sample_logits=True,
                                        top_k=None, top_p=None)
    seconds = time.perf_counter() - start
    self.model.train()
    return {'tokens': out.numpy().astype(np.int32), 'seconds': seconds}


class ProcessSide:
  """A side built and run in a process of its own (`peer_process.PeerProcess`), as a
  `token_prior.Side`: its threads, malloc and peak RSS stay its own. `train` sends a whole
  round of steps per call and the child times them; `describe` is asked at the end, so it
  can report what the side measured along the way."""

  def __init__(self, factory, *args, environ: dict[str, str] | None = None, **kwargs):
    self._proc = peer_process.PeerProcess(factory, *args, environ=environ, **kwargs)

  def num_params(self) -> int:
    return self._proc.num_params()

  def describe(self) -> dict[str, Any]:
    return self._proc.call('describe')

  def train(self, rows: np.ndarray) -> dict[str, list[float]]:
    return self._proc.call('train', rows)

  def bits_per_token(self) -> float:
    return self._proc.call('bits_per_token')

  def sample(self, class_tokens: np.ndarray, temperature: float, seed: int) -> dict[str, Any]:
    return self._proc.call('sample', class_tokens, temperature, seed)

  def close(self) -> float:
    return self._proc.close()


def _vq_environ(huge_pages: bool) -> dict[str, str]:
  """vq's child environment: with the malloc tunable where run.py would restart with it."""
  if huge_pages and host_memory.restart_reason(os.environ, host_memory.glibc_version(),
                                               host_memory.thp_mode()) is None:
    return host_memory.with_tunable(os.environ)
  return dict(os.environ)


def _main(argv) -> None:
  """Flags are defined in `_define_flags` (run as a script only, as absl flags are global)."""
  del argv
  try:
    _run()
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _run() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  for name in ('steps', 'batch_size', 'round_steps', 'threads', 'sample_images',
               'sample_repeats', 'eval_batch'):
    if f[name].value < 1:
      raise ValueError(f'--{name} must be >= 1, saw {f[name].value}.')
  start = time.perf_counter()
  load_start = os.getloadavg()[0]
  train = token_prior.load_tokens(f.train_tokens)
  test = token_prior.load_tokens(f.test_tokens)
  token_prior.check_same_tokenizer(train, test)
  num_classes = int(train.labels.max()) + 1
  spec = GPTSpec(num_codes=train.num_codes, num_classes=num_classes,
                 seq_len=int(np.prod(train.tokens.shape[1:])), batch_size=f.batch_size)
  train_seq = token_prior.sequences(train, num_classes)
  test_seq = token_prior.sequences(test, num_classes)
  unigram = token_prior.unigram_bits_per_token(train.tokens, test.tokens, spec.num_codes)
  schedule = token_prior.batch_schedule(len(train_seq), f.steps, spec.batch_size, f.seed)
  sides = {}
  for name in f.sides:
    if name == 'vq':
      sides['vq'] = ProcessSide(
          vq_prior_side.VqGPTSide, spec, train_seq, test_seq, grid=train.tokens.shape[1:],
          seed=f.seed, class_dropout=f.vq_class_dropout, eval_batch=f.eval_batch,
          maskgit_iterations=f.maskgit_iterations, cpu_devices=f.vq_cpu_devices,
          matmul_dtype=f.vq_matmul_dtype,
          environ=_vq_environ(f.vq_huge_pages))
    elif name == 'peer':
      sides['peer'] = ProcessSide(MinGPTPeer, spec, train_seq, test_seq, seed=f.seed,
                                  num_threads=f.threads, eval_batch=f.eval_batch,
                                  autocast=f.peer_autocast,
                                  environ=host_memory.without_tunable(os.environ))
    else:
      raise ValueError(f"--sides has {name!r}; use 'vq' and/or 'peer'.")

  def emit(record):
    print(json.dumps(record), flush=True)

  results = token_prior.run_sides(sides, schedule, spec, round_steps=f.round_steps,
                                  sample_images=f.sample_images,
                                  sample_repeats=f.sample_repeats, seed=f.seed, emit=emit)
  for name, res in results.items():
    samples = res.pop('samples')
    if f.samples_out:
      res['samples_out'] = token_prior.write_samples(
          f.samples_out.replace('{side}', name), samples, test, num_classes, name)
  ratios = {}
  if 'vq' in results and 'peer' in results:
    vq_res, peer = results['vq'], results['peer']
    ratios = {
        'train_tokens_per_s': vq_res['train_tokens_per_s'] / peer['train_tokens_per_s'],
        'sample_images_per_s': vq_res['sample_images_per_s'] / peer['sample_images_per_s'],
        'test_bits_per_token_minus_peer': (vq_res['test_bits_per_token']
                                           - peer['test_bits_per_token'])}
  if 'vq' in results and results['vq'].get('maskgit_sample_images_per_s'):
    ratios['maskgit_vs_vq_gpt_sample_images_per_s'] = (
        results['vq']['maskgit_sample_images_per_s'] / results['vq']['sample_images_per_s'])
  emit({'event': 'result', 'benchmark': 'gpt_prior', 'sides': list(results),
        **dataclasses.asdict(spec), 'vocab_size': spec.vocab_size, 'steps': f.steps,
        'round_steps': f.round_steps, 'seed': f.seed,
        'train_tokens': train.path, 'test_tokens': test.path,
        'train_grids': len(train_seq), 'test_grids': len(test_seq),
        'tokenizer_config_hash': train.config_hash,
        'tokenizer_checkpoint_step': train.checkpoint_step,
        'unigram_bits_per_token': unigram, **results, 'ratios': ratios,
        'loadavg_1m_start': load_start, 'loadavg_1m_end': os.getloadavg()[0],
        'wall_s': time.perf_counter() - start})


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('train_tokens', None, 'Token file of the training split (--mode=encode).')
  flags.DEFINE_string('test_tokens', None, 'Token file of the held-out split (--mode=encode).')
  flags.DEFINE_integer('steps', 2000, 'Training steps.')
  flags.DEFINE_integer('batch_size', 64, 'Sequences per training step.')
  flags.DEFINE_integer('seed', 0, 'Seeds the batches, the initialisation and the sampling.')
  flags.DEFINE_integer('threads', 2, 'torch intra-op threads of the peer.')
  flags.DEFINE_integer('round_steps', 100, 'Steps per side per interleaved round (and per '
                       'progress line).')
  flags.DEFINE_integer('eval_batch', 500, 'Test sequences per forward pass when scoring.')
  flags.DEFINE_integer('sample_images', 64, 'Grids sampled at once.')
  flags.DEFINE_integer('sample_repeats', 3, 'Timed sampling calls (median reported).')
  flags.DEFINE_string('samples_out', None, "Write the last samples as a token file ('{side}' "
                      'is replaced by the side); decode with run.py --mode=decode.')
  flags.DEFINE_list('sides', ['vq', 'peer'], "Sides to run: 'vq' (vq's GPT) and/or 'peer'.")
  flags.DEFINE_float('vq_class_dropout', 0.1, "vq's class dropout (its recipe's; 0 drops "
                     'nothing, as the peer).')
  flags.DEFINE_integer('maskgit_iterations', 10, "Decoding iterations of vq's MaskGIT "
                       'sampler timed beside its GPT sampler (0: not timed).')
  flags.DEFINE_string('vq_cpu_devices', 'auto', "vq's CPU devices, as run.py's --cpu_devices.")
  flags.DEFINE_enum('vq_matmul_dtype', 'float32', ['float32', 'bfloat16'],
                    "vq's prior.matmul_dtype (its dense layers' products).")
  flags.DEFINE_bool('peer_autocast', False, "Train the peer under torch.autocast('cpu', "
                    'bfloat16), torch\'s mixed precision (sampling and scoring stay float32).')
  flags.DEFINE_bool('vq_huge_pages', True, "vq's process starts with huge pages for large "
                    "mallocs where run.py's training would restart with them "
                    '(vq/cpu/host_memory.py).')
  flags.mark_flags_as_required(['train_tokens', 'test_tokens'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main)
