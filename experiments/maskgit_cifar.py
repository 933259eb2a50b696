"""Class-conditional MaskGIT over a CIFAR-10 tokenizer's 8x8 token grids: the same
transformer as `gpt_cifar.py` without the causal mask, trained to predict the tokens a
cosine-schedule mask hides, sampled in 10 parallel decoding iterations.

  python run.py --config=experiments/maskgit_cifar.py --workdir=/tmp/maskgit \
      --config.prior.tokenizer_workdir=/tmp/vqvae
  python run.py --config=experiments/maskgit_cifar.py --workdir=/tmp/maskgit \
      --config.prior.tokenizer_workdir=/tmp/vqvae --mode=sample --out=/tmp/maskgit_samples
  python run.py --config=experiments/maskgit_cifar.py:smoke ...               # ~1 minute on CPU
"""

from experiments import prior_base


def get_config(arg=None):
  c = prior_base.get_prior_config()
  c.objective = 'maskgit'
  if arg == 'smoke':
    c = prior_base.shrink_for_smoke(c)
  elif arg:
    raise ValueError(f"maskgit_cifar.py: unknown config argument {arg!r}; use ':smoke' or "
                     'nothing.')
  return c
