"""Inference: a trained tokenizer restored from its workdir, and the token CLI modes.

Usage sketch::

  tok = vq.inference.Tokenizer.from_workdir(config, '/tmp/vqvae')
  tokens = tok.encode(images_uint8)          # int32 [N, h, w]
  images = tok.decode(tokens)                # uint8 [N, H, W, 3]

- `tokenizer`: `Tokenizer` (encode, decode, reconstruct on uint8 arrays) and
  `reconstruct_dataset`, `encode_dataset`, `decode_file` behind `--mode=reconstruct|encode|decode`.

Imports: `vq.core`, `vq.data`, `vq.models`, `vq.config`, `vq.runtime`.
"""

from vq.inference.tokenizer import Tokenizer
from vq.inference.tokenizer import config_hash
from vq.inference.tokenizer import decode_file
from vq.inference.tokenizer import encode_dataset
from vq.inference.tokenizer import reconstruct_dataset

__all__ = ['Tokenizer', 'config_hash', 'decode_file', 'encode_dataset', 'reconstruct_dataset']
