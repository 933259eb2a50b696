"""LlamaGen VQ tokenizer checkpoints (vq_ds16_c2i.pt, vq_ds8_c2i.pt, ...) -> vq.

Usage sketch::

  from vq.convert import llamagen
  summary = llamagen.convert_files('/tmp/vq_ds16_c2i.pt', '/tmp/llamagen_f16')

  arch = llamagen.arch_from_state_dict(state_dict, 'vq_ds16_c2i.pt')
  params = llamagen.convert_state_dict(state_dict, arch, 'vq_ds16_c2i.pt')

LlamaGen's tokenizer (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py)
is taming's VQGAN network with other module names (`conv_blocks.{i}.res`, `mid.{0,1,2}`,
decoder blocks listed lowest resolution first) and attention in the blocks of the lowest
resolution only, followed by an l2-normalised lookup in a low-dimensional space:
`quant_conv` (1x1, z_channels -> codebook_embed_dim, 8 in the released models), then
both the projected vector and the codebook rows are l2-normalised, the nearest row is the
token, and `post_quant_conv` maps the normalised row back. That is vq's factorised lookup
(`quantizer.lookup_dim=8`, `quantizer.l2_normalize=True`); beta weighs the commitment term
as in vq. The released models are VQ-16 (f16, ch_mult 1,1,2,2,4) and VQ-8 (f8, ch_mult
1,2,2,4), both ch 128, 2 ResNet blocks per level, 16384 codes of 8 dims; the converter reads
all of that from the tensor shapes. It assumes `codebook_l2_norm=True`, the ModelArgs
default every released tokenizer uses (the state dict does not record it).

The checkpoint is vq_train.py's dict: 'model' (the weights LlamaGen's code extraction and
samplers load), optionally 'ema', plus optimizer and discriminator states, 'steps' and
'args' (an argparse.Namespace, read as an inert record). `quantize.codebook_used`, a
usage buffer, is not converted.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from vq.convert import layout
from vq.convert import torch_reader
from vq.convert import workdir as workdir_lib

WEIGHTS = ('model', 'ema')
IGNORED = ('quantize.codebook_used',)
# LlamaGen's tokenizer recipe (vq_train.py's defaults), used when fine-tuning in vq; its
# PatchGAN (3 layers, 64 channels) is the base config's.
RECIPE = {
    'loss.recon': 'l2', 'loss.recon_weight': 1.0, 'loss.perceptual_weight': 1.0,
    'loss.disc_weight': 0.5, 'loss.disc_start': 20_000, 'loss.gan_loss': 'hinge',
    'train.learning_rate': 1e-4, 'train.b1': 0.9, 'train.b2': 0.95,
    'train.weight_decay': 0.05, 'train.grad_clip': 1.0,
    'disc.learning_rate': 1e-4, 'disc.b1': 0.9, 'disc.b2': 0.95,
}
_HINT = ('Pass a LlamaGen VQ tokenizer checkpoint (tokenizer/tokenizer_image/vq_model.py, '
         'VQ-16 or VQ-8).')


def _shape(state_dict: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
  if key not in state_dict:
    raise ValueError(f'{source} has no {key!r}, so it is not a LlamaGen VQ tokenizer state '
                     f'dict (its first keys: {sorted(state_dict)[:6]}). {_HINT}')
  return tuple(int(d) for d in getattr(state_dict[key], 'shape', ()))


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
  found = {int(m.group(1)) for k in state_dict for m in [re.match(pattern, k)] if m}
  return sorted(found)


def arch_from_state_dict(state_dict: Mapping[str, Any], source: str) -> layout.Arch:
  """The architecture a LlamaGen VQModel state dict holds, read from tensor shapes."""
  ch = _shape(state_dict, 'encoder.conv_in.weight', source)[0]
  levels = _indices(state_dict, r'encoder\.conv_blocks\.(\d+)\.')
  blocks = _indices(state_dict, r'encoder\.conv_blocks\.0\.res\.(\d+)\.')
  if not levels or levels != list(range(len(levels))) or not blocks:
    raise ValueError(f'{source} has no encoder.conv_blocks.<level>.res.<block> tensors in '
                     f'order (levels {levels}, blocks {blocks}). {_HINT}')
  ch_mult = []
  for level in levels:
    out = _shape(state_dict, f'encoder.conv_blocks.{level}.res.0.conv1.weight', source)[0]
    if out % ch:
      raise ValueError(f'{source}: encoder level {level} has {out} channels, not a multiple '
                       f'of conv_in\'s {ch}. {_HINT}')
    ch_mult.append(out // ch)
  for level in levels:
    rlevel = len(levels) - 1 - level
    out = _shape(state_dict, f'decoder.conv_blocks.{rlevel}.res.0.conv1.weight', source)[0]
    if out != ch * ch_mult[level]:
      raise ValueError(f'{source}: the decoder\'s level {level} has {out} channels, the '
                       f'encoder\'s {ch * ch_mult[level]}; vq\'s decoder mirrors the encoder '
                       '(decoder_ch_mult must equal encoder_ch_mult).')
  num_codes, embed_dim = _shape(state_dict, 'quantize.embedding.weight', source)
  return layout.Arch(
      ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=len(blocks),
      attn_levels=(len(levels) - 1,),
      z_channels=_shape(state_dict, 'encoder.conv_out.weight', source)[0],
      embed_dim=embed_dim, num_codes=num_codes)


def convert_state_dict(state_dict: Mapping[str, Any], arch: layout.Arch,
                       source: str) -> dict[str, Any]:
  """vq params from a LlamaGen VQModel state dict (strictly checked against `arch`)."""
  plan = layout.plan(arch, layout.LLAMAGEN)
  layout.check_state_dict(state_dict, plan, ignored=IGNORED, source=source, hint=_HINT)
  return plan.build(state_dict)


def convert_files(checkpoint: str | os.PathLike, workdir: str | os.PathLike, *,
                  image_size: int = 256, weights: str = 'model', reader: str = 'builtin',
                  base_config: str | os.PathLike | None = None) -> dict[str, Any]:
  """`python -m vq.convert llamagen`: a LlamaGen .pt -> a vq workdir.

  Args:
    checkpoint: the .pt written by LlamaGen's vq_train.py (or a bare state dict).
    workdir: where to write the vq workdir (new or empty).
    image_size: the image side the converted model takes (the network is convolutional;
      LlamaGen uses its f16 tokenizer at 256 and 384).
    weights: which weights of the checkpoint: 'model' (what LlamaGen's GPTs were trained
      on) or 'ema'.
    reader: `torch_reader.read_checkpoint`'s reader.
    base_config: the vq config file whose training recipe the workdir keeps; by default
      experiments/vqgan_imagenet256.py with LlamaGen's own recipe (`RECIPE`) on top.

  Returns:
    `workdir.write`'s summary.
  """
  if weights not in WEIGHTS:
    raise ValueError(f'--weights={weights!r} is unknown; choose one of {WEIGHTS}.')
  tree = torch_reader.read_checkpoint(checkpoint, reader)
  if isinstance(tree, Mapping) and weights == 'ema' and 'ema' not in tree:
    raise ValueError(f'{checkpoint} holds no EMA weights (keys: {sorted(map(str, tree))}); '
                     'use --weights=model.')
  state_dict = torch_reader.pick_state_dict(tree, (weights,), str(checkpoint))
  arch = arch_from_state_dict(state_dict, str(checkpoint))
  params = convert_state_dict(state_dict, arch, str(checkpoint))
  config = workdir_lib.tokenizer_config(
      workdir_lib.load_base_config(base_config), arch, image_size=image_size,
      l2_normalize=True, beta_on='commitment', recipe=None if base_config else RECIPE)
  source = workdir_lib.source_record('llamagen', checkpoint, weights=weights)
  return workdir_lib.write(config, params, workdir, source)
