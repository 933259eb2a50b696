r"""The Sonnet CIFAR VQ-VAE in PyTorch: the twin of `experiments/vqvae_cifar.py` for
`benchmarks/train_step.py --peer=sonnet` and `benchmarks/train_loop.py`.

  python -m benchmarks.train_step --config=experiments/vqvae_cifar.py --peer=sonnet
  python -m benchmarks.train_loop --config=experiments/vqvae_cifar.py

  from benchmarks import peer_sonnet
  peer = peer_sonnet.SonnetPeer(config, images_nhwc)   # images in [-1, 1], vq's scale
  losses = peer.step()                                  # one train step on those images
  result = peer_sonnet.train_loop(train_uint8_nhwc, config, steps=300, log_every=100)

Needs PyTorch (CPU): install requirements-bench.txt in a separate venv (see
peer_taming.py); nothing here needs taming-transformers.

The network is the classic CIFAR VQ-VAE of DeepMind's Sonnet example (vqvae_example.ipynb),
written in torch.nn, the recipe `experiments/vqvae_cifar.py` follows:
- encoder: conv 4x4/2 (3->64), ReLU, conv 4x4/2 (64->128), ReLU, conv 3x3 (128->128), a
  residual stack of 2 blocks (ReLU, 3x3 128->32, ReLU, 1x1 32->128, add) then ReLU, and the
  1x1 pre-quantizer conv to 64;
- quantizer: 512 codes of dim 64 (Sonnet's uniform variance-scaling init), debiased EMAs
  (decay 0.99) of the cluster sizes and sums with Laplace smoothing (epsilon 1e-5),
  straight-through gradient, commitment 0.25 * ||z_e - sg[e]||^2, perplexity as Sonnet's;
- decoder: conv 3x3 (64->128), the same residual stack, transposed conv 4x4/2 (128->64),
  ReLU, transposed conv 4x4/2 (64->3);
- inputs in [-0.5, 0.5]; loss MSE / 0.0627 (the variance of the training pixels) + the
  commitment term; Adam (config.train.learning_rate, b1, b2); PyTorch's default inits.
vq's images are in [-1, 1] with its MSE weighted by 1 / 0.2508: the twin halves them, the
same loss. What vq does and the twin does not, so that ratios against it are conservative:
k-means initialisation on the first batch, dead-code restarts (`quantizer.restart_after`)
and the codebook usage statistics of its logs.

`train_loop` is the twin's whole training loop as the PyTorch reference of docs/results.md
ran it: the training split held in memory as float32 NCHW, each epoch in the order of a
random permutation, one step per batch of `config.train.batch_size`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from benchmarks import peer_process

# The Sonnet example's data variance on [-0.5, 0.5] (vq's recon_weight is 1 / (4 x this)).
DATA_VARIANCE = 0.0627

try:
  # pylint: disable=g-import-not-at-top
  import torch
  from torch import nn
  from torch.nn import functional as F
  # pylint: enable=g-import-not-at-top
except ImportError as e:
  raise ImportError(f'--peer=sonnet needs PyTorch, but importing it failed ({e}); install '
                    'requirements-bench.txt in a separate venv (see benchmarks/peer_taming.py).'
                    ) from e


def unsupported_fields(config: ml_collections.ConfigDict) -> list[str]:
  """Config settings the twin cannot mirror, as 'field=value (why)' strings; [] if none."""
  c = config
  bad = []
  if c.model.arch != 'sonnet':
    bad.append(f"model.arch={c.model.arch!r} (the twin is the Sonnet network; use 'sonnet')")
  if c.model.dtype != 'float32':
    bad.append(f"model.dtype={c.model.dtype!r} (the twin runs float32 only)")
  if c.objective != 'vqvae':
    bad.append(f"objective={c.objective!r} (the twin is a VQ-VAE; use 'vqvae')")
  if c.quantizer.kind != 'ema':
    bad.append(f"quantizer.kind={c.quantizer.kind!r} (the twin has Sonnet's EMA codebook; "
               "use 'ema')")
  for name in ('lookup_dim', 'entropy_weight'):
    if c.quantizer[name]:
      bad.append(f'quantizer.{name}={c.quantizer[name]} (the twin has no such thing; use 0)')
  if c.quantizer.l2_normalize:
    bad.append('quantizer.l2_normalize=True (the twin looks codes up by L2; use False)')
  if c.loss.recon != 'l2':
    bad.append(f"loss.recon={c.loss.recon!r} (the Sonnet loss is MSE; use 'l2')")
  for name in ('weight_decay', 'grad_clip', 'ema_decay'):
    if c.train[name] > 0:
      bad.append(f'train.{name}={c.train[name]} (the twin has plain Adam; use 0)')
  if c.train.schedule != 'constant' or c.train.warmup_steps:
    bad.append('train.schedule/warmup_steps (the twin has a constant learning rate)')
  return bad


class _ResidualStack(nn.Module):
  """(ReLU, 3x3 -> hidden, ReLU, 1x1 -> channels, add) x num_layers, then ReLU."""

  def __init__(self, channels: int, hidden: int, num_layers: int):
    super().__init__()
    self.blocks = nn.ModuleList(
        nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(hidden, channels, 1))
        for _ in range(num_layers))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for block in self.blocks:
      x = x + block(x)
    return F.relu(x)


class _VectorQuantizerEMA(nn.Module):
  """Sonnet 2's VectorQuantizerEMA: nearest code by L2, codebook = debiased EMA of the
  assigned inputs' sums over their Laplace-smoothed debiased EMA counts."""

  def __init__(self, num_codes: int, dim: int, commitment: float, decay: float,
               epsilon: float):
    super().__init__()
    self.commitment, self.decay, self.epsilon = commitment, decay, epsilon
    # Sonnet's VarianceScaling(distribution='uniform') on [dim, num_codes]: fan_in = dim.
    limit = (3.0 / dim) ** 0.5
    self.register_buffer('codebook', torch.empty(num_codes, dim).uniform_(-limit, limit))
    # snt.ExponentialMovingAverage: zero-initialised hidden values, debiased by the step.
    self.register_buffer('ema_cluster_size', torch.zeros(num_codes))
    self.register_buffer('ema_w', torch.zeros(num_codes, dim))
    self.updates = 0

  def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z: [N, D, H, W] -> (straight-through quantized z, commitment loss, perplexity)."""
    z_nhwc = z.permute(0, 2, 3, 1).contiguous()
    flat = z_nhwc.reshape(-1, z_nhwc.shape[-1])
    w = self.codebook
    distances = ((flat ** 2).sum(1, keepdim=True) - 2 * flat @ w.t()
                 + (w ** 2).sum(1)[None, :])
    indices = distances.argmin(1)
    encodings = F.one_hot(indices, w.shape[0]).to(flat.dtype)
    quantized = (encodings @ w).view_as(z_nhwc)
    if self.training:
      with torch.no_grad():
        self.updates += 1
        debias = 1.0 - self.decay ** self.updates
        self.ema_cluster_size.mul_(self.decay).add_(encodings.sum(0), alpha=1 - self.decay)
        self.ema_w.mul_(self.decay).add_(encodings.t() @ flat.detach(), alpha=1 - self.decay)
        size = self.ema_cluster_size / debias
        n = size.sum()
        size = (size + self.epsilon) / (n + w.shape[0] * self.epsilon) * n
        self.codebook.copy_(self.ema_w / debias / size[:, None])
    loss = self.commitment * F.mse_loss(z_nhwc, quantized.detach())
    quantized = z_nhwc + (quantized - z_nhwc).detach()
    probs = encodings.mean(0)
    perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))
    return quantized.permute(0, 3, 1, 2), loss, perplexity


class SonnetVQVAE(nn.Module):
  """The Sonnet example's CIFAR VQ-VAE: images [N, 3, H, W] -> (recon, vq loss, perplexity)."""

  def __init__(self, *, hidden: int = 128, res_hidden: int = 32, num_res_layers: int = 2,
               code_dim: int = 64, num_codes: int = 512, commitment: float = 0.25,
               decay: float = 0.99, epsilon: float = 1e-5):
    super().__init__()
    self.encoder = nn.Sequential(
        nn.Conv2d(3, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1),
        _ResidualStack(hidden, res_hidden, num_res_layers))
    self.pre_vq = nn.Conv2d(hidden, code_dim, 1)
    self.quantizer = _VectorQuantizerEMA(num_codes, code_dim, commitment, decay, epsilon)
    self.decoder = nn.Sequential(
        nn.Conv2d(code_dim, hidden, 3, padding=1),
        _ResidualStack(hidden, res_hidden, num_res_layers),
        nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(hidden // 2, 3, 4, stride=2, padding=1))

  def forward(self, x: torch.Tensor):
    quantized, vq_loss, perplexity = self.quantizer(self.pre_vq(self.encoder(x)))
    return self.decoder(quantized), vq_loss, perplexity


class SonnetPeer:
  """The twin's train step (on one fixed batch, or on batches passed to `train_step`).

  Args:
    config: a vq config (see `unsupported_fields` for what it may not set).
    images: float32 NHWC images in vq's [-1, 1], [batch, size, size, 3] (kept halved, NCHW),
      or None for a peer that only runs `train_step`.
    num_threads: torch intra-op threads.
    seed: torch seed of the initialisation.
  """

  def __init__(self, config: ml_collections.ConfigDict, images: np.ndarray | None, *,
               num_threads: int = 2, seed: int = 0):
    bad = unsupported_fields(config)
    if bad:
      raise ValueError(f'--peer=sonnet cannot mirror {"; ".join(bad)}.')
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    self.images = None
    if images is not None:
      if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'SonnetPeer: images must be NHWC with 3 channels, got shape '
                         f'{images.shape}; pass [batch, size, size, 3].')
      self.images = torch.from_numpy(
          np.ascontiguousarray(0.5 * images.transpose(0, 3, 1, 2), np.float32))
    m, q, t = config.model, config.quantizer, config.train
    self.model = SonnetVQVAE(hidden=m.hidden, res_hidden=m.res_hidden,
                             num_res_layers=m.num_res_layers, code_dim=q.code_dim,
                             num_codes=q.num_codes, commitment=q.beta, decay=q.decay,
                             epsilon=q.epsilon).train()
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.learning_rate,
                                      betas=(t.b1, t.b2))

  def num_params(self) -> dict[str, int]:
    return {'generator': sum(p.numel() for p in self.model.parameters())}

  def describe(self) -> dict[str, Any]:
    return describe()

  def train_step(self, x: torch.Tensor) -> dict[str, float]:
    """One step on x [N, 3, H, W] in [-0.5, 0.5]; returns its losses as floats."""
    recon, vq_loss, perplexity = self.model(x)
    recon_loss = F.mse_loss(recon, x) / DATA_VARIANCE
    loss = recon_loss + vq_loss
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return {'loss': loss.item(), 'recon_loss': recon_loss.item(),
            'perplexity': perplexity.item()}

  def step(self) -> dict[str, float]:
    """One step on the images given at construction."""
    return self.train_step(self.images)


class PeerProcess(peer_process.PeerProcess):
  """`SonnetPeer` in a process of its own (benchmarks/peer_process.py)."""

  def __init__(self, config: ml_collections.ConfigDict, images: np.ndarray, *,
               num_threads: int = 2, seed: int = 0, environ: dict[str, str] | None = None):
    bad = unsupported_fields(config)
    if bad:  # here, not as a dead child
      raise ValueError(f'--peer=sonnet cannot mirror {"; ".join(bad)}.')
    super().__init__(SonnetPeer, config, images, num_threads=num_threads, seed=seed,
                     environ=environ)


def train_loop(train_images: np.ndarray, config: ml_collections.ConfigDict, *, steps: int,
               log_every: int, num_threads: int = 2, seed: int = 0) -> dict[str, Any]:
  """The twin's whole training loop over `train_images` (uint8 NHWC) held in memory.

  Timed as vq's loop times itself (vq/runtime/loop.py): from the end of the first step, in
  windows of `log_every` steps (the first window one step shorter), images per second of
  each window.

  Returns:
    {'window_images_per_s': [...], 'images_per_s_median', 'images_per_s_overall',
     'last': losses of the last step, ...}.
  """
  peer = SonnetPeer(config, None, num_threads=num_threads, seed=seed)
  start = time.perf_counter()
  data = torch.from_numpy(np.ascontiguousarray(train_images.transpose(0, 3, 1, 2)))
  data = data.float().div_(255.0).sub_(0.5)
  load_s = time.perf_counter() - start
  batch = config.train.batch_size
  generator = torch.Generator().manual_seed(seed)
  order, pos = torch.randperm(len(data), generator=generator), 0
  windows, window_start, window_steps, last = [], None, 0, {}
  total_s, total_steps = 0.0, 0
  for step in range(steps):
    if pos + batch > len(data):  # a new epoch; the last len % batch examples are dropped
      order, pos = torch.randperm(len(data), generator=generator), 0
    last = peer.train_step(data[order[pos:pos + batch]])
    pos += batch
    done = step + 1
    if step == 0:
      window_start = time.perf_counter()
      continue
    window_steps += 1
    if done % log_every == 0 or done == steps:
      elapsed = time.perf_counter() - window_start
      windows.append(window_steps * batch / elapsed)
      total_s, total_steps = total_s + elapsed, total_steps + window_steps
      window_start, window_steps = time.perf_counter(), 0
  return {'window_images_per_s': [round(w, 2) for w in windows],
          'images_per_s_median': float(np.median(windows)) if windows else None,
          'images_per_s_overall': total_steps * batch / total_s if total_s else None,
          'timed_steps': total_steps, 'data_to_tensor_s': load_s, 'last': last,
          'num_params': peer.num_params(), 'peak_rss_mb': peer_process.peak_rss_mb(),
          **describe()}


def describe() -> dict[str, Any]:
  """Versions and threads of the twin's runtime, for the benchmark's JSON."""
  return {'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
          'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', 'default')}


def main(argv: list[str] | None = None) -> None:
  """`python -m benchmarks.peer_sonnet --data=X.npy --config_json=... --steps=N`: one
  `train_loop` run, one JSON line (benchmarks/train_loop.py runs this)."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--data', required=True, help='uint8 NHWC training images (.npy)')
  parser.add_argument('--config_json', required=True, help="a vq config's JSON")
  parser.add_argument('--steps', type=int, required=True)
  parser.add_argument('--log_every', type=int, default=100)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  config = ml_collections.ConfigDict(json.loads(args.config_json))
  images = np.load(args.data, mmap_mode=None)
  result = train_loop(images, config, steps=args.steps, log_every=args.log_every,
                      num_threads=args.threads, seed=args.seed)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
