"""The PyTorch twin of seg_jax's U-Net (`seg_jax.models.unet.UNet`), for
`python -m seg_jax.bench --vs-torch` on U-Net configs.

Plain torch: the same levels and widths (width x 2**level), two 3x3
convolutions per block each followed by BatchNorm (momentum 0.1, torch's
name for flax's 0.9) and ReLU, 2x2 max-pooling, 2x2/2 transposed
convolutions (or bilinear resizing + a 1x1 convolution), the skip
concatenated before the upsampled features, a final 1x1 convolution, and
the input reflect-padded at the bottom/right to a multiple of 2**depth.
'SAME' padding only (the paper's valid variant has no twin). Not part of
the installed package: a measuring tool.
"""

import torch
from torch import nn


def _block(cin, cout, batch_norm):
  layers = []
  for c in (cin, cout):
    layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=not batch_norm))
    if batch_norm:
      layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
  return nn.Sequential(*layers)


class UNet(nn.Module):
  """seg_jax's `UNet(num_classes, width, depth, 'SAME', batch_norm,
  upsample)` in torch; forward returns {'out': logits (N, C, H, W)}."""

  def __init__(self, num_classes, width=64, depth=4, batch_norm=True,
               upsample='transpose', in_channels=3):
    super().__init__()
    self.depth = depth
    self.down = nn.ModuleList()
    cin = in_channels
    for level in range(depth):
      self.down.append(_block(cin, width * 2**level, batch_norm))
      cin = width * 2**level
    self.bottom = _block(cin, width * 2**depth, batch_norm)
    self.up, self.dec = nn.ModuleList(), nn.ModuleList()
    for level in reversed(range(depth)):
      f = width * 2**level
      if upsample == 'transpose':
        self.up.append(nn.ConvTranspose2d(2 * f, f, 2, stride=2))
      else:
        self.up.append(nn.Sequential(
            nn.Upsample(scale_factor=2, mode='bilinear'),
            nn.Conv2d(2 * f, f, 1)))
      self.dec.append(_block(2 * f, f, batch_norm))
    self.head = nn.Conv2d(width, num_classes, 1)

  def forward(self, x):
    h, w = x.shape[2:]
    m = 2**self.depth
    x = nn.functional.pad(x, (0, -w % m, 0, -h % m), mode='reflect')
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = nn.functional.max_pool2d(x, 2)
    x = self.bottom(x)
    for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
      x = dec(torch.cat([skip, up(x)], 1))
    return {'out': self.head(x)[:, :, :h, :w]}


def create(num_classes, kwargs):
  """The twin of `model.name='unet'` with `model.kwargs`, or a reason."""
  kwargs = dict(kwargs)
  if kwargs.pop('padding', 'SAME') != 'SAME':
    return "the U-Net twin has 'SAME' padding only"
  known = {'width', 'depth', 'batch_norm', 'upsample'}
  if set(kwargs) - known:
    return f'the U-Net twin takes {sorted(known)}, not {sorted(kwargs)}'
  return UNet(num_classes, **kwargs)
