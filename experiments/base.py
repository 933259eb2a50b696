"""Fields shared by every vq experiment; the `experiments/*_cifar.py` files change a few.

Not a config file itself: `get_base_config()` is imported by the config files, and
`shrink_for_smoke(config)` implements their `:smoke` argument.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Every field vq reads, with CIFAR-10 defaults."""
  c = ml_collections.ConfigDict()
  c.objective = 'vqvae'          # 'vqvae' (reconstruction + VQ losses) or 'vqgan' (+ LPIPS + GAN)
  c.seed = 0                     # root PRNG seed: init, data order, per-step noise

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'tfds:cifar10:train'  # train dataset spec: tfds:NAME:SPLIT | npz:PATH | folder:PATH
  c.data.data_dir = ''           # tfds data dir; '' = $TFDS_DATA_DIR or tfds' default
  c.data.image_size = 32         # square image side the model is built for
  c.data.resize = False          # resize (center crop + bicubic) images of another size instead of failing
  c.data.download = True         # let tfds download and prepare a dataset that is not prepared yet
  c.data.prefetch = 2            # batches decoded ahead of the train step

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'sonnet'        # 'sonnet' (VQ-VAE paper CIFAR net) or 'taming' (VQGAN net)
  c.model.dtype = 'float32'      # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  c.model.ch = 64                # taming: base channels
  c.model.ch_mult = (1, 2, 2)    # taming: channel multiplier per level (len-1 downsamplings)
  c.model.num_res_blocks = 2     # taming: ResNet blocks per level
  c.model.attn_resolutions = (8,)  # taming: feature-map sizes with self-attention
  c.model.upsample_impl = 'auto'  # taming: decoder upsampling, nets.upsample_conv (same math)
  c.model.hidden = 128           # sonnet: conv channels
  c.model.res_hidden = 32        # sonnet: residual-block bottleneck channels
  c.model.num_res_layers = 2     # sonnet: residual blocks

  c.quantizer = ml_collections.ConfigDict()
  c.quantizer.kind = 'ema'       # 'ema' (EMA codebook), 'vq' (learned by gradient), 'fsq', 'lfq' or 'rvq'
  c.quantizer.num_codes = 512    # codebook size K
  c.quantizer.code_dim = 64      # code dimension D (encoder output channels)
  c.quantizer.beta = 0.25        # commitment weight: beta * ||z_e - sg[e]||^2
  c.quantizer.beta_on = 'commitment'  # vq: the term beta weighs: 'commitment' or 'codebook' (taming's legacy VQ)
  c.quantizer.decay = 0.99       # ema: decay of counts and sums
  c.quantizer.epsilon = 1e-5     # ema: Laplace smoothing of counts
  c.quantizer.init = 'random'    # vq/ema: 'random' or 'kmeans' (k-means++ and Lloyd on the first global batch)
  c.quantizer.kmeans_iters = 10  # vq/ema: Lloyd iterations of the k-means initialisation
  c.quantizer.restart_after = 0  # vq/ema: replace codes unused for this many steps by batch encodings (0: never)
  c.quantizer.lookup_dim = 0     # vq/ema: project to this many dims for the lookup and back (0: no projection)
  c.quantizer.l2_normalize = False  # vq/ema: l2-normalise inputs and codes (cosine-similarity lookup)
  c.quantizer.gradient = 'ste'   # vq/ema/rvq: 'ste' (straight-through) or 'rotation' (rotation trick)
  c.quantizer.entropy_weight = 0.0  # weight of the entropy penalty (per-sample entropy - batch entropy)
  c.quantizer.entropy_temperature = 0.01  # softmax temperature of the entropy penalty
  c.quantizer.fsq_levels = (8, 5, 5, 5)  # fsq: levels per dimension; num_codes must be their product
  c.quantizer.rvq_depth = 4      # rvq: codebooks quantizing successive residuals
  c.quantizer.usage_window = 1000  # steps of the sliding window for codebook_usage in training logs

  c.loss = ml_collections.ConfigDict()
  c.loss.recon = 'l2'            # reconstruction loss: 'l2' (squared error) or 'l1'
  c.loss.recon_weight = 1.0      # weight of the mean reconstruction loss
  c.loss.perceptual_weight = 0.0  # vqgan: weight of LPIPS-VGG16
  c.loss.disc_weight = 0.0       # vqgan: scales taming's adaptive adversarial weight
  c.loss.adaptive_weight = True  # vqgan: taming's ||grad L_rec|| / ||grad L_G|| at the last layer
  c.loss.gan_loss = 'hinge'      # vqgan: 'hinge' or 'nonsaturating'
  c.loss.disc_start = 0          # vqgan: first step at which the generator sees the GAN loss
  c.loss.disc_warmup = 0         # vqgan: steps the discriminator trains before disc_start
  c.loss.lecam_weight = 0.0      # vqgan: LeCAM regularisation of the discriminator
  c.loss.lecam_decay = 0.999     # vqgan: EMA decay of the LeCAM logit anchors
  c.loss.r1_weight = 0.0         # vqgan: R1 gradient penalty on real images

  c.disc = ml_collections.ConfigDict()
  c.disc.name = 'patchgan'       # 'patchgan' (taming NLayerDiscriminator) or 'stylegan'
  c.disc.ndf = 64                # base channels
  c.disc.n_layers = 2            # patchgan: stride-2 layers
  c.disc.norm = 'group'          # 'group', 'layer' or 'none' (no batch statistics under pmap)
  c.disc.learning_rate = 1e-4    # discriminator peak learning rate
  c.disc.b1 = 0.5                # discriminator Adam beta1
  c.disc.b2 = 0.9                # discriminator Adam beta2

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 10_000     # total optimizer steps
  c.train.batch_size = 64        # global batch size (all devices, all processes)
  c.train.learning_rate = 3e-4   # generator peak learning rate
  c.train.warmup_steps = 0       # linear warm-up steps
  c.train.schedule = 'constant'  # after warm-up: 'constant' or 'cosine' (to end_lr_factor * lr)
  c.train.end_lr_factor = 0.1    # cosine: final lr / peak lr
  c.train.b1 = 0.9               # Adam beta1
  c.train.b2 = 0.999             # Adam beta2
  c.train.weight_decay = 0.0     # decoupled weight decay (AdamW) when > 0
  c.train.grad_clip = 0.0        # clip gradients to this global norm when > 0
  c.train.ema_decay = 0.0        # EMA of generator weights (used for eval) when > 0
  c.train.log_every = 100        # steps between metric logs
  c.train.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
  c.train.keep_checkpoints = 3   # checkpoints kept on disk
  c.train.image_every = 1000     # steps between reconstruction grids in workdir/images
  c.train.eval_every = 0         # steps between test-split evals in training, plus one at the end (0: never)
  c.train.parallel = 'pmap'      # data parallelism: 'pmap' or 'jit' (jax.jit over a device mesh)

  c.eval = ml_collections.ConfigDict()
  c.eval.dataset = 'tfds:cifar10:test'  # evaluation dataset spec (any spec form)
  c.eval.batch_size = 250        # global eval batch size (last batch padded and masked)
  c.eval.max_examples = 0        # evaluate only the first N examples (0: the whole split)
  c.eval.grid_images = 16        # images in the eval reconstruction grid
  c.eval.lpips = True            # compute LPIPS-VGG16 in eval
  c.eval.rfid = True             # Inception rFID when its weights exist (else rfid: null, with why)
  c.eval.probe = False           # linear-probe accuracy on frozen z_q (an extra encode pass)
  c.eval.probe_train_dataset = 'tfds:cifar10:train'  # labelled dataset the probe trains on
  c.eval.probe_max_train = 10_000  # probe trains on the first N examples (0: all)
  c.eval.probe_grid = 4          # probe input: z_q avg-pooled to grid x grid, flattened (0: unpooled)
  return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A tiny version of `c` that trains in about a minute on 2 CPU cores."""
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.hidden = 32
  c.model.res_hidden = 8
  c.model.num_res_layers = 1
  c.quantizer.num_codes = 64
  c.quantizer.code_dim = 16
  c.disc.ndf = 16
  c.train.num_steps = 20
  c.train.batch_size = 16
  c.train.warmup_steps = 0
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.image_every = 10
  c.eval.batch_size = 64
  c.eval.max_examples = 256
  c.eval.grid_images = 8
  if c.loss.disc_start:
    c.loss.disc_start = 5
    c.loss.disc_warmup = min(c.loss.disc_warmup, 5)
  return c
