"""Images onto a larger canvas on the host, as inference fills canvases.

numpy only: the exported programs' loaders (`export.load`,
`to_onnx.load_onnx`) use it without jax computation or flax.
"""

import warnings

import numpy as np


def mirror_indices(n, size):
  """Indices 0..n-1 folded into 0..size-1: numpy's 'reflect', repeated
  where n is more than twice size (`inference.mirror_beyond`'s rule)."""
  r = np.arange(n)
  period = max(2 * (size - 1), 1)
  m = r % period
  return np.where(m < size, m, period - m)


def onto_canvas(images, height, width, where):
  """uint8 images (b, h, w, C), h <= height and w <= width, mirror-filled
  to (b, height, width, C); `ValueError` naming `where` for other dtypes,
  no image, or larger ones."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'{where} takes uint8 images (values 0..255); got '
                     f'{images.dtype}: convert them first (floats in 0..1: '
                     '(x * 255).round().astype(np.uint8)).')
  if not images.shape[0]:
    raise ValueError(f'{where}: no image in the batch ({images.shape}).')
  h, w = images.shape[1:3]
  if h > height or w > width:
    raise ValueError(f'{where} takes images of at most {height}x{width} '
                     f'(HxW); got {h}x{w}: export again with --size={h},{w} '
                     'or larger, or resize them.')
  return images[:, mirror_indices(height, h)][:, :, mirror_indices(width, w)]


def predict_on_canvas(run, images, height, width, channels, where,
                      meta=None, warned=None):
  """`run` (uint8 (b, height, width, channels) -> labels (b, height,
  width)) on `images` of at most that size, mirror-filled to it
  (`onto_canvas`), their labels cropped back: the exported models'
  loaders. A smaller size is warned about once per size (in the set
  `warned`) when the program's inference (`meta['evaluator']`) rescales
  or flips: the mirror-filled canvas is then resized and flipped whole,
  so labels near a tie can differ from those of an export of that size.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[3] != channels:
    raise ValueError(f'{where} takes uint8 images (b, h, w, {channels}); '
                     f'got {images.shape}.')
  h, w = images.shape[1:3]
  spec = (meta or {}).get('evaluator') or {}
  if ((h, w) != (height, width) and warned is not None and
      (h, w) not in warned and (spec.get('flip') or
                                any(s != 1 for s in spec.get('scales', ())))):
    warned.add((h, w))
    warnings.warn(
        f'{where}: images of {h}x{w} are mirror-filled to the export\'s '
        f'{height}x{width}, which its inference (scales '
        f'{tuple(spec["scales"])}, flip {spec["flip"]}) takes whole as the '
        'image: labels near a tie can differ from evaluate\'s; export with '
        f'--size={h},{w} for images of this size.',
        stacklevel=3)
  return np.asarray(run(onto_canvas(images, height, width, where)))[
      :, :h, :w]
