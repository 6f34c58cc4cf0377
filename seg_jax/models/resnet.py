"""ResNet-50/101 backbones in torchvision's layout, with atrous output stride.

Output stride 32 is the classification network; 16 and 8 replace the
strides of the last one or two stages by dilation (torchvision's
`replace_stride_with_dilation`), keeping the receptive field while the
feature map stays larger. `multi_grid` (DeepLab v3) multiplies the dilation
of the last stage's three blocks, e.g. (1, 2, 4).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from seg_jax.models.layers import ConvBN

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(nn.Module):
  """torchvision Bottleneck (stride on the 3x3 conv, ResNet v1.5)."""
  features: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    out = ConvBN(self.features, 1, dtype=self.dtype, name='conv1')(x, train)
    out = ConvBN(self.features, 3, self.stride, self.dilation,
                 dtype=self.dtype, name='conv2')(out, train)
    out = ConvBN(self.features * 4, 1, relu=False, dtype=self.dtype,
                 name='conv3')(out, train)
    if self.downsample:
      x = ConvBN(self.features * 4, 1, self.stride, relu=False,
                 dtype=self.dtype, name='downsample')(x, train)
    return nn.relu(out + x)


def stage_dilations(output_stride):
  """(stride, dilation) increments of stages 2..4 for an output stride."""
  if output_stride not in (8, 16, 32):
    raise ValueError(f'output_stride={output_stride}; use 8, 16 or 32.')
  replace = {32: (False, False, False), 16: (False, False, True),
             8: (False, True, True)}[output_stride]
  return replace


class ResNet(nn.Module):
  """ResNet trunk.  Returns a dict of features: 'stem' (stride 4 after
  pooling), 'layer1' (stride 4, 4 * width ch), 'layer2' (8), 'layer3',
  'layer4'.  `width` is the stem's channels (64 in ResNet-50/101)."""
  depth: int = 50
  output_stride: int = 32
  multi_grid: Sequence[int] | None = None
  deep_stem: bool = False
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    if self.depth not in STAGE_SIZES:
      raise ValueError(f'ResNet depth={self.depth}; use 50 or 101.')
    x = x.astype(self.dtype)
    if self.deep_stem:  # ResNet-C stem: three 3x3 convs
      x = ConvBN(self.width // 2, 3, 2, dtype=self.dtype, name='stem1')(
          x, train)
      x = ConvBN(self.width // 2, 3, dtype=self.dtype, name='stem2')(x, train)
      x = ConvBN(self.width, 3, dtype=self.dtype, name='stem3')(x, train)
    else:
      x = ConvBN(self.width, 7, 2, dtype=self.dtype, name='conv1')(x, train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats = {'stem': x}
    replace = stage_dilations(self.output_stride)
    dilation, in_features = 1, self.width
    for i, blocks in enumerate(STAGE_SIZES[self.depth]):
      stride = 1 if i == 0 else 2
      previous = dilation
      if i > 0 and replace[i - 1]:
        dilation, stride = dilation * stride, 1
      grid = (self.multi_grid if i == 3 and self.multi_grid else
              (1,) * blocks)
      for b in range(blocks):
        # torchvision: the first block keeps the previous dilation.
        d = previous if b == 0 else dilation
        if i == 3 and self.multi_grid:
          d = dilation * grid[b % len(grid)]
        features = self.width * 2**i
        x = Bottleneck(features, stride if b == 0 else 1, d,
                       downsample=(b == 0 and (stride != 1 or
                                               in_features != features * 4)),
                       dtype=self.dtype, name=f'layer{i + 1}_{b}')(x, train)
        in_features = features * 4
      feats[f'layer{i + 1}'] = x
    return feats
