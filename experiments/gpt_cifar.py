"""Class-conditional GPT over a CIFAR-10 tokenizer's 8x8 token grids (taming-transformers'
minGPT recipe at CIFAR size): 4 blocks, width 256, 8 heads; AdamW-style betas (0.9, 0.95),
lr 4.5e-4, batch 64; the class token first; labels dropped 10% of the time for guidance.

  python run.py --config=experiments/vqvae_cifar.py --workdir=/tmp/vqvae      # the tokenizer
  python run.py --config=experiments/gpt_cifar.py --workdir=/tmp/gpt \
      --config.prior.tokenizer_workdir=/tmp/vqvae
  python run.py --config=experiments/gpt_cifar.py --workdir=/tmp/gpt \
      --config.prior.tokenizer_workdir=/tmp/vqvae --mode=sample --out=/tmp/gpt_samples
  python run.py --config=experiments/gpt_cifar.py:smoke ...                   # ~1 minute on CPU
  ... --config.prior.matmul_dtype=bfloat16   # bfloat16 products (faster on an AVX512-BF16 CPU)
"""

from experiments import prior_base


def get_config(arg=None):
  c = prior_base.get_prior_config()
  c.objective = 'gpt'
  if arg == 'smoke':
    c = prior_base.shrink_for_smoke(c)
  elif arg:
    raise ValueError(f"gpt_cifar.py: unknown config argument {arg!r}; use ':smoke' or nothing.")
  return c
