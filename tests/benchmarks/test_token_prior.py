"""benchmarks/token_prior.py: token files, baselines, batches and the loop over sides."""

import math

import numpy as np
import pytest

from benchmarks import token_prior


def _write(path, n=6, grid=(2, 2), num_codes=8, **overrides):
  rng = np.random.default_rng(len(str(path)))
  arrays = {'tokens': rng.integers(0, num_codes, (n,) + grid).astype(np.int32),
            'labels': (np.arange(n) % 3).astype(np.int32),
            'config_hash': np.array('hash0'), 'checkpoint_step': np.array(7, np.int64),
            'num_codes': np.array(num_codes, np.int64), 'image_size': np.array(8, np.int64),
            'dataset': np.array('tfds:x:train')}
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return arrays


def test_load_tokens_reads_what_encode_writes(tmp_path):
  arrays = _write(tmp_path / 't.npz', tokens=np.array([[[1, 2], [3, 7]]], np.int64),
                  labels=np.array([2], np.int64))
  tf = token_prior.load_tokens(tmp_path / 't.npz')
  assert tf.tokens.dtype == np.int32 and tf.labels.dtype == np.int32
  np.testing.assert_array_equal(tf.tokens, arrays['tokens'])
  np.testing.assert_array_equal(tf.labels, [2])
  assert (tf.num_codes, tf.image_size, tf.config_hash, tf.checkpoint_step) == (8, 8, 'hash0', 7)


@pytest.mark.parametrize('overrides, match', [
    ({'labels': None}, r"lacks \['labels'\]"),
    ({'config_hash': None}, r"lacks \['config_hash'\]"),
    ({'tokens': np.zeros((2, 2, 2), np.float32)}, 'tokens must be integers, saw dtype float32'),
    ({'labels': np.zeros(6, bool)}, 'labels must be integers, saw dtype bool'),
    ({'tokens': np.zeros((6, 4), np.int32)}, r'expected tokens \[N, h, w\]'),
    ({'labels': np.zeros(5, np.int32)}, r'labels \(5,\)'),
    ({'tokens': np.full((6, 2, 2), 8, np.int32)}, r'tokens span \[8, 8\] but num_codes is 8'),
    ({'tokens': np.full((6, 2, 2), -1, np.int32)}, r'tokens span \[-1, -1\]'),
    ({'labels': np.full(6, -2, np.int32)}, 'labels must be >= 0, saw -2'),
])
def test_load_tokens_rejects_bad_files(tmp_path, overrides, match):
  _write(tmp_path / 'bad.npz', **overrides)
  with pytest.raises(ValueError, match=match):
    token_prior.load_tokens(tmp_path / 'bad.npz')


def test_load_tokens_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='run.py --mode=encode'):
    token_prior.load_tokens(tmp_path / 'none.npz')


@pytest.mark.parametrize('overrides, match', [
    ({'config_hash': np.array('other')}, "config_hash differs: 'hash0'"),
    ({'checkpoint_step': np.array(9, np.int64)}, 'checkpoint_step differs: 7'),
    ({'tokens': np.zeros((6, 2, 3), np.int32)}, r'token grids differ: \(2, 2\)'),
])
def test_check_same_tokenizer(tmp_path, overrides, match):
  _write(tmp_path / 'a.npz')
  _write(tmp_path / 'b.npz', **overrides)
  a = token_prior.load_tokens(tmp_path / 'a.npz')
  token_prior.check_same_tokenizer(a, a)
  with pytest.raises(ValueError, match=match):
    token_prior.check_same_tokenizer(a, token_prior.load_tokens(tmp_path / 'b.npz'))


def test_sequences_put_the_class_token_first(tmp_path):
  _write(tmp_path / 't.npz', tokens=np.array([[[1, 2], [3, 4]], [[5, 6], [7, 0]]], np.int32),
         labels=np.array([2, 0], np.int32))
  tf = token_prior.load_tokens(tmp_path / 't.npz')
  seq = token_prior.sequences(tf, num_classes=3)
  assert seq.dtype == np.int64
  # Class c is token num_codes + c = 8 + c; the grid follows in raster order.
  np.testing.assert_array_equal(seq, [[10, 1, 2, 3, 4], [8, 5, 6, 7, 0]])
  with pytest.raises(ValueError, match='label 2 >= num_classes 2'):
    token_prior.sequences(tf, num_classes=2)


def test_unigram_bits_per_token_by_hand():
  train = np.array([[0, 0], [1, 2]])
  test = np.array([0, 3])
  # Add-one counts over 4 codes: [3, 2, 2, 1] / 8; the test tokens cost log2(8/3) and 3 bits.
  expected = (math.log2(8 / 3) + 3.0) / 2
  assert token_prior.unigram_bits_per_token(train, test, 4) == pytest.approx(expected, rel=1e-12)
  # A uniform histogram costs log2(num_codes) whatever the test tokens are.
  uniform = np.repeat(np.arange(16), 5)
  assert token_prior.unigram_bits_per_token(uniform, np.array([3, 3, 9]), 16) == pytest.approx(4.0)


def test_batch_schedule_is_seeded_and_in_range():
  a = token_prior.batch_schedule(10, steps=50, batch_size=4, seed=3)
  assert a.shape == (50, 4) and a.dtype == np.int64
  assert a.min() >= 0 and a.max() <= 9
  assert set(np.unique(a)) == set(range(10))  # 200 draws over 10 rows reach every row
  np.testing.assert_array_equal(a, token_prior.batch_schedule(10, 50, 4, seed=3))
  assert not np.array_equal(a, token_prior.batch_schedule(10, 50, 4, seed=4))


def test_tokens_per_s_leaves_out_the_first_step():
  assert token_prior.tokens_per_s([9.0, 1.0, 3.0], tokens_per_step=100) == pytest.approx(50.0)
  with pytest.raises(ValueError, match='at least 2 timed steps, saw 1'):
    token_prior.tokens_per_s([1.0], 100)


class _FakeSide:
  """A side whose k-th training step takes `step_s[k]` 'seconds' and scores fixed figures."""

  def __init__(self, name, log, step_s, bits, sample_s):
    self.name, self.log, self.step_s, self.bits, self.sample_s = name, log, step_s, bits, sample_s
    self.steps_done = 0
    self.rows_seen = []

  def num_params(self):
    return 123

  def describe(self):
    return {'impl': self.name}

  def train(self, rows):
    self.log.append((self.name, len(rows)))
    self.rows_seen.append(rows.copy())
    k = self.steps_done
    self.steps_done += len(rows)
    return {'step_s': self.step_s[k:k + len(rows)], 'loss': [math.log(2) * 5] * len(rows)}

  def bits_per_token(self):
    return self.bits

  def sample(self, class_tokens, temperature, seed):
    assert temperature == 1.0
    self.log.append((self.name, 'sample', seed))
    tokens = np.tile(class_tokens[:, None] - 8, (1, 4))  # the class index as image tokens
    tokens[0, 0] = 9  # one out-of-range token
    return {'tokens': tokens, 'seconds': self.sample_s[seed]}

  def close(self):
    return 42.0


def test_run_sides_interleaves_and_reports():
  log, lines = [], []
  spec = token_prior.GPTSpec(num_codes=8, num_classes=3, seq_len=4, batch_size=2)
  schedule = token_prior.batch_schedule(5, steps=5, batch_size=2, seed=0)
  a = _FakeSide('a', log, [10.0, 1.0, 1.0, 2.0, 4.0], 3.5, [2.0, 1.0, 5.0])
  b = _FakeSide('b', log, [1.0] * 5, 4.0, [1.0, 1.0, 1.0])
  out = token_prior.run_sides({'a': a, 'b': b}, schedule, spec, round_steps=2, sample_images=5,
                              sample_repeats=3, seed=0, emit=lines.append)
  # Rounds of 2, 2, 1 steps, then three sampling calls; the side that goes first alternates.
  assert log == [('a', 2), ('b', 2), ('b', 2), ('a', 2), ('a', 1), ('b', 1),
                 ('a', 'sample', 0), ('b', 'sample', 0), ('b', 'sample', 1), ('a', 'sample', 1),
                 ('a', 'sample', 2), ('b', 'sample', 2)]
  for side in (a, b):  # both train on the same rows
    np.testing.assert_array_equal(np.concatenate(side.rows_seen), schedule)
  assert [(l['side'], l['step']) for l in lines] == [('a', 2), ('b', 2), ('b', 4), ('a', 4),
                                                     ('a', 5), ('b', 5)]
  assert lines[0]['tokens_per_s'] == pytest.approx(2 * 2 * 4 / 11.0)
  ra = out['a']
  # 8 tokens a step; steps 2..5 take 8 s in all.
  assert ra['train_tokens_per_s'] == pytest.approx(8 * 4 / 8.0)
  assert ra['first_step_s'] == 10.0 and ra['step_s_median'] == 2.0
  assert ra['last_round_loss_bits'] == pytest.approx(5.0)
  assert ra['test_bits_per_token'] == 3.5
  assert ra['sample_images_per_s'] == pytest.approx(5 / 2.0)  # median of 2, 1, 5 s
  assert ra['sample_s'] == [2.0, 1.0, 5.0]
  assert ra['sample_out_of_range_fraction'] == pytest.approx(1 / 20)
  # Class tokens 8 + (0, 1, 2, 0, 1), echoed back minus 8 by the fake.
  np.testing.assert_array_equal(ra['samples'][1:, 0], [1, 2, 0, 1])
  assert (ra['params'], ra['impl'], ra['peak_rss_mb']) == (123, 'a', 42.0)
  assert out['b']['test_bits_per_token'] == 4.0



def test_write_samples_round_trips_with_the_tokenizer_metadata(tmp_path):
  _write(tmp_path / 'test.npz')
  like = token_prior.load_tokens(tmp_path / 'test.npz')
  samples = np.arange(5 * 4).reshape(5, 4) % 8
  samples[3, 2] = 9  # a class token (>= num_codes 8): grid 3 cannot be decoded
  out = token_prior.write_samples(tmp_path / 'out' / 's.npz', samples, like, 3, 'peer')
  assert out == {'path': str(tmp_path / 'out' / 's.npz'), 'grids': 4, 'left_out': 1}
  back = token_prior.load_tokens(out['path'])
  np.testing.assert_array_equal(back.tokens, samples[[0, 1, 2, 4]].reshape(4, 2, 2))
  np.testing.assert_array_equal(back.labels, [0, 1, 2, 1])
  token_prior.check_same_tokenizer(like, back)  # run.py --mode=decode checks the same fields
  assert back.image_size == 8
