r"""`python -m vq.convert`: a PyTorch VQ tokenizer checkpoint -> a vq workdir.

  python -m vq.convert taming --checkpoint=/tmp/last.ckpt --config=/tmp/model.yaml \
      --workdir=/tmp/vqgan_f16
  python -m vq.convert llamagen --checkpoint=/tmp/vq_ds16_c2i.pt --workdir=/tmp/llamagen_f16
  python run.py --config=/tmp/vqgan_f16/config.py --workdir=/tmp/vqgan_f16 \
      --mode=reconstruct --dataset=folder:/tmp/images --out=/tmp/recon

Prints a JSON summary (workdir, image size, token grid, codes, parameter count). Errors
are one line on stderr with exit status 2 (VQ_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from vq.convert import torch_reader


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m vq.convert',
      description='Convert a taming-transformers or LlamaGen VQ tokenizer checkpoint into a vq '
      'workdir (config.json, config.py and an orbax checkpoint at step 0).')
  sub = parser.add_subparsers(dest='format', required=True)

  def common(p: argparse.ArgumentParser) -> None:
    p.add_argument('--checkpoint', required=True, help='the torch checkpoint file')
    p.add_argument('--workdir', required=True, help='output vq workdir (new or empty)')
    p.add_argument('--reader', choices=torch_reader.READERS, default='builtin',
                   help="'builtin': vq's restricted unpickler, no torch needed (default); "
                   "'torch': torch.load(weights_only=True), where torch is installed")
    p.add_argument('--base_config', default=None,
                   help='vq config file whose training recipe the workdir keeps for '
                   'fine-tuning (default experiments/vqgan_imagenet256.py)')

  taming = sub.add_parser('taming', help='taming-transformers / latent-diffusion VQModel')
  common(taming)
  taming.add_argument('--config', required=True, help='the model.yaml of the checkpoint')
  taming.add_argument('--image_size', type=int, default=None,
                      help="image side (default: the yaml's resolution)")
  llamagen = sub.add_parser('llamagen', help='LlamaGen VQ tokenizer (VQ-16, VQ-8)')
  common(llamagen)
  llamagen.add_argument('--image_size', type=int, default=256, help='image side (default 256)')
  llamagen.add_argument('--weights', choices=('model', 'ema'), default='model',
                        help="the checkpoint's 'model' weights (default) or its 'ema' ones")
  return parser


def main(argv: Sequence[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  # Imported after parsing so that --help and usage errors come before JAX starts.
  from vq.convert import llamagen  # pylint: disable=g-import-not-at-top
  from vq.convert import taming  # pylint: disable=g-import-not-at-top
  try:
    if args.format == 'taming':
      summary = taming.convert_files(args.checkpoint, args.config, args.workdir,
                                     image_size=args.image_size, reader=args.reader,
                                     base_config=args.base_config)
    else:
      summary = llamagen.convert_files(args.checkpoint, args.workdir,
                                       image_size=args.image_size, weights=args.weights,
                                       reader=args.reader, base_config=args.base_config)
  except (ValueError, FileNotFoundError) as e:
    if os.environ.get('VQ_DEBUG'):
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary, indent=2, sort_keys=True))
  return summary


if __name__ == '__main__':
  main()
