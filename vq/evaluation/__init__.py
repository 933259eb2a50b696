"""Evaluation: numbers that can be quoted, over every example of a split exactly once.

- `evaluator`: whole-split tokenizer evaluation (PSNR, SSIM, LPIPS, fd_vgg, rFID, codebook
  usage, bits, probe) under pmap; `evaluate(config, workdir)` writes eval/step_<N>.json.
- `references`: the cache of the originals' feature statistics.
- `fid`: Fréchet distance (float64) and streaming feature statistics.
- `probe`: a linear softmax probe on frozen features.

Imports: `vq.core`, `vq.data`, `vq.models`, `vq.perceptual`, `vq.config`, `vq.runtime`.
"""
