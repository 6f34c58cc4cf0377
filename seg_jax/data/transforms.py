"""Per-example transforms for the grain pipeline.

Images stay uint8 (H, W, 3) and labels uint8/int (H, W) all the way to the
device: normalisation happens inside the jitted step, which moves 4x fewer
bytes host-to-device. Random transforms take the per-record
`np.random.Generator` grain derives from (seed, record index), so an
example's augmentation does not depend on worker count or on resumption.
"""

import dataclasses

import grain
import numpy as np
from PIL import Image

from seg_jax.metrics import IGNORE_LABEL


def pair(size):
  return (int(size), int(size)) if np.isscalar(size) else tuple(map(int, size))


def resize(example, height, width):
  """Bilinear image, nearest-neighbour label resize to (height, width)."""
  image = Image.fromarray(example['image']).resize((width, height),
                                                   Image.BILINEAR)
  label = Image.fromarray(example['label']).resize((width, height),
                                                   Image.NEAREST)
  return {**example, 'image': np.asarray(image), 'label': np.asarray(label)}


def pad_to(example, height, width, image_fill=0, ignore_label=IGNORE_LABEL):
  """Pads at the bottom/right up to at least (height, width)."""
  h, w = example['label'].shape
  ph, pw = max(height - h, 0), max(width - w, 0)
  if not ph and not pw:
    return example
  image = np.pad(example['image'], ((0, ph), (0, pw), (0, 0)))
  if np.any(image_fill):
    image[h:, :] = image_fill
    image[:, w:] = image_fill
  label = np.pad(example['label'], ((0, ph), (0, pw)),
                 constant_values=ignore_label)
  return {**example, 'image': image, 'label': label}


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """Random rescale (aspect kept), pad, random crop, horizontal flip.

  Attributes:
    crop_size: output (height, width) or one int.
    scale_range: (low, high) range of the random rescale factor.
    flip: flip left-right with probability 0.5.
    mean: per-channel fill for padded image pixels (the dataset mean, so
      padding normalises to 0); padded labels are `ignore_label`.
    ignore_label: label of padded pixels.
  """
  crop_size: tuple = (512, 512)
  scale_range: tuple = (1.0, 1.0)
  flip: bool = True
  mean: tuple = (0, 0, 0)
  ignore_label: int = IGNORE_LABEL

  def random_map(self, element, rng):
    crop_h, crop_w = pair(self.crop_size)
    low, high = self.scale_range
    if (low, high) != (1.0, 1.0):
      scale = rng.uniform(low, high)
      h, w = element['label'].shape
      element = resize(element, max(int(h * scale + 0.5), 1),
                       max(int(w * scale + 0.5), 1))
    fill = np.asarray(self.mean, np.float32).round().astype(np.uint8)
    element = pad_to(element, crop_h, crop_w, fill, self.ignore_label)
    h, w = element['label'].shape
    top = int(rng.integers(0, h - crop_h + 1))
    left = int(rng.integers(0, w - crop_w + 1))
    image = element['image'][top:top + crop_h, left:left + crop_w]
    label = element['label'][top:top + crop_h, left:left + crop_w]
    if self.flip and rng.random() < 0.5:
      image, label = image[:, ::-1], label[:, ::-1]
    return {'image': np.ascontiguousarray(image),
            'label': np.ascontiguousarray(label)}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """Keeps the full image; pads bottom/right to `pad_size` (label -> ignore).

  Padding with the ignore label leaves metrics computed at the original
  resolution over the original pixels only.
  """
  pad_size: tuple = (0, 0)
  mean: tuple = (0, 0, 0)
  ignore_label: int = IGNORE_LABEL

  def map(self, element):
    h, w = pair(self.pad_size)
    fill = np.asarray(self.mean, np.float32).round().astype(np.uint8)
    element = pad_to(element, h, w, fill, self.ignore_label)
    if element['label'].shape != (h, w):
      raise ValueError(f'eval example of size {element["label"].shape} is '
                       f'larger than data.eval_pad_size={(h, w)}; raise it.')
    return {'image': element['image'], 'label': element['label']}
