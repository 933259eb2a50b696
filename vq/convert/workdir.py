"""A converted tokenizer written as a vq workdir: config.json, config.py, a checkpoint.

Usage sketch::

  config = workdir.tokenizer_config(workdir.load_base_config(), arch, image_size=256,
                                    l2_normalize=False, beta_on='codebook')
  summary = workdir.write(config, params, '/tmp/vqgan_f16', source={'format': 'taming'})

The workdir is what `run.py --config=... --workdir=...` leaves after training: the
resolved config as `config.json` and an orbax checkpoint of the full `TrainState` at step
0 (the converted weights; fresh optimizer and discriminator states), so every mode reads
it unchanged (`--mode=eval|reconstruct|encode|decode`, training resumes from it, and a
token prior trains on its tokens with `--config.prior.tokenizer_workdir`). A `config.py`
beside them returns that config for `run.py --config=DIR/config.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from vq.config import builders
from vq.config import loading
from vq.config import validation
from vq.convert import layout
from vq.runtime import checkpointing
from vq.runtime import loop
from vq.runtime import state as ts

# The training recipe a converted tokenizer fine-tunes with unless --base_config says
# otherwise: taming's ImageNet VQGAN (L1 + LPIPS + hinge PatchGAN, Adam 0.5/0.9).
DEFAULT_BASE_CONFIG = (pathlib.Path(__file__).resolve().parents[2] / 'experiments' /
                       'vqgan_imagenet256.py')

_CONFIG_PY = '''"""vq config of a tokenizer converted by `python -m vq.convert`: config.json beside it.

  python run.py --config={dir}/config.py --workdir={dir} --mode=reconstruct --dataset=... --out=...
"""

import json
import pathlib

import ml_collections


def _tuples(value):
  if isinstance(value, dict):
    return {{k: _tuples(v) for k, v in value.items()}}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(arg=None):
  if arg:
    raise ValueError(f'config.py of a converted tokenizer takes no argument; got {{arg!r}}.')
  text = (pathlib.Path(__file__).parent / 'config.json').read_text()
  return ml_collections.ConfigDict(_tuples(json.loads(text)))
'''


def load_base_config(path: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
  """The config file whose training recipe a converted tokenizer keeps (default taming's)."""
  return loading.load_config(path or DEFAULT_BASE_CONFIG)


def tokenizer_config(base: ml_collections.ConfigDict, arch: layout.Arch, *, image_size: int,
                     l2_normalize: bool, beta_on: str,
                     recipe: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`base` with the model and quantizer fields of `arch` (and `recipe` overrides).

  Datasets of other image sizes are resized (`data.resize`). The network computes in float32 (the source's precision; `--config.model.dtype=bfloat16`
  trades exactness for speed). The codebook is learned by gradient (`quantizer.kind='vq'`),
  `quantizer.code_dim` is the encoder's z_channels and `quantizer.lookup_dim` the codebook
  vector size, so the source's quant_conv/post_quant_conv are the lookup projections.
  """
  c = ml_collections.ConfigDict(base.to_dict())
  levels = len(arch.ch_mult)
  if image_size % 2 ** (levels - 1):
    raise ValueError(f'--image_size={image_size} is not divisible by the encoder\'s '
                     f'downsampling factor {2 ** (levels - 1)}; use a multiple of it.')
  fields = {
      'data.image_size': image_size, 'data.resize': True,
      'model.arch': 'taming', 'model.dtype': 'float32', 'model.ch': arch.ch,
      'model.ch_mult': tuple(arch.ch_mult), 'model.num_res_blocks': arch.num_res_blocks,
      'model.attn_resolutions': arch.attn_resolutions(image_size),
      'quantizer.kind': 'vq', 'quantizer.num_codes': arch.num_codes,
      'quantizer.code_dim': arch.z_channels, 'quantizer.lookup_dim': arch.embed_dim,
      'quantizer.l2_normalize': l2_normalize, 'quantizer.beta': 0.25,
      'quantizer.beta_on': beta_on, 'quantizer.init': 'random', 'quantizer.restart_after': 0,
      'quantizer.gradient': 'ste', 'quantizer.entropy_weight': 0.0,
      'train.ema_decay': 0.0,
      **(recipe or {}),
  }
  for dotted, value in fields.items():
    node = c
    *parents, leaf = dotted.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  c.lock()
  return c


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def source_record(fmt: str, checkpoint: str | os.PathLike, **extra: Any) -> dict[str, Any]:
  """What the checkpoint meta records about the converted file."""
  path = pathlib.Path(checkpoint)
  return {'format': fmt, 'file': path.name, 'sha256': _sha256(path), **extra}


def write(config: ml_collections.ConfigDict, params: Mapping[str, Any],
          workdir: str | os.PathLike, source: Mapping[str, Any]) -> dict[str, Any]:
  """Writes `params` under `config` as a vq workdir (checkpoint step 0).

  Args:
    config: the converted tokenizer's config (`tokenizer_config`).
    params: its params tree (`layout.Plan.build`).
    workdir: an empty or new directory.
    source: a record of the converted file, kept in the checkpoint's meta.

  Returns:
    A summary: workdir, image_size, token_grid, num_codes, num_parameters.

  Raises:
    ValueError: the config is invalid, the workdir already holds checkpoints, or the
      params do not fit the model the config builds.
  """
  validation.validate(config, num_devices=1)
  path = loop.prepare_workdir(workdir)
  ckpt_dir = path / 'checkpoints'
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise ValueError(f'--workdir={str(workdir)!r} already holds checkpoints; convert into an '
                     'empty or new directory.')
  size = config.data.image_size
  model = builders.build_tokenizer(config)
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  expected = jax.eval_shape(model.init, jax.random.key(0), dummy)
  if set(expected) != {'params'}:
    raise ValueError(f'the converted model has variables {sorted(expected)}; only a '
                     "quantizer learned by gradient (kind 'vq') can be converted into.")
  layout.check_params(params, expected['params'])
  state = ts.create_train_state(
      config, ts.init_key(config.seed), (size, size, 3),
      lpips_params={} if ts.uses_lpips(config) else None,  # frozen: never checkpointed
      variables={'params': jax.tree.map(jnp.asarray, dict(params))})
  loop.write_config(config, path)
  (path / 'config.py').write_text(_CONFIG_PY.format(dir=path))
  config_json = json.loads(config.to_json_best_effort())
  ckpt = checkpointing.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints)
  try:
    ckpt.save(0, state, meta={'config': config_json, 'objective': config.objective,
                              'converted_from': dict(source)}, force=True)
  finally:
    ckpt.close()
  grid = size // 2 ** (len(config.model.ch_mult) - 1)
  return {'workdir': str(path), 'image_size': size, 'token_grid': [grid, grid],
          'num_codes': config.quantizer.num_codes,
          'num_parameters': int(sum(x.size for x in jax.tree.leaves(params)))}
