"""benchmarks/loop_stats.py: loop throughput from metrics.jsonl records (no training)."""

import pytest

from benchmarks import loop_stats


def test_window_rates_from_logged_records():
  # Windows of 100 steps logged at 100 and 200 (the first covers steps 2..100, 99 steps,
  # as the loop's clock starts after the compiling first step) and an eval-only record.
  records = [{'step': 100, 'steps_per_s': 9.9, 'images_per_s': 633.6, 'loss': 1.0},
             {'step': 200, 'steps_per_s': 5.0, 'images_per_s': 320.0, 'loss': 0.9},
             {'step': 200, 'eval/psnr': 20.0},
             {'step': 250, 'steps_per_s': 10.0, 'images_per_s': 640.0}]
  out = loop_stats.window_rates(records, batch_size=64)
  assert out['window_images_per_s'] == [633.6, 320.0, 640.0]
  assert out['images_per_s_median'] == pytest.approx(633.6)
  # 249 steps over 99 / 9.9 + 100 / 5 + 50 / 10 = 35 s.
  assert out['timed_steps'] == 249
  assert out['images_per_s_overall'] == pytest.approx(249 * 64 / 35.0)


def test_window_rates_without_windows():
  out = loop_stats.window_rates([{'step': 1, 'loss': 1.0}], batch_size=64)
  assert out['window_images_per_s'] == [] and out['images_per_s_median'] is None
  assert out['images_per_s_overall'] is None and out['timed_steps'] == 0


def test_summarize_takes_medians_over_runs():
  runs = [{'images_per_s_median': 100.0, 'images_per_s_overall': 90.0},
          {'images_per_s_median': 300.0, 'images_per_s_overall': 280.0},
          {'images_per_s_median': 200.0, 'images_per_s_overall': 210.0}]
  out = loop_stats.summarize(runs)
  assert out['images_per_s_median'] == 200.0
  assert out['images_per_s_overall_median'] == 210.0
  assert out['run_medians'] == [100.0, 300.0, 200.0]


def test_config_overrides_are_handed_on_as_given():
  argv = ['benchmarks/train_loop.py', '--config=experiments/vqvae_cifar.py', '--steps=10',
          '--config.train.log_every=10', '--config.seed=3', '--config.model.dtype']
  assert loop_stats.config_overrides(argv) == ['--config.train.log_every=10', '--config.seed=3']
