"""Per-layer speed of `vq.models.conv.conv2d`: XLA's convolution against im2col + matmul.

Usage (from the repository root):

  python -m benchmarks.conv_layers --batch_size=64 --reps=11

For every convolution shape of the Sonnet CIFAR VQ-VAE and the taming network (ch 64,
ch_mult (1, 2, 2)) at 32x32 input, plus the 4x4 and 2x2 maps of deeper taming nets, times
`jit(grad(sum(conv2d(x, k) ** 2)))` with respect to (x, k) and the forward
`jit(conv2d)` for impl='xla', 'im2col' and 'mixed' (whose forward is XLA's). The impls run
interleaved, rotating which goes first, so load from other processes on shared cores hits
them alike. Prints one JSON line per shape (median milliseconds of `--reps` runs after
warm-up, speed-ups over xla, and the impl that `impl='auto'` picks) and a summary line
with the totals of each impl and of the auto choice, overall and per network."""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vq.models import conv

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Batch size of every layer input.')
_REPS = flags.DEFINE_integer('reps', 15, 'Timed runs per impl and shape (median is kept).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed runs after compiling.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Input dtype.')
_ONLY = flags.DEFINE_string('only', '', 'Run only shapes whose name contains this.')

# (name, input height = width, cin, cout, kernel, stride, padding). Heights are those the
# layer sees inside the networks for a 32x32 image; taming's Downsample pads (0, 1) first,
# so it runs 'VALID' on a 33x33 (then 17x17) input.
SHAPES = (
    ('sonnet/enc_conv1_4x4s2_3-64@32', 32, 3, 64, 4, 2, 'SAME'),
    ('sonnet/enc_conv2_4x4s2_64-128@16', 16, 64, 128, 4, 2, 'SAME'),
    ('sonnet/enc_conv3_3x3_128-128@8', 8, 128, 128, 3, 1, 'SAME'),
    ('sonnet/res_conv3_3x3_128-32@8', 8, 128, 32, 3, 1, 'SAME'),
    ('sonnet/res_conv1_1x1_32-128@8', 8, 32, 128, 1, 1, 'SAME'),
    ('sonnet/enc_out_1x1_128-64@8', 8, 128, 64, 1, 1, 'SAME'),
    ('sonnet/dec_in_3x3_64-128@8', 8, 64, 128, 3, 1, 'SAME'),
    ('sonnet/deconv1_subpixel_3x3_128-256@8', 8, 128, 256, 3, 1, 'SAME'),
    ('sonnet/dec_out_subpixel_3x3_64-12@16', 16, 64, 12, 3, 1, 'SAME'),
    ('taming/conv_in_3x3_3-64@32', 32, 3, 64, 3, 1, 'SAME'),
    ('taming/block_3x3_64-64@32', 32, 64, 64, 3, 1, 'SAME'),
    ('taming/downsample_3x3s2_64@33', 33, 64, 64, 3, 2, 'VALID'),
    ('taming/block_3x3_64-128@16', 16, 64, 128, 3, 1, 'SAME'),
    ('taming/nin_shortcut_1x1_64-128@16', 16, 64, 128, 1, 1, 'SAME'),
    ('taming/block_3x3_128-128@16', 16, 128, 128, 3, 1, 'SAME'),
    ('taming/downsample_3x3s2_128@17', 17, 128, 128, 3, 2, 'VALID'),
    ('taming/block_3x3_128-128@8', 8, 128, 128, 3, 1, 'SAME'),
    ('taming/dec_out_3x3_64-3@32', 32, 64, 3, 3, 1, 'SAME'),
    # Deeper taming nets (more ch_mult levels) reach 4x4 and 2x2 feature maps, where
    # XLA:CPU's convolution is at its worst.
    ('deep/block_3x3_512-512@4', 4, 512, 512, 3, 1, 'SAME'),
    ('deep/block_3x3_512-512@2', 2, 512, 512, 3, 1, 'SAME'),
    ('deep/downsample_3x3s2_256@9', 9, 256, 256, 3, 2, 'VALID'),
    ('deep/downsample_3x3s2_256@5', 5, 256, 256, 3, 2, 'VALID'),
)
IMPLS = ('xla', 'im2col', 'mixed')


def _fns(impl, stride, padding):
  def fwd(x, k):
    return conv.conv2d(x, k, strides=(stride, stride), padding=padding, impl=impl)

  def loss(x, k):
    return jnp.sum(jnp.square(fwd(x, k).astype(jnp.float32)))

  return {'fwd': jax.jit(fwd), 'grad': jax.jit(jax.grad(loss, argnums=(0, 1)))}


def _time_once(fn, x, k):
  start = time.perf_counter()
  jax.block_until_ready(fn(x, k))
  return (time.perf_counter() - start) * 1e3


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  n = _BATCH_SIZE.value
  rng = np.random.default_rng(0)
  totals = {f'{what}_{impl}': 0.0
            for what in ('fwd', 'grad') for impl in IMPLS + ('auto',)}
  per_net = {}
  for name, hw, cin, cout, ksize, stride, padding in SHAPES:
    if _ONLY.value not in name:
      continue
    x = jnp.asarray(rng.standard_normal((n, hw, hw, cin)), dtype)
    k = jnp.asarray(rng.standard_normal((ksize, ksize, cin, cout))
                    / np.sqrt(ksize * ksize * cin), dtype)
    fns = {impl: _fns(impl, stride, padding) for impl in IMPLS}
    row = {'shape': name, 'batch_size': n, 'dtype': _DTYPE.value}
    for what in ('fwd', 'grad'):
      for impl in IMPLS:
        for _ in range(1 + _WARMUP.value):  # The first call compiles.
          jax.block_until_ready(fns[impl][what](x, k))
      times = {impl: [] for impl in IMPLS}
      for rep in range(_REPS.value):
        order = IMPLS[rep % len(IMPLS):] + IMPLS[:rep % len(IMPLS)]
        for impl in order:
          times[impl].append(_time_once(fns[impl][what], x, k))
      for impl in IMPLS:
        ms = statistics.median(times[impl])
        row[f'{what}_ms_{impl}'] = round(ms, 3)
        totals[f'{what}_{impl}'] += ms
      for impl in IMPLS[1:]:
        row[f'{what}_speedup_{impl}'] = round(row[f'{what}_ms_xla'] / row[f'{what}_ms_{impl}'],
                                              2)
    pads = jax.lax.padtype_to_pads((hw, hw), (ksize, ksize), (stride, stride), padding)
    out = (hw + sum(pads[0]) - ksize) // stride + 1
    auto = conv.select_impl('auto', (ksize, ksize, cin, cout), (stride, stride), pads,
                            (out, out), dtype)
    row['auto_picks'] = auto
    for what in ('fwd', 'grad'):
      totals[f'{what}_auto'] += row[f'{what}_ms_{auto}']
    net = per_net.setdefault(name.split('/')[0], {'grad_ms_xla': 0.0, 'grad_ms_auto': 0.0})
    net['grad_ms_xla'] += row['grad_ms_xla']
    net['grad_ms_auto'] += row[f'grad_ms_{auto}']
    fwd_flops = 2 * n * out * out * ksize * ksize * cin * cout
    # The gradient is two matmul-sized products (dx and dk) plus the forward.
    for impl in IMPLS:
      row[f'grad_gflops_{impl}'] = round(3 * fwd_flops / row[f'grad_ms_{impl}'] / 1e6, 1)
    print(json.dumps(row), flush=True)
  summary = {'summary': True, 'backend': jax.default_backend(), 'reps': _REPS.value,
             'batch_size': n, 'dtype': _DTYPE.value}
  for key, value in totals.items():
    summary[f'total_{key}_ms'] = round(value, 2)
  if totals['grad_auto']:
    # How much faster impl='auto' runs these layers than XLA's convolution alone.
    summary['total_grad_speedup_auto_vs_xla'] = round(totals['grad_xla'] / totals['grad_auto'],
                                                      2)
    summary['total_fwd_speedup_auto_vs_xla'] = round(totals['fwd_xla'] / totals['fwd_auto'], 2)
  summary['grad_ms_per_net'] = {
      net: {key: round(value, 1) for key, value in ms.items()} for net, ms in per_net.items()}
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  app.run(main)
