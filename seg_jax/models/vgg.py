"""VGG16's 13 convolutional layers (torchvision/caffe layout)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from seg_jax.models import layers

# Channels of the five blocks; each block ends with 2x2 max-pooling.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                (512, 512, 512))


def scale(channels, width):
  """Channels times a width multiplier, at least 1."""
  return max(int(channels * width), 1)


class VGG16(nn.Module):
  """VGG16 convolutions with ReLU (optionally BatchNorm, as vgg16_bn).

  Attributes:
    first_padding: padding of conv1_1; FCN uses caffe's 100 so that any
      input size survives fc6's 7x7 valid convolution.
    pool: callable (x) -> pooled x, applied after each block.
    batch_norm: BatchNorm after every conv (SegNet's encoder).
    width: channel multiplier (1.0 is VGG16; smaller for quick tests).

  Returns a dict 'pool1'..'pool5' of pooled features, and 'block1'..'block5'
  of the features before pooling.
  """
  first_padding: int = 1
  pool: Any = None
  batch_norm: bool = False
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    feats = {}
    x = x.astype(self.dtype)
    for b, block in enumerate(VGG16_BLOCKS):
      for c, features in enumerate(block):
        pad = self.first_padding if (b, c) == (0, 0) else 1
        x = nn.Conv(scale(features, self.width), (3, 3), padding=((pad, pad), (pad, pad)),
                    use_bias=True, dtype=self.dtype,
                    name=f'conv{b + 1}_{c + 1}')(x)
        if self.batch_norm:
          x = layers.BatchNorm(use_running_average=not train, momentum=0.9,
                               epsilon=1e-5, dtype=self.dtype, relu=True,
                               name=f'bn{b + 1}_{c + 1}')(x)
        else:
          x = nn.relu(x)
      feats[f'block{b + 1}'] = x
      x = self.pool(x) if self.pool else nn.max_pool(x, (2, 2), (2, 2))
      feats[f'pool{b + 1}'] = x
    return feats
