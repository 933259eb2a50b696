r"""Codebook ablation: one network, one training length, several quantizers; a Markdown table.

  python -m benchmarks.codebook_ablation --workdir=/tmp/ablation            # all variants
  python -m benchmarks.codebook_ablation --workdir=/tmp/ablation --steps=200 \
      --variants=plain_vq,fsq --eval_examples=1000                          # a quick look

Every variant trains `experiments/vqvae_cifar.py` (the Sonnet CIFAR-10 network, MSE/Var
loss, Adam 3e-4, batch 64, seed 0) for the same number of steps with a 1024-entry
vocabulary per token, then evaluates on the test split (LPIPS and rFID off: this table is
about the codebook). Each variant is two `run.py` processes (train, then eval), so a
variant's numbers are exactly what a user gets from the same command lines, which the
script prints. Rerunning skips variants whose eval JSON exists (delete the directory to
redo one).

Reported per variant: test PSNR, SSIM, codebook usage over the whole test split, and
perplexity of the test-split code histogram; the training log's usage over the last
`quantizer.usage_window` steps; bits per image; wall-clock seconds of training. The
results go to stdout (Markdown) and `<workdir>/ablation.json`, and
`<workdir>/usage_histograms.png` stacks each variant's training usage histogram (the
image TensorBoard shows, from the final checkpoint's usage EMA).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Every variant starts from these (the config file's own codebook options switched off), so
# that a variant is exactly what its overrides say, whatever the config file's defaults.
COMMON = {'quantizer.num_codes': 1024, 'quantizer.init': 'random', 'quantizer.restart_after': 0}

# name -> (description, config overrides). Every vocabulary has 1024 entries per index.
VARIANTS = {
    'plain_vq': ('VQ, codebook learned by gradient', {'quantizer.kind': 'vq'}),
    'ema': ('EMA codebook (decay 0.99)', {'quantizer.kind': 'ema'}),
    'ema_kmeans_restart': ('EMA + k-means init + restarts after 50 idle steps', {
        'quantizer.kind': 'ema', 'quantizer.init': 'kmeans', 'quantizer.restart_after': 50}),
    'l2_lowdim': ('VQ, l2-normalised 8-d factorised lookup', {
        'quantizer.kind': 'vq', 'quantizer.lookup_dim': 8, 'quantizer.l2_normalize': True}),
    'rotation': ('VQ with the rotation trick', {
        'quantizer.kind': 'vq', 'quantizer.gradient': 'rotation'}),
    'fsq': ('FSQ, levels (8, 8, 4, 4)', {
        'quantizer.kind': 'fsq', 'quantizer.fsq_levels': (8, 8, 4, 4)}),
    'lfq': ('LFQ, 10 bits, entropy weight 0.1', {
        'quantizer.kind': 'lfq', 'quantizer.entropy_weight': 0.1}),
    'rvq': ('Residual VQ, 2 EMA levels of 1024', {
        'quantizer.kind': 'rvq', 'quantizer.rvq_depth': 2}),
}

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for one workdir per variant.')
_STEPS = flags.DEFINE_integer('steps', 1500, 'Training steps per variant (batch 64).')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS), f'Subset of {list(VARIANTS)}.')
_EVAL_EXAMPLES = flags.DEFINE_integer('eval_examples', 0,
                                      'Test examples evaluated (0: all 10,000).')
_CONFIG = flags.DEFINE_string('config', 'experiments/vqvae_cifar.py', 'Base config file.')
flags.mark_flags_as_required(['workdir'])


def command(variant: str, workdir: pathlib.Path, mode: str) -> list[str]:
  """The run.py command line of one variant (train or eval)."""
  _, overrides = VARIANTS[variant]
  fields = {**COMMON, 'train.num_steps': _STEPS.value,
            'train.checkpoint_every': _STEPS.value, 'train.image_every': 0,
            'eval.lpips': False, 'eval.rfid': False,
            'eval.max_examples': _EVAL_EXAMPLES.value, **overrides}
  return ([sys.executable, 'run.py', f'--config={_CONFIG.value}',
           f'--workdir={workdir / variant}', f'--mode={mode}']
          + [f'--config.{k}={_flag_value(v)}' for k, v in fields.items()])


def _flag_value(v) -> str:
  return f'({",".join(map(str, v))})' if isinstance(v, tuple) else str(v)


def last_training_metrics(path: pathlib.Path) -> dict:
  last = {}
  with path.open() as f:
    for line in f:
      row = json.loads(line)
      if 'codebook_usage' in row:
        last = row
  return last


def run_variant(variant: str, root: pathlib.Path) -> dict:
  workdir = root / variant
  eval_json = workdir / 'eval' / f'step_{_STEPS.value}.json'
  timing = workdir / 'train_seconds.txt'
  if not eval_json.exists():
    for mode in ('train', 'eval'):
      cmd = command(variant, root, mode)
      print('$ ' + ' '.join(cmd), flush=True)
      start = time.perf_counter()
      subprocess.run(cmd, cwd=_REPO, check=True)
      if mode == 'train':
        timing.write_text(f'{time.perf_counter() - start:.1f}\n')
  results = json.loads(eval_json.read_text())
  train = last_training_metrics(workdir / 'metrics.jsonl')
  return {
      'variant': variant, 'description': VARIANTS[variant][0], 'steps': _STEPS.value,
      'psnr': results['psnr'], 'ssim': results['ssim'],
      'test_usage': results['codebook_usage'], 'test_perplexity': results['perplexity'],
      'train_window_usage': train.get('codebook_usage'),
      'bits_per_image': results['bits_per_image'],
      'num_examples': results['num_examples'],
      'train_seconds': float(timing.read_text()) if timing.exists() else None,
      'train_command': ' '.join(command(variant, root, 'train')[1:]),
  }


def variant_config(variant: str):
  """The config a variant trained with (the same overrides as its command line)."""
  from experiments import vqvae_cifar  # pylint: disable=g-import-not-at-top
  config = vqvae_cifar.get_config()
  overrides = {**COMMON, **VARIANTS[variant][1]}
  config.update_from_flattened_dict(overrides)
  return config


def usage_histograms(variants: list[str], root: pathlib.Path) -> pathlib.Path:
  """One labelled row per variant: `codebook_usage.histogram_image` of its final usage EMA."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  from vq.runtime import checkpointing, codebook_usage, images, train_state as ts  # pylint: disable=g-import-not-at-top,g-multiple-import
  rows = []
  for variant in variants:
    config = variant_config(variant)
    fresh = ts.create_train_state(config, ts.init_key(0), (32, 32, 3))
    ckpt = checkpointing.Checkpointer(root / variant / 'checkpoints')
    state, _ = ckpt.restore(ckpt.latest_step(), fresh)
    ckpt.close()
    hist = codebook_usage.histogram_image(np.asarray(state.code_usage['counts_ema']))
    label = Image.new('RGB', (hist.shape[1], 14), (255, 255, 255))
    ImageDraw.Draw(label).text((2, 1), f'{variant}: {VARIANTS[variant][0]}', fill=(0, 0, 0))
    rows += [np.asarray(label), hist, np.full((6, hist.shape[1], 3), 255, np.uint8)]
  path = root / 'usage_histograms.png'
  images.save_png(path, np.concatenate(rows))
  return path


def markdown(rows: list[dict]) -> str:
  lines = ['| variant | PSNR (dB) | SSIM | usage (test) | perplexity (test) | usage (train window)'
           ' | bits/image | train s |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    window = '-' if r['train_window_usage'] is None else f"{100 * r['train_window_usage']:.1f}%"
    seconds = '-' if r['train_seconds'] is None else f"{r['train_seconds']:.0f}"
    lines.append(
        f"| {r['variant']}: {r['description']} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
        f"{100 * r['test_usage']:.1f}% | {r['test_perplexity']:.0f} | {window} | "
        f"{r['bits_per_image']:.0f} | {seconds} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f'--variants: unknown {unknown}; choose from {list(VARIANTS)}.')
  root = pathlib.Path(_WORKDIR.value).absolute()
  root.mkdir(parents=True, exist_ok=True)
  rows = [run_variant(v, root) for v in _VARIANTS.value]
  (root / 'ablation.json').write_text(json.dumps(rows, indent=2) + '\n')
  print(markdown(rows))
  print(f'usage histograms: {usage_histograms(_VARIANTS.value, root)}')


if __name__ == '__main__':
  app.run(main)
