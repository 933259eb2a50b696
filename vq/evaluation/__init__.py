"""Evaluation: numbers that can be quoted, over every example of a split exactly once.

- `evaluator`: whole-split tokenizer evaluation (PSNR, SSIM, LPIPS, fd_vgg, rFID, codebook
  usage, bits, probe) under pmap; `evaluate(config, workdir)` writes eval/step_<N>.json.
- `references`: the cache of the originals' feature statistics.
- `fid`: Fréchet distance (float64) and streaming feature statistics.
- `probe`: a linear softmax probe on frozen features.
- `precision_recall`: improved precision and recall (k-NN manifolds) of generated samples'
  features against real ones.
- `classifier`: a small CIFAR-10 classifier shipped with vq (weights in `weights/`) and the
  class-fidelity metrics of class-conditional samples built on it (`classifier_accuracy`,
  `classifier_score`); `classifier_train` is the program that trains it.

Imports: `vq.core`, `vq.data`, `vq.models`, `vq.perceptual`, `vq.config`, `vq.runtime`.
"""
