"""vq: discrete image tokenizers (VQ-VAE, VQ-GAN) in JAX/Flax, and what is built on them.

Usage sketch::

  import vq

  config = vq.load_config('experiments/vqvae_cifar.py:smoke')
  vq.train_and_evaluate(config, '/tmp/vq')          # train (resumes from the workdir)
  results = vq.evaluate(config, '/tmp/vq')          # eval/step_<N>.json
  tok = vq.Tokenizer.from_workdir(config, '/tmp/vq')
  tokens = tok.encode(images_uint8)                 # int32 [N, h, w]
  gen = vq.Generator.from_workdir('/tmp/gpt')       # a token prior trained on those tokens
  samples = gen.sample([3, 3, 5], jax.random.PRNGKey(0))

The packages, bottom to top (each imports only the ones above it in this list):

  core         metrics, image grids, safe weight files
  cpu          XLA:CPU fast paths (native kernels, CPU device count, host memory)
  data         dataset specs, sources, deterministic batches
  quantizers   VQ, EMA, FSQ, LFQ, residual VQ; k-means; codebook usage
  models       encoders/decoders, discriminators, norms, conv routing, VQTokenizer
  perceptual   LPIPS-VGG16, Inception (FID)
  config       config files -> modules and optimizers; validation
  runtime      train state, checkpoints, pmap/jit, multi-process, log writers
  evaluation   whole-split tokenizer evaluation, FID, probe
  training     losses, the train step, the loop
  inference    a trained tokenizer from its workdir; encode/decode/reconstruct modes
  generation   token priors (GPT, MaskGIT): training, sampling, evaluation
  convert      taming-transformers and LlamaGen checkpoints -> vq workdirs (python -m vq.convert)

Importing `vq` imports none of them (and so starts no JAX backend): the names below load
their package on first use.
"""

import importlib

_PUBLIC = {
    'load_config': ('vq.config.loading', 'load_config'),
    'train_and_evaluate': ('vq.training.trainer', 'train_and_evaluate'),
    'evaluate': ('vq.evaluation.evaluator', 'evaluate'),
    'Tokenizer': ('vq.inference.tokenizer', 'Tokenizer'),
    'Generator': ('vq.generation.generator', 'Generator'),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    module, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
  raise AttributeError(f'module vq has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
