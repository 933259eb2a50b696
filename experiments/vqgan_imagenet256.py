"""VQ-GAN f16 on ImageNet 256x256: taming-transformers' ImageNet VQGAN (16x16 tokens).

As taming's `vqgan_imagenet_f16_1024.yaml`: encoder/decoder ch 128, multipliers
(1, 1, 2, 2, 4) (four downsamplings: 256 -> 16), 2 ResNet blocks per level, attention at
16x16; 1024 codes of dim 256 learned by gradient (beta 0.25); L1 + LPIPS-VGG16 + hinge
PatchGAN with 3 stride-2 layers, adaptive weight x 0.8, discriminator from step 250001;
Adam (0.5, 0.9) at taming's base rate 4.5e-6 x global batch. GroupNorm in the
discriminator where taming has BatchNorm (no batch statistics across devices here).

ImageNet needs a manual download (tfds `imagenet2012`: place the tar files in the tfds
manual dir, then `tfds build imagenet2012`); images are center-cropped and resized
(bicubic) to 256. Global batch 64: 8 per device on 8 accelerators, bfloat16 compute.

  python run.py --config=experiments/vqgan_imagenet256.py --workdir=/ckpt/vqgan256
  python run.py --config=experiments/vqgan_imagenet256.py --workdir=/ckpt/vqgan256 --mode=eval
  python -m benchmarks.train_step --config=experiments/vqgan_imagenet256.py \
      --config.train.batch_size=8 --config.loss.disc_start=0 --steps=5   # one GPU
  python run.py --config=experiments/vqgan_imagenet256.py:smoke --workdir=/tmp/smoke256
"""

from experiments import base

# taming scales its base learning rate by the batch (lr = base_lr * batch * gpus).
_TAMING_BASE_LR = 4.5e-6


def get_config(arg=None):
  c = base.get_base_config()
  c.objective = 'vqgan'
  c.data.dataset = 'tfds:imagenet2012:train'
  c.data.image_size = 256
  c.data.resize = True
  c.data.download = False  # ImageNet cannot be downloaded by tfds; prepare it by hand
  c.model.arch = 'taming'
  c.model.dtype = 'bfloat16'
  c.model.ch = 128
  c.model.ch_mult = (1, 1, 2, 2, 4)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.quantizer.kind = 'vq'
  c.quantizer.num_codes = 1024
  c.quantizer.code_dim = 256
  c.quantizer.beta = 0.25
  c.loss.recon = 'l1'
  c.loss.recon_weight = 1.0
  c.loss.perceptual_weight = 1.0
  c.loss.disc_weight = 0.8
  c.loss.gan_loss = 'hinge'
  c.loss.disc_start = 250_001
  c.loss.disc_warmup = 0
  c.disc.name = 'patchgan'
  c.disc.ndf = 64
  c.disc.n_layers = 3
  c.train.batch_size = 64
  c.train.learning_rate = _TAMING_BASE_LR * c.train.batch_size
  c.disc.learning_rate = c.train.learning_rate
  c.train.b1 = 0.5
  c.train.b2 = 0.9
  # Twice disc_start: as many steps with the GAN loss as without.
  c.train.num_steps = 500_000
  c.train.log_every = 100
  c.train.checkpoint_every = 5_000
  c.train.image_every = 5_000
  c.eval.dataset = 'tfds:imagenet2012:validation'
  c.eval.batch_size = 64
  c.eval.grid_images = 8
  if arg == 'smoke':
    # The same five-level network, narrower, at 64x64 on CIFAR-10 (upsampled), so the
    # pipeline runs on a CPU without ImageNet; attention still sits at 16x16.
    c = base.shrink_for_smoke(c)
    c.data.dataset = 'tfds:cifar10:train'
    c.eval.dataset = 'tfds:cifar10:test'
    c.data.download = True
    c.data.image_size = 64
    c.model.dtype = 'float32'
    c.model.ch = 32
    c.model.ch_mult = (1, 1, 2, 2, 4)
    c.model.attn_resolutions = (16,)
    c.quantizer.code_dim = 16
    c.train.batch_size = 8
    c.train.learning_rate = _TAMING_BASE_LR * c.train.batch_size
    c.disc.learning_rate = c.train.learning_rate
    c.eval.batch_size = 16
    c.eval.max_examples = 64
  elif arg:
    raise ValueError(f"vqgan_imagenet256.py: unknown config argument {arg!r}; use ':smoke' or "
                     'nothing.')
  return c
