"""Image/mask pairs on disk as a random-access grain source.

`FileSource` decodes one (image, mask) pair per record, maps raw mask values
to train ids through a 256-entry lookup table and checks everything a wrong
file could get wrong: undecodable or truncated images, masks whose size
differs from their image, colour masks, and raw values the dataset does not
define. Each problem raises `BadSampleError` naming the file; with
`on_bad_sample='skip'` the record instead becomes a `skipped` marker that the
pipeline drops and counts, so a bad file never turns into a wrong label.
"""

import concurrent.futures
import logging
import os
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seg_jax import errors
from seg_jax.labels import IGNORE_LABEL

ON_BAD_SAMPLE = ('raise', 'skip')
# The file types read as images and masks (and by `predict`).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp',
                    '.gif')
# A raw mask value the dataset does not define maps to this in the table.
INVALID = -1
# Why a JPEG mask is refused, and what to do.
JPEG_MASK_PROBLEM = ("JPEG's lossy compression changes the class ids along "
                     'every edge (silently, where they stay valid ids); save '
                     'masks as PNG.')


def walk(folder):
  """`os.walk(folder)` in sorted order, hidden folders and macOS's
  `__MACOSX` (the resource forks a zip made on a Mac unpacks into) left
  out, following symbolic links to folders (a dataset assembled from links
  is read whole), each real folder once (a link back up does not loop)."""
  seen = set()
  for root, dirs, names in os.walk(folder, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    dirs[:] = sorted(d for d in dirs
                     if not d.startswith('.') and d != '__MACOSX')
    yield root, dirs, sorted(names)


# A dataset file that cannot be used as it is; the message names it.
BadSampleError = errors.BadSampleError


class ChannelCountError(BadSampleError):
  """An image whose channel count is not `data.channels`; `found` says
  what the file holds (its path first), for callers whose advice differs
  (a trained model's channel count cannot change)."""

  def __init__(self, found, channels, advice):
    super().__init__(f'{found} but data.channels={channels}: {advice}')
    self.found = found


def check_on_bad_sample(value):
  if value not in ON_BAD_SAMPLE:
    raise errors.ConfigError(f"data.on_bad_sample={value!r}; use 'raise' or "
                             "'skip'.")
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


def _open(path, what):
  """The PIL image at `path`, fully decoded, upright as its EXIF orientation
  says (what any image viewer shows); BadSampleError names the file."""
  try:
    with Image.open(path) as im:
      _refuse_animation(im, path, what)
      im.load()  # decodes fully: a truncated file fails here
      orientation = im.getexif().get(EXIF_ORIENTATION, 1)
      upright = ImageOps.exif_transpose(im) if orientation != 1 else im
      upright.format = im.format  # the file's, whatever its name says
      return upright, orientation
  except FileNotFoundError:
    raise BadSampleError(f'{path}: {what} file not found.') from None
  except BadSampleError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    _refuse_other_types(e, path)
    reason = 'the file is empty' if _is_empty(path) else str(e)
    raise BadSampleError(f'{path}: cannot decode {what} ({reason}); the file '
                         'is corrupt or truncated: replace or remove it.'
                         ) from e


def _refuse_animation(im, path, what):
  """An animated GIF, WebP or PNG is refused as an image or mask: which of
  its frames was meant cannot be guessed (multi-page TIFFs are channels:
  `_read_tiff`)."""
  frames = getattr(im, 'n_frames', 1)
  if frames > 1 and im.format != 'TIFF':
    raise BadSampleError(
        f'{path}: the {what} is an animation of {frames} frames; seg_jax '
        f'reads one frame per {what} file: save the frame meant as its own '
        'file (predict reads videos: convert the animation to .mp4).')


def _refuse_other_types(error, path):
  """A file PIL cannot identify whose name is of no image type is not an
  image (a text file given by mistake), rather than a corrupt one."""
  if (isinstance(error, UnidentifiedImageError) and not _is_empty(path) and
      not path.lower().endswith(IMAGE_EXTENSIONS)):
    raise BadSampleError(
        f'{path}: not an image file (its type is none that is read: '
        f'{", ".join(IMAGE_EXTENSIONS)}).') from None


def _is_empty(path):
  try:
    return os.path.getsize(path) == 0
  except OSError:
    return False


def read_image(path, channels=3):
  """uint8 (H, W, channels), upright (EXIF orientation applied); see
  `read_image_notes` for how files of each kind are read."""
  return read_image_notes(path, channels)[0]


TIFF_EXTENSIONS = ('.tif', '.tiff')


def read_image_notes(path, channels=3):
  """(uint8 (H, W, channels), notes): the image and how it was read.

  channels=3 (RGB): 8-bit images of any mode become RGB (grayscale
  repeated, alpha dropped, palette and CMYK converted). channels=1: the
  file must hold one channel (8-bit, 16-bit or float grayscale). channels=4:
  an RGBA PNG, or a 4-channel TIFF. Any other count: a TIFF with that many
  channels (read with `tifffile`: interleaved (H, W, C) or planar
  (C, H, W)); TIFFs are read that way for 1 and 4 channels too when PIL
  cannot. Values: 16-bit images (PIL modes I;16*, I, or uint16 TIFFs) are
  scaled to 0..255 as value * 255 / 65535, so a 16-bit image holding an
  8-bit one's values x 257 reads back exactly as that 8-bit image; float
  images are read as 0..1 and scaled by 255 (values outside 0..1 are an
  error). The EXIF orientation is applied. `notes` lists each of these that
  happened (for `seg_jax.data.check`). A file whose channel count does not
  fit `channels` is a BadSampleError naming both.
  """
  if channels != 3:
    return _read_channels(path, channels)
  im, orientation = _open(path, 'image')
  notes = []
  if orientation != 1:
    notes.append(f'EXIF orientation {orientation} applied (the image is '
                 'read upright, as viewers show it)')
  if im.mode == 'RGB':
    return np.asarray(im), notes
  if im.mode in HIGH_BIT_MODES or im.mode == 'F':
    raw = np.asarray(im)
    grey = _grey_to_uint8(raw, im.mode, path)
    notes.append(f'{_MODE_NAMES.get(im.mode, im.mode)} ({im.mode}): scaled to '
                 '8 bits and repeated to 3 channels')
    notes += _few_bits_note(raw, im.mode)
    return np.repeat(grey[..., None], 3, -1), notes
  if im.mode not in _RGB_CONVERTIBLE:
    raise BadSampleError(f'{path}: image has PIL mode {im.mode!r}, which '
                         'seg_jax cannot read as RGB; save it as 8-bit RGB or '
                         'grayscale (PNG or JPEG).')
  notes.append(f'{_MODE_NAMES.get(im.mode, im.mode)} ({im.mode}): read as '
               'RGB')
  return np.asarray(im.convert('RGB')), notes


# What data.channels reads besides RGB: `_read_channels` (TIFFs of other
# counts go to `_read_tiff` before it).
_CHANNEL_FORMS = {1: 'grayscale: 8, 16-bit or float',
                  4: 'RGBA, or a 4-channel TIFF'}


def _read_channels(path, channels):
  """`read_image_notes` for channels != 3."""
  if path.lower().endswith(TIFF_EXTENSIONS) and channels not in (1, 4):
    return _read_tiff(path, channels), []
  try:
    im, orientation = _open(path, 'image')
  except BadSampleError:
    if path.lower().endswith(TIFF_EXTENSIONS):
      return _read_tiff(path, channels), []  # e.g. a float multi-page TIFF
    raise
  notes = ([f'EXIF orientation {orientation} applied (the image is read '
            'upright, as viewers show it)'] if orientation != 1 else [])
  if channels == 1 and im.mode in HIGH_BIT_MODES + ('F',):
    raw = np.asarray(im)
    notes.append(f'{_MODE_NAMES.get(im.mode, im.mode)} ({im.mode}): scaled to '
                 '8 bits')
    notes += _few_bits_note(raw, im.mode)
    return _grey_to_uint8(raw, im.mode, path)[..., None], notes
  if channels == 1 and im.mode in ('L', '1'):
    return np.asarray(im.convert('L'))[..., None], notes
  if channels == 4 and im.mode == 'RGBA':
    return np.asarray(im), notes
  if len(im.getbands()) == channels:  # e.g. a palette image, a CMYK JPEG
    raise BadSampleError(
        f'{path}: a {_MODE_NAMES.get(im.mode, im.mode)} (PIL mode '
        f'{im.mode!r}) is not read as data.channels={channels} '
        f'({_CHANNEL_FORMS.get(channels, "a multi-channel TIFF")}); convert '
        'the image to that.')
  raise ChannelCountError(
      f'{path}: the image has {len(im.getbands())} channel(s) (PIL mode '
      f'{im.mode!r})', channels, "set data.channels to the images' count "
      '(1: grayscale, 3: RGB, 4: RGBA or 4-channel TIFF, more: '
      'multi-channel TIFF), or convert the images.')


def _read_tiff(path, channels):
  """(H, W, channels) uint8 of a multi-channel TIFF, via tifffile."""
  try:
    import tifffile  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.ConfigError(
        f'{path}: reading a {channels}-channel TIFF needs the tifffile '
        "package: pip install tifffile (or pip install -e '.[tiff]').") from None
  try:
    raw = np.asarray(tifffile.imread(path))
  except FileNotFoundError:
    raise BadSampleError(f'{path}: image file not found.') from None
  except Exception as e:  # pylint: disable=broad-except
    raise BadSampleError(f'{path}: cannot decode image ({e}); the file is '
                         'corrupt or not a TIFF: replace or remove it.') from e
  if raw.ndim == 2:
    raw = raw[..., None]
  if raw.ndim == 3 and raw.shape[0] == channels and raw.shape[-1] != channels:
    raw = np.moveaxis(raw, 0, -1)  # planar (C, H, W)
  if raw.ndim != 3 or raw.shape[-1] != channels:
    raise ChannelCountError(
        f'{path}: the TIFF holds an array of shape {raw.shape}', channels,
        f'give (H, W, {channels}) or ({channels}, H, W) images, or set '
        'data.channels to their count.')
  if raw.dtype == np.uint8:
    return raw
  if raw.dtype.kind == 'f':
    return _grey_to_uint8(raw, 'F', path)
  if raw.dtype.kind in 'iu' and raw.dtype.itemsize <= 4:
    return _grey_to_uint8(raw.astype(np.int64), 'I', path)
  raise BadSampleError(f'{path}: TIFF values of type {raw.dtype} are not '
                       'read; save 8 or 16-bit integers or floats in 0..1.')


# EXIF tag 274: how the stored pixels are rotated/flipped for display.
EXIF_ORIENTATION = 0x0112
HIGH_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
_RGB_CONVERTIBLE = ('L', 'LA', 'P', 'PA', '1', 'RGBA', 'RGBX', 'RGBa',
                    'CMYK', 'YCbCr', 'LAB', 'HSV', 'La')
_MODE_NAMES = {'L': 'grayscale', 'LA': 'grayscale with alpha',
               'P': 'palette image', 'PA': 'palette image with alpha',
               '1': '1-bit image', 'RGBA': 'RGB with alpha (dropped)',
               'CMYK': 'CMYK image', 'I': '16-bit grayscale',
               'F': '32-bit float grayscale'}
_MODE_NAMES.update({m: '16-bit grayscale' for m in HIGH_BIT_MODES[:4]})


def _few_bits_note(raw, mode):
  """[a note] when a 16-bit image uses at most 12 of its bits (a 10- or
  12-bit camera's values, or 8-bit ones, stored as they came): scaled from
  0..65535, it reads nearly black."""
  if mode not in HIGH_BIT_MODES or not raw.size:
    return []
  top = int(raw.max())
  if not 0 < top < 4096:
    return []
  bits = top.bit_length()
  most = 2 ** bits - 1
  return [f'16-bit image using only {bits} of its bits (values up to '
          f'{most}): read as 0..65535, it becomes at most 0..'
          f'{(most * 255 + 32767) // 65535} of 0..255, nearly black; rescale '
          f'such images to the 16-bit range (x {2 ** (16 - bits)}) or save '
          'them as 8-bit']


def _grey_to_uint8(raw, mode, path):
  """16-bit or float grey values -> uint8 (see `read_image_notes`)."""
  if mode == 'F':
    if raw.size and not (np.isfinite(raw).all() and raw.min() >= 0 and
                         raw.max() <= 1):
      raise BadSampleError(
          f'{path}: float image holds values {np.nanmin(raw):.4g}..'
          f'{np.nanmax(raw):.4g}; seg_jax reads float images as 0..1: '
          'rescale it to 0..1, or save it as an 8 or 16-bit image.')
    return np.round(raw * 255.0).astype(np.uint8)
  if raw.size and (raw.min() < 0 or raw.max() > 65535):
    raise BadSampleError(
        f'{path}: image holds values {raw.min()}..{raw.max()}, beyond 16 '
        'bits; save it as an 8 or 16-bit image.')
  return ((raw.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def read_mask(path):
  """Raw mask values (H, W) uint8: palette PNGs give indices, not colours.

  An RGB mask whose three channels are equal everywhere (a grayscale mask
  saved as RGB) is read as that grayscale mask, and so are RGBA and
  grayscale-with-alpha (LA) masks whose alpha is opaque everywhere; any
  other colour mask, or a mask with transparent pixels, is an error. The
  EXIF orientation is applied, as to images.
  """
  im, _ = _open(path, 'mask')
  if im.format == 'JPEG':
    raise BadSampleError(f'{path}: the mask is a JPEG file (whatever its '
                         f'name): {JPEG_MASK_PROBLEM}')
  if im.mode in ('P', 'L'):
    return np.asarray(im)  # 'P': the palette indices themselves
  if im.mode == '1':  # 1-bit masks: 0 and 1
    return np.asarray(im).astype(np.uint8)
  if im.mode in HIGH_BIT_MODES:
    raw = np.asarray(im)
    if raw.size and (raw.min() < 0 or raw.max() > 255):
      raise BadSampleError(
          f'{path}: mask holds values up to {raw.max()}; seg_jax reads '
          'class ids and the ignore label (0..255) from 8-bit masks.')
    return raw.astype(np.uint8)
  if im.mode in ('RGB', 'RGBA', 'LA'):
    pixels = np.asarray(im)
    grey = pixels[..., 0]
    if im.mode.endswith('A') and not np.all(pixels[..., -1] == 255):
      raise BadSampleError(
          f'{path}: mask has mode {im.mode!r} with transparent pixels; save '
          'it as a single-channel (8-bit or palette) PNG of class ids '
          '(transparency carries no class).')
    if im.mode == 'LA' or (np.array_equal(grey, pixels[..., 1]) and
                           np.array_equal(grey, pixels[..., 2])):
      return np.ascontiguousarray(grey)
  raise BadSampleError(
      f'{path}: mask has mode {im.mode!r}; masks must be single-channel '
      '(8-bit or palette PNG) holding class ids, not colours.')


def mask_palette(path, num_classes):
  """The first `num_classes` colours of a palette-PNG mask's own palette,
  (num_classes, 3) uint8, or None when the mask has no palette."""
  try:
    with Image.open(path) as im:
      if im.mode != 'P':
        return None
      colours = np.asarray(im.getpalette() or [], np.uint8).reshape(-1, 3)
  except (OSError, SyntaxError, ValueError):
    return None
  if len(colours) < num_classes:
    return None
  return colours[:num_classes]


def _header_orientation(im):
  """The EXIF orientation an opened, undecoded image declares. A PNG's eXIf
  chunk is only looked for before the pixels: asking PIL for one stored
  after them decodes the whole image."""
  if im.format == 'PNG' and 'exif' not in im.info:
    return 1
  return im.getexif().get(EXIF_ORIENTATION, 1)


def _multichannel_tiff_size(path):
  """(height, width) of a TIFF that PIL misreads or rejects (other than 1,
  3 or 4 interleaved channels, planar, or pages), from tifffile's header:
  the array `tifffile.imread` gives, its smallest end axis the channels
  (`_read_tiff`'s layouts); None for other TIFFs, without tifffile, or for
  a file it cannot read."""
  try:
    import tifffile  # pylint: disable=g-import-not-at-top
    with tifffile.TiffFile(path) as tiff:
      series = tiff.series[0]
      axes, shape = series.axes, tuple(int(n) for n in series.shape)
  except Exception:  # pylint: disable=broad-except
    return None
  if axes == 'YX' or (axes == 'YXS' and shape[-1] in (3, 4)):
    return None  # PIL reads it (and its EXIF orientation)
  if len(shape) == 2:
    return shape
  if len(shape) == 3:
    return shape[1:] if shape[0] < shape[-1] else shape[:2]
  return None


def image_size(path):
  """(height, width) of an image file as it is read (EXIF orientation
  applied), from its header only; BadSampleError when unreadable."""
  if path.lower().endswith(TIFF_EXTENSIONS):
    size = _multichannel_tiff_size(path)
    if size is not None:
      return size
  try:
    with Image.open(path) as im:
      w, h = im.size
      if _header_orientation(im) in (5, 6, 7, 8):
        w, h = h, w  # rotated by 90 degrees for display
      return h, w
  except FileNotFoundError:
    raise BadSampleError(f'{path}: file not found.') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    _refuse_other_types(e, path)
    reason = 'the file is empty' if _is_empty(path) else str(e)
    raise BadSampleError(f'{path}: cannot read it ({reason}); the file is '
                         'corrupt or not an image: replace or remove it.'
                         ) from e


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


def size_mismatch(mask_name, mask_hw, image_name, image_hw):
  """The message of a mask whose size differs from its image's (saying so
  when the image is turned by its EXIF orientation and the mask fits its
  stored pixels)."""
  message = (f'{mask_name}: mask is {mask_hw[0]}x{mask_hw[1]} (HxW) but its '
             f'image {image_name} is {image_hw[0]}x{image_hw[1]}')
  if tuple(mask_hw[:2]) == tuple(image_hw[:2])[::-1]:
    try:
      with Image.open(image_name) as im:
        orientation = _header_orientation(im)
    except (OSError, SyntaxError, ValueError):
      orientation = 1
    if orientation in (5, 6, 7, 8):
      return (f'{message} as shown upright (EXIF orientation '
              f'{orientation}): the mask matches the stored, sideways '
              'pixels; rotate the mask to match the upright image, or save '
              'the image without its EXIF orientation.')
  return message + '; they must be the same size.'


def to_example(image, raw, table, mask_name, image_name):
  """{'image', 'label'} of a decoded image and its raw mask, checked: the
  sizes must agree and every raw value must be defined by `table`."""
  if raw.shape != image.shape[:2]:
    raise BadSampleError(size_mismatch(mask_name, raw.shape, image_name,
                                       image.shape[:2]))
  return {'image': image, 'label': apply_table(raw, table, mask_name)}


def header_check(image_path, mask_path):
  """((height, width) of the image, problem or None), read from the two
  files' headers only: a file that cannot be opened, or an image and mask
  of different sizes, is a problem."""
  try:
    size = image_size(image_path)
    mask = image_size(mask_path)
  except BadSampleError as e:
    return None, str(e)
  if mask != size:
    return size, size_mismatch(mask_path, mask, image_path, size)
  return size, None


def header_checks(pairs, threads=8):
  """`header_check` of every (image, mask) pair, in order."""
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(lambda p: header_check(*p), pairs))


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
  if not root:
    raise errors.MissingFileError(
        f'{name}: data.root is not set; give --config.data.root=<the '
        f'dataset folder>{" (" + hint + ")" if hint else ""}.')
  if not os.path.isdir(root):
    raise errors.MissingFileError(
        f'{name}: dataset folder data.root={root!r} '
        f'{errors.not_a_folder(root)}{"; " + hint if hint else ""}.')
  return root


def read_list(path, name):
  """Non-empty lines of a split list file; errors name the file."""
  if not os.path.isfile(path):
    raise errors.MissingFileError(
        f'{name}: split list {path} does not exist; check data.root and the '
        'split name.')
  lines = _stripped_lines(path)
  if not lines:
    raise errors.ConfigError(f'{name}: split list {path} is empty.')
  return lines


def _stripped_lines(path):
  """The non-blank lines of a text file, stripped."""
  with open(path, encoding='utf-8-sig') as f:  # a BOM is no character
    return [line.strip() for line in f if line.strip()]


def read_class_names(path):
  """The class names of a `classes.txt`: one per non-empty line, lines
  starting with '#' left out as comments, as is a '#' after a space and
  what follows it ('road  # asphalt' is 'road'); one that names none
  (empty, blank or only comments) is refused, naming it."""
  names = [re.sub(r'\s+#.*$', '', line) for line in _stripped_lines(path)
           if not line.startswith('#')]
  if not names:
    raise errors.ConfigError(
        f'{path} names no class (it is empty, blank or only comments): '
        'write one class name a line, in class-id order, or remove it '
        '(the classes are then named class_0, class_1, ...).')
  return names


class FileSource:
  """Random-access source of (image file, mask file) pairs.

  Attributes:
    class_names: one name per train id.
    palette: (num_classes, 3) uint8 colours for visualisation.
    skipped_at_build: list entries dropped because a file was missing
      (only with on_bad_sample='skip').
    left_out: once `check_headers` ran, every pair left out as the split
      was opened (those and the unreadable ones; 'skip' mode), a message
      each.
  """

  def __init__(self, name, pairs, class_names, palette, table,
               on_bad_sample='raise', origin='', channels=3):
    """Args:
      name: dataset/split for messages, e.g. 'voc/train'.
      pairs: list of (image path, mask path).
      class_names, palette: as the attributes.
      table: raw value -> train id table from `label_table`.
      on_bad_sample: 'raise' or 'skip'.
      origin: where the pairs were listed (a file or folder), for messages.
      channels: image channels (`config.data.channels`; see `read_image`).
    """
    self.channels = channels
    self.name = name
    self.class_names = tuple(class_names)
    self.palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    self.table = np.asarray(table, np.int16)
    self._on_bad = check_on_bad_sample(on_bad_sample)
    kept, self.skipped_at_build, first_missing = [], [], None
    for image_path, mask_path in pairs:
      missing = [p for p in (image_path, mask_path) if not os.path.isfile(p)]
      if not missing:
        kept.append((image_path, mask_path))
        continue
      folder = os.path.dirname(missing[0])
      if not os.path.isdir(folder):  # a whole folder missing: no skipping
        raise errors.MissingFileError(
            f'{name}: {missing[0]} (listed in {origin or name}) does not '
            f'exist, nor does its folder {folder}: is the dataset complete '
            '(its images and masks both there)?')
      first_missing = first_missing or missing[0]
      message = (f'{name}: {missing[0]} (listed in {origin or name}) does '
                 'not exist.')
      if self._on_bad == 'raise':
        raise errors.MissingFileError(
            message + " Fix the list, or set data.on_bad_sample='skip' to "
            'drop it.')
      self.skipped_at_build.append(message)
    if not kept:
      raise errors.MissingFileError(
          f'{name}: no examples found in {origin or name}.' if not pairs else
          f'{name}: none of the {len(pairs)} examples listed in '
          f'{origin or name} has both its files; the first missing: '
          f'{first_missing}.')
    self.pairs = kept

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, index):
    return load_or_skip(self._on_bad, self.load, *self.pairs[index])

  def load(self, image_path, mask_path):
    """Decoded, checked example {'image', 'label'} of one pair."""
    return to_example(read_image(image_path, self.channels),
                      self.read_mask(mask_path),
                      self.table, mask_path, image_path)

  def read_mask(self, path):
    """The raw values of mask `path` (a source may check them first)."""
    return read_mask(path)

  def check_headers(self):
    """Reads every pair's file headers (nothing is decoded) and returns
    each kept pair's image (height, width).

    A pair whose file cannot be opened, or whose image and mask sizes
    differ, raises `BadSampleError` naming the first such file and the
    count ('raise' mode), or is dropped with one warning line each
    ('skip').
    """
    checks = header_checks(self.pairs)
    problems = [p for _, p in checks if p]
    if problems and self._on_bad == 'raise':
      more = (f' ({len(problems) - 1} more such files; `python -m '
              'seg_jax.data.check` lists them all)' if len(problems) > 1
              else '')
      raise BadSampleError(f'{problems[0]}{more} Fix it, or set '
                           "data.on_bad_sample='skip' to leave such files "
                           'out.')
    for problem in problems:
      logging.warning('%s: skipped: %s', self.name, problem)
    self.left_out = list(self.skipped_at_build) + problems
    if problems:
      kept = [(pair, size) for pair, (size, p) in zip(self.pairs, checks)
              if not p]
      if not kept:
        raise BadSampleError(f'{self.name}: every file is bad; the first: '
                             f'{problems[0]}')
      self.pairs = [pair for pair, _ in kept]
      return [size for _, size in kept]
    return [size for size, _ in checks]

  def __repr__(self):
    return f'FileSource({self.name!r}, n={len(self)})'
