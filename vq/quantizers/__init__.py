"""Quantizers: what turns an encoder's output into discrete tokens and back.

Every quantizer is a Flax module with the same interface: called on z_e [..., code_dim] it
returns a `QuantizerOutput` (straight-through output, int32 indices, losses, counts), and
`lookup(indices)` maps tokens back; `vocab_size`, `index_depth` and `bits_per_token` describe
the token space (`TokenSpace`).

- `base`: `QuantizerOutput`, `TokenSpace`, distances, the entropy penalty, the rotation trick.
- `vector`: `VectorQuantizer` (codebook by gradient) and `EMAVectorQuantizer` (EMA codebook),
  with factorised/l2 lookup and codebook upkeep (`maintain`: k-means init, dead-code restarts).
- `scalar`: `FSQ` and `LFQ` (no codebook). `residual`: `ResidualVQ`.
- `kmeans`: jit-able k-means++ and Lloyd. `usage`: on-device codebook usage tracking.

Imports: `vq.core` only.
"""

from vq.quantizers.base import QuantizerOutput
from vq.quantizers.base import STATS
from vq.quantizers.base import TokenSpace
from vq.quantizers.base import nearest_codes
from vq.quantizers.base import rotate_to
from vq.quantizers.base import squared_distances
from vq.quantizers.residual import ResidualVQ
from vq.quantizers.scalar import FSQ
from vq.quantizers.scalar import LFQ
from vq.quantizers.vector import EMAVectorQuantizer
from vq.quantizers.vector import QUANTIZERS
from vq.quantizers.vector import VectorQuantizer

__all__ = [
    'EMAVectorQuantizer',
    'FSQ',
    'LFQ',
    'QUANTIZERS',
    'QuantizerOutput',
    'ResidualVQ',
    'STATS',
    'TokenSpace',
    'VectorQuantizer',
    'nearest_codes',
    'rotate_to',
    'squared_distances',
]
