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

from seg_jax import errors
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
    raise errors.ConfigError(f'model.kwargs.output_stride={output_stride}; '
                             'use 8, 16 or 32.')
  replace = {32: (False, False, False), 16: (False, False, True),
             8: (False, True, True)}[output_stride]
  return replace


class _RepeatedBlock(nn.Module):
  """One identity-shortcut Bottleneck as a scan body: (x, None) -> (x, None)."""
  features: int
  dilation: int
  train: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, _):
    return Bottleneck(self.features, 1, self.dilation, dtype=self.dtype,
                      name='block')(x, self.train), None


def repeated_blocks(n, features, dilation, train, dtype, name):
  """`n` identical Bottlenecks under `nn.scan`: parameters stacked on a
  leading axis, compiled once however deep the stage (ResNet-101's layer3
  has 22), so compile time does not grow with depth."""
  scan = nn.scan(_RepeatedBlock, variable_axes={'params': 0, 'batch_stats': 0},
                 split_rngs={'params': True, 'dropout': True}, length=n)
  return scan(features, dilation, train, dtype, name=name)


class ResNet(nn.Module):
  """ResNet trunk.  Returns a dict of features: 'stem' (stride 4 after
  pooling), 'layer1' (stride 4, 4 * width ch), 'layer2' (8), 'layer3',
  'layer4'.  `width` is the stem's channels (64 in ResNet-50/101).

  Parameters: stage i's first block is `layer{i}_0`; its other blocks share
  one scanned module `layer{i}_rest` with stacked parameters (unrolled
  `layer4_{b}` blocks instead where multi-grid gives them different
  dilations, or with `scan_blocks=False`: same computation, and XLA's cost
  analysis, which counts a loop body once, then sees every block).
  """
  depth: int = 50
  output_stride: int = 32
  multi_grid: Sequence[int] | None = None
  deep_stem: bool = False
  width: int = 64
  scan_blocks: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    if self.depth not in STAGE_SIZES:
      raise errors.ConfigError(f'ResNet depth={self.depth}; use 50 or 101.')
    x = self._stem(x.astype(self.dtype), train)
    feats = {'stem': x}
    replace = stage_dilations(self.output_stride)
    dilation = 1
    for i, blocks in enumerate(STAGE_SIZES[self.depth]):
      stride, previous = (1 if i == 0 else 2), dilation
      if i > 0 and replace[i - 1]:
        dilation, stride = dilation * stride, 1
      features = self.width * 2**i
      grid = self.multi_grid if i == 3 and self.multi_grid else None
      # torchvision: the first block keeps the previous stage's dilation.
      first = dilation * grid[0] if grid else previous
      x = Bottleneck(features, stride, first, downsample=True,
                     dtype=self.dtype, name=f'layer{i + 1}_0')(x, train)
      if grid or not self.scan_blocks:
        for b in range(1, blocks):
          d = dilation * grid[b % len(grid)] if grid else dilation
          x = Bottleneck(features, 1, d, dtype=self.dtype,
                         name=f'layer{i + 1}_{b}')(x, train)
      else:
        x, _ = repeated_blocks(blocks - 1, features, dilation, train,
                               self.dtype, f'layer{i + 1}_rest')(x, None)
      feats[f'layer{i + 1}'] = x
    return feats

  def _stem(self, x, train):
    if self.deep_stem:  # ResNet-C stem: three 3x3 convs
      x = ConvBN(self.width // 2, 3, 2, dtype=self.dtype, name='stem1')(
          x, train)
      x = ConvBN(self.width // 2, 3, dtype=self.dtype, name='stem2')(x, train)
      x = ConvBN(self.width, 3, dtype=self.dtype, name='stem3')(x, train)
    else:
      x = ConvBN(self.width, 7, 2, dtype=self.dtype, name='conv1')(x, train)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
