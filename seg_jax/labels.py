"""Label values and colours: the one authority on what a label pixel means.

Train ids are `0..num_classes-1`; one more value, `config.data.ignore_label`
(255 unless configured otherwise), marks pixels that neither the loss nor the
metrics count. Sources map raw mask values to these, padding writes the
ignore value, and the confusion matrix skips it. Palettes turn label maps into
colours for overlays and palette PNGs.
"""

import numpy as np

IGNORE_LABEL = 255  # the default of config.data.ignore_label


def ignore_label(config):
  """`config.data.ignore_label`, checked against the class count.

  Labels are stored as uint8, so the ignore value must fit in 0..255 and must
  not be a class id.
  """
  value = int(config.data.ignore_label)
  num_classes = int(config.model.num_classes)
  if not num_classes <= value <= 255:
    raise ValueError(
        f'data.ignore_label={value} must be in {num_classes}..255: class ids '
        f'are 0..{num_classes - 1} (model.num_classes={num_classes}) and '
        'labels are stored as uint8.')
  return value


def color_map(n):
  """The VOC colour map: n distinct (n, 3) uint8 colours from index bits."""
  cmap = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


def colorize(label, palette, ignore_color=(255, 255, 255)):
  """(H, W) train ids -> (H, W, 3) uint8 colours; other values -> ignore_color.

  Args:
    label: integer label map.
    palette: (num_classes, 3) uint8 colours.
    ignore_color: colour of the ignore label (and of any value that is not a
      class id).
  """
  palette = np.asarray(palette, np.uint8).reshape(-1, 3)
  table = np.tile(np.asarray(ignore_color, np.uint8), (256, 1))
  table[:len(palette)] = palette
  return table[np.asarray(label, np.int64).clip(0, 255)]


def display_rgb(image):
  """(H, W, 3) uint8 of an image of any channel count, for pictures:
  grayscale repeated, the first three channels of more."""
  image = np.asarray(image)
  if image.shape[-1] == 3:
    return image
  if image.shape[-1] < 3:
    return np.repeat(image[..., :1], 3, -1)
  return np.ascontiguousarray(image[..., :3])


def overlay(image, label, palette, alpha=0.5, ignore_label_value=IGNORE_LABEL):
  """Blends the colours of `label` over `image`; ignored pixels stay as is.

  Args:
    image: (H, W, C) uint8 (`display_rgb` of it is shown).
    label: (H, W) train ids.
    palette: (num_classes, 3) uint8.
    alpha: weight of the label colour.
    ignore_label_value: label value left uncoloured.

  Returns:
    (H, W, 3) uint8.
  """
  image = display_rgb(image)  # any channel count
  colours = colorize(label, palette).astype(np.float32)
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
  keep = (np.asarray(label) == ignore_label_value)[..., None]
  out = np.where(keep, image.astype(np.float32), blended)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)
