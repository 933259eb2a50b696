"""`run.py` modes for a token prior: train, eval, sample, and the editing modes.

Usage sketch::

  python run.py --config=experiments/gpt_cifar.py --workdir=/tmp/gpt \\
      --config.prior.tokenizer_workdir=/tmp/vqvae                       # train
  python run.py --config=experiments/gpt_cifar.py --workdir=/tmp/gpt \\
      --config.prior.tokenizer_workdir=/tmp/vqvae --mode=eval            # eval/step_<N>.json
  python run.py ... --mode=sample --out=/tmp/samples [--labels=3,3,5] [--num_samples=80]

`--mode=sample` writes `samples.png` (one row per requested class, in the order the classes
first appear) and `samples.npz` (`images` uint8 [N, H, W, 3], `labels` int32 [N], `tokens`
int32 [N, h, w]); without `--labels` it draws `--num_samples` class-balanced samples
(default 8 per class). Sampler settings are `config.sample.*` (e.g.
`--config.sample.guidance=2`), the key is `config.sample.seed`.

The editing modes (inpaint, edit, sample_large, eval_inpaint) live in
`vq.generation.edit_cli`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from vq.core import images as vq_images
from vq.core import weights
from vq.generation import generator as gen_lib
from vq.generation import priors
from vq.generation import validation

MODES = ('train', 'eval', 'sample', 'inpaint', 'edit', 'sample_large', 'eval_inpaint')


def sample_to_dir(config: ml_collections.ConfigDict, workdir: str, out: str, *,
                  labels: list[int] | None = None, num_samples: int | None = None
                  ) -> dict[str, Any]:
  """--mode=sample: samples.png and samples.npz in `out`; returns what it wrote."""
  if not out:
    raise ValueError('--mode=sample needs --out=DIR (a folder for samples.png and samples.npz).')
  if num_samples is not None and num_samples < 1:
    raise ValueError(f'--num_samples={num_samples} must be >= 1.')
  if labels is not None and num_samples is not None and num_samples != len(labels):
    raise ValueError(f'--num_samples={num_samples} but --labels names {len(labels)} samples; '
                     'give one of them, or make them agree.')
  gen = gen_lib.Generator.from_workdir(workdir, config)
  num_classes = gen.layout.num_classes
  if labels is not None:
    labels_arr = validation.check_labels(labels, num_classes)
  else:
    n = num_samples or 8 * max(num_classes, 1)
    labels_arr = gen_lib.balanced_labels(n, num_classes)
  tokens = gen.sample_tokens(labels_arr, jax.random.PRNGKey(config.sample.seed))
  images = gen.tokenizer.decode(tokens)
  out_dir = pathlib.Path(out).expanduser()
  out_dir.mkdir(parents=True, exist_ok=True)
  if num_classes:
    classes = list(dict.fromkeys(labels_arr.tolist()))
    rows = [images[labels_arr == c] for c in classes]
    width = max(len(r) for r in rows)
    rows = [np.concatenate([r, np.zeros((width - len(r),) + r.shape[1:], np.uint8)])
            for r in rows]
    grid = vq_images.make_grid(rows, max_columns=width)
  else:
    grid = vq_images.make_grid([images], max_columns=8)
  vq_images.save_png(out_dir / 'samples.png', grid)
  weights.save_npz(out_dir / 'samples.npz',
                   {'images': images, 'labels': labels_arr, 'tokens': tokens})
  return {'samples_png': str(out_dir / 'samples.png'),
          'samples_npz': str(out_dir / 'samples.npz'), 'num_samples': int(len(labels_arr)),
          'step': gen.step, 'settings': gen_lib.settings_from(config)._asdict()}


def run(config: ml_collections.ConfigDict, mode: str, workdir: str, *, out: str | None = None,
        labels: str | None = None, num_samples: int | None = None,
        reinit_unusable_checkpoints: bool = False, **edit_flags) -> dict[str, Any] | None:
  """Runs `mode` for the prior of `config`; returns what run.py prints (None for train).

  `edit_flags` are the editing modes' flags (`vq.generation.edit_cli.run`): mask, dataset,
  max_images, samples_per_image, target_label, ratios, token_grid, feather, widen.
  """
  if mode not in MODES:
    raise ValueError(f'--mode={mode} is for tokenizers; a {config.objective} prior takes '
                     f'--mode={"|".join(MODES)} (decode its samples with --mode=sample).')
  if mode == 'train':
    from vq.generation import trainer  # pylint: disable=g-import-not-at-top
    trainer.train_and_evaluate(config, workdir,
                               reinit_unusable_checkpoints=reinit_unusable_checkpoints)
    return None
  validation.validate(config, num_devices=jax.local_device_count(),
                      process_count=jax.process_count())
  if mode == 'eval':
    from vq.generation import evaluation  # pylint: disable=g-import-not-at-top
    return evaluation.evaluate(config, workdir)
  if mode != 'sample':
    from vq.generation import edit_cli  # pylint: disable=g-import-not-at-top
    return edit_cli.run(config, mode, workdir, out=out, labels=labels,
                        num_samples=num_samples, **edit_flags)
  parsed = validation.parse_labels(labels) if labels else None
  return sample_to_dir(config, workdir, out, labels=parsed, num_samples=num_samples)


def is_prior_config(config: ml_collections.ConfigDict) -> bool:
  return config.get('objective') in priors.KINDS



