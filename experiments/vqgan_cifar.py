"""VQ-GAN on CIFAR-10: taming-transformers' network and objective at 32x32.

Encoder/decoder ch 64, multipliers (1, 2, 2), 2 ResNet blocks, attention at 8x8 -> 8x8 tokens;
512 EMA codes of dim 64 (k-means init, dead-code restarts); L1 + LPIPS-VGG16 + hinge PatchGAN
with taming's adaptive weight; the discriminator warms up before the generator sees it.

  python run.py --config=experiments/vqgan_cifar.py --workdir=/tmp/vqgan
  python run.py --config=experiments/vqgan_cifar.py --workdir=/tmp/vqgan --mode=eval
  python run.py --config=experiments/vqgan_cifar.py:smoke --workdir=/tmp/smoke_gan
  python run.py --config=experiments/vqgan_cifar.py --config.objective=vqvae   # same net, no GAN
"""

from experiments import base


def get_config(arg=None):
  c = base.get_base_config()
  c.objective = 'vqgan'
  c.model.arch = 'taming'
  c.model.ch = 64
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (8,)
  c.quantizer.kind = 'ema'
  c.quantizer.num_codes = 512
  c.quantizer.code_dim = 64
  # The codebook ablation's winner (docs/results.md, benchmarks/codebook_ablation.py): k-means from
  # the first batch and restarts of codes idle for 50 steps keep every code in use.
  c.quantizer.init = 'kmeans'
  c.quantizer.restart_after = 50
  c.loss.recon = 'l1'
  c.loss.recon_weight = 1.0
  c.loss.perceptual_weight = 1.0
  c.loss.disc_weight = 0.5
  c.loss.gan_loss = 'hinge'
  c.loss.disc_start = 2_000
  c.loss.disc_warmup = 500
  c.disc.name = 'patchgan'
  c.disc.ndf = 64
  c.disc.n_layers = 2
  c.disc.learning_rate = 1e-4
  c.train.num_steps = 10_000
  c.train.batch_size = 64
  c.train.learning_rate = 1e-4
  c.train.b1 = 0.5
  c.train.b2 = 0.9
  if arg == 'smoke':
    c = base.shrink_for_smoke(c)
  elif arg:
    raise ValueError(f"vqgan_cifar.py: unknown config argument {arg!r}; use ':smoke' or nothing.")
  return c
