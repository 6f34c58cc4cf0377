"""Lite R-ASPP (Howard et al. 2019) on MobileNetV3-Large, in torchvision's
layout (`lraspp_mobilenet_v3_large`)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seg_jax.models import layers, mobilenet_v3


class LRASPPHead(nn.Module):
  """torchvision's LRASPPHead: the high-level features through 1x1 conv +
  BN + ReLU, gated per channel by a sigmoid of their global mean (1x1
  conv, no bias), upsampled to the low-level features' size; a 1x1
  classifier on each branch, summed."""
  num_classes: int
  inter_channels: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, low, high, train):
    x = layers.ConvBN(self.inter_channels, 1, dtype=self.dtype, name='cbr')(
        high, train)
    s = layers.spatial_mean(high)  # (N, 1, 1, C)
    s = layers.Conv(self.inter_channels, 1, dtype=self.dtype, name='scale')(s)
    x = layers.resize_bilinear(x * jax.nn.sigmoid(s), *low.shape[1:3])
    return (layers.Conv(self.num_classes, 1, dtype=self.dtype, use_bias=True,
                        name='low_classifier')(low) +
            layers.Conv(self.num_classes, 1, dtype=self.dtype, use_bias=True,
                        name='high_classifier')(x))


class LRASPP(nn.Module):
  """torchvision's `lraspp_mobilenet_v3_large`: LR-ASPP on the dilated
  MobileNetV3-Large's stride-16 (960 channels) and stride-8 (40 channels)
  features, bilinear upsampling to the input size.

  The head's parameters sit under 'classifier', as torchvision's, so a
  fine-tuning start from weights with another class count keeps the two
  class-count-shaped layers fresh (`convert.load_pretrained`).

  Attributes:
    num_classes: output classes.
    width: MobileNetV3 width multiplier (1.0 is torchvision's model).
    inter_channels: the head's intermediate channels (torchvision: 128).
  """
  num_classes: int
  width: float = 1.0
  inter_channels: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    h, w = x.shape[1:3]
    feats = mobilenet_v3.MobileNetV3Large(self.width, dtype=self.dtype,
                                          name='backbone')(x, train)
    out = LRASPPHead(self.num_classes, self.inter_channels, self.dtype,
                     name='classifier')(feats['low'], feats['high'], train)
    return layers.resize_bilinear(out, h, w).astype(jnp.float32)
