"""Codebook upkeep inside the pmapped train step: usage tracking, k-means, restarts, kinds."""


import functools
import types

import chex
import jax
import jax.numpy as jnp
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


# Step 0 runs k-means, step 1 has no dead code (every code was rewritten at step 0),
# step 2 restarts the codes idle since then: both branches of the upkeep gate run.
GATED = {'quantizer.init': 'kmeans', 'quantizer.restart_after': 2}


def _step_states(config, par, images_per_step, after_step=lambda: None):
  """Host state and metrics after each step under `par` (a `parallel` implementation)."""
  settings = steps.StepSettings.from_config(config)
  p_step = par.step(functools.partial(steps.train_step, settings=settings))
  p_state = par.replicate(ts.create_train_state(config, ts.init_key(0), (32, 32, 3)))
  p_rng = par.replicate(jax.random.PRNGKey(1))
  out = []
  for images in images_per_step:
    batch = par.shard({'image': images.reshape((2, -1) + images.shape[1:])})
    p_state, metrics = p_step(p_state, batch, p_rng)
    out.append((ts.checkpointable(par.to_host(p_state)), jax.device_get(par.unreplicate(metrics))))
    after_step()
  return out


class _TwoDevicePmap(parallel.PmapParallel):
  """The 'pmap' implementation on the first two local devices."""

  @property
  def devices(self):
    return jax.local_devices()[:2]

  def step(self, step_fn):
    return parallel.pmap_train_step(step_fn, devices=self.devices)

  def replicate(self, tree):
    return parallel.replicate(tree, self.devices)

  def shard(self, batch):
    return parallel.shard(batch, self.devices)


@pytest.mark.parametrize('kind', ['vq', pytest.param('ema', marks=pytest.mark.slow)])
def test_gated_upkeep_equals_ungated_rule_bit_for_bit(kind, monkeypatch):
  config = _smoke(**{'quantizer.kind': kind, **GATED})
  images = _images(3)
  gated = _step_states(config, _TwoDevicePmap(), images)
  assert [m['restarted_codes'] for _, m in gated][:2] == [config.quantizer.num_codes, 0]
  assert gated[2][1]['restarted_codes'] > 0
  # The rule before the gate: gather and maintain on every step.
  monkeypatch.setattr(steps, 'upkeep_needed', lambda dead, kmeans_now: jnp.ones((), bool))
  ungated = _step_states(config, _TwoDevicePmap(), images)
  for (g_state, g_metrics), (u_state, u_metrics) in zip(gated, ungated):
    chex.assert_trees_all_equal(g_state, u_state)
    chex.assert_trees_all_equal(g_metrics, u_metrics)


@pytest.mark.parametrize('kind', ['pmap', 'jit'])
def test_upkeep_gathers_encoder_rows_only_on_steps_that_rewrite_codes(kind, monkeypatch):
  gathers = []
  real_all_gather = jax.lax.all_gather

  def counting_all_gather(x, *args, **kwargs):
    # Runs on the device each time the gather itself runs, not when it is traced.
    jax.debug.callback(lambda: gathers.append(1))
    return real_all_gather(x, *args, **kwargs)

  monkeypatch.setattr(jax.lax, 'all_gather', counting_all_gather)
  par = _TwoDevicePmap() if kind == 'pmap' else parallel.JitParallel(jax.local_devices()[:2])
  per_step = []

  def count():
    jax.effects_barrier()
    per_step.append(len(gathers))
    gathers.clear()

  states = _step_states(_smoke(**{'quantizer.kind': 'vq', **GATED}), par, _images(3), count)
  # One gather per device on the k-means and restart steps, none in between.
  assert per_step == [2, 0, 2]
  assert [m['restarted_codes'] > 0 for _, m in states] == [True, False, True]


def _encoder_outputs(config, state, images):
  model = builders.build_tokenizer(config)
  variables = {'params': state.params, 'vq_stats': state.vq_stats}
  return np.asarray(model.apply(variables, images, method=lambda m, x: m.encoder(x))
                    ).reshape(-1, config.quantizer.code_dim)


def _chosen_codes(config, state, images):
  """bool [K]: codes some encoder output of `images` is nearest to (numpy oracle)."""
  z = _encoder_outputs(config, state, images)
  codebook = np.asarray(state.vq_stats['quantizer']['codebook'] if config.quantizer.kind ==
                        'ema' else state.params['quantizer']['codebook'])
  d = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
  chosen = np.zeros(len(codebook), bool)
  chosen[np.argmin(d, axis=1)] = True
  return z, chosen


def test_restart_replaces_exactly_the_dead_codes_with_batch_encodings():
  # restart_after=1: every code not chosen in a step is dead at its end.
  config = _smoke(**{'quantizer.kind': 'ema', 'quantizer.restart_after': 1})
  off = _smoke(**{'quantizer.kind': 'ema'})
  (images,) = _images(1)
  fresh = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  z, chosen = _chosen_codes(config, fresh, images)

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


@pytest.mark.parametrize('kind', ['vq', 'ema'])
def test_evaluation_looks_up_restarted_codes_when_weights_are_averaged(kind):
  """With train.ema_decay > 0 the codebook evaluated holds this step's restarted rows."""
  decay = 0.5
  config = _smoke(**{'quantizer.kind': kind, 'quantizer.restart_after': 1,
                     'train.ema_decay': decay})
  (images,) = _images(1)
  fresh = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
  z, chosen = _chosen_codes(config, fresh, images)
  p_state, metrics = _run_steps(config, jax.local_devices()[:2], [images], fresh)
  assert metrics[0]['restarted_codes'] == (~chosen).sum() > 0
  host = parallel.to_host(p_state)
  # What the evaluator and inference restore apply: eval_params with the live vq_stats.
  evaluated = np.asarray(builders.build_tokenizer(config).apply(
      {'params': ts.eval_params(host), 'vq_stats': host.vq_stats},
      jnp.arange(config.quantizer.num_codes), method=lambda m, i: m.quantizer.lookup(i)))
  gaps = np.min(((evaluated[~chosen][:, None, :] - z[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_allclose(gaps, 0.0, atol=1e-8)
  # The other weights evaluated are the EMA: decay * initial + (1 - decay) * trained.
  for name in ('encoder', 'decoder'):
    chex.assert_trees_all_close(
        ts.eval_params(host)[name],
        jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, fresh.params[name],
                     host.params[name]), rtol=1e-6, atol=1e-7)
  assert not np.allclose(host.params['decoder']['conv_out']['kernel'],
                         fresh.params['decoder']['conv_out']['kernel'])


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
  # With weight averaging on: every kind evaluates its live codebook (state.py docstring).
  config = _smoke(**KINDS[name], **{'train.ema_decay': 0.5})
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
  evaluated = {'params': ts.eval_params(state), 'vq_stats': state.vq_stats}
  live = {'params': state.params, 'vq_stats': state.vq_stats}
  assert not np.allclose(evaluated['params']['encoder']['conv1']['kernel'],
                         live['params']['encoder']['conv1']['kernel'])
  if name in ('fsq', 'lfq'):
    return  # a fixed code grid, no codebook
  codes = lambda m, i: jnp.stack([level.lookup(i) for level in getattr(
      m.quantizer, 'levels', [m.quantizer])])
  every_code = jnp.arange(config.quantizer.num_codes)
  np.testing.assert_array_equal(model.apply(evaluated, every_code, method=codes),
                                model.apply(live, every_code, method=codes))


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
