"""Codebook upkeep inside the pmapped train step: usage tracking, k-means, restarts, kinds."""


import types

import chex
import jax
import numpy as np
import pytest

from experiments import vqvae_cifar
from vq.config import builders
from vq.evaluation import evaluator
from vq import inference
from vq.runtime import parallel
from vq.runtime import state as ts
from vq.training import step as steps
from tests import train_util


def _smoke(**overrides):
  # Upkeep off unless a test asks for it (the CIFAR configs switch it on by default).
  config = vqvae_cifar.get_config('smoke')
  config.update_from_flattened_dict(
      {'quantizer.init': 'random', 'quantizer.restart_after': 0, **overrides})
  return config


_run_steps = train_util.run_steps


def _images(n_steps, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32) for _ in range(n_steps)]


def _assert_devices_agree(p_state):
  for leaf in jax.tree.leaves(ts.checkpointable(p_state)):
    leaf = np.asarray(leaf)
    for d in range(1, leaf.shape[0]):
      np.testing.assert_array_equal(leaf[0], leaf[d])


UPKEEP = {
    'ema_kmeans_restart': {'quantizer.kind': 'ema', 'quantizer.init': 'kmeans',
                           'quantizer.restart_after': 1},
    'vq_kmeans_restart': {'quantizer.kind': 'vq', 'quantizer.init': 'kmeans',
                          'quantizer.restart_after': 1},
    'l2_lowdim_restart': {'quantizer.kind': 'vq', 'quantizer.lookup_dim': 4,
                          'quantizer.l2_normalize': True, 'quantizer.restart_after': 1},
}


@pytest.mark.parametrize('name', sorted(UPKEEP))
def test_upkeep_under_pmap_equals_one_device_and_devices_agree(name):
  config = _smoke(**UPKEEP[name])
  images = _images(2)
  devices = jax.local_devices()
  multi, m_multi = _run_steps(config, devices[:2], images)
  single, m_single = _run_steps(config, devices[:1], images)
  _assert_devices_agree(multi)
  chex.assert_trees_all_close(ts.checkpointable(parallel.to_host(multi)),
                              ts.checkpointable(parallel.to_host(single)),
                              rtol=2e-4, atol=2e-5)
  for a, b in zip(m_multi, m_single):
    chex.assert_trees_all_close(a, b, rtol=2e-4, atol=2e-5)
  if config.quantizer.init == 'kmeans':
    # k-means rewrites every row at step 0, so the first step reports all codes restarted.
    assert m_single[0]['restarted_codes'] == config.quantizer.num_codes
  else:
    assert 0 < m_single[0]['restarted_codes'] < config.quantizer.num_codes


def _encoder_outputs(config, state, images):
  model = builders.build_tokenizer(config)
  variables = {'params': state.params, 'vq_stats': state.vq_stats}
  return np.asarray(model.apply(variables, images, method=lambda m, x: m.encoder(x))
                    ).reshape(-1, config.quantizer.code_dim)


def test_restart_replaces_exactly_the_dead_codes_with_batch_encodings():
  # restart_after=1: every code not chosen in a step is dead at its end.
  config = _smoke(**{'quantizer.kind': 'ema', 'quantizer.restart_after': 1})
  off = _smoke(**{'quantizer.kind': 'ema'})
  (images,) = _images(1)
  fresh = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  z = _encoder_outputs(config, fresh, images)
  codebook = np.asarray(fresh.vq_stats['quantizer']['codebook'])
  d = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
  chosen = np.zeros(len(codebook), bool)
  chosen[np.argmin(d, axis=1)] = True

  with_restarts, metrics = _run_steps(config, jax.local_devices()[:2], [images], fresh)
  without, _ = _run_steps(off, jax.local_devices()[:2], [images], fresh)
  _assert_devices_agree(with_restarts)
  new = np.asarray(parallel.to_host(with_restarts).vq_stats['quantizer']['codebook'])
  ref = parallel.to_host(without).vq_stats['quantizer']
  # Codes chosen this step get exactly the plain EMA update; dead ones differ from it.
  np.testing.assert_array_equal(new[chosen], np.asarray(ref['codebook'])[chosen])
  assert metrics[0]['restarted_codes'] == (~chosen).sum() > 0
  # Each restarted code is one of this step's encoder outputs.
  gaps = np.min(((new[~chosen][:, None, :] - z[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_allclose(gaps, 0.0, atol=1e-8)
  # Their EMA statistics were reset (not the EMA-decayed values) and survive into the state.
  stats = parallel.to_host(with_restarts).vq_stats['quantizer']
  assert not np.allclose(np.asarray(stats['ema_sums'])[~chosen],
                         np.asarray(ref['ema_sums'])[~chosen])
  # Their idle counters start again, but they do not count as used.
  usage = parallel.to_host(with_restarts).code_usage
  np.testing.assert_array_equal(np.asarray(usage['last_refreshed']), (~chosen).astype(int))
  np.testing.assert_array_equal(np.asarray(usage['last_used']), chosen.astype(int))


def test_restart_resets_adam_moments_of_replaced_rows_only():
  config = _smoke(**{'quantizer.kind': 'vq', 'quantizer.restart_after': 1})
  p_state, metrics = _run_steps(config, jax.local_devices()[:1], _images(2))
  host = parallel.to_host(p_state)
  restarted = metrics[-1]['restarted_codes']
  assert restarted > 0
  adam = [s for s in jax.tree.leaves(host.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
          if hasattr(s, 'mu')][0]
  mu = np.asarray(adam.mu['quantizer']['codebook'])
  nu = np.asarray(adam.nu['quantizer']['codebook'])
  zero_rows = np.all(mu == 0, axis=1) & np.all(nu == 0, axis=1)
  # Rows chosen in step 2 have non-zero moments. Rows restarted after step 2 (not chosen
  # in it) are zero again, including those chosen in step 1, which had non-zero moments.
  assert zero_rows.sum() == restarted


def test_usage_metrics_window_and_batch():
  config = _smoke(**{'quantizer.usage_window': 1})
  _, metrics = _run_steps(config, jax.local_devices()[:1], _images(2))
  for m in metrics:
    # A 1-step window is this batch's usage; dead codes are those idle for >= 1 step.
    np.testing.assert_allclose(m['codebook_usage'], m['batch_usage'], rtol=1e-6)
    np.testing.assert_allclose(m['dead_codes'],
                               config.quantizer.num_codes * (1 - m['batch_usage']), atol=1e-4)


KINDS = {
    'fsq': {'quantizer.kind': 'fsq', 'quantizer.fsq_levels': (4, 4, 4),
            'quantizer.num_codes': 64},
    'lfq': {'quantizer.kind': 'lfq', 'quantizer.num_codes': 64,
            'quantizer.entropy_weight': 0.1},
    'rvq': {'quantizer.kind': 'rvq', 'quantizer.rvq_depth': 3},
    'rvq_rotation': {'quantizer.kind': 'rvq', 'quantizer.rvq_depth': 2,
                     'quantizer.gradient': 'rotation'},
    'rotation': {'quantizer.kind': 'vq', 'quantizer.gradient': 'rotation',
                 'quantizer.restart_after': 1},
    'entropy': {'quantizer.kind': 'ema', 'quantizer.entropy_weight': 0.1},
}


def _nearest(z, codebook, margin=1e-5):
  d = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
  two = np.sort(d, axis=1)[:, :2]
  assert np.min(two[:, 1] - two[:, 0]) > margin, 'near-tie in the test data: change the seed'
  return np.argmin(d, axis=1)


def _np_codes(config, state, z):
  """Each kind's documented code choice, in float64 numpy: (indices [N, depth], inputs).

  `inputs[l]` are the vectors level l quantized (the residuals for rvq).
  """
  q, p = config.quantizer, state.params.get('quantizer', {})
  z = z.astype(np.float64)
  if q.kind in ('fsq', 'lfq'):
    g = z @ np.asarray(p['project_in']['kernel'], np.float64) + np.asarray(
        p['project_in']['bias'], np.float64)
    if q.kind == 'lfq':  # index = sum_i [g_i > 0] 2^i
      assert np.min(np.abs(g)) > 1e-5, 'near-tie in the test data: change the seed'
      return ((g > 0) @ (2 ** np.arange(g.shape[1])))[:, None], [g]
    levels = np.asarray(q.fsq_levels)  # bounded to [-(L-1)/2, (L-1)/2], shifted so f(0)=0
    half = (levels - 1) * (1 - 1e-3) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    bounded = np.tanh(g + np.arctanh(offset / half)) * half - offset
    assert np.min(np.abs(np.abs(bounded - np.floor(bounded)) - 0.5)) > 1e-5, 'near-tie'
    digits = np.round(bounded) + levels // 2  # mixed radix, dimension 0 least significant
    return (digits @ np.cumprod([1] + list(levels[:-1])))[:, None].astype(int), [g]
  if q.kind == 'vq':
    return _nearest(z, np.asarray(p['codebook'], np.float64))[:, None], [z]
  stats = state.vq_stats['quantizer']
  books = [stats] if q.kind == 'ema' else [stats[f'levels_{l}'] for l in range(q.rvq_depth)]
  indices, inputs, residual = [], [], z
  for book in books:
    codebook = np.asarray(book['codebook'], np.float64)
    idx = _nearest(residual, codebook)
    indices.append(idx)
    inputs.append(residual)
    residual = residual - codebook[idx]
  return np.stack(indices, axis=1), inputs


@pytest.mark.parametrize('name', sorted(KINDS))
def test_every_quantizer_trains_under_pmap_and_tracks_its_codes(name):
  config = _smoke(**KINDS[name])
  (images,) = _images(1, seed=3)
  fresh = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  p_state, (m,) = _run_steps(config, jax.local_devices()[:2], [images], fresh)
  _assert_devices_agree(p_state)
  assert np.isfinite(m['loss']) and np.isfinite(m['grad_norm']), m
  state = parallel.to_host(p_state)

  # Oracle: the codes this step chose over both devices, from the step's own encoder outputs.
  k = config.quantizer.num_codes
  indices, inputs = _np_codes(config, fresh, _encoder_outputs(config, fresh, images))
  counts = np.concatenate([np.bincount(indices[:, l], minlength=k)
                           for l in range(indices.shape[1])]).astype(np.float64)
  chosen = counts > 0
  assert 0 < chosen.sum() < len(counts)
  usage = state.code_usage
  np.testing.assert_array_equal(usage['last_used'], chosen.astype(int))
  np.testing.assert_allclose(usage['counts_ema'], 0.01 * counts / counts.sum(), rtol=1e-5,
                             atol=1e-9)
  np.testing.assert_allclose(m['batch_usage'], chosen.mean(), rtol=1e-6)
  p = counts[chosen] / counts.sum()
  np.testing.assert_allclose(m['perplexity'], np.exp(-np.sum(p * np.log(p))), rtol=1e-4)

  restarted = ~chosen if config.quantizer.restart_after else np.zeros_like(chosen)
  assert m['restarted_codes'] == restarted.sum()
  np.testing.assert_array_equal(usage['last_refreshed'], restarted.astype(int))
  if config.quantizer.kind in ('fsq', 'lfq'):  # no codebook: nothing for upkeep to keep
    assert fresh.vq_stats == {} and state.vq_stats == {}
  if config.quantizer.kind in ('ema', 'rvq'):
    # One EMA step (decay d) from zero statistics, zero-debiased: each level's codebook is
    # the Laplace-smoothed mean of the inputs it was chosen for; no upkeep touched it.
    stats = state.vq_stats['quantizer']
    levels = [stats] if 'codebook' in stats else [stats[f'levels_{l}'] for l in range(
        indices.shape[1])]
    for l, level in enumerate(levels):
      n = np.bincount(indices[:, l], minlength=k).astype(np.float64)
      sums = np.zeros((k, inputs[l].shape[1]))
      np.add.at(sums, indices[:, l], inputs[l])
      smoothed = (n + 1e-5) / (n.sum() + k * 1e-5) * n.sum()
      np.testing.assert_allclose(level['ema_counts'], 0.01 * n, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(level['codebook'], sums / smoothed[:, None], rtol=1e-4,
                                 atol=1e-5)
  if restarted.any():
    # Documented rule: each dead code becomes one of the step's encoder rows, drawn without
    # replacement (512 rows >= 64 codes), so restarted codes are distinct encoder rows.
    z = _encoder_outputs(config, fresh, images)
    new = np.asarray(state.params['quantizer']['codebook'])[restarted]
    rows = np.argmin(((new[:, None, :] - z[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(new, z[rows], atol=1e-5)
    assert len(set(rows.tolist())) == len(rows)
    # The chosen codes moved by Adam's first step alone: at most lr per entry.
    old = np.asarray(fresh.params['quantizer']['codebook'])[chosen]
    step = np.abs(np.asarray(state.params['quantizer']['codebook'])[chosen] - old)
    assert np.all(step <= config.train.learning_rate * (1 + 1e-3))
  model = builders.build_tokenizer(config)
  assert usage['last_used'].shape == (model.quantizer.usage_size,)


@pytest.mark.parametrize('name', ['fsq', 'lfq', 'rvq'])
def test_upkeep_of_kinds_without_restarts_changes_only_the_usage_tracker(name):
  config = _smoke(**KINDS[name])
  state = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  settings = steps.StepSettings.from_config(config)
  assert not settings.maintain
  size = settings.usage_size
  counts = np.zeros(size, np.float32)
  counts[[0, 5, size - 1]] = [3.0, 1.0, 4.0]
  rows = {'intermediates': {'quantizer': {'lookup_input': (np.ones((4, 16), np.float32),)}}}

  def upkeep(c):
    return steps._codebook_upkeep(settings, state, types.SimpleNamespace(counts=c), rows,
                                  jax.random.PRNGKey(0))  # pylint: disable=protected-access

  new, metrics = jax.vmap(upkeep, axis_name=steps.AXIS)(counts[None])
  new = jax.tree.map(lambda x: x[0], new)
  chex.assert_trees_all_equal(new.replace(code_usage=state.code_usage), state)
  np.testing.assert_array_equal(new.code_usage['last_used'], (counts > 0).astype(int))
  np.testing.assert_array_equal(new.code_usage['last_refreshed'], 0)
  assert float(metrics['restarted_codes'][0]) == 0.0


@pytest.mark.parametrize('name, bits_per_token', [('fsq', 6.0), ('lfq', 6.0), ('rvq', 18.0)])
def test_bits_per_image_follow_the_quantizer(name, bits_per_token):
  config = _smoke(**KINDS[name])
  state = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  grid, bits, ratio = evaluator.token_bits(config, state.params, state.vq_stats, (32, 32, 3))
  assert grid == (8, 8)
  assert bits == 64 * bits_per_token
  assert ratio == 32 * 32 * 24 / bits


def test_residual_tokens_round_trip_through_the_inference_api():
  config = _smoke(**KINDS['rvq'])
  state = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  tok = inference.Tokenizer(config, state.params, state.vq_stats, step=0)
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  tokens = tok.encode(images)
  assert tokens.shape == (3, 8, 8, 3) and tok.token_shape == (8, 8, 3)
  np.testing.assert_array_equal(tok.decode(tokens), tok.reconstruct(images))
  with pytest.raises(ValueError, match=r'tokens \[N, 8, 8, 3\]'):
    tok.decode(tokens[..., 0])
