"""Per-example transforms for the grain pipeline.

Images stay uint8 (H, W, 3) and labels uint8/int (H, W) all the way to the
device: normalisation happens inside the jitted step, which moves 4x fewer
bytes host-to-device. Random transforms take the per-record
`np.random.Generator` grain derives from (seed, record index), so an
example's augmentation does not depend on worker count or on resumption.

Photometric distortion is drawn here per example but applied on the device:
brightness, contrast, saturation and hue are each linear in RGB, so the
drawn distortion is one (3, 4) affine colour matrix ('colour' in the
example) that the train step applies to the whole batch at once
(`steps.apply_colour`). This keeps
the host, usually the bottleneck, to decoding and geometry.
"""

import dataclasses

import grain
import numpy as np
from PIL import Image

from seg_jax import errors
from seg_jax.data import files
from seg_jax.labels import IGNORE_LABEL

# ITU-R 601 luma weights (grey level used by the saturation change).
_LUMA = np.array([0.299, 0.587, 0.114])
# RGB <-> YIQ: a hue change is a rotation of the (I, Q) chroma plane.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                 [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)


def pad_to_fit(pad, size):
  """The smallest evaluation canvas, per side, that is at least `pad` and
  holds `size` ((height, width)), a side that must grow rounded up to a
  multiple of 32."""
  return tuple(p if m <= p else -(-m // 32) * 32 for p, m in zip(pad, size))


def pair(size, key=None):
  """(height, width) of one int or two: the one parser of config sizes.

  With `key` (the config key or flag it came from), anything but one or two
  positive integers is a ConfigError naming it.
  """
  values = (size, size) if np.isscalar(size) else tuple(size)
  if key is not None and (len(values) != 2 or not all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
      for v in values)):
    raise errors.ConfigError(f'{key}={size!r}: give (height, width) in '
                             'pixels.')
  return tuple(int(v) for v in values)


def scaled_size(size, scale):
  """(h, w) * scale, rounded, at least 1 pixel each."""
  return tuple(max(int(s * scale + 0.5), 1) for s in pair(size))


def fill_value(mean):
  """The uint8 pixel padded images get: the mean, so it normalises to ~0."""
  return np.asarray(mean, np.float32).round().astype(np.uint8)


def pad_image(image, height, width, fill):
  """Pads (H, W, C) at the bottom/right with `fill` to (height, width)."""
  h, w = image.shape[:2]
  if h >= height and w >= width:
    return image
  out = np.empty((max(h, height), max(w, width), image.shape[-1]), np.uint8)
  out[...] = fill
  out[:h, :w] = image
  return out


def resize_image(image, size, box=None):
  """Bilinear resize of (H, W, C) uint8 to `size` (width, height), PIL's
  (of the `box` region when given): RGB and RGBA in one call, any other
  channel count one channel at a time (the same filter per channel)."""
  if image.shape[-1] in (3, 4):
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR,
                                                    box=box))
  return np.stack([np.asarray(Image.fromarray(image[..., c]).resize(
      size, Image.BILINEAR, box=box)) for c in range(image.shape[-1])], -1)


def pad_label(label, height, width, ignore_label=IGNORE_LABEL):
  """Pads (H, W) at the bottom/right with `ignore_label`."""
  h, w = label.shape
  ph, pw = max(height - h, 0), max(width - w, 0)
  if not ph and not pw:
    return label
  return np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_label)


@dataclasses.dataclass(frozen=True)
class Photometric:
  """Random brightness, contrast, saturation and hue, each with p = 0.5.

  The standard segmentation recipe's photometric distortion: brightness adds
  U(-brightness_delta, brightness_delta), contrast and saturation scale by a
  factor from their ranges (contrast before or after the colour changes, at
  random), hue rotates by U(-hue_delta, hue_delta) degrees. Values are on
  the 0..255 scale; the result is clipped to it once, on device. Images of
  other than 3 channels (grayscale, multispectral) get brightness and
  contrast only: saturation and hue are colour notions.
  """
  brightness_delta: float = 32.0
  contrast_range: tuple = (0.5, 1.5)
  saturation_range: tuple = (0.5, 1.5)
  hue_delta: float = 36.0

  def sample(self, rng, channels=3):
    """A random (C, C + 1) float32 matrix [A | b]: x' = A @ x + b, C =
    `channels`."""
    a, b = np.eye(channels), np.zeros(channels)

    def then(m, c=0.0):  # compose: new = m @ old + c
      nonlocal a, b
      a, b = m @ a, m @ b + c

    draws = rng.random(5)
    if draws[0] < 0.5:
      then(np.eye(channels), rng.uniform(-self.brightness_delta,
                                         self.brightness_delta))
    contrast_first = draws[1] < 0.5
    contrast = (rng.uniform(*self.contrast_range) if draws[2] < 0.5
                else None)
    if contrast is not None and contrast_first:
      then(contrast * np.eye(channels))
    if channels != 3:
      if contrast is not None and not contrast_first:
        then(contrast * np.eye(channels))
      return np.concatenate([a, b[:, None]], 1).astype(np.float32)
    if draws[3] < 0.5:
      s = rng.uniform(*self.saturation_range)
      then(s * np.eye(3) + (1 - s) * np.outer(np.ones(3), _LUMA))
    if draws[4] < 0.5:
      t = np.deg2rad(rng.uniform(-self.hue_delta, self.hue_delta))
      rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)],
                      [0, np.sin(t), np.cos(t)]])
      then(_YIQ_INV @ rot @ _YIQ)
    if contrast is not None and not contrast_first:
      then(contrast * np.eye(3))
    return np.concatenate([a, b[:, None]], 1).astype(np.float32)


def _crop_origin(label, crop_h, crop_w, rng, cat_max_ratio, ignore_label):
  """Random crop corner; with cat_max_ratio < 1, retries (up to 10 times)
  until no single class covers more than that share of the labelled crop
  pixels and at least two classes are present."""
  h, w = label.shape
  step = max(1, int(np.sqrt(crop_h * crop_w / 16384)))
  for _ in range(10 if cat_max_ratio < 1.0 else 1):
    top = int(rng.integers(0, h - crop_h + 1))
    left = int(rng.integers(0, w - crop_w + 1))
    if cat_max_ratio >= 1.0:
      break
    # Class shares are estimated on a grid of at most ~16k pixels (every
    # 4th pixel of a 512x512 crop): exact enough for a cap, 16x cheaper.
    crop = label[top:top + crop_h:step, left:left + crop_w:step]
    counts = np.bincount(crop.ravel(), minlength=ignore_label + 1)
    counts[ignore_label] = 0
    counts = counts[counts > 0]
    if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
      break
  return top, left


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """Random rescale (aspect kept), pad, random crop, flip, colour draw.

  Attributes:
    crop_size: output (height, width) or one int.
    scale_range: (low, high) range of the random rescale factor.
    flip: flip left-right with probability 0.5.
    mean: per-channel fill for padded image pixels (the dataset mean, so
      padding normalises to 0); padded labels are `ignore_label`.
    ignore_label: label of padded pixels.
    cat_max_ratio: below 1, re-draw crops (up to 10 times) that one class
      dominates beyond this share.
    photometric: a `Photometric` to draw a per-example 'colour' matrix, or
      None for none.
  """
  crop_size: tuple = (512, 512)
  scale_range: tuple = (1.0, 1.0)
  flip: bool = True
  mean: tuple = (0, 0, 0)
  ignore_label: int = IGNORE_LABEL
  cat_max_ratio: float = 1.0
  photometric: Photometric | None = None

  def random_map(self, element, rng):
    if files.is_skipped(element):
      return element
    crop_h, crop_w = pair(self.crop_size)
    h, w = element['label'].shape
    sh, sw = h, w  # size after the random rescale
    if tuple(self.scale_range) != (1.0, 1.0):
      sh, sw = scaled_size((h, w), rng.uniform(*self.scale_range))
    # The label is rescaled whole (cheap, and cat_max_ratio looks at it);
    # the image only inside the crop window, which gives the same pixels as
    # rescaling it whole and cropping, at a fraction of the cost.
    label = element['label']
    if (sh, sw) != (h, w):
      label = np.asarray(Image.fromarray(label).resize((sw, sh),
                                                       Image.NEAREST))
    label = pad_label(label, crop_h, crop_w, self.ignore_label)
    top, left = _crop_origin(label, crop_h, crop_w, rng, self.cat_max_ratio,
                             self.ignore_label)
    label = label[top:top + crop_h, left:left + crop_w]
    y1, x1 = min(top + crop_h, sh), min(left + crop_w, sw)
    if (sh, sw) == (h, w):
      image = element['image'][top:y1, left:x1]
    else:
      box = (left * w / sw, top * h / sh, x1 * w / sw, y1 * h / sh)
      image = resize_image(element['image'], (x1 - left, y1 - top), box)
    image = pad_image(image, crop_h, crop_w, fill_value(self.mean))
    if self.flip and rng.random() < 0.5:
      image, label = image[:, ::-1], label[:, ::-1]
    out = {'image': np.ascontiguousarray(image),
           'label': np.ascontiguousarray(label)}
    if self.photometric is not None:
      out['colour'] = self.photometric.sample(rng, image.shape[-1])
    return out


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """Keeps the whole image and label; pads both bottom/right to `pad_size`.

  The image is padded with the mean (which normalises to 0), the label with
  `ignore_label`, so batches have one static shape while metrics count the
  original pixels only. 'size' records the original (height, width): the
  evaluators resize, flip and tile within it.
  """
  pad_size: tuple = (0, 0)
  mean: tuple = (0, 0, 0)
  ignore_label: int = IGNORE_LABEL

  def map(self, element):
    if files.is_skipped(element):
      return element
    h, w = pair(self.pad_size)
    size = element['label'].shape
    if size[0] > h or size[1] > w:
      # Sizes not read before (a tfds split): found as the example is.
      fit = pad_to_fit((h, w), size)
      raise errors.ConfigError(
          f'An evaluation image is {size[0]}x{size[1]} (HxW), larger than '
          f'data.eval_pad_size={(h, w)} that evaluation pads to: set '
          f'--config.data.eval_pad_size="{fit}" or larger (the largest '
          'image of the split).')
    return {'image': pad_image(element['image'], h, w, fill_value(self.mean)),
            'label': pad_label(element['label'], h, w, self.ignore_label),
            'size': np.asarray(size, np.int32)}
