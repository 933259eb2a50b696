"""Reconstruction and adversarial losses for VQ-VAE / VQ-GAN training.

Usage sketch::

  from vq.training import losses

  rec = losses.reconstruction_loss(recon, images, kind='l1').mean()
  d_loss = losses.discriminator_loss(real, fake, kind='hinge').mean()
  g_loss = losses.generator_loss(fake, kind='hinge').mean()
  weight = losses.adaptive_generator_weight(rec_grads, gen_grads)

Every loss is pure and UNREDUCED: it returns one value per element (or per
example for `r1_penalty`), and the caller picks the reduction (mean over the
batch, masking, pmean over devices). Inputs whose shapes should match are
checked and a mismatch raises a one-line ValueError. Losses are computed in at
least float32, so a bfloat16 network still gets float32 losses.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

RECONSTRUCTION_KINDS = ('l1', 'l2')
GAN_KINDS = ('hinge', 'nonsaturating')


def _as_float(x: Any) -> jax.Array:
  # Losses are summed over many elements; bfloat16 would lose most of them.
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_same_shape(name_a: str, a: jax.Array, name_b: str,
                      b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(
        f'{name_a} and {name_b} must have the same shape, got {a.shape} and '
        f'{b.shape}; pass arrays of equal shape (no broadcasting is done).')


def _check_kind(kind: str, choices: tuple[str, ...], what: str) -> None:
  if kind not in choices:
    raise ValueError(
        f'Unknown {what} kind {kind!r}; choose one of {", ".join(choices)}.')


def l1_loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise absolute error `|predictions - targets|`.

  Args:
    predictions: Array of any shape.
    targets: Array with the same shape as `predictions`.

  Returns:
    Array with the shape of the inputs.

  Raises:
    ValueError: If the shapes differ.
  """
  predictions, targets = _as_float(predictions), _as_float(targets)
  _check_same_shape('predictions', predictions, 'targets', targets)
  return jnp.abs(predictions - targets)


def l2_loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise squared error `(predictions - targets)**2`.

  Unlike `optax.l2_loss` there is no 0.5 factor, so `l2_loss(...).mean()` is
  the mean squared error that PSNR is computed from.

  Args:
    predictions: Array of any shape.
    targets: Array with the same shape as `predictions`.

  Returns:
    Array with the shape of the inputs.

  Raises:
    ValueError: If the shapes differ.
  """
  predictions, targets = _as_float(predictions), _as_float(targets)
  _check_same_shape('predictions', predictions, 'targets', targets)
  return jnp.square(predictions - targets)


def reconstruction_loss(predictions: jax.Array, targets: jax.Array, *,
                        kind: str) -> jax.Array:
  """Elementwise reconstruction loss selected by name.

  Args:
    predictions: Reconstructed images, any shape.
    targets: Original images, same shape as `predictions`.
    kind: 'l1' (`l1_loss`) or 'l2' (`l2_loss`).

  Returns:
    Array with the shape of the inputs.

  Raises:
    ValueError: If `kind` is unknown or the shapes differ.
  """
  _check_kind(kind, RECONSTRUCTION_KINDS, 'reconstruction loss')
  if kind == 'l1':
    return l1_loss(predictions, targets)
  return l2_loss(predictions, targets)


def hinge_discriminator_loss(real_logits: jax.Array,
                             fake_logits: jax.Array) -> jax.Array:
  """Hinge loss for the discriminator: `relu(1 - real) + relu(1 + fake)`.

  Taming-transformers additionally multiplies the mean by 0.5; that constant is
  left to the caller's discriminator weight.

  Args:
    real_logits: Discriminator logits on real images.
    fake_logits: Discriminator logits on reconstructions, same shape.

  Returns:
    Array with the shape of the logits.

  Raises:
    ValueError: If the shapes differ.
  """
  real_logits, fake_logits = _as_float(real_logits), _as_float(fake_logits)
  _check_same_shape('real_logits', real_logits, 'fake_logits', fake_logits)
  return jax.nn.relu(1.0 - real_logits) + jax.nn.relu(1.0 + fake_logits)


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
  """Hinge loss for the generator: `-fake_logits` elementwise."""
  return -_as_float(fake_logits)


def nonsaturating_discriminator_loss(real_logits: jax.Array,
                                     fake_logits: jax.Array) -> jax.Array:
  """Logistic loss for the discriminator: `softplus(-real) + softplus(fake)`.

  This is `-log sigmoid(real) - log(1 - sigmoid(fake))`, written with softplus
  so that large logits neither overflow nor lose their gradient.

  Args:
    real_logits: Discriminator logits on real images.
    fake_logits: Discriminator logits on reconstructions, same shape.

  Returns:
    Array with the shape of the logits.

  Raises:
    ValueError: If the shapes differ.
  """
  real_logits, fake_logits = _as_float(real_logits), _as_float(fake_logits)
  _check_same_shape('real_logits', real_logits, 'fake_logits', fake_logits)
  return jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)


def nonsaturating_generator_loss(fake_logits: jax.Array) -> jax.Array:
  """Non-saturating generator loss `softplus(-fake) = -log sigmoid(fake)`."""
  return jax.nn.softplus(-_as_float(fake_logits))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, *,
                       kind: str) -> jax.Array:
  """Elementwise discriminator loss selected by name.

  Args:
    real_logits: Discriminator logits on real images.
    fake_logits: Discriminator logits on reconstructions, same shape.
    kind: 'hinge' or 'nonsaturating'.

  Returns:
    Array with the shape of the logits.

  Raises:
    ValueError: If `kind` is unknown or the shapes differ.
  """
  _check_kind(kind, GAN_KINDS, 'GAN loss')
  if kind == 'hinge':
    return hinge_discriminator_loss(real_logits, fake_logits)
  return nonsaturating_discriminator_loss(real_logits, fake_logits)


def generator_loss(fake_logits: jax.Array, *, kind: str) -> jax.Array:
  """Elementwise generator (adversarial) loss selected by name.

  Args:
    fake_logits: Discriminator logits on reconstructions.
    kind: 'hinge' or 'nonsaturating'.

  Returns:
    Array with the shape of the logits.

  Raises:
    ValueError: If `kind` is unknown.
  """
  _check_kind(kind, GAN_KINDS, 'GAN loss')
  if kind == 'hinge':
    return hinge_generator_loss(fake_logits)
  return nonsaturating_generator_loss(fake_logits)


def lecam_regularizer(real_logits: jax.Array, fake_logits: jax.Array,
                      ema_real_mean: jax.Array,
                      ema_fake_mean: jax.Array) -> jax.Array:
  """LeCAM regulariser for the discriminator (Tseng et al., CVPR 2021).

  Elementwise `relu(real - ema_fake)**2 + relu(ema_real - fake)**2`. The paper
  writes the unclipped `||D(x) - a_F||^2 + ||D(G(z)) - a_R||^2`; the authors'
  code (google/lecam-gan, `lecam_reg`) and MAGVIT apply the ReLU, penalising
  only real logits above the fake anchor and fake logits below the real
  anchor. We follow the code. The anchors are EMAs of the mean real and fake
  logits that the caller keeps (typical decay 0.99) and are treated as
  constants here (stop-gradient).

  Args:
    real_logits: Discriminator logits on real images.
    fake_logits: Discriminator logits on reconstructions, same shape.
    ema_real_mean: Scalar EMA of the mean real logit.
    ema_fake_mean: Scalar EMA of the mean fake logit.

  Returns:
    Array with the shape of the logits; take its mean for the paper's R_LC.

  Raises:
    ValueError: If the logits' shapes differ or an EMA is not a scalar.
  """
  real_logits, fake_logits = _as_float(real_logits), _as_float(fake_logits)
  _check_same_shape('real_logits', real_logits, 'fake_logits', fake_logits)
  ema_real_mean = jax.lax.stop_gradient(_as_float(ema_real_mean))
  ema_fake_mean = jax.lax.stop_gradient(_as_float(ema_fake_mean))
  for name, value in (('ema_real_mean', ema_real_mean),
                      ('ema_fake_mean', ema_fake_mean)):
    if value.ndim != 0:
      raise ValueError(
          f'{name} must be a scalar, got shape {value.shape}; pass the EMA of '
          'the mean logit, not the logits themselves.')
  return (jnp.square(jax.nn.relu(real_logits - ema_fake_mean)) +
          jnp.square(jax.nn.relu(ema_real_mean - fake_logits)))


def r1_penalty(discriminator_fn: Callable[[jax.Array], jax.Array],
               real_images: jax.Array) -> jax.Array:
  """Per-example R1 gradient penalty `||d D(x) / dx||^2` (Mescheder et al.).

  The gradient is that of the sum of all logits, as StyleGAN2 does: for a
  PatchGAN the patch logits of one example are summed, and, because examples
  do not interact (no batch statistics), the gradient of the batch sum with
  respect to one example is that example's own gradient. The squared
  gradient is summed over all pixels and channels of each example. The usual
  weight is gamma / 2 on the batch mean.

  Args:
    discriminator_fn: Maps images `[N, ...]` to logits `[N, ...]`, e.g.
      `lambda x: disc.apply(params, x)`.
    real_images: Real images `[N, H, W, C]` (any rank with a leading batch).

  Returns:
    Float array of shape `[N]`.

  Raises:
    ValueError: If `real_images` has no batch dimension.
  """
  real_images = jnp.asarray(real_images)
  if real_images.ndim < 2:
    raise ValueError(
        f'real_images must have a leading batch dimension, got shape '
        f'{real_images.shape}; pass an array [N, H, W, C].')
  grads = jax.grad(lambda x: jnp.sum(_as_float(discriminator_fn(x))))(
      real_images)
  grads = _as_float(grads)
  return jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim)))


def adaptive_generator_weight(rec_grads: Any, gen_grads: Any, *,
                              eps: float = 1e-4,
                              max_weight: float = 1e4) -> jax.Array:
  """Balances the adversarial term against reconstruction (taming-transformers).

  Returns `||rec_grads|| / (||gen_grads|| + eps)` clipped to `[0, max_weight]`
  with gradients stopped, where `||.||` is the global L2 norm over the pytree.
  Both pytrees are the gradients of the respective losses with respect to the
  kernel of the decoder's last layer (taming's `last_layer`, the
  `decoder.conv_out.weight` tensor alone, without its bias); multiply the
  generator loss by the result (and by the user's discriminator weight).

  Args:
    rec_grads: Pytree of gradients of the reconstruction (+ perceptual) loss.
    gen_grads: Pytree of gradients of the generator loss, same structure.
    eps: Added to the generator gradient norm to avoid dividing by zero.
    max_weight: Upper clip of the weight.

  Returns:
    Scalar float32 weight.

  Raises:
    ValueError: If the pytree structures differ.
  """
  rec_struct = jax.tree_util.tree_structure(rec_grads)
  gen_struct = jax.tree_util.tree_structure(gen_grads)
  if rec_struct != gen_struct:
    raise ValueError(
        f'rec_grads and gen_grads must have the same pytree structure, got '
        f'{rec_struct} and {gen_struct}; take both gradients with respect to '
        'the same parameters.')
  rec_norm = optax.tree.norm(jax.tree_util.tree_map(_as_float, rec_grads))
  gen_norm = optax.tree.norm(jax.tree_util.tree_map(_as_float, gen_grads))
  weight = jnp.clip(rec_norm / (gen_norm + eps), 0.0, max_weight)
  return jax.lax.stop_gradient(weight)
