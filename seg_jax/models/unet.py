"""U-Net after Ronneberger et al. 2015, with the common modern variants."""

import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seg_jax import errors
from seg_jax.models import layers


def _crop_like(x, height, width):
  """Centre-crops (N, H, W, C) features to (N, height, width, C)."""
  top = (x.shape[1] - height) // 2
  left = (x.shape[2] - width) // 2
  return x[:, top:top + height, left:left + width]


def valid_input_size(size, depth):
  """Smallest (input, output) sizes of a valid-padded U-Net covering `size`.

  The paper's network shrinks each side by 4 per double-conv and needs every
  pooled size to be even; the output is at least `size` pixels.
  """
  out = size
  while True:
    s, ok = out, True
    for _ in range(depth):  # decoder, top to bottom
      s += 4
      if s % 2:
        ok = False
        break
      s //= 2
    if ok:
      s += 4  # bottleneck double-conv
      for _ in range(depth):  # encoder, bottom to top
        s = s * 2 + 4
      return s, out
    out += 1


class DoubleConv(nn.Module):
  """Two 3x3 convolutions, each followed by (optional) BatchNorm and ReLU."""
  features: int
  padding: str
  batch_norm: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    for i in range(2):  # the names nn.Conv gave: checkpoints still load
      x = layers.Conv(self.features, 3, padding=self.padding,
                      use_bias=not self.batch_norm, dtype=self.dtype,
                      name=f'Conv_{i}')(x)
      if self.batch_norm:
        x = layers.BatchNorm(use_running_average=not train, momentum=0.9,
                             dtype=self.dtype, relu=True,
                             name=f'BatchNorm_{i}')(x)
      else:
        x = nn.relu(x)
    return x


class UNet(nn.Module):
  """U-Net.  Input (N, H, W, C) float; output logits (N, H, W, num_classes).

  Attributes:
    num_classes: number of output classes.
    width: channels at the first level (64 in the paper), doubled per level.
    depth: number of down-sampling steps (4 in the paper).
    padding: 'SAME' (output aligned with input) or 'VALID' (the paper's
      unpadded convolutions; the input is mirror-padded, the paper's
      overlap-tile strategy, so the output still covers the whole input).
    batch_norm: BatchNorm after every convolution (the paper has none).
    upsample: 'transpose' (the paper's 2x2 up-convolution) or 'bilinear'
      (resize followed by a 1x1 convolution halving the channels).
    dtype: computation dtype; parameters stay float32.
  """
  num_classes: int
  width: int = 64
  depth: int = 4
  padding: str = 'SAME'
  batch_norm: bool = True
  upsample: str = 'transpose'
  dtype: Any = jnp.float32

  def setup(self):
    if self.padding not in ('SAME', 'VALID'):
      raise errors.ConfigError(f'unet: model.kwargs.padding={self.padding!r}; '
                               "use 'SAME' or 'VALID'.")
    for key in ('width', 'depth'):
      value = getattr(self, key)
      if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
          or value < 1):
        raise errors.ConfigError(f'unet: model.kwargs.{key}={value!r}; give '
                                 'an integer >= 1.')
    if self.upsample not in ('transpose', 'bilinear'):
      raise errors.ConfigError(
          f'unet: model.kwargs.upsample={self.upsample!r}; use '
          "'transpose' or 'bilinear'.")

  @nn.compact
  def __call__(self, x, train=False):
    height, width = x.shape[1:3]
    x = self._pad_input(x)
    block = functools.partial(DoubleConv, padding=self.padding,
                              batch_norm=self.batch_norm, dtype=self.dtype)
    x = x.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = block(self.width * 2**level)(x, train)
      skips.append(x)
      x = layers.max_pool(x)
    x = block(self.width * 2**self.depth)(x, train)
    for k, level in enumerate(reversed(range(self.depth))):
      x = self._upsample(x, self.width * 2**level, k)
      skip = _crop_like(skips[level], x.shape[1], x.shape[2])
      x = block(self.width * 2**level)(jnp.concatenate([skip, x], -1), train)
    # Named as nn.Conv was numbered: after the bilinear path's 1x1 convs.
    last = self.depth if self.upsample == 'bilinear' else 0
    x = layers.Conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                    name=f'Conv_{last}')(x)
    x = x[:, :height, :width]  # padding was added at the bottom/right edge
    return x.astype(jnp.float32)

  def _upsample(self, x, features, index):
    if self.upsample == 'transpose':
      return layers.ConvTranspose(features, 2, 2, dtype=self.dtype,
                                  name=f'ConvTranspose_{index}')(x)
    n, h, w, c = x.shape
    x = jax.image.resize(x, (n, 2 * h, 2 * w, c), 'bilinear')
    return layers.Conv(features, 1, use_bias=True, dtype=self.dtype,
                       name=f'Conv_{index}')(x)

  def _pad_input(self, x):
    """Pads so every level divides evenly and output pixel (i, j) is input (i, j)."""
    h, w = x.shape[1:3]
    if self.padding == 'SAME':
      m = 2**self.depth
      ph, pw = -h % m, -w % m
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode='reflect')
      return x
    (in_h, out_h), (in_w, out_w) = (valid_input_size(h, self.depth),
                                    valid_input_size(w, self.depth))
    # The valid network trims (in - out) / 2 pixels per side: mirror that much
    # in at the top/left so the output starts at input pixel (0, 0).
    top, left = (in_h - out_h) // 2, (in_w - out_w) // 2
    return jnp.pad(x, ((0, 0), (top, in_h - h - top), (left, in_w - w - left),
                       (0, 0)), mode='symmetric')
