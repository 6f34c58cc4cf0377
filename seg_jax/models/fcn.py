"""FCN after Long et al. 2015 (VGG16: 32s, 16s, 8s) and torchvision's
dilated-ResNet FCN.

The VGG variants follow the reference caffe models: conv1_1 pads by 100,
pooling rounds up, fc6/fc7 are 7x7 and 1x1 convolutions with dropout, the
upsampling layers are bias-free transposed convolutions initialised to
bilinear interpolation, and the caffe crop offsets align every map with the
input, so the output has the input's size for any input size.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from seg_jax import errors
from seg_jax.models import layers, resnet
from seg_jax.models.vgg import VGG16, scale

# Caffe crop offsets of the reference voc-fcn{32,16,8}s nets.
_CROP = {'score': {32: 19, 16: 27, 8: 31}, 'pool4': 5, 'pool3': 9}


def _crop(x, offset, like_hw):
  h, w = like_hw
  return x[:, offset:offset + h, offset:offset + w]


class FCNVGG(nn.Module):
  """FCN-32s/16s/8s on VGG16.

  Attributes:
    num_classes: output classes.
    stride: 32, 16 or 8 (which skip connections are fused).
    fixed_upsample: keep the final upsampling fixed at bilinear (the paper);
      intermediate ones (16s, 8s) are always learned from bilinear init.
    dropout: dropout rate after fc6 and fc7.
    width: channel multiplier of VGG16 and fc6/fc7 (1.0 is the paper's).
  """
  num_classes: int
  stride: int = 8
  fixed_upsample: bool = True
  dropout: float = 0.5
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    if self.stride not in (32, 16, 8):
      raise errors.ConfigError(f'FCN stride={self.stride}; use 32, 16 or 8.')
    in_hw = x.shape[1:3]
    feats = VGG16(first_padding=100, pool=layers.max_pool_ceil,
                  width=self.width, dtype=self.dtype, name='backbone')(x)
    h = feats['pool5']
    for name, k in (('fc6', 7), ('fc7', 1)):
      h = nn.relu(nn.Conv(scale(4096, self.width), (k, k), padding='VALID', dtype=self.dtype,
                          name=name)(h))
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    score = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                    name='score_fr')(h)
    for skip in {32: (), 16: ('pool4',), 8: ('pool4', 'pool3')}[self.stride]:
      up = layers.BilinearConvTranspose(self.num_classes, 4, 2,
                                        dtype=self.dtype,
                                        name=f'upscore_{skip}')(score)
      side = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     name=f'score_{skip}')(feats[skip])
      score = up + _crop(side, _CROP[skip], up.shape[1:3])
    up = layers.BilinearConvTranspose(
        self.num_classes, 2 * self.stride, self.stride,
        fixed=self.fixed_upsample, dtype=self.dtype, name='upscore')(score)
    return _crop(up, _CROP['score'][self.stride], in_hw).astype(jnp.float32)


class FCNHead(nn.Module):
  """torchvision FCNHead: 3x3 conv (in/4 ch) + BN + ReLU + dropout + 1x1."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    x = layers.ConvBN(x.shape[-1] // 4, 3, dtype=self.dtype, name='conv')(
        x, train)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                   name='classifier')(x)


def with_aux_head(module, out, layer3, train):
  """`out`, or (out, aux logits) from torchvision's auxiliary FCNHead on
  layer3 when `module.aux_head`; the head runs in training (and at init, so
  its parameters exist), not in evaluation. Call inside `module`'s compact
  `__call__`."""
  if not module.aux_head or not (train or module.is_initializing()):
    return out
  aux = FCNHead(module.num_classes, module.dtype, name='aux')(layer3, train)
  return out, layers.resize_bilinear(aux, *out.shape[1:3]).astype(jnp.float32)


class FCNResNet(nn.Module):
  """torchvision `fcn_resnet50/101`: dilated ResNet (output stride 8 by
  default) + FCNHead, bilinear upsampling to the input size.

  With `aux_head`, training returns (logits, aux_logits) from an FCNHead on
  layer3; evaluation returns logits only.
  """
  num_classes: int
  depth: int = 50
  output_stride: int = 8
  aux_head: bool = False
  deep_stem: bool = False
  width: int = 64
  scan_blocks: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    h, w = x.shape[1:3]
    feats = resnet.ResNet(self.depth, self.output_stride,
                          deep_stem=self.deep_stem, width=self.width,
                          scan_blocks=self.scan_blocks,
                          dtype=self.dtype, name='backbone')(x, train)
    out = FCNHead(self.num_classes, self.dtype, name='head')(
        feats['layer4'], train)
    out = layers.resize_bilinear(out, h, w).astype(jnp.float32)
    return with_aux_head(self, out, feats['layer3'], train)
