"""Datasets by name and the pipelines that feed them to the devices."""

import copy
import logging
import os

import numpy as np

from seg_jax import errors, labels
from seg_jax.data import files, shapes, sources, transforms


def _shapes(config, split, strict=True):
  del strict  # nothing to pair
  c = config.data.shapes
  if split not in ('train', 'val'):
    raise errors.ConfigError(f"shapes: no split {split!r}; the built-in "
                             "dataset has 'train' and 'val'.")
  key = 'num_train' if split == 'train' else 'num_val'
  if c[key] < 1:
    raise errors.ConfigError(f'data.shapes.{key}={c[key]}: split {split!r} '
                             'needs 1 example or more.')
  return shapes.ShapesSource(
      split, c[key],
      seed=c.seed, size=c.image_size, max_shapes=c.max_shapes,
      ignore_label=labels.ignore_label(config))


def _files(builder):
  def build(config, split, strict=True):
    del strict  # list files name their pairs
    return builder(config.data.root, split, config.data.on_bad_sample,
                   ignore_label=labels.ignore_label(config))
  return build


def _folder(config, split, strict=True):
  return sources.folder(config.data.root, split, config.model.num_classes,
                        config.data.on_bad_sample,
                        ignore_label=labels.ignore_label(config),
                        label_map=dict(config.data.label_map),
                        mask_suffix=config.data.mask_suffix, strict=strict,
                        channels=config.data.channels)


def names_setting(value):
  """A class-names setting as a tuple of names: ('bg', 'road') as given
  (a name may hold a comma), and a comma-separated string, alone or as
  the one element the command line gives (`--config.data.class_names=
  bg,road` arrives as ('bg,road',))."""
  if isinstance(value, str):
    value = (value,)
  value = tuple(str(v) for v in value)
  if len(value) != 1:
    return value
  return tuple(name.strip() for name in value[0].split(',') if name.strip())


def _tfds(config, split, strict=True):
  del strict  # records hold both
  c = config.data.tfds
  if not c.name:
    raise errors.ConfigError("data.name='tfds' needs data.tfds.name, e.g. "
                             "'oxford_iiit_pet'.")
  names = names_setting(c.class_names) or tuple(
      f'class_{i}' for i in range(config.model.num_classes))
  return sources.TfdsSource(
      c.name, split, data_dir=c.data_dir, image_key=c.image_key,
      label_key=c.label_key, label_offset=c.label_offset,
      ignore_values=tuple(c.ignore_values), class_names=names,
      on_bad_sample=config.data.on_bad_sample,
      ignore_label=labels.ignore_label(config))


# data.name -> builder(config, split) -> random-access source with
# `class_names` and `palette`. A plain dict: no registration on import.
DATASETS = {
    'shapes': _shapes,
    'voc': _files(sources.voc),
    'cityscapes': _files(sources.cityscapes),
    'ade20k': _files(sources.ade20k),
    'camvid': _files(sources.camvid),
    'folder': _folder,
    'tfds': _tfds,
}


# data.name -> (class names, palette) known without reading the dataset.
_CLASSES = {
    'shapes': (shapes.CLASS_NAMES, shapes.PALETTE),
    'voc': (sources.VOC_CLASSES, sources.VOC_PALETTE),
    'cityscapes': (sources.CITYSCAPES_CLASSES, sources.CITYSCAPES_PALETTE),
    'ade20k': (sources.ADE20K_CLASSES, sources.ADE20K_PALETTE),
    'camvid': (sources.CAMVID_CLASSES, sources.CAMVID_PALETTE),
}


def class_info(config):
  """(class names, (C, 3) uint8 palette) of the config's dataset, without
  its files (prediction runs where the training data is not):
  `data.class_names` and `data.palette` when set (a run's stored config
  has both); else the dataset's own, `folder` reading `classes.txt` when
  its root is there, `tfds` using `data.tfds.class_names`, otherwise
  `class_<i>` and the VOC colour map."""
  names, palette = _CLASSES.get(config.data.name, ((), None))
  origin = f'data.name={config.data.name!r} has'
  if config.data.name == 'tfds':
    names = names_setting(config.data.tfds.class_names)
    origin = 'data.tfds.class_names names'
  listed = os.path.join(config.data.root or '', 'classes.txt')
  if config.data.name == 'folder' and os.path.isfile(listed):
    names = tuple(files.read_class_names(listed))
    origin = f'{listed} names'
  return _configured(config, names, palette, origin)


def _configured(config, names, palette, origin):
  """The dataset's (names, (C, 3) uint8 palette) with `data.class_names`
  and `data.palette` applied when set, checked against model.num_classes;
  `origin` says where `names` came from, for the errors."""
  num = config.model.num_classes
  if config.data.class_names:
    names = names_setting(config.data.class_names)
    origin = 'data.class_names names'
  names = tuple(names) or tuple(f'class_{i}' for i in range(num))
  if len(names) != num:
    raise errors.ConfigError(
        f'{origin} {len(names)} classes but model.num_classes={num}; make '
        'them equal.')
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise errors.ConfigError(
        f'{origin.rsplit(" ", 1)[0]}: the class name {twice[0]!r} is given '
        'twice; every class needs its own name (scores and --keep go by '
        'name).')
  if config.data.palette:
    palette = check_palette(config.data.palette, num)
  elif palette is None or len(palette) != num:
    palette = labels.color_map(num)
  return names, np.asarray(palette, np.uint8)


def check_config(c):
  """The data section's own check (see `seg_jax.validate`): every value,
  the dataset name and its classes against model.num_classes; no file is
  read."""
  errors.config_int(c, 'data.worker_count', 0)
  errors.config_int(c, 'data.num_threads')
  channels = errors.config_int(c, 'data.channels')
  if channels != 3 and c.data.name != 'folder':
    raise errors.ConfigError(
        f'data.channels={channels}: data.name={c.data.name!r} gives RGB '
        "images; other channel counts are read by the 'folder' source.")
  labels.ignore_label(c)  # outside the class ids, within uint8
  if not isinstance(c.data.mask_suffix, str) or '/' in c.data.mask_suffix:
    raise errors.ConfigError(
        f'data.mask_suffix={c.data.mask_suffix!r}: give what a mask\'s file '
        "name adds to its image's, e.g. '_mask'.")
  crop = transforms.pair(c.data.crop_size, 'data.crop_size')
  if c.data.eval_pad_size not in ((), None):
    pad = transforms.pair(c.data.eval_pad_size, 'data.eval_pad_size')
    if given_eval_pad_size(c) and (pad[0] < crop[0] or pad[1] < crop[1]):
      raise errors.ConfigError(
          f'data.crop_size={crop} is larger than data.eval_pad_size={pad}: '
          'evaluation pads images to at least the crop size; raise '
          'data.eval_pad_size or lower data.crop_size.')
  lo, hi = tuple(c.data.scale_range)
  if not 0 < lo <= hi:
    raise errors.ConfigError(f'data.scale_range={tuple(c.data.scale_range)}: '
                             'give 0 < low <= high.')
  if not 0 < c.data.cat_max_ratio <= 1:
    raise errors.ConfigError(f'data.cat_max_ratio={c.data.cat_max_ratio!r}: '
                             'give a value in (0, 1].')
  if c.data.label_map:
    if c.data.name != 'folder':
      raise errors.ConfigError(
          f'data.label_map is read by the folder source only, not '
          f'data.name={c.data.name!r} (its mask values are fixed); remove it.')
    sources.folder_table(c.model.num_classes, c.data.ignore_label,
                         dict(c.data.label_map))
  if (len(c.data.mean) != channels or len(c.data.std) != channels or
      min(c.data.std) <= 0):
    raise errors.ConfigError(
        f'data.mean={tuple(c.data.mean)} / data.std={tuple(c.data.std)}: '
        f'give data.channels={channels} values each, std > 0.')
  files.check_on_bad_sample(c.data.on_bad_sample)
  if c.data.name not in DATASETS:
    raise errors.ConfigError(f'Unknown data.name={c.data.name!r}; choose one '
                             f'of {sorted(DATASETS)}.')
  class_info(c)  # num_classes against the dataset's class list, the palette


def check_palette(palette, num_classes):
  """`data.palette` as a (num_classes, 3) uint8 array, or ConfigError."""
  try:
    colours = np.asarray(palette, np.int64).reshape(-1, 3)
    ok = (len(colours) == num_classes and colours.size == 3 * num_classes
          and colours.min() >= 0 and colours.max() <= 255)
  except (ValueError, TypeError):
    ok = False
  if not ok:
    raise errors.ConfigError(
        f'data.palette={tuple(palette)!r}: give one (r, g, b) colour of '
        f'0..255 per class ({num_classes}), or () for the dataset\'s own.')
  return colours.astype(np.uint8)


def split_name(config, split):
  """The dataset's own name of `split`: 'train' and 'val' are
  data.train_split and data.val_split (e.g. VOC's 'train_aug'); other
  names, and the shapes dataset's, are as given."""
  if config.data.name == 'shapes':
    return split
  return {'train': config.data.train_split,
          'val': config.data.val_split}.get(split, split)


def create_source(config, split, strict=True):
  """The random-access source of `split` ('train' or 'val') for a config.

  For file datasets the split read is `data.train_split` / `data.val_split`
  (e.g. VOC's 'train_aug'). `data.class_names` and `data.palette`, when
  set, replace the dataset's own. `strict=False` leaves the folder
  dataset's pairing problems for `seg_jax.data.check` to list (its
  `source.pairing`) instead of refusing them.
  """
  name = config.data.name
  if name not in DATASETS:
    raise errors.ConfigError(f'Unknown data.name={name!r}; choose one of '
                             f'{sorted(DATASETS)}.')
  source = DATASETS[name](config, split_name(config, split), strict=strict)
  source.class_names, source.palette = _configured(
      config, source.class_names, getattr(source, 'palette', None),
      f'data.name={name!r} has')
  dropped = getattr(source, 'skipped_at_build', ())
  if dropped:
    logging.warning('%s: skipped %d list entries with missing files '
                    "(data.on_bad_sample='skip'); first: %s", source,
                    len(dropped), dropped[0])
  return source


def open_split(config, split, training=True):
  """`create_source(config, split)`, checked and described before any step.

  A file dataset's headers are read (`FileSource.check_headers`: missing,
  unreadable and mismatched files are found now, not hours into a run;
  about 0.25 ms a pair, 367 CamVid pairs in 0.09 s; an evaluated split's
  sizes fit `data.eval_pad_size`); one line is logged with the example
  count, the image sizes when read, and the class names.

  A missing validation split's error says how to train without one
  (`training`) or which other split to evaluate.

  Returns:
    (source, image sizes [(height, width)] of its examples, or None when
    not read).
  """
  try:
    source = create_source(config, split)
  except errors.MissingFileError as e:
    root = config.data.get('root')
    if split != 'val' or (root and not os.path.isdir(root)):
      raise  # no split is there: the dataset folder is missing
    hint = ("To train without validation: --config.data.val_split=''."
            if training else 'Evaluate another split with --split=NAME '
            "(e.g. --split=train), or point data.val_split at one.")
    raise errors.MissingFileError(f'{e} {hint}') from None
  sizes = None
  if isinstance(source, files.FileSource):
    sizes = source.check_headers()
    if source.channels != 3:
      # Headers do not say how an image reads as data.channels (as RGB
      # any does): the first example is read now, so images of another
      # channel count stop the run before any step (in 'skip' mode it is
      # left to the run).
      source[0]  # pylint: disable=pointless-statement
  elif config.data.name == 'shapes':  # every image is image_size square
    sizes = [(config.data.shapes.image_size,) * 2] * len(source)
  logging.info('%s', describe(source, sizes))
  return source, sizes


def describe(source, sizes=None):
  """'folder/train: 340 examples, images 240..480 x 320..640 (HxW), 3
  classes: a, b, c' for a source (sizes when known)."""
  names = list(source.class_names)
  shown = ', '.join(names[:12]) + (f', ... ({len(names) - 12} more)'
                                   if len(names) > 12 else '')
  where = getattr(source, 'name', repr(source))
  size = f', images {size_range(sizes)}' if sizes else ''
  return (f'{where}: {len(source)} examples{size}, {len(names)} classes: '
          f'{shown}')


def size_range(sizes):
  """'24x32 (HxW)' of images of one size, else each side's range, e.g.
  '240..480 x 320 (HxW)' (a range of the sides, not of whole sizes: no
  image need be 240x320)."""
  (h0, w0), (h1, w1) = np.min(sizes, 0), np.max(sizes, 0)
  if (h0, w0) == (h1, w1):
    return f'{h0}x{w0} (HxW)'
  side = lambda a, b: f'{a}' if a == b else f'{a}..{b}'
  return f'{side(h0, h1)} x {side(w0, w1)} (HxW)'


def given_eval_pad_size(config):
  """`data.eval_pad_size` as set by hand, or () when unset or when it is
  the value a run fitted (`data.eval_pad_size_fitted`, in a run folder's
  config), which evaluating another split, or the same split with other
  files, fits again."""
  set_to = tuple(config.data.eval_pad_size or ())
  if set_to == tuple(config.data.get('eval_pad_size_fitted', ()) or ()):
    return ()
  return set_to


def fit_eval_pad_size(config, source, sizes):
  """The `data.eval_pad_size` that evaluating `source` needs.

  Set: returned as it is, after checking that every image fits
  (ConfigError naming the largest image and the setting otherwise).
  Empty, or the value a run fitted before (`data.eval_pad_size_fitted`,
  in a run folder's config): the training crop, or when an image is
  larger, the largest image's size rounded up to a multiple of 32 (per
  side).

  Args:
    sizes: (height, width) of each of `source.pairs`, or None (unknown:
      the setting is returned as it is).
  """
  crop = transforms.pair(config.data.crop_size)
  if not sizes:
    return tuple(config.data.eval_pad_size or ())
  set_to = given_eval_pad_size(config)
  heights, widths = np.asarray(sizes).T
  largest = (int(heights.max()), int(widths.max()))
  if not set_to:
    return transforms.pad_to_fit(crop, largest)
  pad = transforms.pair(set_to)
  over = np.flatnonzero((heights > pad[0]) | (widths > pad[1]))
  if len(over):
    k = over[np.argmax(heights[over] * widths[over])]
    fit = transforms.pad_to_fit(pad, largest)
    what = (source.pairs[k][0] if hasattr(source, 'pairs') else
            f'{getattr(source, "name", "the split")} example {k}')
    raise errors.ConfigError(
        f'{what} is {heights[k]}x{widths[k]} (HxW), larger '
        f'than data.eval_pad_size={pad} that evaluation pads to ({len(over)} '
        f'image(s) of {getattr(source, "name", "the split")} are): set '
        f'--config.data.eval_pad_size="{fit}", or () to fit the largest '
        'image.')
  return set_to


def resolved_config(config, train_source, val_source=None, val_sizes=None):
  """A copy of `config` with what the data decided written in: the class
  names and palette of `train_source`, and the eval pad size the
  validation images need (`fit_eval_pad_size`). It is what a run folder
  stores, so that evaluation and prediction need neither the data nor
  the settings repeated. A relative `data.root` becomes absolute: the run
  folder's config finds the data from any working directory."""
  resolved = copy.deepcopy(config)
  if config.data.root and os.path.isdir(config.data.root):
    resolved.data.root = os.path.abspath(config.data.root)
  resolved.data.class_names = tuple(str(n) for n in train_source.class_names)
  resolved.data.palette = tuple(tuple(int(v) for v in colour)
                                for colour in train_source.palette)
  if val_source is not None:
    pad = fit_eval_pad_size(config, val_source, val_sizes)
    fitted = bool(val_sizes) and not given_eval_pad_size(config)
    if (pad and fitted and
        tuple(pad) != transforms.pair(config.data.crop_size)):
      logging.info('data.eval_pad_size=%s: the largest validation image '
                   'padded to a multiple of 32.', tuple(pad))
    resolved.data.eval_pad_size = tuple(pad)
    with resolved.unlocked():  # a run folder's config from before the key
      resolved.data.eval_pad_size_fitted = tuple(pad) if fitted else ()
  return resolved
