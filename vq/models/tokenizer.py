"""The tokenizer: encoder -> quantizer -> decoder, with a token-level API.

Usage sketch::

  model = builders.build_tokenizer(config)                # or VQTokenizer(enc, quant, dec)
  variables = model.init(rng, images)                     # {'params', 'vq_stats'?}
  recon, q = model.apply(variables, images)               # q: QuantizerOutput
  tokens = model.apply(variables, images, method=VQTokenizer.tokenize)     # int32 [N, h, w]
  images = model.apply(variables, tokens, method=VQTokenizer.detokenize)   # [N, H, W, 3]

This is the seam later work plugs into: a token prior trains on `tokenize` outputs and
generates or inpaints through `detokenize`; new quantizers only have to return a
`QuantizerOutput` and provide `lookup(indices)`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq import quantizers


class VQTokenizer(nn.Module):
  """Encoder, quantizer and decoder; images NHWC in [-1, 1].

  Attributes:
    encoder: maps images to [N, h, w, code_dim].
    quantizer: returns a `QuantizerOutput`; has `lookup(indices)`.
    decoder: maps [N, h, w, code_dim] to images; its last layer is `conv_out`.
  """
  encoder: nn.Module
  quantizer: nn.Module
  decoder: nn.Module

  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, quantizers.QuantizerOutput]:
    q = self.encode(images, train=train)
    return self.decode(q.quantized), q

  def encode(self, images: jax.Array, *, train: bool = False) -> quantizers.QuantizerOutput:
    # Distances and codebook statistics are float32 whatever the network dtype.
    z_e = self.encoder(images).astype(jnp.float32)
    return self.quantizer(z_e, train=train)

  def decode(self, z_q: jax.Array) -> jax.Array:
    return self.decoder(z_q)

  def tokenize(self, images: jax.Array) -> jax.Array:
    """Images [N, H, W, 3] -> int32 token grid [N, h, w] (no statistics updated)."""
    return self.encode(images, train=False).indices

  def detokenize(self, tokens: jax.Array) -> jax.Array:
    """Token grid [N, h, w] -> images [N, H, W, 3]."""
    return self.decode(self.quantizer.lookup(tokens))
