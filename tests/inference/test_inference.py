"""Tokenizer inference tests on a smoke model trained for one step by the real entry."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from experiments import vqvae_cifar
from vq.config import builders
from vq import inference
from vq.training import trainer

_N = 37  # not a multiple of any batch size used below


def _config(eval_npz):
  c = vqvae_cifar.get_config('smoke')
  c.train.num_steps = 1
  c.train.image_every = 0
  # Keeps EMA weights, which after one step differ from the raw ones (about 10% of the
  # tokens change), so the tests can tell which of the two inference used.
  c.train.ema_decay = 0.9
  c.eval.dataset = f'npz:{eval_npz}'
  c.eval.batch_size = 16  # at most the 37 eval images
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('inference')
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (_N, 32, 32, 3), dtype=np.uint8)
  labels = (np.arange(_N) % 10).astype(np.int64)
  npz = root / 'eval.npz'
  np.savez(npz, images=images, labels=labels)
  config = _config(npz)
  workdir = root / 'wd'
  trainer.train_and_evaluate(config, str(workdir))
  tok = inference.Tokenizer.from_workdir(config, str(workdir))
  return dict(config=config, workdir=workdir, images=images, labels=labels, npz=npz, tok=tok)


def _raw_checkpoint(workdir, step):
  """The saved state tree read by plain orbax, bypassing vq's Checkpointer and TrainState."""
  path = pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state'
  return ocp.StandardCheckpointer().restore(path)


def _png(path):
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def test_round_trip_equals_reconstruct_and_model_apply(trained):
  tok, images, config = trained['tok'], trained['images'], trained['config']
  tokens = tok.encode(images, batch_size=16)
  chex.assert_shape(tokens, (_N, 8, 8))
  assert tokens.dtype == np.int32 and tok.token_shape == (8, 8)
  decoded = tok.decode(tokens, batch_size=16)
  chex.assert_shape(decoded, (_N, 32, 32, 3))
  assert decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, tok.reconstruct(images, batch_size=16))

  # Oracle: the checkpoint restored by hand, one unpadded model.apply on all images (the
  # straight-through forward pass, not tokenize/detokenize), rounded to uint8 in numpy.
  state = _raw_checkpoint(trained['workdir'], 1)
  apply = jax.jit(builders.build_tokenizer(config).apply)
  x = images.astype(np.float32) / 127.5 - 1.0

  def oracle(params):
    recon, q = apply({'params': params, 'vq_stats': state['vq_stats']}, x)
    return np.asarray(q.indices), np.asarray(recon, np.float64)

  want_tokens, recon = oracle(state['ema_params'])
  np.testing.assert_array_equal(tokens, want_tokens)
  assert len(np.unique(tokens)) > 8  # many codes in use, not one collapsed code
  scaled = (recon + 1.0) * 127.5
  want = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
  assert len(np.unique(want)) > 10  # a reconstruction with texture, not a flat grey
  # Float round-off between batch shapes may only decide pixels sitting on a .5 boundary.
  on_boundary = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3
  np.testing.assert_array_equal(decoded[~on_boundary], want[~on_boundary])
  assert np.abs(decoded.astype(int) - want).max() <= 1
  # The EMA weights were used: the raw weights tokenize differently.
  assert not np.array_equal(tokens, oracle(state['params'])[0])

  # Any batch size (and the padded last batch) gives the same tokens.
  np.testing.assert_array_equal(tok.encode(images, batch_size=5), tokens)
  np.testing.assert_array_equal(tok.encode(images[:1])[0], tokens[0])
  chex.assert_shape(tok.encode(images[:0]), (0, 8, 8))


def test_from_workdir_metadata_and_errors(trained, tmp_path):
  tok, config = trained['tok'], trained['config']
  assert tok.step == 1 and tok.num_codes == config.quantizer.num_codes
  text = config.to_json_best_effort(sort_keys=True)
  assert tok.config_hash == hashlib.sha256(text.encode()).hexdigest()[:16]
  with pytest.raises(FileNotFoundError, match=r'step=7 .* \[1\]'):
    inference.Tokenizer.from_workdir(config, trained['workdir'], step=7)
  with pytest.raises(FileNotFoundError, match='train first'):
    inference.Tokenizer.from_workdir(config, str(tmp_path / 'empty'))
  other = _config(trained['npz'])
  other.quantizer.num_codes = 32
  with pytest.raises(ValueError, match=r'quantizer\.num_codes=32 \(trained with 64\)'):
    inference.Tokenizer.from_workdir(other, trained['workdir'])


def test_reconstruct_dataset_grid_and_psnr(trained, tmp_path):
  tok, images = trained['tok'], trained['images']
  record = inference.reconstruct_dataset(tok, f"npz:{trained['npz']}", tmp_path, max_images=10)
  recons = tok.reconstruct(images[:10])
  # Independent PSNR: float64 numpy on the uint8 pixels.
  mse = np.mean((images[:10].astype(np.float64) - recons) ** 2, axis=(1, 2, 3))
  psnr = 10 * np.log10(255.0 ** 2 / mse)
  np.testing.assert_allclose(record['psnr_per_image'], psnr, rtol=1e-5)
  np.testing.assert_allclose(record['psnr'], psnr.mean(), rtol=1e-5)
  assert record['num_images'] == 10 and record['step'] == 1
  assert json.loads((tmp_path / 'psnr.json').read_text()) == record

  # Grid layout: 2-px borders, 8 columns; lines are originals 0-7, reconstructions 0-7,
  # originals 8-9, reconstructions 8-9.
  grid = _png(tmp_path / 'reconstructions.png')
  chex.assert_shape(grid, (4 * 34 + 2, 8 * 34 + 2, 3))
  for i in range(10):
    chunk, col = divmod(i, 8)
    x0 = 2 + col * 34
    for line, want in ((2 * chunk, images[i]), (2 * chunk + 1, recons[i])):
      np.testing.assert_array_equal(grid[2 + line * 34:34 + line * 34, x0:x0 + 32], want)


def test_encode_dataset_and_decode_file_round_trip(trained, tmp_path):
  tok, images = trained['tok'], trained['images']
  out = tmp_path / 'sub' / 'tokens.npz'
  info = inference.encode_dataset(tok, f"npz:{trained['npz']}", out, batch_size=16)
  assert info['num_images'] == _N
  assert sorted(p.name for p in out.parent.iterdir()) == ['tokens.npz']  # no temp files left
  with np.load(out, allow_pickle=False) as f:
    np.testing.assert_array_equal(f['tokens'], tok.encode(images, batch_size=16))
    assert f['tokens'].dtype == np.int32
    np.testing.assert_array_equal(f['labels'], trained['labels'])
    assert str(f['config_hash']) == tok.config_hash
    assert int(f['checkpoint_step']) == 1
    assert int(f['num_codes']) == 64 and int(f['image_size']) == 32
    tokens = f['tokens']

  paths = inference.decode_file(tok, out, tmp_path / 'png', batch_size=16)
  assert [pathlib.Path(p).name for p in paths] == [f'image_{i:05d}.png' for i in range(_N)]
  decoded = np.stack([_png(p) for p in paths])
  np.testing.assert_array_equal(decoded, tok.decode(tokens, batch_size=16))
  np.testing.assert_array_equal(decoded, tok.reconstruct(images, batch_size=16))

  # Unlabeled datasets write no labels; max_images keeps the first images.
  npz = tmp_path / 'unlabeled.npz'
  np.savez(npz, images=images[:6])
  inference.encode_dataset(tok, f'npz:{npz}', tmp_path / 'u.npz', max_images=4)
  with np.load(tmp_path / 'u.npz', allow_pickle=False) as f:
    assert 'labels' not in f.files
    np.testing.assert_array_equal(f['tokens'], tok.encode(images[:4]))


def _one_line_error(exc_type, fn, *needles):
  with pytest.raises(exc_type) as e:
    fn()
  message = str(e.value)
  assert '\n' not in message, message
  for needle in needles:
    assert needle in message, message


def test_decode_file_rejects_tokens_of_another_model(trained, tmp_path):
  tok = trained['tok']
  tokens = np.zeros((2, 8, 8), np.int32)
  path = tmp_path / 'foreign.npz'
  np.savez(path, tokens=tokens, config_hash=np.array('0123456789abcdef'),
           checkpoint_step=np.array(1))
  _one_line_error(ValueError, lambda: inference.decode_file(tok, path, tmp_path / 'out'),
                  '0123456789abcdef', tok.config_hash, 'another model/config')
  np.savez(path, tokens=tokens, config_hash=np.array(tok.config_hash),
           checkpoint_step=np.array(5))
  _one_line_error(ValueError, lambda: inference.decode_file(tok, path, tmp_path / 'out'),
                  'step 5', 'step=5')
  assert not (tmp_path / 'out').exists()


def test_bad_inputs_raise_one_line_value_errors(trained):
  tok, images = trained['tok'], trained['images'][:2]
  tokens = np.zeros((2, 8, 8), np.int32)
  cases = [
      (lambda: tok.encode(images.astype(np.float32) / 127.5 - 1), 'float32', 'to_uint8'),
      (lambda: tok.encode(np.zeros((2, 16, 16, 3), np.uint8)), '16x16', 'image_size=32'),
      (lambda: tok.reconstruct(images[0]), '(32, 32, 3)', 'x[None]'),
      (lambda: tok.encode(images[..., :1]), '1 channels', 'RGB'),
      (lambda: tok.decode(tokens + 64), '[64, 64]', '[0, 64)'),
      (lambda: tok.decode(tokens - 1), '[-1, -1]', '[0, 64)'),
      (lambda: tok.decode(np.zeros((2, 4, 4), np.int32)), '(2, 4, 4)', '[N, 8, 8]'),
      (lambda: tok.decode(tokens.astype(np.float32)), 'float32', 'int32'),
      (lambda: tok.encode(images, batch_size=0), 'batch_size', '0'),
  ]
  for fn, *needles in cases:
    _one_line_error(ValueError, fn, *needles)


def test_cli_encode_then_decode_reproduces_reconstructions(trained, tmp_path):
  """run.py --mode=encode / --mode=decode, as a user types them (the config's overrides
  are repeated on the command line so the config hash matches)."""
  repo = pathlib.Path(__file__).resolve().parents[2]
  common = [sys.executable, str(repo / 'run.py'), '--config=experiments/vqvae_cifar.py:smoke',
            f'--workdir={trained["workdir"]}', '--config.train.num_steps=1',
            '--config.train.image_every=0', '--config.train.ema_decay=0.9',
            f'--config.eval.dataset=npz:{trained["npz"]}', '--config.eval.batch_size=16']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  tokens = tmp_path / 'tokens.npz'
  for extra in (['--mode=encode', f'--out={tokens}'],
                ['--mode=decode', f'--tokens={tokens}', f'--out={tmp_path / "png"}']):
    result = subprocess.run(common + extra, cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
  decoded = np.stack([_png(p) for p in sorted((tmp_path / 'png').glob('*.png'))])
  np.testing.assert_array_equal(decoded, trained['tok'].reconstruct(trained['images']))
