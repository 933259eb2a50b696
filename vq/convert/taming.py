"""taming-transformers VQGAN checkpoints (and latent-diffusion's VQ autoencoders) -> vq.

Usage sketch::

  from vq.convert import taming
  summary = taming.convert_files('/tmp/last.ckpt', '/tmp/model.yaml', '/tmp/vqgan_f16')

  # Or from arrays already in memory (names as in the Lightning 'state_dict'):
  arch, resolution = taming.arch_from_yaml(yaml_dict, 'model.yaml')
  params = taming.convert_state_dict(state_dict, arch, 'last.ckpt')

Supported: `taming.models.vqgan.VQModel` (VQGAN ImageNet f16 with 1024 or 16384 codes,
and every other VQModel trained with taming's code) and `ldm.models.autoencoder.VQModel`
(and its VQModelInterface: latent-diffusion's vq-f4/f8/f16 autoencoders, including the OpenImages f8 VQGANs taming's
README lists), whose Encoder, Decoder and VectorQuantizer2 are taming's line for line when
`attn_type` is 'vanilla'. Not supported, with a message: Gumbel and EMA quantizers,
index remapping (`remap`), `double_z`, `attn_type` other than 'vanilla', `tanh_out`,
resampling without convs.

What taming computes differently from vq's defaults, and how the conversion keeps
taming's function:
- the lookup happens after a 1x1 `quant_conv` (z_channels -> embed_dim) and the decoder
  starts with a 1x1 `post_quant_conv`: vq's `quantizer.lookup_dim = embed_dim` projections;
- `VectorQuantizer2(legacy=True)`, what `VQModel` builds, weighs the codebook term by beta
  and the commitment term by 1 (vq: the other way round): `quantizer.beta_on='codebook'`;
  this only changes training (fine-tuning), not tokens or reconstructions;
- attention is placed by feature-map size relative to the yaml's `resolution`; converting
  for another `--image_size` keeps attention at the same levels.
Downsampling (pad (0, 1) then a stride-2 3x3 conv), nearest-neighbour upsampling and the
attention are those of `vq.models.nets` already. The state dict's `loss.*` tensors (LPIPS and
a BatchNorm PatchGAN) are not converted: vq brings its own LPIPS, and fine-tuning starts a
fresh GroupNorm discriminator. Dropout (used only in training) is not converted.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import yaml

from vq.convert import layout
from vq.convert import torch_reader
from vq.convert import workdir as workdir_lib

TARGETS = ('taming.models.vqgan.VQModel', 'ldm.models.autoencoder.VQModel',
           'ldm.models.autoencoder.VQModelInterface')
# State-dict prefixes that are known and not converted: the training loss's modules
# (LPIPS VGG, discriminator) and latent-diffusion's EMA copy (use_ema).
IGNORED = ('loss.', 'model_ema.')
_HINT = ('Pass the checkpoint together with the model.yaml it was trained with (the '
         'configs/*-project.yaml of its log directory).')


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
  """The yaml file as plain data (yaml.safe_load: no Python objects are built)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No model config at {path}; pass the model.yaml of the '
                            'checkpoint (configs/*-project.yaml in its log directory).')
  try:
    data = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise ValueError(f'{path} is not valid YAML ({str(e).splitlines()[0]}); pass the '
                     'model.yaml of the checkpoint.') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path} holds a {type(data).__name__}, not a yaml mapping; pass the '
                     'model.yaml of the checkpoint.')
  return data


def _refuse(source: str, what: str, fix: str) -> None:
  raise ValueError(f'{source}: {what}; {fix}.')


def arch_from_yaml(config: Mapping[str, Any], source: str) -> tuple[layout.Arch, int]:
  """The architecture and training resolution a taming model.yaml describes."""
  model = config.get('model', config)
  target = model.get('target') if isinstance(model, Mapping) else None
  if target not in TARGETS:
    _refuse(source, f'model.target is {target!r}', f'vq converts {", ".join(TARGETS)} '
            '(GumbelVQ, EMAVQ and other first stages are not supported)')
  params = model.get('params') or {}
  dd = params.get('ddconfig') or {}
  required = ('ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'resolution',
              'z_channels')
  absent = [k for k in required if k not in dd] + [
      k for k in ('n_embed', 'embed_dim') if k not in params]
  if absent:
    _refuse(source, f'model.params lacks {absent}', 'pass the complete model.yaml')
  checks = [
      (dd.get('double_z', True) is False, f'ddconfig.double_z is {dd.get("double_z", True)!r}',
       'a VQ model has double_z: false'),
      (dd.get('in_channels', 3) == 3 and dd.get('out_ch', 3) == 3,
       f'in_channels/out_ch are {dd.get("in_channels")}/{dd.get("out_ch")}',
       'vq tokenizes RGB images (3 channels)'),
      (dd.get('resamp_with_conv', True) is True, 'ddconfig.resamp_with_conv is false',
       'vq resamples with convs only'),
      (dd.get('attn_type', 'vanilla') == 'vanilla' and not dd.get('use_linear_attn', False),
       f'ddconfig.attn_type is {dd.get("attn_type")!r} (linear or no attention)',
       "vq's middle block always has vanilla attention"),
      (not dd.get('tanh_out', False), 'ddconfig.tanh_out is true', 'vq has no tanh output'),
      (not dd.get('give_pre_end', False), 'ddconfig.give_pre_end is true',
       'the decoder must end in conv_out'),
      (params.get('remap') is None, f'model.params.remap is {params.get("remap")!r}',
       'remapped indices are not supported; convert a model trained without remap'),
  ]
  for ok, what, fix in checks:
    if not ok:
      _refuse(source, what, fix)
  try:
    ch_mult = tuple(int(m) for m in dd['ch_mult'])
    resolution = int(dd['resolution'])
    attn = {int(r) for r in dd['attn_resolutions'] or ()}
    arch = layout.Arch(
        ch=int(dd['ch']), ch_mult=ch_mult, num_res_blocks=int(dd['num_res_blocks']),
        attn_levels=tuple(l for l in range(len(ch_mult)) if resolution // 2 ** l in attn),
        z_channels=int(dd['z_channels']), embed_dim=int(params['embed_dim']),
        num_codes=int(params['n_embed']))
  except (TypeError, ValueError) as e:
    _refuse(source, f'a model size is not an integer (or list of integers): {e}',
            'pass the model.yaml the checkpoint was trained with')
  return arch, resolution


def convert_state_dict(state_dict: Mapping[str, Any], arch: layout.Arch,
                       source: str) -> dict[str, Any]:
  """vq params from a taming VQModel state dict (strictly checked against `arch`)."""
  plan = layout.plan(arch, layout.TAMING)
  layout.check_state_dict(state_dict, plan, ignored=IGNORED, source=source, hint=_HINT)
  return plan.build(state_dict)


def convert_files(checkpoint: str | os.PathLike, config_yaml: str | os.PathLike,
                  workdir: str | os.PathLike, *, image_size: int | None = None,
                  reader: str = 'builtin', base_config: str | os.PathLike | None = None
                  ) -> dict[str, Any]:
  """`python -m vq.convert taming`: a Lightning .ckpt and its model.yaml -> a vq workdir.

  Args:
    checkpoint: the .ckpt (a dict with 'state_dict', or a bare state dict).
    config_yaml: the model.yaml it was trained with.
    workdir: where to write the vq workdir (new or empty).
    image_size: the image side the converted model takes (default: the yaml's
      `resolution`); attention stays at the same levels.
    reader: `torch_reader.read_checkpoint`'s reader.
    base_config: the vq config file whose training recipe is kept (default
      experiments/vqgan_imagenet256.py, taming's ImageNet recipe).

  Returns:
    `workdir.write`'s summary.
  """
  yaml_dict = read_yaml(config_yaml)
  arch, resolution = arch_from_yaml(yaml_dict, str(config_yaml))
  tree = torch_reader.read_checkpoint(checkpoint, reader)
  state_dict = torch_reader.pick_state_dict(tree, ('state_dict',), str(checkpoint))
  params = convert_state_dict(state_dict, arch, str(checkpoint))
  config = workdir_lib.tokenizer_config(
      workdir_lib.load_base_config(base_config), arch, image_size=image_size or resolution,
      l2_normalize=False, beta_on='codebook')
  source = workdir_lib.source_record('taming', checkpoint,
                                     config_file=pathlib.Path(config_yaml).name,
                                     target=yaml_dict.get('model', yaml_dict).get('target'))
  return workdir_lib.write(config, params, workdir, source)
