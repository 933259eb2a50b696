"""The token cache, the tokenizer checks and token batches."""

import json

import ml_collections
import numpy as np
import pytest

from vq.generation import tokens as token_data


class _CountingTokenizer:
  """Stands in for vq.inference.Tokenizer: 'encodes' an image as its 2x2 block means."""

  def __init__(self, step=5, config_hash='abc'):
    self.step, self.config_hash, self.image_size = step, config_hash, 4
    self.config = ml_collections.ConfigDict({'data': {'resize': False}})
    self.calls = 0

  def encode(self, images):
    self.calls += 1
    x = images.astype(np.int32).mean(-1)
    return (x.reshape(len(x), 2, 2, 2, 2).mean((2, 4)) // 64).astype(np.int32)


def _npz(tmp_path, n=6):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
  path = tmp_path / 'images.npz'
  np.savez(path, images=images, labels=np.arange(n) % 3)
  return f'npz:{path}', images


def test_grids_are_cached_per_tokenizer_and_rebuilt_when_it_changes(tmp_path):
  spec, images = _npz(tmp_path)
  tok = _CountingTokenizer()
  ident = {'workdir': '/t', 'config_hash': 'abc', 'step': 5}
  first = token_data.encoded_split(tok, ident, spec, tmp_path / 'cache', flip=True)
  assert tok.calls == 2 and len(first) == 12                   # originals + mirror images
  np.testing.assert_array_equal(first.tokens[6:], tok.encode(images[:, :, ::-1]))
  np.testing.assert_array_equal(first.labels, np.tile(np.arange(6) % 3, 2))
  again = token_data.encoded_split(tok, ident, spec, tmp_path / 'cache', flip=True)
  assert tok.calls == 3                                        # (the check above encoded once)
  np.testing.assert_array_equal(again.tokens, first.tokens)
  newer = dict(ident, step=6)
  token_data.encoded_split(tok, newer, spec, tmp_path / 'cache', flip=True)
  assert tok.calls == 5                                        # a new checkpoint: encoded again
  assert len(list((tmp_path / 'cache').glob('*.npz'))) == 2


def test_a_prior_refuses_a_tokenizer_that_changed_under_it():
  saved = {'workdir': '/t', 'config_hash': 'abc', 'step': 3000}
  token_data.check_same_tokenizer(saved, dict(saved))
  token_data.check_same_tokenizer(None, dict(saved))
  with pytest.raises(ValueError) as e:
    token_data.check_same_tokenizer(saved, dict(saved, step=4000))
  assert '\n' not in str(e.value) and 'tokenizer_step=3000' in str(e.value)


def test_tokenizer_workdir_errors_are_one_line(tmp_path):
  cases = {}
  cases['missing'] = tmp_path / 'nope'
  (tmp_path / 'empty').mkdir()
  cases['no config.json'] = tmp_path / 'empty'
  (tmp_path / 'prior').mkdir()
  (tmp_path / 'prior' / 'config.json').write_text(json.dumps({'objective': 'gpt'}))
  cases['not a tokenizer'] = tmp_path / 'prior'
  (tmp_path / 'rvq').mkdir()
  (tmp_path / 'rvq' / 'config.json').write_text(json.dumps(
      {'objective': 'vqvae', 'quantizer': {'kind': 'rvq', 'rvq_depth': 4}}))
  cases['residual-VQ'] = tmp_path / 'rvq'
  for needle, path in cases.items():
    with pytest.raises(ValueError) as e:
      token_data.tokenizer_config(path)
    message = str(e.value)
    assert '\n' not in message and (needle in message or 'does not exist' in message), message


def test_token_batches_resume_exactly_and_split_over_devices():
  split = token_data.TokenSplit(np.arange(40 * 4).reshape(40, 2, 2).astype(np.int32),
                                np.arange(40, dtype=np.int32) % 4, 'test')
  make = lambda start: token_data.token_batches(split, global_batch_size=8, num_local_devices=2,
                                                seed=3, start_step=start)
  straight = [next(it) for it in [make(0)] for _ in range(12)]
  resumed = make(7)
  for k in range(7, 12):
    b = next(resumed)
    np.testing.assert_array_equal(b['tokens'], straight[k]['tokens'])
    np.testing.assert_array_equal(b['label'], straight[k]['label'])
  first = straight[0]
  assert first['tokens'].shape == (2, 4, 4) and first['label'].shape == (2, 4)
  rows = first['tokens'].reshape(8, 4)[:, 0] // 4                # grid index of each row
  np.testing.assert_array_equal(first['label'].reshape(8), rows % 4)   # labels follow grids
  epoch = np.concatenate([b['tokens'].reshape(8, 4)[:, 0] // 4 for b in straight[:5]])
  assert sorted(epoch) == list(range(40))                      # one epoch visits every grid


def test_eval_batches_cover_every_grid_once():
  split = token_data.TokenSplit(np.arange(11 * 4).reshape(11, 2, 2).astype(np.int32),
                                np.zeros(11, np.int32), 'test')
  seen = []
  for b in token_data.eval_batches(split, global_batch_size=4, num_local_devices=2):
    seen.extend(b['tokens'].reshape(4, 4)[b['mask'].reshape(4), 0] // 4)
  assert seen == list(range(11))
