"""A per-pixel classifier: 1x1 convolutions only, no spatial context.

It sees one pixel's colour at a time, so it measures how much of a dataset
colour alone explains. On the built-in shapes dataset it must stay far
below a real segmentation network (the class is decided by shape).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class PixelClassifier(nn.Module):
  """Per-pixel MLP: `depth` hidden 1x1 convolutions of `width` channels."""
  num_classes: int
  width: int = 64
  depth: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = x.astype(self.dtype)
    for _ in range(self.depth):
      x = nn.relu(nn.Conv(self.width, (1, 1), dtype=self.dtype)(x))
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x).astype(
        jnp.float32)
