"""A trained prior and its tokenizer as one image generator.

Usage sketch::

  gen = Generator.from_workdir('/tmp/gpt')                  # the prior's --workdir
  images = gen.sample([3, 3, 5], jax.random.PRNGKey(0))     # uint8 [3, 32, 32, 3]
  tokens = gen.sample_tokens(labels, key, guidance=2.0)     # int32 [N, 8, 8]

The prior's workdir holds its config.json and checkpoints; each checkpoint records which
tokenizer (workdir, config hash, step) its tokens came from, and `from_workdir` loads
exactly that one. Sampling is a pure function of (params, labels, key): row i draws from
`fold_in(key, i)`, so the same key gives the same images whatever the batch size or the
number of devices, and a different key gives different ones. Rows are split over the
local devices (`vq.runtime.parallel`) in chunks of `config.sample.batch_size`; each chunk
shape compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vq import inference
from vq.config import builders
from vq.generation import priors
from vq.generation import sampling
from vq.generation import tokens as token_data
from vq.generation import validation
from vq.runtime import checkpointing
from vq.runtime import parallel


@flax.struct.dataclass
class PriorState:
  """A prior's training state: step, parameters, optimizer state (tx is static)."""
  step: jax.Array
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def checkpointable(state: PriorState) -> dict:
  return flax.serialization.to_state_dict(state)


def restore_from(state: PriorState, tree: dict) -> PriorState:
  return flax.serialization.from_state_dict(state, tree)


# Config fields that shape a prior's saved state.
STRUCTURAL_FIELDS = ('objective', 'prior.width', 'prior.depth', 'prior.num_heads',
                     'prior.mlp_ratio', 'data.num_classes')


def incompatible_fields(saved: dict, current: dict, *, optimizer: bool = True) -> list[str]:
  """'field: saved X, now Y' for every difference that changes the saved state (with
  `optimizer=False`, only the model's: what sampling and evaluation restore)."""
  lookup = checkpointing._lookup  # pylint: disable=protected-access
  out = []
  for field in STRUCTURAL_FIELDS:
    a, b = lookup(saved, field), lookup(current, field)
    if a != b:
      out.append(f'{field}: saved {a!r}, now {b!r}')
  for field in ('train.grad_clip', 'train.weight_decay') if optimizer else ():
    a, b = lookup(saved, field), lookup(current, field)
    if a is not None and b is not None and (a > 0) != (b > 0):
      out.append(f'{field}: saved {a!r}, now {b!r} (on/off changes the saved state)')
  return out


def checkpointer(directory: pathlib.Path, keep: int) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(directory, keep=keep, to_tree=checkpointable,
                                    from_tree=restore_from, incompatible=incompatible_fields)


def layout_for(config: ml_collections.ConfigDict, tok: inference.Tokenizer
               ) -> priors.TokenLayout:
  return priors.TokenLayout(num_codes=tok.num_codes, num_classes=int(config.data.num_classes),
                            grid=tuple(tok.token_shape))


def build_model(config: ml_collections.ConfigDict, layout: priors.TokenLayout):
  p = config.prior
  return priors.build_model(config.objective, layout, width=p.width, depth=p.depth,
                            num_heads=p.num_heads, mlp_ratio=p.mlp_ratio, dropout=p.dropout,
                            dtype=builders.compute_dtype(p.dtype),
                            matmul_dtype=validation.matmul_dtype(config))


def decay_mask(params: Any) -> Any:
  """Weight decay on the kernels of dense layers only: never on biases, LayerNorm scales,
  the token and position embeddings (minGPT's / taming's `configure_optimizers` split)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {k: k[-1] == 'kernel' for k in flat})


def create_state(config: ml_collections.ConfigDict, model, layout: priors.TokenLayout,
                 key: jax.Array) -> PriorState:
  """Fresh parameters and optimizer state (host arrays)."""
  dummy = jnp.zeros((1, layout.length + 1), jnp.int32)
  params = jax.jit(lambda k: model.init(k, dummy)['params'])(key)
  tx = builders.build_optimizer(config.train, decay_mask=decay_mask)
  return PriorState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=jax.jit(tx.init)(params), tx=tx)


def settings_from(config: ml_collections.ConfigDict, **overrides) -> sampling.Settings:
  s = config.sample
  fields = dict(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
                guidance=float(s.guidance), num_iterations=int(s.num_iterations),
                choice_temperature=float(s.choice_temperature))
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return sampling.Settings(**fields)


class Sampler:
  """Token grids for any number of rows: chunks of `batch_size`, split over the devices."""

  def __init__(self, kind: str, model, layout: priors.TokenLayout, batch_size: int):
    self.kind, self.layout = kind, layout
    self.batch_size = int(batch_size)
    self._par = parallel.get('pmap')
    self._devices = jax.local_device_count()
    if self.batch_size % self._devices:
      raise ValueError(f'sample.batch_size={batch_size} is not divisible by the '
                       f'{self._devices} local devices; use a multiple of {self._devices}.')
    self._model = model
    self._compiled: dict[sampling.Settings, Any] = {}

  def _fn(self, settings: sampling.Settings):
    if settings not in self._compiled:
      sample = sampling.sample_gpt if self.kind == 'gpt' else sampling.sample_maskgit

      def per_device(params, batch):
        return sample(self._model, params, self.layout, batch['labels'], batch['keys'],
                      settings)

      self._compiled[settings] = self._par.eval_step(per_device)
    return self._compiled[settings]

  def __call__(self, params: Any, labels: np.ndarray, key: jax.Array,
               settings: sampling.Settings) -> np.ndarray:
    """int32 [N, L] for int32 labels [N]; row i uses fold_in(key, i)."""
    n, b, d = len(labels), self.batch_size, self._devices
    fn = self._fn(settings)
    p_params = self._par.replicate(params)
    keys = sampling.row_keys(key, n)
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.key_data(keys)
    keys = np.asarray(keys)
    out = np.zeros((n, self.layout.length), np.int32)
    for lo in range(0, n, b):
      rows = min(b, n - lo)
      chunk_labels = np.zeros(b, np.int32)
      chunk_labels[:rows] = labels[lo:lo + rows]
      chunk_keys = np.zeros((b,) + keys.shape[1:], keys.dtype)
      chunk_keys[:rows] = keys[lo:lo + rows]
      batch = {'labels': chunk_labels.reshape(d, b // d),
               'keys': chunk_keys.reshape((d, b // d) + keys.shape[1:])}
      tokens = fn(p_params, self._par.shard(batch))
      out[lo:lo + rows] = np.asarray(tokens).reshape(b, -1)[:rows]
    return out


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """0, 1, ..., C-1, 0, 1, ...: `num` labels with every class equally often (+-1)."""
  if num_classes == 0:
    return np.full(num, priors.NULL_LABEL, np.int32)
  return (np.arange(num) % num_classes).astype(np.int32)


def read_prior_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir).expanduser() / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not the --workdir of a '
                            'trained prior; train one first (run.py --config=experiments/'
                            'gpt_cifar.py --workdir=DIR ...).')
  config = ml_collections.ConfigDict(token_data.tuples(json.loads(path.read_text())))
  if not validation.is_prior(config):
    raise ValueError(f'{workdir} holds a {config.get("objective")!r} run, not a token prior; '
                     'for tokenizers use vq.Tokenizer.from_workdir.')
  return config


@dataclasses.dataclass
class Generator:
  """A prior's parameters, its tokenizer, and the sampler between them."""
  config: ml_collections.ConfigDict
  params: Any
  step: int
  tokenizer: inference.Tokenizer
  tokenizer_identity: dict

  def __post_init__(self):
    self.layout = layout_for(self.config, self.tokenizer)
    self.model = build_model(self.config, self.layout)
    self.sampler = Sampler(self.config.objective, self.model, self.layout,
                           self.config.sample.batch_size)

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike,
                   config: ml_collections.ConfigDict | None = None,
                   step: int | None = None) -> Generator:
    """The prior trained in `workdir` (latest or given checkpoint) and its tokenizer.

    Args:
      workdir: the prior's --workdir.
      config: the config to sample with (e.g. with `sample.*` overrides); None reads the
        workdir's config.json.
      step: a checkpoint step; None for the latest.
    """
    workdir = pathlib.Path(workdir).expanduser().absolute()
    saved = read_prior_config(workdir)
    if config is None:
      config = saved
    else:
      diff = incompatible_fields(json.loads(saved.to_json_best_effort()),
                                 json.loads(config.to_json_best_effort()), optimizer=False)
      if diff:
        raise ValueError(f'the config does not describe the prior in {workdir}: '
                         f'{"; ".join(diff)}; pass the config it was trained with.')
    ckpt = checkpointer(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
    try:
      steps = ckpt.all_steps()
      if not steps:
        raise FileNotFoundError(f'no checkpoints in {workdir / "checkpoints"}; train the '
                                f'prior first with the same --config and --workdir={workdir}.')
      step = max(steps) if step is None else step
      if step not in steps:
        raise FileNotFoundError(f'no checkpoint at step={step} in {workdir}; saved steps are '
                                f'{sorted(steps)}.')
      meta = ckpt.read_meta(step)
      ident = meta.get('tokenizer') or {}
      tok = token_data.load_tokenizer(ident.get('workdir') or config.prior.tokenizer_workdir,
                                      step=ident.get('step'))
      token_data.check_same_tokenizer(ident, token_data.identity(tok, ident['workdir']))
      layout = layout_for(config, tok)
      model = build_model(config, layout)
      # The saved structure (optimizer state included) is the training config's.
      target = jax.eval_shape(functools.partial(create_state, saved, model, layout),
                              jax.random.PRNGKey(0))
      state, _ = ckpt.restore(step, target)
    finally:
      ckpt.close()
    return cls(config, state.params, int(step), tok, ident)

  def sample_tokens(self, labels: Any, key: jax.Array, **settings) -> np.ndarray:
    """int32 [N, h, w] token grids for `labels` (class ids; -1 = unconditional row)."""
    labels = validation.check_labels(labels, self.layout.num_classes)
    grids = self.sampler(self.params, labels, key, settings_from(self.config, **settings))
    return grids.reshape((-1,) + tuple(self.layout.grid))

  def sample(self, labels: Any, key: jax.Array, **settings) -> np.ndarray:
    """uint8 [N, H, W, 3] images for `labels`, decoded by the tokenizer."""
    return self.tokenizer.decode(self.sample_tokens(labels, key, **settings))
