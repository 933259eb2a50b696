r"""taming-transformers (PyTorch) train steps at a vq config's architecture: the peer for
`benchmarks/train_step.py --peer=taming`.

  python -m benchmarks.train_step --config=experiments/vqgan_cifar.py --peer=taming \
      --objectives=vqvae,vqgan

  from benchmarks import peer_taming
  peer = peer_taming.TamingPeer(config, images_nhwc)   # config.objective picks the step
  losses = peer.step()                                  # one train step; float losses
  peer = peer_taming.PeerProcess(config, images_nhwc, environ=env)  # the same, own process

Install (a SEPARATE venv, so the project's venv stays free of PyTorch)::

  python3 -m venv /tmp/venv-bench
  /tmp/venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt
  /tmp/venv-bench/bin/pip install --no-deps taming-transformers-rom1504==0.0.6

taming-transformers-rom1504 goes in with --no-deps: it declares pytorch-lightning, omegaconf and
torchvision (none is imported here) and forgets einops (its quantizer imports it;
requirements-bench.txt pins it). torchvision is left out because PyPI's torchvision wheels are
CUDA builds: next to the CPU torch wheel their C extension cannot load (it links
libtorch_cuda.so) and `import torchvision` fails with "operator torchvision::nms does not
exist". taming's lpips module only needs `torchvision.models.vgg16` for its VGG16 layers, so
the peer builds those 13 conv layers from torch.nn itself and, while importing taming's lpips
module, lets `from torchvision import models` see a stand-in that refuses to be called.
Lightning is not needed: `taming.models.vqgan.VQModel` is a LightningModule, so
`_VQModel` below re-assembles its forward pass (Encoder -> quant_conv -> VectorQuantizer2 ->
post_quant_conv -> Decoder) from taming's own modules, and `TamingPeer.step` does what
Lightning's automatic optimisation does around `VQModel.training_step`.

What one step is, with taming's code wherever taming has it:
- 'vqvae': encode, quantize, decode; L1 or L2 (`config.loss.recon`) + codebook + beta *
  commitment (`VectorQuantizer2(legacy=False)`, the beta placement vq uses); one Adam step.
- 'vqgan': generator step = taming's `VQLPIPSWithDiscriminator.forward(optimizer_idx=0)`
  (L1 + LPIPS-VGG16, hinge G loss, adaptive weight from two `torch.autograd.grad` calls at
  `decoder.conv_out.weight`, codebook loss), backward, Adam; with the discriminator's
  parameters frozen meanwhile, as Lightning's `toggle_optimizer` does. Then the
  discriminator step on real images and the DETACHED reconstruction of that same forward pass
  (taming's `hinge_d_loss`), backward, Adam. Stock taming under Lightning would run the
  encoder, decoder and LPIPS forward a second time for the discriminator step; skipping that
  makes this peer faster than stock taming, so ratios against it are conservative.

Deliberate differences, none of which changes the compute much:
- LPIPS: taming's `LPIPS` would download VGG16 and the LPIPS heads. `_RandomLPIPS` keeps
  taming's forward but builds VGG16's feature layers (torchvision's layer table and init,
  written in torch.nn) with random weights and random 1x1 heads: the same compute, nothing
  downloaded. It stays in eval mode (no dropout).
- The quantizer learns its codebook by gradient (taming has no EMA codebook); vq's
  vqgan_cifar config uses an EMA codebook, which costs about the same.
- taming's `VQModel` has two 1x1 convs around the quantizer (quant_conv, post_quant_conv;
  8,320 parameters) that vq's taming network does not.
- taming's PatchGAN uses BatchNorm; vq's uses GroupNorm (see vq/models/discriminator.py for why).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Any
from unittest import mock

import ml_collections
import numpy as np

from benchmarks import peer_process

_INSTALL = ('install them in a separate venv: python3 -m venv /tmp/venv-bench && '
            '/tmp/venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt && '
            '/tmp/venv-bench/bin/pip install --no-deps taming-transformers-rom1504==0.0.6')



def _torchvision_stand_in() -> types.ModuleType:
  """A `torchvision` whose `models.vgg16` refuses to run: nothing here calls it."""

  def vgg16(*args, **kwargs):
    raise RuntimeError('benchmarks.peer_taming builds VGG16 itself; torchvision.models.vgg16 '
                       f'is a stand-in here (called with {args}, {kwargs}).')

  tv = types.ModuleType('torchvision')
  tv.models = types.SimpleNamespace(vgg16=vgg16)
  return tv


try:
  # pylint: disable=g-import-not-at-top
  import torch
  from torch import nn
  from taming.modules.diffusionmodules import model as taming_model
  from taming.modules.vqvae import quantize as taming_quantize
  # taming's lpips module imports torchvision at the top for vgg16 alone (see above).
  with mock.patch.dict(sys.modules, {'torchvision': _torchvision_stand_in()}):
    from taming.modules.losses import lpips as taming_lpips
    from taming.modules.losses import vqperceptual
  # pylint: enable=g-import-not-at-top
except ImportError as e:
  raise ImportError(f'--peer=taming needs PyTorch and taming-transformers, but importing '
                    f'them failed ({e}); {_INSTALL}') from e

# VGG16 ('D') feature layers: conv3x3 widths, 'M' = 2x2 max-pool (torchvision's table), and
# the layer indices at which taming's LPIPS takes relu1_2 ... relu5_3.
_VGG16_LAYERS = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
                 512, 512, 512, 'M')
_VGG_SLICES = (0, 4, 9, 16, 23, 30)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class _VGG16Features(taming_lpips.vgg16):
  """taming's sliced VGG16 (forward inherited) over randomly initialised conv layers.

  The layers of torchvision's `vgg16().features` with its init, minus the 120M-parameter
  classifier that `models.vgg16()` would also allocate and taming throws away.
  """

  def __init__(self):  # pylint: disable=super-init-not-called
    nn.Module.__init__(self)
    features, channels = [], 3
    for width in _VGG16_LAYERS:
      if width == 'M':
        features.append(nn.MaxPool2d(kernel_size=2, stride=2))
        continue
      conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
      nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
      nn.init.zeros_(conv.bias)
      features += [conv, nn.ReLU(inplace=True)]
      channels = width
    self.N_slices = 5  # pylint: disable=invalid-name
    for i in range(self.N_slices):
      piece = nn.Sequential()
      for j in range(_VGG_SLICES[i], _VGG_SLICES[i + 1]):
        piece.add_module(str(j), features[j])
      setattr(self, f'slice{i + 1}', piece)
    self.requires_grad_(False)


class _RandomLPIPS(taming_lpips.LPIPS):
  """taming's LPIPS (forward inherited) with random VGG16 and heads; downloads nothing."""

  def __init__(self, use_dropout: bool = True):  # pylint: disable=super-init-not-called
    nn.Module.__init__(self)
    self.scaling_layer = taming_lpips.ScalingLayer()
    self.chns = list(_LPIPS_CHANNELS)
    self.net = _VGG16Features()
    for i, channels in enumerate(_LPIPS_CHANNELS):
      lin = taming_lpips.NetLinLayer(channels, use_dropout=use_dropout)
      with torch.no_grad():
        lin.model[-1].weight.abs_()  # trained LPIPS heads are non-negative
      setattr(self, f'lin{i}', lin)
    self.requires_grad_(False)


class _VQModel(nn.Module):
  """The forward pass of taming's `VQModel` without Lightning: images -> (recon, q_loss)."""

  def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
               attn_resolutions: tuple[int, ...], resolution: int, code_dim: int,
               num_codes: int, beta: float):
    super().__init__()
    ddconfig = dict(double_z=False, z_channels=code_dim, resolution=resolution,
                    in_channels=3, out_ch=3, ch=ch, ch_mult=tuple(ch_mult),
                    num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                    dropout=0.0)
    self.encoder = taming_model.Encoder(**ddconfig)
    self.decoder = taming_model.Decoder(**ddconfig)
    self.quantize = taming_quantize.VectorQuantizer2(num_codes, code_dim, beta=beta,
                                                     legacy=False)
    self.quant_conv = nn.Conv2d(code_dim, code_dim, 1)
    self.post_quant_conv = nn.Conv2d(code_dim, code_dim, 1)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    quant, q_loss, _ = self.quantize(self.quant_conv(self.encoder(x)))
    return self.decoder(self.post_quant_conv(quant)), q_loss


def unsupported_fields(config: ml_collections.ConfigDict) -> list[str]:
  """Config settings the peer cannot mirror, as 'field=value (why)' strings; [] if none."""
  c = config
  bad = []
  if c.model.arch != 'taming':
    bad.append(f"model.arch={c.model.arch!r} (the peer is taming's network; use 'taming')")
  if c.model.dtype != 'float32':
    bad.append(f"model.dtype={c.model.dtype!r} (the peer runs float32 only)")
  for name in ('weight_decay', 'grad_clip', 'ema_decay'):
    if c.train[name] > 0:
      bad.append(f'train.{name}={c.train[name]} (the peer has plain Adam; use 0)')
  if c.objective == 'vqgan':
    if c.loss.recon != 'l1':
      bad.append(f"loss.recon={c.loss.recon!r} (taming's VQ-GAN loss is L1; use 'l1')")
    if c.loss.gan_loss != 'hinge':
      bad.append(f"loss.gan_loss={c.loss.gan_loss!r} (the peer runs taming's hinge; use 'hinge')")
    if not c.loss.adaptive_weight:
      bad.append('loss.adaptive_weight=False (taming always uses it; use True)')
    if c.disc.name != 'patchgan':
      bad.append(f"disc.name={c.disc.name!r} (taming has the PatchGAN only; use 'patchgan')")
    for name in ('lecam_weight', 'r1_weight'):
      if c.loss[name] > 0:
        bad.append(f'loss.{name}={c.loss[name]} (taming has no such term; use 0)')
  return bad


def _count(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


class TamingPeer:
  """taming's train step for `config.objective` on one fixed batch.

  Args:
    config: a vq experiment config (see `unsupported_fields` for what it may not set).
    images: float32 NHWC images in [-1, 1], [batch, size, size, 3]; kept as NCHW.
    num_threads: torch intra-op threads.
    seed: torch seed for the random initialisation.
  """

  def __init__(self, config: ml_collections.ConfigDict, images: np.ndarray, *,
               num_threads: int = 2, seed: int = 0):
    bad = unsupported_fields(config)
    if bad:
      raise ValueError(f'--peer=taming cannot mirror {"; ".join(bad)}.')
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'TamingPeer: images must be NHWC with 3 channels, got shape '
                       f'{images.shape}; pass [batch, size, size, 3].')
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    self.objective = config.objective
    self.recon = config.loss.recon
    self.recon_weight = float(config.loss.recon_weight)
    self.global_step = 0
    self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    m, q, t = config.model, config.quantizer, config.train
    # taming prints banners on construction; stdout carries only the benchmark's JSON.
    with contextlib.redirect_stdout(sys.stderr):
      self.autoencoder = _VQModel(
          ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
          attn_resolutions=tuple(m.attn_resolutions), resolution=config.data.image_size,
          code_dim=q.code_dim, num_codes=q.num_codes, beta=q.beta).train()
    self.opt_g = torch.optim.Adam(self.autoencoder.parameters(), lr=t.learning_rate,
                                  betas=(t.b1, t.b2))
    self.loss = None
    self.opt_d = None
    if self.objective == 'vqgan':
      with mock.patch.object(vqperceptual, 'LPIPS', _RandomLPIPS), \
          contextlib.redirect_stdout(sys.stderr):
        self.loss = vqperceptual.VQLPIPSWithDiscriminator(
            disc_start=0, codebook_weight=1.0, pixelloss_weight=config.loss.recon_weight,
            disc_num_layers=config.disc.n_layers, disc_in_channels=3, disc_factor=1.0,
            disc_weight=config.loss.disc_weight,
            perceptual_weight=config.loss.perceptual_weight, use_actnorm=False,
            disc_ndf=config.disc.ndf, disc_loss='hinge')
      d = config.disc
      self.opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=d.learning_rate,
                                    betas=(d.b1, d.b2))

  def num_params(self) -> dict[str, int]:
    """Parameter counts: generator, and for VQ-GAN discriminator and (frozen) LPIPS."""
    counts = {'generator': _count(self.autoencoder)}
    if self.loss is not None:
      counts['discriminator'] = _count(self.loss.discriminator)
      counts['lpips'] = _count(self.loss.perceptual_loss)
    return counts

  def describe(self) -> dict[str, Any]:
    return describe()

  def step(self) -> dict[str, float]:
    """One train step of `config.objective`; returns its losses as floats."""
    if self.objective == 'vqgan':
      out = self._vqgan_step()
    else:
      out = self._vqvae_step()
    self.global_step += 1
    return out

  def _vqvae_step(self) -> dict[str, float]:
    x = self.images
    xrec, q_loss = self.autoencoder(x)
    if self.recon == 'l1':
      rec = torch.mean(torch.abs(x - xrec))
    else:
      rec = torch.mean((x - xrec) ** 2)
    loss = self.recon_weight * rec + q_loss
    self.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    self.opt_g.step()
    return {'loss': loss.item(), 'recon_loss': rec.item(), 'q_loss': q_loss.item()}

  def _vqgan_step(self) -> dict[str, float]:
    x = self.images
    disc = self.loss.discriminator
    # Generator: Lightning's toggle_optimizer freezes the other optimizer's parameters.
    disc.requires_grad_(False)
    xrec, q_loss = self.autoencoder(x)
    g_total, log = self.loss(q_loss, x, xrec, 0, self.global_step,
                             last_layer=self.autoencoder.decoder.conv_out.weight)
    self.opt_g.zero_grad(set_to_none=True)
    g_total.backward()
    self.opt_g.step()
    disc.requires_grad_(True)
    # Discriminator on real images and the detached reconstruction of the same forward pass.
    logits_real = disc(x.detach())
    logits_fake = disc(xrec.detach())
    d_loss = self.loss.disc_factor * self.loss.disc_loss(logits_real, logits_fake)
    self.opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    self.opt_d.step()
    return {'loss': g_total.item(), 'd_loss': d_loss.item(),
            'd_weight': float(log['train/d_weight']), 'p_loss': float(log['train/p_loss'])}


class PeerProcess(peer_process.PeerProcess):
  """`TamingPeer` in a process of its own (benchmarks/peer_process.py).

  Args:
    config, images, num_threads, seed: as `TamingPeer`.
    environ: the child's environment (default: this process's).
  """

  def __init__(self, config: ml_collections.ConfigDict, images: np.ndarray, *,
               num_threads: int = 2, seed: int = 0, environ: dict[str, str] | None = None):
    bad = unsupported_fields(config)
    if bad:  # here, not as a dead child
      raise ValueError(f'--peer=taming cannot mirror {"; ".join(bad)}.')
    super().__init__(TamingPeer, config, images, num_threads=num_threads, seed=seed,
                     environ=environ)


def describe() -> dict[str, Any]:
  """Versions and threads of the peer's runtime, for the benchmark's JSON."""
  return {'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
          'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', 'default')}
