"""VQ-VAE on CIFAR-10: the classic setting of the VQ-VAE paper and DeepMind's Sonnet example.

8x8 tokens from 512 EMA codes of dim 64 (k-means init, dead-code restarts); MSE scaled by
1 / Var(train pixels); Adam 3e-4, batch 64 (the Sonnet recipe uses batch 32; 64 matches the
reference numbers we compare to).

  python run.py --config=experiments/vqvae_cifar.py --workdir=/tmp/vqvae
  python run.py --config=experiments/vqvae_cifar.py --workdir=/tmp/vqvae --mode=eval
  python run.py --config=experiments/vqvae_cifar.py:smoke --workdir=/tmp/smoke   # ~1 minute on CPU
"""

from experiments import base


def get_config(arg=None):
  c = base.get_base_config()
  c.objective = 'vqvae'
  c.model.arch = 'sonnet'
  c.quantizer.kind = 'ema'
  c.quantizer.num_codes = 512
  c.quantizer.code_dim = 64
  # The codebook ablation's winner (docs/results.md, benchmarks/codebook_ablation.py): k-means from
  # the first batch and restarts of codes idle for 50 steps keep every code in use.
  c.quantizer.init = 'kmeans'
  c.quantizer.restart_after = 50
  # Sonnet divides the MSE by the variance of the training pixels (0.0627 on [-0.5, 0.5],
  # i.e. 0.2508 on our [-1, 1] scale), which sets the balance against the commitment loss.
  c.loss.recon = 'l2'
  c.loss.recon_weight = 1.0 / 0.2508
  c.train.num_steps = 10_000
  c.train.batch_size = 64
  c.train.learning_rate = 3e-4
  if arg == 'smoke':
    c = base.shrink_for_smoke(c)
  elif arg:
    raise ValueError(f"vqvae_cifar.py: unknown config argument {arg!r}; use ':smoke' or nothing.")
  return c
