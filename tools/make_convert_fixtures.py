r"""Writes tests/convert/fixtures/*.npz: tiny PyTorch tokenizers and what their own code computes.

  /tmp/venv-bench/bin/python tools/make_convert_fixtures.py

Runs in the PyTorch venv of requirements-bench.txt (torch, taming-transformers-rom1504
installed with --no-deps, einops; jax and flax from requirements.txt), never in the test
environment. The oracle is the PyTorch code itself:

- taming.npz: taming-transformers' own `taming.models.vqgan.VQModel` (imported from the
  installed package; `pytorch_lightning` and `taming.main` are replaced by two-line stand-ins
  because VQModel only subclasses LightningModule and calls instantiate_from_config),
  ch 32, ch_mult (1, 2), one ResNet block per level, attention at 16x16 (level 0),
  z_channels 32, 64 codes of 16 dims, on 16x16 images. Saved as Lightning 1.0 saves a
  .ckpt: epoch, global_step, a callbacks dict keyed by the ModelCheckpoint class, optimizer
  states, and 'state_dict' with the loss's modules ('loss.*', a stand-in discriminator
  with BatchNorm). The model.yaml beside it is stored as text.
- llamagen.npz: LlamaGen's VQModel as transcribed in tools/llamagen_vq_model.py from
  FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py at commit
  ce98ec41803a74a90ce68c40ababa9eaeffeb4ec (no package provides it; one deviation, marked
  FIXTURE there: VQModel passes `ch` and `num_res_blocks` on), so the fixture can be small: ch 32, ch_mult (1, 2), one block, z_channels 32, 64 codes of
  8 dims, l2-normalised. Saved as vq_train.py saves: {'model', 'optimizer',
  'discriminator', 'optimizer_disc', 'steps', 'args': argparse.Namespace}.
- reader.npz: a dict of tensors of every dtype, views, transposes, a Parameter and the
  records training loops add, saved in torch's zip format and in its older stream format
  (`_use_new_zipfile_serialization=False`), with the arrays torch itself loads back.

Each model npz holds the checkpoint file's bytes (`checkpoint`, uint8; tests write it to
disk and convert it like a user's file), 4 uint8 test images, and the PyTorch outputs on
them (float32, NHWC): `z` (encoder output), `tokens`, `recon` (forward pass) and
`decoded` (decoder of the tokens' codebook rows). Weights are random (seeded), rounded to
multiples of 2^-7 so the npz compresses; codebook rows are drawn near encoder outputs so
the test images use many codes, and the seed is kept only if every position's nearest code
beats the second nearest by a margin (so equal tokens are a meaningful check, not a tie).
The script also checks vq.convert's reader against torch.load on every file it writes.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import io
import pathlib
import sys
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import llamagen_vq_model as llamagen  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / 'tests' / 'convert' / 'fixtures'
LLAMAGEN_SOURCE = ('FoundationVision/LlamaGen@ce98ec41803a74a90ce68c40ababa9eaeffeb4ec '
                   'tokenizer/tokenizer_image/vq_model.py')
IMAGE_SIZE = 16
MIN_MARGIN = 1e-3  # relative gap between the nearest and second-nearest code


# ----- Stand-ins so that taming.models.vqgan imports without Lightning's trainer. -----

def _install_stand_ins() -> type:
  """Registers pytorch_lightning (LightningModule = nn.Module) and taming.main stand-ins."""
  modules = {}
  for name in ('pytorch_lightning', 'pytorch_lightning.callbacks',
               'pytorch_lightning.callbacks.model_checkpoint', 'taming.main'):
    modules[name] = sys.modules[name] = types.ModuleType(name)
  modules['pytorch_lightning'].LightningModule = nn.Module

  class ModelCheckpoint:  # Lightning 1.0 keys callback states by the callback's class
    pass
  ModelCheckpoint.__module__ = 'pytorch_lightning.callbacks.model_checkpoint'
  ModelCheckpoint.__qualname__ = 'ModelCheckpoint'
  modules['pytorch_lightning.callbacks.model_checkpoint'].ModelCheckpoint = ModelCheckpoint

  def instantiate_from_config(config):  # taming/main.py's, without the reload
    module, cls = config['target'].rsplit('.', 1)
    return getattr(__import__(module, fromlist=[cls]), cls)(**config.get('params', {}))
  modules['taming.main'].instantiate_from_config = instantiate_from_config
  return ModelCheckpoint


class LossStandIn(nn.Module):
  """Stands for taming's VQLPIPSWithDiscriminator in the state dict: 'loss.*' tensors."""

  def __init__(self):
    super().__init__()
    self.discriminator = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.BatchNorm2d(8))


# ----- Fixture making. -----

TAMING_YAML = f"""\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 16
    n_embed: 64
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: {IMAGE_SIZE}
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult:
      - 1
      - 2
      num_res_blocks: 1
      attn_resolutions:
      - {IMAGE_SIZE}
      dropout: 0.0
    lossconfig:
      target: __main__.LossStandIn
"""


def _randomize(model: nn.Module, seed: int) -> None:
  """Seeded weights on a 2^-7 grid: unit-ish activations, GroupNorm affine off identity."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ('norm' in name):
        value = (1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn(p.shape, generator=gen)
      elif p.ndim == 1:
        value = 0.1 * torch.randn(p.shape, generator=gen)
      else:
        fan_in = int(np.prod(p.shape[1:]))
        value = torch.randn(p.shape, generator=gen) * (1.5 / fan_in) ** 0.5
      p.copy_(torch.round(value * 128) / 128)


def _images(seed: int, n: int = 4) -> np.ndarray:
  """uint8 [n, 16, 16, 3]: smooth gradients plus noise."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
  out = []
  for _ in range(n):
    a, b, c = rng.uniform(-1, 1, (3, 3))
    base = a[None, None] * yy[..., None] + b[None, None] * xx[..., None] + c[None, None]
    noisy = 127.5 * (base / 2 + 1) + rng.normal(0, 30, base.shape)
    out.append(np.clip(np.round(noisy), 0, 255))
  return np.stack(out).astype(np.uint8)


def _to_torch(images_uint8: np.ndarray) -> torch.Tensor:
  x = torch.from_numpy(images_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1))
  return x.permute(0, 3, 1, 2).contiguous()


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def _codebook_from_data(model, images, num_codes, seed, l2):
  """Codebook rows near lookup-space encoder outputs of other images (many codes used)."""
  rng = np.random.RandomState(seed)
  with torch.no_grad():
    h = model.quant_conv(model.encoder(_to_torch(images)))
  rows = _nhwc(h).reshape(-1, h.shape[1])
  if l2:
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  picks = rows[rng.choice(len(rows), num_codes, replace=len(rows) < num_codes)]
  noisy = picks + rng.normal(0, 0.2 * np.std(picks), picks.shape)
  return torch.from_numpy(np.round(noisy * 128).astype(np.float32) / 128)


def _margin(h: np.ndarray, codebook: np.ndarray, l2: bool) -> float:
  """Smallest relative gap between nearest and second-nearest code over all positions."""
  z = h.reshape(-1, h.shape[-1]).astype(np.float64)
  e = codebook.astype(np.float64)
  if l2:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
  d = np.sort(((z[:, None, :] - e[None]) ** 2).sum(-1), axis=1)
  return float(np.min((d[:, 1] - d[:, 0]) / (d[:, 1] + 1e-12)))


def _record(model, images, l2):
  """The PyTorch outputs the tests compare against."""
  model.eval()
  with torch.no_grad():
    x = _to_torch(images)
    z = model.encoder(x)
    h = model.quant_conv(z)
    quant, _, info = model.quantize(h)
    n, _, gh, gw = h.shape
    tokens = info[2].reshape(n, gh, gw)
    recon = model.decode(quant)
    rows = (F.normalize(model.quantize.embedding.weight, p=2, dim=-1) if l2
            else model.quantize.embedding.weight)[tokens.reshape(-1)]
    decoded = model.decode(rows.reshape(n, gh, gw, -1).permute(0, 3, 1, 2))
  margin = _margin(_nhwc(h), model.quantize.embedding.weight.detach().numpy(), l2)
  return dict(z=_nhwc(z), tokens=tokens.numpy().astype(np.int32), recon=_nhwc(recon),
              decoded=_nhwc(decoded)), margin


def _save_bytes(obj, legacy: bool = False) -> np.ndarray:
  buffer = io.BytesIO()
  torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
  return np.frombuffer(buffer.getvalue(), np.uint8).copy()


def _check_reader(data: np.ndarray, top_key: str, tmp: pathlib.Path) -> None:
  """vq.convert's restricted reader returns what torch.load returns, bit for bit."""
  sys.path.insert(0, str(REPO))
  from vq.convert import torch_reader  # pylint: disable=g-import-not-at-top
  tmp.write_bytes(data.tobytes())
  ours = torch_reader.read_checkpoint(tmp)[top_key]
  theirs = torch.load(tmp, map_location='cpu', weights_only=False)[top_key]
  assert set(ours) == set(theirs), set(ours) ^ set(theirs)
  for k, v in theirs.items():
    want = (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
    got = np.asarray(ours[k])
    assert got.dtype == want.dtype and np.array_equal(got, want), k


def make_taming(seed: int, tmp: pathlib.Path) -> dict:
  model_checkpoint_cls = _install_stand_ins()
  import yaml  # pylint: disable=g-import-not-at-top
  from taming.models.vqgan import VQModel as TamingVQModel  # pylint: disable=g-import-not-at-top
  params = yaml.safe_load(TAMING_YAML)['model']['params']
  for attempt in range(seed, seed + 50):
    torch.manual_seed(attempt)
    model = TamingVQModel(**params)
    _randomize(model, attempt)
    with torch.no_grad():
      model.quantize.embedding.weight.copy_(_codebook_from_data(
          model, _images(attempt + 1000, 16), params['n_embed'], attempt, l2=False))
    images = _images(attempt)
    outputs, margin = _record(model, images, l2=False)
    print(f'taming seed {attempt}: margin {margin:.3g}, {len(np.unique(outputs["tokens"]))} codes')
    if margin > MIN_MARGIN and len(np.unique(outputs['tokens'])) > 16:
      break
  else:
    raise RuntimeError('no seed gave a clear nearest code everywhere')
  # One Adam step on a copy of the codebook, so optimizer_states holds tensors as a real
  # .ckpt's does while the saved weights stay the recorded ones.
  copy = nn.Parameter(model.quantize.embedding.weight.detach().clone())
  opt = torch.optim.Adam([copy], lr=1e-4, betas=(0.5, 0.9))
  copy.grad = torch.ones_like(copy)
  opt.step()
  ckpt = {
      'epoch': 3, 'global_step': 1200, 'pytorch-lightning_version': '1.0.8',
      'callbacks': {model_checkpoint_cls: {'best_model_score': torch.tensor(0.25),
                                           'best_model_path': 'logs/last.ckpt'}},
      'optimizer_states': [opt.state_dict()], 'lr_schedulers': [],
      'state_dict': model.state_dict(),
  }
  return dict(checkpoint=_save_bytes(ckpt), images=images, seed=np.int64(attempt),
              margin=np.float64(margin), model_yaml=np.array(TAMING_YAML), **outputs)


def make_llamagen(seed: int) -> dict:
  args = llamagen.ModelArgs(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 2],
                   decoder_ch_mult=[1, 2], z_channels=32, ch=32, num_res_blocks=1)
  for attempt in range(seed, seed + 50):
    torch.manual_seed(attempt)
    model = llamagen.VQModel(args)
    _randomize(model, attempt)
    with torch.no_grad():
      model.quantize.embedding.weight.copy_(_codebook_from_data(
          model, _images(attempt + 1000, 16), args.codebook_size, attempt, l2=True))
    images = _images(attempt)
    outputs, margin = _record(model, images, l2=True)
    print(f'llamagen seed {attempt}: margin {margin:.3g}, {len(np.unique(outputs["tokens"]))} codes')
    if margin > MIN_MARGIN and len(np.unique(outputs['tokens'])) > 16:
      break
  else:
    raise RuntimeError('no seed gave a clear nearest code everywhere')
  disc = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1))
  ckpt = {
      'model': model.state_dict(),
      'optimizer': torch.optim.AdamW(disc.parameters(), lr=1e-4).state_dict(),
      'discriminator': disc.state_dict(),
      'optimizer_disc': torch.optim.Adam(disc.parameters(), lr=1e-4).state_dict(),
      'steps': 10,
      'args': argparse.Namespace(vq_model='VQ-16', codebook_size=64, codebook_embed_dim=8,
                                 codebook_l2_norm=True, image_size=IMAGE_SIZE),
  }
  return dict(checkpoint=_save_bytes(ckpt), images=images, seed=np.int64(attempt),
              margin=np.float64(margin), source=np.array(LLAMAGEN_SOURCE), **outputs)


def make_reader_cases() -> dict:
  """Tensors of every kind the reader handles, saved in both torch formats."""
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  gen = torch.Generator().manual_seed(0)
  sd = collections.OrderedDict(
      f32=torch.randn(3, 4, generator=gen), f16=torch.randn(5, generator=gen).half(),
      bf16=torch.randn(2, 3, generator=gen).bfloat16(), f64=torch.randn(2, generator=gen).double(),
      i64=torch.arange(7), i32=torch.arange(3, dtype=torch.int32),
      u8=torch.arange(4, dtype=torch.uint8), b=torch.tensor([True, False]),
      scalar=torch.tensor(3.5), transposed=base.t(), view=base[1:3, 2:5], shared=base,
      param=nn.Parameter(torch.randn(3, generator=gen)), empty=torch.zeros(0, 3))
  obj = {'state_dict': sd, 'args': argparse.Namespace(lr=1e-4), 'steps': 7}
  expected = {f'expected_{k}': (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
              for k, v in sd.items()}
  return dict(zip=_save_bytes(obj), legacy=_save_bytes(obj, legacy=True), **expected)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  OUT.mkdir(parents=True, exist_ok=True)
  tmp = OUT / '.reader_check.tmp'
  fixtures = {'taming': make_taming(args.seed, tmp), 'llamagen': make_llamagen(args.seed),
              'reader': make_reader_cases()}
  try:
    _check_reader(fixtures['taming']['checkpoint'], 'state_dict', tmp)
    _check_reader(fixtures['llamagen']['checkpoint'], 'model', tmp)
    _check_reader(fixtures['reader']['zip'], 'state_dict', tmp)
    _check_reader(fixtures['reader']['legacy'], 'state_dict', tmp)
  finally:
    tmp.unlink(missing_ok=True)
  versions = dict(torch_version=np.array(torch.__version__),
                  taming_version=np.array(importlib.metadata.version(
                      'taming-transformers-rom1504')))
  for name, arrays in fixtures.items():
    path = OUT / f'{name}.npz'
    np.savez_compressed(path, **arrays, **versions)
    extra = (f", seed {int(arrays['seed'])}, margin {float(arrays['margin']):.3g}, "
             f"{len(np.unique(arrays['tokens']))} codes used") if 'tokens' in arrays else ''
    print(f'wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes{extra})')


if __name__ == '__main__':
  main()
