"""Training: the tokenizer's losses, its pure train step and the loop around it.

- `losses`: pure, unreduced losses (L1/L2, hinge and non-saturating GAN, LeCAM, R1,
  taming's adaptive weight).
- `step`: `train_step(state, batch, rng) -> (state, metrics)` for VQ-VAE and VQ-GAN, and
  the codebook upkeep after each update.
- `trainer`: `train_and_evaluate(config, workdir)`: restore-or-init, steps, logs, pictures,
  checkpoints, preemption, the NaN guard and evaluations during training.

Imports: everything below it (`vq.core` ... `vq.runtime`, `vq.evaluation`).
"""
