"""SegNet (Badrinarayanan et al. 2017): a VGG16-BN encoder and a mirrored
decoder that upsamples with the encoder's max-pooling indices."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from seg_jax.models import layers
from seg_jax.models.vgg import VGG16_BLOCKS, scale


class SegNet(nn.Module):
  """SegNet.  Input sides are padded to a multiple of 32 and the output
  cropped back, so any input size works."""
  num_classes: int
  width: float = 1.0  # channel multiplier of the VGG16 layout
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, -h % 32), (0, -w % 32), (0, 0)))
    x = x.astype(self.dtype)
    indices = []
    for b, block in enumerate(VGG16_BLOCKS):
      for c, features in enumerate(block):
        x = self._conv_bn(x, scale(features, self.width), f'enc{b + 1}_{c + 1}', train)
      x, idx = layers.max_pool_with_indices(x)
      indices.append(idx)
    for b in reversed(range(len(VGG16_BLOCKS))):
      x = layers.max_unpool(x, indices[b])
      block = VGG16_BLOCKS[b]
      # Mirror of the encoder block; its last conv maps to the channels of
      # the block below (64 at the top, which the classifier follows).
      outs = list(block[:-1]) + [VGG16_BLOCKS[b - 1][-1] if b else block[-1]]
      for c, features in enumerate(outs):
        x = self._conv_bn(x, scale(features, self.width), f'dec{b + 1}_{len(outs) - c}', train)
    x = nn.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)),
                dtype=self.dtype, name='classifier')(x)
    return x[:, :h, :w].astype(jnp.float32)

  def _conv_bn(self, x, features, name, train):
    x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name=f'{name}_conv')(x)
    return layers.BatchNorm(use_running_average=not train, momentum=0.9,
                            epsilon=1e-5, dtype=self.dtype, relu=True,
                            name=f'{name}_bn')(x)
