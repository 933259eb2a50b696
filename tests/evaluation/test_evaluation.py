"""Evaluation keys researchers quote: fd_vgg, rfid, the reference cache, bits, the probe."""

import json
import os

import chex
import jax
import numpy as np
import pytest
from scipy import optimize

from experiments import vqvae_cifar
from vq.config import builders
from vq.runtime import checkpointing
from vq import data
from vq.evaluation import evaluator
from vq.evaluation import fid
from vq.perceptual import inception
from vq.perceptual import lpips
from vq.evaluation import probe
from vq.evaluation import references
from vq.models import tokenizer
from vq.runtime import state as ts
from vq.training import trainer
from vq.core import weights

# A few dozen images give singular 512-d covariances on purpose (fast); fid.frechet_distance
# handles them and scipy says so.
pytestmark = pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')

# 21 examples in global batches of 8 over 4 devices: 3 batches, the last with 3 padded rows.
N_EVAL = 21


def _smoke(**overrides):
  config = vqvae_cifar.get_config('smoke')
  config.eval.batch_size = 8
  config.eval.max_examples = 0
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def state():
  return ts.create_train_state(_smoke(), ts.init_key(0), (32, 32, 3))


@pytest.fixture(scope='module')
def eval_images():
  return np.random.default_rng(0).integers(0, 256, (N_EVAL, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  path = tmp_path / 'cache'
  path.mkdir()
  monkeypatch.setenv('VQ_CACHE_DIR', str(path))
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  return path


@pytest.fixture
def accumulators(monkeypatch):
  """Records every StatsAccumulator evaluation creates, to count the rows that reach it."""
  made = []

  class Recording(fid.StatsAccumulator):

    def __init__(self, dim):
      super().__init__(dim)
      made.append(self)

  monkeypatch.setattr(fid, 'StatsAccumulator', Recording)
  return made


def _write_npz(path, images, labels=None):
  arrays = {'images': images}
  if labels is not None:
    arrays['labels'] = np.asarray(labels, np.int64)
  np.savez(path, **arrays)
  return f'npz:{path}'


def _saved_recon(config, state, images):
  """Reconstructions rounded like a saved PNG, as [-1, 1] floats (single device, jitted)."""
  recon = trainer.Reconstructor(config)(state.params, state.vq_stats, data.to_float(images))
  return np.clip(np.round((recon.astype(np.float64) + 1) * 127.5), 0, 255) / 127.5 - 1


def _quadrant_means(x):
  """Stand-in Inception: per-channel means of the four image quadrants, [N, 12]."""
  n = x.shape[0]
  return x.reshape(n, 2, 16, 2, 16, 3).mean(axis=(2, 4)).reshape(n, 12)


# --- The probe ---


def _blobs(rng, n, d, k, spread):
  centers = rng.normal(size=(k, d)) * spread
  labels = rng.integers(0, k, n)
  return centers[labels] + rng.normal(size=(n, d)) + 50.0, labels


def test_probe_separates_separable_classes_and_is_at_chance_on_random_labels():
  rng = np.random.default_rng(0)
  x, y = _blobs(rng, 600, 16, 3, spread=4.0)
  out = probe.linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=3)
  assert out['accuracy'] >= 0.95 and out['train_accuracy'] >= 0.95

  n_test = 4000
  x = rng.normal(size=(400 + n_test, 16))
  y = rng.integers(0, 3, 400 + n_test)
  out = probe.linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=3)
  # Chance is 1/3; with 4000 test labels 5 standard deviations are 0.037.
  assert abs(out['accuracy'] - 1 / 3) < 0.037
  assert out['train_accuracy'] > out['accuracy']  # it fits the training noise


def test_probe_predictions_match_scipy_lbfgs_on_the_same_objective():
  rng = np.random.default_rng(1)
  # The shapes of the test above, so the jitted solver compiles once.
  k, d, l2 = 3, 16, 1e-2
  x, y = _blobs(rng, 600, d, k, spread=0.5)  # overlapping classes: the optimum matters
  x_tr, y_tr, x_te, y_te = x[:400], y[:400], x[400:], y[400:]
  out = probe.linear_probe(x_tr, y_tr, x_te, y_te, num_classes=k, l2=l2)

  # Oracle: the same penalised softmax regression written in numpy, solved by scipy.
  mean, std = x_tr.mean(0), x_tr.std(0)
  z_tr, z_te = (x_tr - mean) / std, (x_te - mean) / std
  one_hot = np.eye(k)[y_tr]

  def objective(theta):
    w, b = theta[:d * k].reshape(d, k), theta[d * k:]
    logits = z_tr @ w + b
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    loss = -np.mean(np.sum(one_hot * np.log(p), 1)) + 0.5 * l2 * np.sum(w * w)
    g = (p - one_hot) / len(y_tr)
    return loss, np.concatenate([(z_tr.T @ g + l2 * w).ravel(), g.sum(0)])

  theta = optimize.minimize(objective, np.zeros(d * k + k), jac=True, method='L-BFGS-B',
                            options={'gtol': 1e-10, 'maxiter': 2000}).x
  predictions = np.argmax(z_te @ theta[:d * k].reshape(d, k) + theta[d * k:], 1)
  np.testing.assert_allclose(out['accuracy'], np.mean(predictions == y_te), atol=1.5 / 200)


def test_probe_rejects_labels_outside_the_classes():
  x = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match=r'outside \[0, num_classes=2\)'):
    probe.linear_probe(x, [0, 1, 2, 0], x, [0, 1, 0, 1], num_classes=2)


# --- Evaluation keys ---


def test_bits_per_image_and_compression_ratio_for_the_smoke_config(tmp_path, cache_dir, state,
                                                                    eval_images):
  config = _smoke(**{'eval.dataset': _write_npz(tmp_path / 'e.npz', eval_images),
                     'eval.rfid': False})
  results = evaluator.evaluate_params(config, state.params, state.vq_stats)
  # 8x8 tokens from 64 codes: 64 * log2(64) = 384 bits; 32 * 32 * 24 / 384 = 64.
  assert results['token_grid'] == [8, 8]
  assert results['bits_per_image'] == 384.0
  assert results['compression_ratio'] == 64.0
  assert results['evaluator'].startswith(evaluator.EVALUATOR_VERSION + ':')
  assert results['num_examples'] == N_EVAL
  for key in ('rfid', 'rfid_unavailable', 'lpips', 'fd_vgg', 'probe_accuracy'):
    assert key not in results  # each was turned off


def _zero_decoder_output(params):
  """Params whose decoder outputs exactly 0 (a zero `conv_out` kernel and bias)."""
  params = dict(params)
  params['decoder'] = dict(params['decoder'])
  params['decoder']['conv_out'] = jax.tree.map(np.zeros_like, params['decoder']['conv_out'])
  return params


def _reject_constant(name):
  raise ValueError(f'eval JSON holds {name}')


def test_exact_reconstructions_and_padding_rows_give_finite_capped_psnr(tmp_path, cache_dir,
                                                                        state, eval_images):
  # A zero last decoder layer outputs 0 everywhere, i.e. pixel 128 (to_pixel_range rounds
  # 127.5 half to even). The 3 zero padding rows of the last batch and an all-128 image are
  # then reconstructed exactly (MSE 0).
  params = _zero_decoder_output(state.params)
  images = eval_images.copy()
  images[0] = 128
  config = _smoke(**{'eval.dataset': _write_npz(tmp_path / 'e.npz', images),
                     'eval.rfid': False})
  results = evaluator.evaluate_params(config, params, state.vq_stats)

  # Oracle: numpy PSNR against the constant 128 image, 100 dB where the MSE is 0.
  mse = np.mean((images.astype(np.float64) - 128.0) ** 2, axis=(1, 2, 3))
  assert mse[0] == 0 and np.all(mse[1:] > 0)
  psnr = np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)
  assert results['num_examples'] == N_EVAL
  np.testing.assert_allclose(results['psnr'], psnr.mean(), rtol=1e-5)
  np.testing.assert_allclose(results['mse'], mse.mean(), rtol=1e-5)
  assert '100 dB' in results['evaluator']
  path = evaluator.write_results(tmp_path, {'step': 0, **results})
  saved = json.loads(path.read_text(), parse_constant=_reject_constant)  # no NaN, Infinity
  np.testing.assert_allclose(saved['psnr'], psnr.mean(), rtol=1e-5)


def test_eval_step_masks_padding_rows_whatever_their_values(state, eval_images):
  # Run op by op (vmap, no jit): XLA's simplifier may turn `value * mask` into a select under
  # jit, which would hide an inf * 0 = NaN from a padding row; the step must not rely on it.
  params = _zero_decoder_output(state.params)
  # Rows 2, 3 are padding: zeros as eval_batches pads (reconstructed exactly), and a NaN row.
  images = np.zeros((4, 32, 32, 3), np.float32)
  images[:2] = data.to_float(eval_images[:2])
  images[3] = np.nan
  batch = {'image': images, 'mask': np.arange(4) < 2, 'label': np.zeros(4, np.int32)}
  step = evaluator.make_eval_step(_smoke(), with_lpips=False)
  sums, _ = jax.vmap(step, in_axes=(None, None, None, 0), axis_name=evaluator.AXIS)(
      params, state.vq_stats, {}, jax.tree.map(lambda v: v[None], batch))
  mse = np.mean((eval_images[:2].astype(np.float64) - 128.0) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(sums['psnr'][0], np.sum(10 * np.log10(255.0**2 / mse)), rtol=1e-5)
  np.testing.assert_allclose(sums['mse'][0], mse.sum(), rtol=1e-5)
  assert sums['num_examples'][0] == 2


def test_eval_step_does_not_compute_the_lfq_entropy_penalty():
  # 8 images of 8x8 tokens: the penalty's softmax would be [512 positions, 128 codes].
  config = _smoke(**{'quantizer.kind': 'lfq', 'quantizer.num_codes': 128,
                     'quantizer.entropy_weight': 0.1, 'quantizer.init': 'random',
                     'quantizer.restart_after': 0})
  batch = {'image': np.zeros((8, 32, 32, 3), np.float32), 'mask': np.ones(8, bool),
           'label': np.zeros(8, np.int32)}
  model = builders.build_tokenizer(config)
  # Shapes are all tracing needs.
  variables = jax.eval_shape(model.init, jax.random.key(0), batch['image'])
  step = evaluator.make_eval_step(config, with_lpips=False)
  jaxpr = str(jax.make_jaxpr(step, axis_env=[(evaluator.AXIS, 1)])(
      variables['params'], variables.get('vq_stats', {}), {}, batch))
  train_jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True))(
      variables, batch['image']))
  assert 'f32[512,128]' in train_jaxpr and 'f32[512,128]' not in jaxpr


def test_rfid_is_null_with_the_reason_when_weights_are_missing(tmp_path, cache_dir, state,
                                                                eval_images):
  config = _smoke(**{'eval.dataset': _write_npz(tmp_path / 'e.npz', eval_images),
                     'eval.lpips': False})
  workdir = tmp_path / 'wd'
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints')
  ckpt.save(3, state)
  ckpt.close()
  results = evaluator.evaluate(config, str(workdir))
  saved = json.loads((workdir / 'eval' / 'step_3.json').read_text())
  for r in (results, saved):
    assert r['rfid'] is None
    assert r['rfid_unavailable'].startswith(
        f'No Inception FID weights at {cache_dir / inception.CACHE_FILE}')
    assert '\n' not in r['rfid_unavailable']
    assert r['bits_per_image'] == 384.0
  assert not (cache_dir / 'ref_stats').exists()


def test_rfid_from_synthetic_weights_matches_fid_and_reuses_cached_reference(
    tmp_path, cache_dir, state, eval_images, accumulators, monkeypatch):
  # Random weights of the right names and shapes (traced from the module), saved where
  # load_params looks, so the real loading and checking code runs.
  rng = np.random.default_rng(0)
  weights.save_npz(cache_dir / inception.CACHE_FILE,
                   {k: rng.normal(size=s).astype(np.float32) * 0.1
                    for k, s in inception.param_shapes().items()})
  traced_rows = []

  def fake_features(params, images):
    # The loaded tree arrives intact; a 299x299 Inception pass would cost minutes here.
    assert params['Mixed_7c']['branch_pool']['kernel'].shape == (1, 1, 2048, 192)
    traced_rows.append(images.shape[0])
    return _quadrant_means(images)

  monkeypatch.setattr(evaluator, '_inception_features', fake_features)
  saves = []
  real_save = references.save_reference_stats
  monkeypatch.setattr(references, 'save_reference_stats',
                      lambda *a, **k: saves.append(a) or real_save(*a, **k))
  config = _smoke(**{'eval.dataset': _write_npz(tmp_path / 'e.npz', eval_images),
                     'eval.lpips': False})

  first = evaluator.evaluate_params(config, state.params, state.vq_stats)
  per_device = config.eval.batch_size // jax.local_device_count()
  assert traced_rows == [2 * per_device]  # originals and reconstructions, one joint batch
  assert [a.count for a in accumulators] == [N_EVAL, N_EVAL]  # padding never counted
  recon = _saved_recon(config, state, eval_images)
  mu_r, sigma_r = fid.feature_statistics(_quadrant_means(data.to_float(eval_images)))
  mu_f, sigma_f = fid.feature_statistics(_quadrant_means(recon))
  expected = fid.frechet_distance(mu_f, sigma_f, mu_r, sigma_r)
  assert np.isfinite(first['rfid']) and first['rfid'] > 0
  np.testing.assert_allclose(first['rfid'], expected, rtol=1e-4)
  assert 'rfid_unavailable' not in first
  assert len(saves) == 1
  cached = list((cache_dir / 'ref_stats').glob(f'{evaluator.FEATURE_INCEPTION}-*.npz'))
  assert len(cached) == 1
  np.testing.assert_allclose(weights.load_npz(cached[0])['mu'], mu_r, rtol=1e-5, atol=1e-8)

  traced_rows.clear()
  accumulators.clear()
  second = evaluator.evaluate_params(config, state.params, state.vq_stats)
  assert traced_rows == [per_device]  # reconstructions only: originals come from the cache
  assert [a.count for a in accumulators] == [N_EVAL]
  assert len(saves) == 1
  np.testing.assert_allclose(second['rfid'], first['rfid'], rtol=1e-6)

  # Another evaluated subset is another reference: no stale statistics.
  config.eval.max_examples = 16
  traced_rows.clear()
  evaluator.evaluate_params(config, state.params, state.vq_stats)
  assert traced_rows == [2 * per_device] and len(saves) == 2


def test_fd_vgg_matches_independent_pooled_features_and_caches_the_originals(
    tmp_path, cache_dir, state, eval_images, accumulators, monkeypatch):
  config = _smoke(**{'eval.dataset': _write_npz(tmp_path / 'e.npz', eval_images),
                     'eval.rfid': False})
  lpips_params = lpips.load_pretrained_params()
  made = []
  real_make = evaluator.make_eval_step
  monkeypatch.setattr(evaluator, 'make_eval_step',
                      lambda *a, **k: made.append(k['vgg_real']) or real_make(*a, **k))
  first = evaluator.evaluate_params(config, state.params, state.vq_stats,
                                     lpips_params=lpips_params)
  assert [a.count for a in accumulators] == [N_EVAL, N_EVAL]

  # Oracle: LPIPS's own pooled_features and distance on the PNG-rounded reconstructions.
  net = lpips.LPIPS()
  pooled = jax.jit(lambda x: net.apply({'params': lpips_params}, x,
                                       method=lpips.LPIPS.pooled_features))
  originals = data.to_float(eval_images)
  recon = _saved_recon(config, state, eval_images).astype(np.float32)
  mu_r, sigma_r = fid.feature_statistics(pooled(originals))
  mu_f, sigma_f = fid.feature_statistics(pooled(recon))
  np.testing.assert_allclose(first['fd_vgg'], fid.frechet_distance(mu_f, sigma_f, mu_r, sigma_r),
                             rtol=1e-3)
  distances = jax.jit(lambda x, y: net.apply({'params': lpips_params}, x, y))(recon, originals)
  np.testing.assert_allclose(first['lpips'], np.mean(distances), rtol=1e-5)

  accumulators.clear()
  second = evaluator.evaluate_params(config, state.params, state.vq_stats,
                                      lpips_params=lpips_params)
  assert made == [True, False]  # the second pass returns no originals' features
  assert [a.count for a in accumulators] == [N_EVAL]
  assert len(list((cache_dir / 'ref_stats').glob(f'{evaluator.FEATURE_VGG}-*.npz'))) == 1
  np.testing.assert_allclose(second['fd_vgg'], first['fd_vgg'], rtol=1e-5)
  np.testing.assert_allclose(second['lpips'], first['lpips'], rtol=1e-6)


def test_probe_accuracy_on_frozen_latents_and_omitted_without_labels(
    tmp_path, cache_dir, state, eval_images, monkeypatch):
  # Two classes a random encoder can tell apart: dark and bright noise.
  rng = np.random.default_rng(2)

  def images_of(labels):
    low = np.where(labels == 0, 0, 150)[:, None, None, None]
    return (low + rng.integers(0, 106, (len(labels), 32, 32, 3))).astype(np.uint8)

  train_labels = np.arange(64) % 2
  test_labels = rng.integers(0, 2, N_EVAL)
  test_images = images_of(test_labels)
  config = _smoke(**{
      'eval.dataset': _write_npz(tmp_path / 'test.npz', test_images, test_labels),
      'eval.probe_train_dataset': _write_npz(tmp_path / 'train.npz', images_of(train_labels),
                                             train_labels),
      'eval.probe': True, 'eval.probe_max_train': 50, 'eval.probe_grid': 2,
      'eval.lpips': False, 'eval.rfid': False})
  seen = []
  real_probe = probe.linear_probe
  monkeypatch.setattr(probe, 'linear_probe',
                      lambda *a, **k: seen.append(a) or real_probe(*a, **k))
  results = evaluator.evaluate_params(config, state.params, state.vq_stats)
  assert results['probe_accuracy'] >= 0.9
  assert results['probe_num_train'] == 50
  assert results['probe_features'] == 2 * 2 * config.quantizer.code_dim

  # Oracle for the features: z_q of each test image, mean over 4x4 windows of the 8x8 grid.
  model = builders.build_tokenizer(config)
  z_q = jax.jit(lambda x: model.apply({'params': state.params, 'vq_stats': state.vq_stats}, x,
                                      method=tokenizer.VQTokenizer.encode).quantized)(
                                          data.to_float(test_images))
  z_q = np.asarray(z_q)
  expected = z_q.reshape(N_EVAL, 2, 4, 2, 4, -1).mean(axis=(2, 4)).reshape(N_EVAL, -1)
  train_x, train_y, test_x, test_y = seen[0]
  chex.assert_shape(train_x, (50, expected.shape[1]))
  np.testing.assert_array_equal(train_y, train_labels[:50])
  np.testing.assert_allclose(test_x, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(test_y, test_labels)

  config.eval.dataset = _write_npz(tmp_path / 'unlabelled.npz', test_images)
  results = evaluator.evaluate_params(config, state.params, state.vq_stats)
  assert 'probe_accuracy' not in results
  assert 'has no labels' in results['probe_unavailable']
  assert len(seen) == 1


def test_probe_grid_that_does_not_divide_the_tokens_is_a_one_line_error(tmp_path, state,
                                                                        eval_images):
  config = _smoke(**{'eval.dataset': _write_npz(tmp_path / 'e.npz', eval_images),
                     'eval.probe': True, 'eval.probe_grid': 3})
  with pytest.raises(ValueError, match=r'probe_grid=3 does not divide the 8x8 token grid'):
    evaluator.evaluate_params(config, state.params, state.vq_stats)


def test_reference_key_names_what_the_statistics_depend_on(tmp_path, eval_images):
  config = _smoke(**{'eval.dataset': _write_npz(tmp_path / 'e.npz', eval_images)})
  source = data.open_source(config.eval.dataset, image_size=32)
  key = json.loads(references.reference_key(config, source, 'vgg', 'abc'))
  assert key['dataset'] == config.eval.dataset and key['num_examples'] == N_EVAL
  assert key['evaluator'] == evaluator.EVALUATOR_VERSION and key['feature'] == 'vgg'
  assert key['image_size'] == 32 and key['max_examples'] == 0 and key['network'] == 'abc'
  before = references.reference_path(references.reference_key(config, source, 'vgg', 'abc'))
  os.utime(tmp_path / 'e.npz', ns=(1, 1))  # a rewritten data file must miss the cache
  after = references.reference_path(references.reference_key(config, source, 'vgg', 'abc'))
  assert before != after
