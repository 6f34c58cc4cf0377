"""Image/mask pairs on disk as a random-access grain source.

`FileSource` decodes one (image, mask) pair per record, maps raw mask values
to train ids through a 256-entry lookup table and checks everything a wrong
file could get wrong: undecodable or truncated images, masks whose size
differs from their image, colour masks, and raw values the dataset does not
define. Each problem raises `BadSampleError` naming the file; with
`on_bad_sample='skip'` the record instead becomes a `skipped` marker that the
pipeline drops and counts, so a bad file never turns into a wrong label.
"""

import os

import numpy as np
from PIL import Image

from seg_jax import validate
from seg_jax.labels import IGNORE_LABEL

ON_BAD_SAMPLE = ('raise', 'skip')
# A raw mask value the dataset does not define maps to this in the table.
INVALID = -1


class BadSampleError(ValueError):
  """A dataset file that cannot be used as it is; the message names it."""


def check_on_bad_sample(value):
  if value not in ON_BAD_SAMPLE:
    raise ValueError(f"data.on_bad_sample={value!r}; use 'raise' or 'skip'.")
  return value


def is_skipped(element):
  """Whether `element` is the marker of a skipped bad record."""
  return 'skipped' in element


def skipped(message):
  """The marker that replaces a bad record in 'skip' mode."""
  return {'skipped': message}


def label_table(num_classes, mapping=None, ignore=(IGNORE_LABEL,),
                ignore_label=IGNORE_LABEL):
  """A 256-entry raw value -> train id table.

  Args:
    num_classes: raw values 0..num_classes-1 map to themselves unless
      `mapping` is given.
    mapping: optional dict raw value -> train id (or `ignore_label`); when
      given, only its keys (and `ignore`) are valid raw values.
    ignore: raw values that become `ignore_label`.
    ignore_label: the train-id value of ignored pixels
      (`config.data.ignore_label`).

  Returns:
    int16 array of 256 entries; INVALID marks undefined raw values.
  """
  table = np.full(256, INVALID, np.int16)
  if mapping is None:
    table[:num_classes] = np.arange(num_classes)
  else:
    for raw, train_id in mapping.items():
      table[raw] = train_id
  for raw in ignore:
    table[raw] = ignore_label
  return table


def read_image(path):
  """RGB uint8 (H, W, 3); BadSampleError if the file is unreadable."""
  try:
    with Image.open(path) as im:
      im.load()  # decodes fully: a truncated file fails here
      if im.mode != 'RGB':
        im = im.convert('RGB')
      return np.asarray(im)
  except FileNotFoundError:
    raise BadSampleError(f'{path}: image file not found.') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadSampleError(f'{path}: cannot decode image ({e}); the file is '
                         'corrupt or truncated: replace or remove it.') from e


def read_mask(path):
  """Raw mask values (H, W) uint8: palette PNGs give indices, not colours."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ('P', 'L'):
        return np.asarray(im)  # 'P': the palette indices themselves
      if im.mode == '1':  # 1-bit masks: 0 and 1
        return np.asarray(im).astype(np.uint8)
      if im.mode in ('I', 'I;16', 'I;16B', 'I;16L'):
        raw = np.asarray(im)
        if raw.size and (raw.min() < 0 or raw.max() > 255):
          raise BadSampleError(
              f'{path}: mask holds values up to {raw.max()}; seg_jax reads '
              'class ids and the ignore label (0..255) from 8-bit masks.')
        return raw.astype(np.uint8)
      raise BadSampleError(
          f'{path}: mask has mode {im.mode!r}; masks must be single-channel '
          '(8-bit or palette PNG) holding class ids, not colours.')
  except FileNotFoundError:
    raise BadSampleError(f'{path}: mask file not found.') from None
  except BadSampleError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadSampleError(f'{path}: cannot decode mask ({e}); the file is '
                         'corrupt or truncated: replace or remove it.') from e


def apply_table(raw, table, path):
  """Raw mask values -> uint8 train ids; BadSampleError on undefined ones."""
  mapped = table[raw]
  if np.any(mapped == INVALID):
    bad = np.unique(raw[mapped == INVALID])
    valid = np.flatnonzero(table != INVALID)
    raise BadSampleError(
        f'{path}: mask values {bad.tolist()[:10]} are not labels of this '
        f'dataset (valid raw values: {_ranges(valid)}); fix the mask or the '
        'dataset/num_classes setting.')
  return mapped.astype(np.uint8)


def to_example(image, raw, table, mask_name, image_name):
  """{'image', 'label'} of a decoded image and its raw mask, checked: the
  sizes must agree and every raw value must be defined by `table`."""
  if raw.shape != image.shape[:2]:
    raise BadSampleError(
        f'{mask_name}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its '
        f'image {image_name} is {image.shape[1]}x{image.shape[0]}; they '
        'must be the same size.')
  return {'image': image, 'label': apply_table(raw, table, mask_name)}


def load_or_skip(on_bad_sample, load, *args):
  """`load(*args)`; in 'skip' mode a BadSampleError becomes a skip marker."""
  try:
    return load(*args)
  except BadSampleError as e:
    if on_bad_sample == 'raise':
      raise
    return skipped(str(e))


def _ranges(values):
  """[0,1,2,5,255] -> '0..2, 5, 255'."""
  out, start = [], None
  for i, v in enumerate(values):
    if start is None:
      start = v
    if i + 1 == len(values) or values[i + 1] != v + 1:
      out.append(f'{start}..{v}' if v > start else f'{v}')
      start = None
  return ', '.join(out)


def check_root(root, name, hint=''):
  """FileNotFoundError naming the setting when `root` is not a folder."""
  if not root or not os.path.isdir(root):
    raise validate.MissingFileError(
        f'{name}: dataset folder data.root={root!r} does not exist'
        f'{"; " + hint if hint else ""}.')
  return root


def read_list(path, name):
  """Non-empty lines of a split list file; errors name the file."""
  if not os.path.isfile(path):
    raise validate.MissingFileError(
        f'{name}: split list {path} does not exist; check data.root and the '
        'split name.')
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  if not lines:
    raise ValueError(f'{name}: split list {path} is empty.')
  return lines


class FileSource:
  """Random-access source of (image file, mask file) pairs.

  Attributes:
    class_names: one name per train id.
    palette: (num_classes, 3) uint8 colours for visualisation.
    skipped_at_build: list entries dropped because a file was missing
      (only with on_bad_sample='skip').
  """

  def __init__(self, name, pairs, class_names, palette, table,
               on_bad_sample='raise', origin=''):
    """Args:
      name: dataset/split for messages, e.g. 'voc/train'.
      pairs: list of (image path, mask path).
      class_names, palette: as the attributes.
      table: raw value -> train id table from `label_table`.
      on_bad_sample: 'raise' or 'skip'.
      origin: where the pairs were listed (a file or folder), for messages.
    """
    self.name = name
    self.class_names = tuple(class_names)
    self.palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    self._table = np.asarray(table, np.int16)
    self._on_bad = check_on_bad_sample(on_bad_sample)
    kept, self.skipped_at_build = [], []
    for image_path, mask_path in pairs:
      missing = [p for p in (image_path, mask_path) if not os.path.isfile(p)]
      if not missing:
        kept.append((image_path, mask_path))
        continue
      message = (f'{name}: {missing[0]} (listed in {origin or name}) does '
                 'not exist.')
      if self._on_bad == 'raise':
        raise validate.MissingFileError(
            message + " Fix the list, or set data.on_bad_sample='skip' to "
            'drop it.')
      self.skipped_at_build.append(message)
    if not kept:
      raise ValueError(f'{name}: no examples found in {origin or name}.')
    self.pairs = kept

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, index):
    return load_or_skip(self._on_bad, self.load, *self.pairs[index])

  def load(self, image_path, mask_path):
    """Decoded, checked example {'image', 'label'} of one pair."""
    return to_example(read_image(image_path), self.read_mask(mask_path),
                      self._table, mask_path, image_path)

  def read_mask(self, path):
    """The raw values of mask `path` (a source may check them first)."""
    return read_mask(path)

  def __repr__(self):
    return f'FileSource({self.name!r}, n={len(self)})'
