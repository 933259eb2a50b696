"""The taming-style tokenizer's tensors, named the torch way and the vq way.

Usage sketch::

  arch = layout.Arch(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,),
                     z_channels=256, embed_dim=256, num_codes=1024)
  plan = layout.plan(arch, layout.TAMING)           # or layout.LLAMAGEN
  layout.check_state_dict(state_dict, plan, ignored=('loss.',), source='last.ckpt', hint='...')
  params = plan.build(state_dict)                   # vq's params tree, float32 numpy

taming-transformers' `Encoder`/`Decoder` (taming/modules/diffusionmodules/model.py) and
LlamaGen's (tokenizer/tokenizer_image/vq_model.py) are the same network as
`vq.models.nets.TamingEncoder`/`TamingDecoder` under other module names: GroupNorm(32,
eps 1e-6) + swish ResNet blocks, a 1x1 `nin_shortcut` where channels change, stride-2 3x3
downsampling after (0, 1) zero padding, nearest x2 upsampling then a 3x3 conv, single-head
attention with separate q, k, v 1x1 convs (vq: one `qkv` Dense). Their 1x1 `quant_conv`
(z_channels -> codebook dim) and `post_quant_conv` (back) are the quantizer's `lookup_in`
and `lookup_out` projections in vq (`quantizer.lookup_dim`), so tokens and codes are looked
up in the same space as in the source. What differs between the two sources is only the
names: taming indexes decoder levels by level, LlamaGen by their order of use (the lowest
resolution first), and LlamaGen puts attention in the blocks of the lowest level only.

Conversions: conv weights OIHW -> HWIO (no flip: both frameworks cross-correlate); 1x1
convs used as dense layers -> [in, out] kernels; GroupNorm weight/bias -> scale/bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from flax import traverse_util
import numpy as np


@dataclasses.dataclass(frozen=True)
class Arch:
  """What a converted tokenizer's shapes depend on.

  Attributes:
    ch: base channels.
    ch_mult: channel multiplier per level; level 0 runs at the input resolution.
    num_res_blocks: ResNet blocks per encoder level (the decoder has one more).
    attn_levels: levels whose blocks are followed by self-attention (the middle block
      always has it).
    z_channels: encoder output / decoder input channels (vq: quantizer.code_dim).
    embed_dim: codebook vector size (vq: quantizer.lookup_dim).
    num_codes: codebook size.
  """
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_levels: tuple[int, ...]
  z_channels: int
  embed_dim: int
  num_codes: int

  def attn_resolutions(self, image_size: int) -> tuple[int, ...]:
    """vq's `model.attn_resolutions` (feature-map sizes) for images of `image_size`."""
    return tuple(image_size // 2 ** level for level in self.attn_levels)


@dataclasses.dataclass(frozen=True)
class Names:
  """torch module paths; fields are formatted with level, rlevel (levels - 1 - level), i."""
  enc_block: str
  enc_attn: str
  enc_down: str
  enc_mid: tuple[str, str, str]
  dec_block: str
  dec_attn: str
  dec_up: str
  dec_mid: tuple[str, str, str]


TAMING = Names(
    enc_block='encoder.down.{level}.block.{i}', enc_attn='encoder.down.{level}.attn.{i}',
    enc_down='encoder.down.{level}.downsample.conv',
    enc_mid=('encoder.mid.block_1', 'encoder.mid.attn_1', 'encoder.mid.block_2'),
    dec_block='decoder.up.{level}.block.{i}', dec_attn='decoder.up.{level}.attn.{i}',
    dec_up='decoder.up.{level}.upsample.conv',
    dec_mid=('decoder.mid.block_1', 'decoder.mid.attn_1', 'decoder.mid.block_2'))

LLAMAGEN = Names(
    enc_block='encoder.conv_blocks.{level}.res.{i}',
    enc_attn='encoder.conv_blocks.{level}.attn.{i}',
    enc_down='encoder.conv_blocks.{level}.downsample.conv',
    enc_mid=('encoder.mid.0', 'encoder.mid.1', 'encoder.mid.2'),
    dec_block='decoder.conv_blocks.{rlevel}.res.{i}',
    dec_attn='decoder.conv_blocks.{rlevel}.attn.{i}',
    dec_up='decoder.conv_blocks.{rlevel}.upsample.conv',
    dec_mid=('decoder.mid.0', 'decoder.mid.1', 'decoder.mid.2'))


def _f32(x: Any) -> np.ndarray:
  return np.asarray(x, np.float32)


def _dense_kernel(w: Any) -> np.ndarray:
  """A 1x1 conv weight [out, in, 1, 1] as a Dense kernel [in, out]."""
  return _f32(w)[:, :, 0, 0].T


class Plan:
  """Expected torch tensors (name -> shape) and how each vq parameter is made from them."""

  def __init__(self):
    self.expected: dict[str, tuple[int, ...]] = {}
    self._make: list[tuple[tuple[str, ...], Callable[[Mapping[str, Any]], np.ndarray]]] = []

  def _expect(self, key: str, shape: tuple[int, ...]) -> None:
    if key in self.expected:
      raise AssertionError(f'{key} planned twice')
    self.expected[key] = shape

  def conv(self, path: tuple[str, ...], key: str, cin: int, cout: int, k: int) -> None:
    self._expect(f'{key}.weight', (cout, cin, k, k))
    self._expect(f'{key}.bias', (cout,))
    self._make.append((path + ('kernel',),
                       lambda sd: np.transpose(_f32(sd[f'{key}.weight']), (2, 3, 1, 0))))
    self._make.append((path + ('bias',), lambda sd: _f32(sd[f'{key}.bias'])))

  def dense_1x1(self, path: tuple[str, ...], key: str, cin: int, cout: int) -> None:
    self._expect(f'{key}.weight', (cout, cin, 1, 1))
    self._expect(f'{key}.bias', (cout,))
    self._make.append((path + ('kernel',), lambda sd: _dense_kernel(sd[f'{key}.weight'])))
    self._make.append((path + ('bias',), lambda sd: _f32(sd[f'{key}.bias'])))

  def norm(self, path: tuple[str, ...], key: str, c: int) -> None:
    self._expect(f'{key}.weight', (c,))
    self._expect(f'{key}.bias', (c,))
    self._make.append((path + ('scale',), lambda sd: _f32(sd[f'{key}.weight'])))
    self._make.append((path + ('bias',), lambda sd: _f32(sd[f'{key}.bias'])))

  def resnet_block(self, path: tuple[str, ...], key: str, cin: int, cout: int) -> None:
    self.norm(path + ('norm1',), f'{key}.norm1', cin)
    self.conv(path + ('conv1',), f'{key}.conv1', cin, cout, 3)
    self.norm(path + ('norm2',), f'{key}.norm2', cout)
    self.conv(path + ('conv2',), f'{key}.conv2', cout, cout, 3)
    if cin != cout:
      self.conv(path + ('nin_shortcut',), f'{key}.nin_shortcut', cin, cout, 1)

  def attention(self, path: tuple[str, ...], key: str, c: int) -> None:
    self.norm(path + ('norm',), f'{key}.norm', c)
    for name in ('q', 'k', 'v', 'proj_out'):
      self._expect(f'{key}.{name}.weight', (c, c, 1, 1))
      self._expect(f'{key}.{name}.bias', (c,))
    # vq projects q, k and v with one Dense of 3c outputs, in that order.
    self._make.append((path + ('qkv', 'kernel'), lambda sd: np.concatenate(
        [_dense_kernel(sd[f'{key}.{n}.weight']) for n in 'qkv'], axis=1)))
    self._make.append((path + ('qkv', 'bias'), lambda sd: np.concatenate(
        [_f32(sd[f'{key}.{n}.bias']) for n in 'qkv'])))
    self._make.append((path + ('proj_out', 'kernel'),
                       lambda sd: _dense_kernel(sd[f'{key}.proj_out.weight'])))
    self._make.append((path + ('proj_out', 'bias'), lambda sd: _f32(sd[f'{key}.proj_out.bias'])))

  def tensor(self, path: tuple[str, ...], key: str, shape: tuple[int, ...]) -> None:
    self._expect(key, shape)
    self._make.append((path, lambda sd: _f32(sd[key])))

  def build(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """vq's params tree from a state dict that passed `check_state_dict`."""
    flat = {path: make(state_dict) for path, make in self._make}
    return traverse_util.unflatten_dict(flat)


def plan(arch: Arch, names: Names) -> Plan:
  """Every tensor of the tokenizer `arch`, in the order vq's nets create them."""
  p = Plan()
  levels = len(arch.ch_mult)
  fmt = lambda s, level=0, i=0: s.format(level=level, rlevel=levels - 1 - level, i=i)

  def mid(module: str, keys: tuple[str, str, str], c: int) -> None:
    p.resnet_block((module, 'mid_block1'), keys[0], c, c)
    p.attention((module, 'mid_attn'), keys[1], c)
    p.resnet_block((module, 'mid_block2'), keys[2], c, c)

  # Encoder (nets.TamingEncoder).
  p.conv(('encoder', 'conv_in'), 'encoder.conv_in', 3, arch.ch, 3)
  c = arch.ch
  for level, mult in enumerate(arch.ch_mult):
    for i in range(arch.num_res_blocks):
      p.resnet_block(('encoder', f'down{level}_block{i}'), fmt(names.enc_block, level, i), c,
                     arch.ch * mult)
      c = arch.ch * mult
      if level in arch.attn_levels:
        p.attention(('encoder', f'down{level}_attn{i}'), fmt(names.enc_attn, level, i), c)
    if level != levels - 1:
      p.conv(('encoder', f'down{level}_downsample', 'conv'), fmt(names.enc_down, level), c, c, 3)
  mid('encoder', names.enc_mid, c)
  p.norm(('encoder', 'norm_out'), 'encoder.norm_out', c)
  p.conv(('encoder', 'conv_out'), 'encoder.conv_out', c, arch.z_channels, 3)

  # Quantizer: codebook and the 1x1 projections around the lookup.
  p.tensor(('quantizer', 'codebook'), 'quantize.embedding.weight',
           (arch.num_codes, arch.embed_dim))
  p.dense_1x1(('quantizer', 'lookup_in'), 'quant_conv', arch.z_channels, arch.embed_dim)
  p.dense_1x1(('quantizer', 'lookup_out'), 'post_quant_conv', arch.embed_dim, arch.z_channels)

  # Decoder (nets.TamingDecoder).
  c = arch.ch * arch.ch_mult[-1]
  p.conv(('decoder', 'conv_in'), 'decoder.conv_in', arch.z_channels, c, 3)
  mid('decoder', names.dec_mid, c)
  for level in reversed(range(levels)):
    for i in range(arch.num_res_blocks + 1):
      p.resnet_block(('decoder', f'up{level}_block{i}'), fmt(names.dec_block, level, i), c,
                     arch.ch * arch.ch_mult[level])
      c = arch.ch * arch.ch_mult[level]
      if level in arch.attn_levels:
        p.attention(('decoder', f'up{level}_attn{i}'), fmt(names.dec_attn, level, i), c)
    if level != 0:
      p.conv(('decoder', f'up{level}_upsample', 'conv'), fmt(names.dec_up, level), c, c, 3)
  p.norm(('decoder', 'norm_out'), 'decoder.norm_out', c)
  p.conv(('decoder', 'conv_out'), 'decoder.conv_out', c, 3, 3)
  return p


def _listing(items: Sequence[str], limit: int = 8) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f' (+{len(items) - limit} more)' if len(items) > limit else '')


def check_state_dict(state_dict: Mapping[str, Any], the_plan: Plan, *,
                     ignored: Sequence[str], source: str, hint: str) -> None:
  """Raises one ValueError naming every missing, unexpected and mis-shaped tensor.

  Args:
    state_dict: torch parameter names -> arrays (anything with a `.shape`).
    the_plan: the tensors the architecture needs.
    ignored: name prefixes that are known and deliberately not converted (a training
      loss's modules, usage buffers).
    source: what the state dict came from, for the message.
    hint: how to fix a mismatch, for the message.
  """
  expected = the_plan.expected
  given = {k: v for k, v in state_dict.items() if not k.startswith(tuple(ignored))}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  misshaped = sorted(f'{k} {tuple(np.shape(given[k]))} (expected {expected[k]})'
                     for k in set(expected) & set(given)
                     if tuple(np.shape(given[k])) != expected[k])
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing: {_listing(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected: {_listing(unexpected)}')
  if misshaped:
    problems.append(f'{len(misshaped)} mis-shaped: {_listing(misshaped)}')
  if problems:
    raise ValueError(f'{source} does not hold the tensors of the architecture it describes: '
                     f'{"; ".join(problems)}. {hint}')


def check_params(params: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raises if a converted params tree differs in names or shapes from `model.init`'s."""
  got = {'/'.join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
  want = {'/'.join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
  diff = sorted(set(got) ^ set(want)) + sorted(k for k in set(got) & set(want)
                                               if got[k] != want[k])
  if diff:
    raise ValueError(f'the converted parameters do not fit the vq model built from the '
                     f'converted config ({_listing(diff)}); this is a converter bug, please '
                     'report it with the source config.')
