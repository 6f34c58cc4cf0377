"""DeepLab v3 (Chen et al. 2017) and v3+ (Chen et al. 2018) on dilated ResNets,
in torchvision's layout (`deeplabv3_resnet50/101`) for v3; torchvision's
`deeplabv3_mobilenet_v3_large`."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from seg_jax.models import fcn, layers, mobilenet_v3, resnet


def aspp_rates(output_stride):
  """ASPP rates: (6, 12, 18) at output stride 16, doubled at 8."""
  return {16: (6, 12, 18), 8: (12, 24, 36), 32: (3, 6, 9)}[output_stride]


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: a 1x1 branch, three atrous 3x3
  branches, an image-level pooling branch; concatenated and projected to
  `features` channels with dropout 0.5."""
  rates: Sequence[int]
  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    h, w = x.shape[1:3]
    branches = [layers.ConvBN(self.features, 1, dtype=self.dtype,
                              name='conv0')(x, train)]
    for i, rate in enumerate(self.rates):
      branches.append(layers.ConvBN(self.features, 3, dilation=rate,
                                    dtype=self.dtype,
                                    name=f'conv{i + 1}')(x, train))
    pooled = layers.spatial_mean(x)
    pooled = layers.ConvBN(self.features, 1, dtype=self.dtype,
                           name='pool')(pooled, train)
    branches.append(layers.resize_bilinear(pooled, h, w))
    x = layers.ConvBN(self.features, 1, dtype=self.dtype, name='project')(
        jnp.concatenate(branches, -1), train)
    return nn.Dropout(0.5, deterministic=not train)(x)


class DeepLabV3(nn.Module):
  """DeepLab v3 (`plus=False`, torchvision's DeepLabHead) or v3+.

  Attributes:
    num_classes: output classes.
    depth: ResNet depth, 50 or 101.
    output_stride: 8 (torchvision's v3 default) or 16 (v3+ default).
    aux_head: torchvision's auxiliary FCNHead on layer3 (v3 only).
    multi_grid: dilation multipliers of the last stage's blocks.
    plus: v3+ decoder: 48-channel projection of stride-4 features, fused
      with the upsampled ASPP output by two 3x3 convs of 256 channels.
  """
  num_classes: int
  depth: int = 50
  output_stride: int = 8
  aux_head: bool = False
  multi_grid: Sequence[int] | None = None
  deep_stem: bool = False
  plus: bool = False
  width: int = 64
  scan_blocks: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    h, w = x.shape[1:3]
    feats = resnet.ResNet(self.depth, self.output_stride, self.multi_grid,
                          self.deep_stem, self.width, self.scan_blocks,
                          dtype=self.dtype,
                          name='backbone')(x, train)
    out = ASPP(aspp_rates(self.output_stride), dtype=self.dtype,
               name='aspp')(feats['layer4'], train)
    if self.plus:
      out = self._decoder(out, feats['layer1'], train)
    else:
      out = layers.ConvBN(256, 3, dtype=self.dtype, name='head')(out, train)
    out = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                  name='classifier')(out)
    out = layers.resize_bilinear(out, h, w).astype(jnp.float32)
    return fcn.with_aux_head(self, out, feats['layer3'], train)

  def _decoder(self, x, low, train):
    low = layers.ConvBN(48, 1, dtype=self.dtype, name='low_proj')(low, train)
    x = layers.resize_bilinear(x, *low.shape[1:3])
    x = jnp.concatenate([x, low], -1)
    x = layers.ConvBN(256, 3, dtype=self.dtype, name='decoder1')(x, train)
    return layers.ConvBN(256, 3, dtype=self.dtype, name='decoder2')(x, train)


class DeepLabV3MobileNetV3(nn.Module):
  """torchvision's `deeplabv3_mobilenet_v3_large`: the dilated
  MobileNetV3-Large (output stride 16) + DeepLab v3's head on its last
  960-channel features, bilinear upsampling to the input size.

  The ASPP rates are torchvision's `DeepLabHead` default, 12/24/36, which
  torchvision keeps at this output stride (not `aspp_rates(16)`).

  Attributes:
    num_classes: output classes.
    aux_head: torchvision's auxiliary FCNHead on the stride-8 features
      (block 4, 40 channels); training returns (logits, aux_logits).
    width: MobileNetV3 width multiplier (torchvision's `width_mult`; 1.0 is
      torchvision's model, smaller for quick experiments).
  """
  num_classes: int
  aux_head: bool = False
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    h, w = x.shape[1:3]
    feats = mobilenet_v3.MobileNetV3Large(self.width, dtype=self.dtype,
                                          name='backbone')(x, train)
    out = ASPP((12, 24, 36), dtype=self.dtype, name='aspp')(feats['high'],
                                                            train)
    out = layers.ConvBN(256, 3, dtype=self.dtype, name='head')(out, train)
    out = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                  name='classifier')(out)
    out = layers.resize_bilinear(out, h, w).astype(jnp.float32)
    return fcn.with_aux_head(self, out, feats['low'], train)
