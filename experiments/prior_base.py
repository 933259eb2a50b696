"""Fields of every token-prior experiment (GPT, MaskGIT); `gpt_cifar.py` and
`maskgit_cifar.py` change a few.

Not a config file itself: `get_prior_config()` is imported by the config files, and
`shrink_for_smoke(config)` implements their `:smoke` argument. The tokenizer is named by
`prior.tokenizer_workdir` (its config and checkpoints); the image size, the codebook and
the token grid come from it.
"""

import ml_collections


def get_prior_config() -> ml_collections.ConfigDict:
  """Every field a token prior reads, with CIFAR-10 defaults."""
  c = ml_collections.ConfigDict()
  c.objective = 'gpt'            # 'gpt' (causal, raster order) or 'maskgit' (masked, iterative)
  c.seed = 0                     # root PRNG seed: init, data order, per-step noise

  c.prior = ml_collections.ConfigDict()
  c.prior.tokenizer_workdir = ''  # workdir of a trained tokenizer (required)
  c.prior.tokenizer_step = 0     # its checkpoint whose tokens to learn (0: the latest)
  c.prior.width = 256            # transformer width
  c.prior.depth = 4              # transformer blocks
  c.prior.num_heads = 8          # attention heads (must divide width)
  c.prior.mlp_ratio = 4          # MLP hidden width / width
  c.prior.dropout = 0.0          # dropout on embeddings, attention and MLP outputs
  c.prior.dtype = 'float32'      # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  # 'bfloat16' (a TPU's default matmul precision) was 1.5-1.7x faster on an AVX512-BF16 CPU,
  # where `dtype='bfloat16'` was slower than float32 (docs/speed.md).
  c.prior.matmul_dtype = 'float32'  # dense layers' products: 'float32' or 'bfloat16' (f32 sums)
  c.prior.class_dropout = 0.1    # labels dropped to the null class in training (for guidance)
  c.prior.flip = True            # also learn the grids of left-right mirrored training images

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'tfds:cifar10:train'  # training images, encoded once by the tokenizer
  c.data.data_dir = ''           # tfds data dir; '' = $TFDS_DATA_DIR or tfds' default
  c.data.download = True         # let tfds download and prepare a dataset that is not prepared yet
  c.data.num_classes = 10        # class-conditional over labels 0..N-1 (0: unconditional)
  c.data.max_examples = 0        # encode only the first N training images (0: all)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2_000      # total optimizer steps
  c.train.batch_size = 64        # global batch of token grids (all devices, all processes)
  c.train.learning_rate = 4.5e-4  # peak learning rate
  c.train.warmup_steps = 0       # linear warm-up steps
  c.train.schedule = 'constant'  # after warm-up: 'constant' or 'cosine' (to end_lr_factor * lr)
  c.train.end_lr_factor = 0.1    # cosine: final lr / peak lr
  c.train.b1 = 0.9               # Adam beta1
  c.train.b2 = 0.95              # Adam beta2
  c.train.weight_decay = 0.01    # AdamW decay of dense kernels (not biases, norms, embeddings)
  c.train.grad_clip = 0.0        # clip gradients to this global norm when > 0
  c.train.log_every = 100        # steps between metric logs
  c.train.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
  c.train.keep_checkpoints = 3   # checkpoints kept on disk
  c.train.image_every = 1000     # steps between class grids of samples in workdir/images
  c.train.eval_every = 0         # steps between held-out bits/token evals, plus one at the end (0: never)
  c.train.parallel = 'pmap'      # data parallelism: 'pmap' or 'jit' (jax.jit over a device mesh)

  c.sample = ml_collections.ConfigDict()
  c.sample.temperature = 1.0     # logits / temperature before sampling
  c.sample.top_k = 0             # sample among the k most likely codes (0: all)
  c.sample.top_p = 1.0           # nucleus sampling: the smallest set with this mass (1: all)
  c.sample.guidance = 1.0        # classifier-free guidance s: u + s (c - u); 1: none
  c.sample.num_iterations = 10   # maskgit: decoding iterations
  c.sample.choice_temperature = 4.5  # maskgit: Gumbel noise on the confidence, annealed to 0
  c.sample.batch_size = 250      # grids sampled at once (all devices)
  c.sample.seed = 0              # PRNG seed of --mode=sample and of the eval samples

  c.eval = ml_collections.ConfigDict()
  c.eval.dataset = 'tfds:cifar10:test'  # held-out images: their grids and the real features
  c.eval.batch_size = 250        # global eval batch (the last one padded and masked)
  c.eval.max_examples = 0        # evaluate on the first N held-out images only (0: all)
  c.eval.num_samples = 10_000    # class-balanced samples scored against the held-out images
  c.eval.mask_ratio = 0.5        # maskgit: fraction of tokens masked for masked bits/token
  c.eval.references = True       # also score the tokenizer's reconstructions and unigram samples
  c.eval.classifier = True       # classifier_accuracy / classifier_score (CIFAR-10, 32x32 only)
  c.eval.gfid = True             # Inception FID when its weights exist (else gfid: null, with why)
  c.eval.grid_per_class = 8      # samples per class in the picture grids
  return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A tiny version of `c` that trains and evaluates in about a minute on 2 CPU cores."""
  c.prior.width = 32
  c.prior.depth = 2
  c.prior.num_heads = 4
  c.prior.flip = False
  c.data.max_examples = 512
  c.train.num_steps = 20
  c.train.batch_size = 16
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.image_every = 10
  c.sample.batch_size = 64
  c.sample.num_iterations = 4
  c.eval.batch_size = 64
  c.eval.max_examples = 256
  c.eval.num_samples = 128
  c.eval.grid_per_class = 2
  return c
