"""benchmarks/matmul_peak.py: the FLOP count and the timing helper, tiny sizes."""

from benchmarks import matmul_peak


def test_flops_of_a_square_product_counts_a_multiply_and_an_add_per_term():
  assert matmul_peak.matmul_flops(3) == 54.0     # 27 terms, 2 operations each


def test_best_seconds_takes_the_fastest_call_after_a_warm_up(monkeypatch):
  calls = []
  times = iter([0.0, 5.0, 10.0, 10.5, 20.0, 23.0])   # durations 5, 0.5, 3
  monkeypatch.setattr(matmul_peak.time, 'perf_counter', lambda: next(times))
  best = matmul_peak.best_seconds(lambda: calls.append(1), repeats=3)
  assert best == 0.5 and len(calls) == 4


def test_measure_reports_every_backend_for_each_size():
  out = matmul_peak.measure([8, 16], repeats=1)
  assert set(out['numpy']) == set(out['xla']) == set(out['xla_bf16']) == {8, 16}
  assert out['best_gflops'] == max(list(out['numpy'].values()) + list(out['xla'].values()))
  assert out['best_bf16_gflops'] == max(out['xla_bf16'].values())
  assert out['best_gflops'] > 0 and out['best_bf16_gflops'] > 0
