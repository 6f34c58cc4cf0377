"""MobileNetV3-Large backbone in torchvision's layout, dilated for segmentation.

Howard et al. 2019, "Searching for MobileNetV3", as torchvision 0.29 builds
`mobilenet_v3_large(dilated=True)` for `deeplabv3_mobilenet_v3_large` and
`lraspp_mobilenet_v3_large`: a 3x3/2 stem, fifteen inverted residual blocks
(1x1 expansion, depthwise k x k, optional squeeze-and-excitation, 1x1
linear projection; ReLU or hard-swish per block), a 1x1 convolution to
6 x the last block's channels. Every BatchNorm has torch's eps 1e-3 and
momentum 0.01 (flax's 0.99). `dilated` replaces the stride of the last
stage (blocks 13-15) by dilation 2: output stride 16 instead of 32.
"""

import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seg_jax import errors
from seg_jax.models.layers import Conv, ConvBN, spatial_mean

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # torch's momentum 0.01

# torchvision's `_mobilenet_v3_conf('mobilenet_v3_large')` (the paper's
# Table 1): input, kernel, expanded, output channels, squeeze-and-excite,
# hard-swish (else ReLU), stride.
LARGE = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),  # C1
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),  # C2
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),  # C3
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),  # C4: dilated from here on
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)
DILATED_FROM = 13  # the first block (1-based) of the dilated last stage
# The block whose output has stride 8 (C2, 40 channels): torchvision's
# `stage_indices[-4]`, LR-ASPP's low-level input and DeepLab's aux input.
LOW_BLOCK = 4


class BlockConfig(NamedTuple):
  """One inverted residual block, channels already rounded."""
  input: int
  kernel: int
  expanded: int
  output: int
  squeeze_excite: bool
  hard_swish: bool
  stride: int
  dilation: int


def make_divisible(value, divisor=8, min_value=None):
  """torchvision's `_make_divisible` (from the TF reference): the nearest
  multiple of `divisor`, at least `min_value`, never 10% below `value`."""
  min_value = min_value or divisor
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def block_configs(width=1.0, dilated=True):
  """The fifteen `BlockConfig`s of MobileNetV3-Large at width multiplier
  `width` (torchvision's `width_mult`), as `_mobilenet_v3_conf` makes them."""
  if isinstance(width, bool) or not isinstance(width, numbers.Real) or not (
      width > 0):
    raise errors.ConfigError(
        f'model.kwargs.width={width!r}: the MobileNetV3 width multiplier '
        "must be > 0 (1.0 is torchvision's model).")
  configs = []
  for i, (cin, k, exp, cout, se, hs, stride) in enumerate(LARGE, 1):
    dilation = 2 if dilated and i >= DILATED_FROM else 1
    configs.append(BlockConfig(
        make_divisible(cin * width), k, make_divisible(exp * width),
        make_divisible(cout * width), se, hs, stride, dilation))
  return configs


def _activation(hard_swish):
  # jax.nn.hard_swish is torch's Hardswish: x * relu6(x + 3) / 6.
  return jax.nn.hard_swish if hard_swish else nn.relu


def _conv_bn(features, kernel=1, stride=1, dilation=1, groups=1,
             dtype=jnp.float32, name=None):
  """ConvBN with MobileNetV3's BatchNorm, activation left to the caller."""
  return ConvBN(features, kernel, stride, dilation, relu=False,
                dtype=dtype, feature_group_count=groups,
                epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


class SqueezeExcite(nn.Module):
  """torchvision's SqueezeExcitation: global mean, 1x1 (+bias) to `squeeze`
  channels, ReLU, 1x1 (+bias) back, hard-sigmoid gate on the input."""
  squeeze: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = spatial_mean(x)  # (N, 1, 1, C)
    s = nn.relu(Conv(self.squeeze, 1, dtype=self.dtype, use_bias=True,
                     name='fc1')(s))
    s = Conv(x.shape[-1], 1, dtype=self.dtype, use_bias=True, name='fc2')(s)
    return x * jax.nn.hard_sigmoid(s)  # torch's Hardsigmoid: relu6(x+3)/6


class InvertedResidual(nn.Module):
  """torchvision's InvertedResidual: expand (when expanded != input),
  depthwise, squeeze-and-excite, linear projection; the input added when
  stride is 1 and the channels match. A dilated block runs at stride 1."""
  config: BlockConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    c, act = self.config, _activation(self.config.hard_swish)
    y = x
    if c.expanded != c.input:
      y = act(_conv_bn(c.expanded, dtype=self.dtype, name='expand')(y, train))
    stride = 1 if c.dilation > 1 else c.stride
    y = act(_conv_bn(c.expanded, c.kernel, stride, c.dilation, c.expanded,
                     self.dtype, 'depthwise')(y, train))
    if c.squeeze_excite:
      y = SqueezeExcite(make_divisible(c.expanded // 4), self.dtype,
                        name='se')(y)
    y = _conv_bn(c.output, dtype=self.dtype, name='project')(y, train)
    # torchvision tests the configured stride, before dilation replaced it.
    return y + x if c.stride == 1 and c.input == c.output else y


class MobileNetV3Large(nn.Module):
  """The MobileNetV3-Large feature extractor (torchvision's `features`).

  Returns a dict: 'low' (block `LOW_BLOCK`'s output, stride 8, 40 channels
  at width 1) and 'high' (the last 1x1 convolution, 960 channels, stride 16
  when `dilated`, else 32).

  Parameters: 'stem', 'block1'..'block15' (each 'expand', 'depthwise', 'se'
  {'fc1', 'fc2'}, 'project' as present), 'last_conv': torchvision's
  `features.0` .. `features.16`. Initialisation is flax's (LeCun normal),
  as every seg_jax model's; torchvision's pretrained weights load through
  `convert.from_torchvision`.
  """
  width: float = 1.0
  dilated: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    configs = block_configs(self.width, self.dilated)
    x = jax.nn.hard_swish(_conv_bn(configs[0].input, 3, 2, dtype=self.dtype,
                                   name='stem')(x.astype(self.dtype), train))
    feats = {}
    for i, config in enumerate(configs, 1):
      x = InvertedResidual(config, self.dtype, name=f'block{i}')(x, train)
      if i == LOW_BLOCK:
        feats['low'] = x
    feats['high'] = jax.nn.hard_swish(_conv_bn(
        6 * configs[-1].output, dtype=self.dtype, name='last_conv')(x, train))
    return feats
