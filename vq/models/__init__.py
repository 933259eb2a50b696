"""Models: the networks, as Flax Linen modules that take explicit fields, never a config.

- `nets`: taming-transformers' Encoder/Decoder (ResNet + GroupNorm + swish + attention) and
  the Sonnet / VQ-VAE-paper CIFAR encoder/decoder.
- `tokenizer`: `VQTokenizer` = encoder -> quantizer -> decoder, with `tokenize` (images ->
  int tokens) and `detokenize` (tokens -> images).
- `discriminator`: PatchGAN (taming's NLayerDiscriminator) and a StyleGAN-style one.
- `norms`: GroupNorm with flax's parameters, optionally fused with swish.
- `conv`: the convolution every network uses, routed per backend (XLA's own on GPU/TPU).
- `conv_transpose`: the Sonnet decoder's 4x4 stride-2 transposed convolution, per backend.

Imports: `vq.core`, `vq.cpu`, `vq.quantizers`.
"""
