"""Small folder datasets as users make them, written by the tests.

`write_folder` writes images/{split}/ and masks/{split}/ with palette-PNG
masks of 3 classes whose colours are easy to learn: class k is a block
whose pixels are `COLOURS[k]` plus noise. Options write the same examples
in other forms (16-bit, nested folders, ...); each decodes to the very
arrays of the plain form.
"""

import os

import numpy as np
from PIL import Image

COLOURS = np.array([[40, 40, 40], [200, 60, 60], [60, 60, 200]], np.uint8)
PALETTE = np.array([[0, 0, 0], [0, 255, 0], [255, 128, 0]], np.uint8)
SIZE = (24, 32)  # (height, width)


def example(i, size=SIZE):
  """(image uint8 (H, W, 3), mask uint8 (H, W)) of example i."""
  rng = np.random.default_rng(i)
  h, w = size
  mask = np.zeros((h, w), np.uint8)
  for k in (1, 2):
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[top:top + h // 2, left:left + w // 2] = k
  image = COLOURS[mask].astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
  return np.clip(image, 0, 255).astype(np.uint8), mask


def save_mask(path, mask, palette=PALETTE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(mask, 'P')
  colours = np.zeros((256, 3), np.uint8)
  colours[:len(palette)] = palette
  im.putpalette(colours.ravel().tolist())
  im.save(path)


def save_image(path, image, form='png'):
  """Writes `image` as `form`: 'png' (8-bit RGB), 'gray16' (16-bit
  grayscale PNG holding the first channel x 257), 'exif6' (a JPEG whose
  pixels are stored rotated, with EXIF orientation 6 to show it upright;
  lossless only through the rotation, so compare against the file's own
  decoding)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if form == 'png':
    Image.fromarray(image).save(path)
  elif form == 'gray16':
    Image.fromarray(image[..., 0].astype(np.uint16) * 257).save(path)
  elif form == 'exif6':
    # Orientation 6: the viewer rotates the stored pixels 90 degrees
    # clockwise, so store them rotated 90 degrees counter-clockwise.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(image, 1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=100, exif=exif)
  else:
    raise ValueError(form)


def write_folder(root, n=10, split='train', form='png', nested=0,
                 grey=False, mask_suffix='', size=SIZE, palette=PALETTE):
  """Writes n examples of `split`; returns their (image, mask) paths.

  Args:
    form: how images are saved (see `save_image`).
    nested: > 0 puts example i in subfolder g{i // nested}/ (sorted the
      same as the flat names).
    grey: the images are grayscale (the first channel repeated), so a
      16-bit form holds them exactly.
    mask_suffix: added to each mask's file name.
  """
  paths = []
  for i in range(n):
    image, mask = example(i, size)
    if grey:
      image = np.repeat(image[..., :1], 3, -1)
    sub = f'g{i // nested}' if nested else ''
    ext = 'jpg' if form == 'exif6' else 'png'
    image_path = os.path.join(root, 'images', split, sub, f'img_{i:03d}.{ext}')
    mask_path = os.path.join(root, 'masks', split, sub,
                             f'img_{i:03d}{mask_suffix}.png')
    save_image(image_path, image, form)
    save_mask(mask_path, mask, palette)
    paths.append((image_path, mask_path))
  return paths


def folder_config(root, **overrides):
  """configs/unet_shapes_tiny.py on the folder dataset at `root`."""
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  c = unet_shapes_tiny.get_config()
  c.data.name = 'folder'
  c.data.root = str(root)
  c.model.num_classes = 3
  c.data.crop_size = (16, 16)
  c.data.scale_range = (1.0, 1.0)
  c.train.num_steps = 4
  c.train.global_batch_size = 8
  c.eval.every_steps = 4
  c.checkpoint.every_steps = 4
  c.compilation_cache_dir = ''
  for key, value in overrides.items():
    node = c
    *parents, last = key.split('.')
    for part in parents:
      node = node[part]
    node[last] = value
  return c


def cli_args(root, **overrides):
  """The --config flags of `folder_config(root)` for the CLIs."""
  args = ['--config=configs/unet_shapes_tiny.py',
          '--config.data.name=folder', f'--config.data.root={root}',
          '--config.model.num_classes=3', '--config.data.crop_size=(16,16)',
          '--config.data.scale_range=(1.0,1.0)',
          '--config.train.num_steps=4', '--config.eval.every_steps=4',
          '--config.checkpoint.every_steps=4',
          '--config.compilation_cache_dir=']
  return args + [f'--config.{k}={v}' for k, v in overrides.items()]
