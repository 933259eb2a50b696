"""Generation: token priors (GPT, MaskGIT) that turn a trained tokenizer into an image generator.

Usage sketch::

  gen = vq.Generator.from_workdir('/tmp/gpt')          # a prior trained by run.py
  images = gen.sample([3, 3, 5], jax.random.PRNGKey(0))  # uint8 [3, 32, 32, 3]

- `transformer`: one pre-LayerNorm transformer, causal (GPT) or bidirectional (MaskGIT),
  with a key/value cache for autoregressive decoding.
- `priors`: the token layout (class token, null class, [MASK]) and both objectives.
- `sampling`: KV-cached GPT sampling and MaskGIT iterative decoding, with temperature,
  top-k, top-p and classifier-free guidance; pure functions of (params, labels, keys).
- `tokens`: the frozen tokenizer's grids of the training and held-out splits, cached.
- `generator`: `Generator` (a prior + its tokenizer), the prior's state and checkpoints.
- `trainer`: `train_and_evaluate` for priors, on the shared loop of `vq.runtime.loop`.
- `evaluation`: held-out bits/token, sample quality (fd_vgg, precision/recall, gfid,
  classifier metrics) and its references.
- `validation`, `cli`: config checks; the `run.py` modes train, eval and sample.
- `masks`, `editing`, `large`: editing with a prior: mask specs and their token regions,
  inpainting/outpainting and class-guided image-to-image (`Editor`), grids larger than
  the training grid (GPT sliding window, MaskGIT windows).
- `edit_eval`, `edit_cli`: inpainting metrics and baselines; the `run.py` modes inpaint,
  edit, sample_large and eval_inpaint.

Imports: everything below it (`vq.core` ... `vq.inference`, `vq.training` for its step keys).
"""
