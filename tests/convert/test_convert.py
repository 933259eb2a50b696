"""taming and LlamaGen checkpoints converted into vq workdirs compute what PyTorch computed.

The oracle is tests/convert/fixtures/{taming,llamagen}.npz, written by
tools/make_convert_fixtures.py with the PyTorch code itself (taming-transformers'
VQModel, LlamaGen's vq_model.py): the checkpoint file's bytes, test images and the
encoder outputs, tokens and reconstructions PyTorch computed on them. Each test converts
the real file format through `python -m vq.convert`'s entry point.
"""

import functools
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq import inference
from vq.config import builders
from vq.config import loading
from vq.convert import __main__ as cli
from vq.convert import layout
from vq.convert import llamagen
from vq.convert import taming
from vq.convert import torch_reader
from vq.convert import workdir as workdir_lib
from vq.core import metrics
from vq.generation import tokens as token_data
from vq.runtime import checkpointing
from vq.runtime import state as ts

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
REPO = pathlib.Path(__file__).resolve().parents[2]
# A recipe whose discriminator fits the fixtures' 16x16 images.
BASE = f'{REPO / "experiments" / "vqgan_cifar.py"}:smoke'
FORMATS = ('taming', 'llamagen')
ATOL = 1e-4


def _fixture(name):
  with np.load(FIXTURES / f'{name}.npz', allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _write_inputs(name, fix, root):
  """The checkpoint (and model.yaml) as a user has them on disk; the CLI arguments."""
  if name == 'taming':
    (root / 'last.ckpt').write_bytes(fix['checkpoint'].tobytes())
    (root / 'model.yaml').write_text(str(fix['model_yaml']))
    return ['taming', f'--checkpoint={root / "last.ckpt"}', f'--config={root / "model.yaml"}']
  (root / 'vq_ds16_c2i.pt').write_bytes(fix['checkpoint'].tobytes())
  return ['llamagen', f'--checkpoint={root / "vq_ds16_c2i.pt"}', '--image_size=16']


def _state_dict(name, root):
  path = root / ('last.ckpt' if name == 'taming' else 'vq_ds16_c2i.pt')
  tree = torch_reader.read_checkpoint(path)
  sd = torch_reader.pick_state_dict(tree, ('state_dict' if name == 'taming' else 'model',),
                                    str(path))
  return {k: np.asarray(v) for k, v in sd.items()}


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  out = {}
  for name in FORMATS:
    root = tmp_path_factory.mktemp(name)
    fix = _fixture(name)
    args = _write_inputs(name, fix, root)
    summary = cli.main(args + [f'--workdir={root / "wd"}', f'--base_config={BASE}'])
    config = token_data.tokenizer_config(root / 'wd')
    tok = inference.Tokenizer.from_workdir(config, root / 'wd')
    out[name] = dict(fix=fix, root=root, workdir=root / 'wd', summary=summary, config=config,
                     tok=tok)
  return out


@pytest.mark.parametrize('name', FORMATS)
def test_tokens_and_outputs_match_pytorch(converted, name):
  c = converted[name]
  fix, tok = c['fix'], c['tok']
  np.testing.assert_array_equal(tok.encode(fix['images']), fix['tokens'])
  model = builders.build_tokenizer(c['config'])

  def outputs(m, x, tokens):
    recon, q = m(x)
    return m.encoder(x), recon, q.indices, m.detokenize(tokens)

  x = fix['images'].astype(np.float32) / np.float32(127.5) - np.float32(1)
  z, recon, indices, decoded = jax.jit(functools.partial(model.apply, method=outputs))(
      tok._variables, x, jnp.asarray(fix['tokens']))  # pylint: disable=protected-access
  np.testing.assert_allclose(z, fix['z'], rtol=0, atol=ATOL)
  np.testing.assert_array_equal(indices, fix['tokens'])
  np.testing.assert_allclose(recon, fix['recon'], rtol=0, atol=ATOL)
  np.testing.assert_allclose(decoded, fix['decoded'], rtol=0, atol=ATOL)
  # uint8 round trips: at most one level off where PyTorch's value sits on a rounding edge.
  for got, want in ((tok.reconstruct(fix['images']), fix['recon']),
                    (tok.decode(fix['tokens']), fix['decoded'])):
    pixels = np.asarray(metrics.to_pixel_range(jnp.asarray(want)))
    assert np.max(np.abs(got.astype(np.int32) - pixels)) <= 1


@pytest.mark.parametrize('name', FORMATS)
def test_workdir_config_and_meta(converted, name):
  c = converted[name]
  saved = json.loads((c['workdir'] / 'config.json').read_text())
  q, m = saved['quantizer'], saved['model']
  assert (m['arch'], m['ch'], m['ch_mult'], m['num_res_blocks'], m['dtype']) == (
      'taming', 32, [1, 2], 1, 'float32')
  # taming's yaml puts attention at 16 (level 0); LlamaGen at its lowest level (8 here).
  assert m['attn_resolutions'] == ([16] if name == 'taming' else [8])
  assert (q['kind'], q['num_codes'], q['code_dim']) == ('vq', 64, 32)
  assert (q['lookup_dim'], q['l2_normalize'], q['beta_on']) == (
      (16, False, 'codebook') if name == 'taming' else (8, True, 'commitment'))
  assert c['summary']['token_grid'] == [8, 8]
  # run.py --config=DIR/config.py reads the same config.
  loaded = loading.load_config(c['workdir'] / 'config.py')
  assert json.loads(loaded.to_json_best_effort()) == saved
  ckpt = checkpointing.Checkpointer(c['workdir'] / 'checkpoints')
  try:
    meta = ckpt.read_meta(0)
  finally:
    ckpt.close()
  source = meta['converted_from']
  path = c['root'] / ('last.ckpt' if name == 'taming' else 'vq_ds16_c2i.pt')
  assert source['format'] == name and source['file'] == path.name
  assert source['sha256'] == workdir_lib.source_record(name, path)['sha256']
  assert meta['config'] == saved


def test_modes_prior_and_resume_work_on_the_converted_workdir(converted, tmp_path):
  c = converted['taming']
  tok, fix = c['tok'], c['fix']
  npz = tmp_path / 'images.npz'
  np.savez(npz, images=fix['images'], labels=np.arange(4))
  # --mode=encode, --mode=decode, --mode=reconstruct, through what run.py calls.
  record = inference.encode_dataset(tok, f'npz:{npz}', tmp_path / 'tokens.npz')
  assert record['checkpoint_step'] == 0
  with np.load(tmp_path / 'tokens.npz') as f:
    np.testing.assert_array_equal(f['tokens'], fix['tokens'])
  paths = inference.decode_file(tok, tmp_path / 'tokens.npz', tmp_path / 'decoded')
  assert len(paths) == 4
  psnr = inference.reconstruct_dataset(tok, f'npz:{npz}', tmp_path / 'recon', max_images=4)
  assert psnr['num_images'] == 4
  # A token prior loads it as its tokenizer (--config.prior.tokenizer_workdir=DIR).
  prior_tok = token_data.load_tokenizer(c['workdir'])
  assert (prior_tok.step, prior_tok.config_hash) == (0, tok.config_hash)
  # Training resumes from it: the trainer's restore (with its compatibility check) takes
  # the full state, discriminator and optimizer included, at step 0.
  config = c['config']
  size = config.data.image_size
  fresh = jax.eval_shape(lambda: ts.create_train_state(config, ts.init_key(1),
                                                       (size, size, 3), lpips_params={}))
  ckpt = checkpointing.Checkpointer(c['workdir'] / 'checkpoints')
  try:
    state, step = ckpt.restore_or_init(fresh, json.loads(config.to_json_best_effort()))
  finally:
    ckpt.close()
  assert step == 0 and state.disc_params and state.opt_state
  chex.assert_trees_all_equal(state.params, tok._variables['params'])  # pylint: disable=protected-access


def test_second_conversion_into_the_same_workdir_is_refused(converted):
  c = converted['llamagen']
  args = _write_inputs('llamagen', c['fix'], c['root'])
  with pytest.raises(SystemExit) as info:
    cli.main(args + [f'--workdir={c["workdir"]}', f'--base_config={BASE}'])
  assert info.value.code == 2


@pytest.mark.parametrize('name', FORMATS)
def test_strict_keys_list_missing_unexpected_and_misshaped_in_one_message(converted, name):
  sd = _state_dict(name, converted[name]['root'])
  if name == 'taming':
    arch, _ = taming.arch_from_yaml(taming.read_yaml(converted[name]['root'] / 'model.yaml'),
                                    'model.yaml')
    convert = taming.convert_state_dict
    drop, extra, bend = 'decoder.up.1.upsample.conv.bias', 'encoder.extra.weight', 'quant_conv.weight'
  else:
    arch = llamagen.arch_from_state_dict(sd, 'vq.pt')
    convert = llamagen.convert_state_dict
    drop, extra, bend = 'decoder.conv_blocks.0.upsample.conv.bias', 'encoder.extra.weight', 'quant_conv.weight'
  assert convert(sd, arch, 'ok')['quantizer']['codebook'].shape == (64, arch.embed_dim)
  if name == 'taming':  # a taming file given to the llamagen command
    with pytest.raises(ValueError, match=r'no encoder\.conv_blocks.*LlamaGen VQ'):
      llamagen.arch_from_state_dict(sd, 'last.ckpt')
  sd.pop(drop)
  sd[extra] = np.zeros(3, np.float32)
  sd[bend] = sd[bend][:, :-1]
  with pytest.raises(ValueError) as info:
    convert(sd, arch, 'ckpt')
  message = str(info.value)
  assert '\n' not in message
  assert f'1 missing: {drop}' in message
  assert f'1 unexpected: {extra}' in message
  assert f'1 mis-shaped: {bend} {sd[bend].shape} (expected' in message


def test_taming_refuses_what_it_cannot_convert_exactly():
  good = {'model': {'target': 'taming.models.vqgan.VQModel', 'params': {
      'embed_dim': 4, 'n_embed': 8, 'ddconfig': {
          'double_z': False, 'z_channels': 4, 'resolution': 32, 'ch': 32, 'ch_mult': [1, 2],
          'num_res_blocks': 1, 'attn_resolutions': [16]}}}}
  arch, resolution = taming.arch_from_yaml(good, 'model.yaml')
  assert (arch.attn_levels, resolution) == ((1,), 32)
  cases = {
      'taming.models.vqgan.GumbelVQ': ('target', r"model.target is 'taming.models.vqgan.GumbelVQ'"),
      'double_z': (('ddconfig', 'double_z', True), r'double_z is True'),
      'remap': (('remap', 'indices.npy'), r"remap is 'indices.npy'"),
      'attn_none': (('ddconfig', 'attn_type', 'none'), r"attn_type is 'none'"),
  }
  for value, (where, pattern) in cases.items():
    bad = json.loads(json.dumps(good))
    if where == 'target':
      bad['model']['target'] = value
    elif where[0] == 'ddconfig':
      bad['model']['params']['ddconfig'][where[1]] = where[2]
    else:
      bad['model']['params'][where[0]] = where[1]
    with pytest.raises(ValueError, match=pattern) as info:
      taming.arch_from_yaml(bad, 'model.yaml')
    assert '\n' not in str(info.value)


def test_image_size_keeps_attention_levels_and_default_recipes_validate():
  arch = layout.Arch(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,),
                     z_channels=256, embed_dim=8, num_codes=16384)
  base = workdir_lib.load_base_config()
  for size, attn in ((256, (16,)), (384, (24,))):
    config = workdir_lib.tokenizer_config(base, arch, image_size=size, l2_normalize=True,
                                          beta_on='commitment', recipe=llamagen.RECIPE)
    assert tuple(config.model.attn_resolutions) == attn
    assert (config.train.b2, config.loss.recon) == (0.95, 'l2')
    from vq.config import validation  # pylint: disable=g-import-not-at-top
    validation.validate(config, num_devices=1)
  with pytest.raises(ValueError, match=r'--image_size=200 is not divisible .* 16'):
    workdir_lib.tokenizer_config(base, arch, image_size=200, l2_normalize=True,
                                 beta_on='commitment')
