"""Copy any dataset seg_jax reads into the compact `folder` layout.

    python -m seg_jax.data.to_folder --config=configs/unet_camvid.py \\
        --config.data.root=../shared/data/camvid --out=data/camvid_folder \\
        [--splits=train,val] [--image_format=jpg] [--jpeg_quality=95] \\
        [--overwrite]

Each split is read through `data.create_source` (voc, cityscapes, ade20k,
camvid, folder, tfds, shapes) and written as `OUT/images/{split}/{stem}.jpg`
(JPEG, grey or RGB as `data.channels` says; `--image_format=png`: lossless
PNG, RGBA too; `tif`: any channel count), `OUT/masks/{split}/{stem}.png`
(palette PNGs of train ids in the dataset's colours, `data.ignore_label`
(255) = ignore) and
`OUT/classes.txt`, so `--config.data.name=folder --config.data.root=OUT`
trains on it with no label mapping. `stem` is the source image's file stem
(prefixed with its folder's name where two collide), or the record index.
Records a source skips (`data.on_bad_sample='skip'`) are left out and
counted. CamVid's 122 MB of PNGs become 36 MB at JPEG quality 95.
"""

import collections
import concurrent.futures
import os
import shlex
import shutil
import sys
import time

import numpy as np
from absl import flags, logging
from PIL import Image

from seg_jax import data, errors
from seg_jax.data import files

IMAGE_FORMATS = ('jpg', 'png', 'tif')

# What one split's conversion did; `bytes` counts the files written.
Summary = collections.namedtuple(
    'Summary', 'split written skipped bytes seconds image_dir mask_dir')


def split_dirs(out, split):
  """(images folder, masks folder) of `split` under `out`."""
  return (os.path.join(out, 'images', split),
          os.path.join(out, 'masks', split))


def record_stems(source):
  """One unique file stem per record of `source`.

  A source with `.pairs` (FileSource) gives its image files' stems; a stem
  found twice is prefixed with its folder's name, and the record index is
  appended if that still collides. Other sources give `{index:06d}`.
  """
  pairs = getattr(source, 'pairs', None)
  if pairs is None:
    return [f'{i:06d}' for i in range(len(source))]
  stems = [os.path.splitext(os.path.basename(p))[0] for p, _ in pairs]
  seen = collections.Counter(stems)
  stems = [f'{os.path.basename(os.path.dirname(p))}_{s}' if seen[s] > 1
           else s for s, (p, _) in zip(stems, pairs)]
  seen = collections.Counter(stems)
  return [f'{s}_{i:06d}' if seen[s] > 1 else s for i, s in enumerate(stems)]


def _held_files(folder):
  """Files under `folder` (none when it does not exist)."""
  return [os.path.join(d, f) for d, _, names in files.walk(folder)
          for f in names]


def check_out(out, splits, class_names, overwrite=False):
  """Raises `ConfigError` if `out` already holds files of a split, or a
  different classes.txt, unless `overwrite`; with it, empties the splits'
  image and mask folders (so no stale file stays matched by stem)."""
  for split in splits:
    for folder in split_dirs(out, split):
      held = _held_files(folder)
      if held and not overwrite:
        raise errors.ConfigError(
            f'--out={out}: {folder} already holds {len(held)} files of split '
            f'{split!r}; pass --overwrite to replace them, or choose another '
            '--out.')
      if held:
        shutil.rmtree(folder)
  listed = os.path.join(out, 'classes.txt')
  if os.path.isfile(listed) and not overwrite:
    with open(listed) as f:
      if f.read().split('\n') != [*class_names, '']:
        raise errors.ConfigError(
            f'--out={out}: {listed} names other classes than this dataset; '
            'pass --overwrite to replace it, or choose another --out.')


def _save_image(image, path, image_format, jpeg_quality):
  """Writes an (H, W, C) uint8 image: C=1 as grayscale, 3 as RGB, 4 as
  RGBA (PNG), any count as a TIFF (`--image_format=tif`)."""
  image = np.asarray(image, np.uint8)
  if image_format == 'tif':
    import tifffile  # pylint: disable=g-import-not-at-top
    tifffile.imwrite(path, image[..., 0] if image.shape[-1] == 1 else image)
    return
  im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if image_format == 'jpg':
    im.save(path, 'JPEG', quality=jpeg_quality)
  else:
    im.save(path, 'PNG')


def check_format(image_format, channels):
  """Raises `ConfigError` unless `image_format` holds `channels` channels
  (JPEG: 1 or 3; PNG: 1, 3 or 4; TIFF: any, with tifffile)."""
  if image_format not in IMAGE_FORMATS:
    raise errors.ConfigError(f'--image_format={image_format!r}: use one '
                             f'of {", ".join(IMAGE_FORMATS)}.')
  holds = {'jpg': (1, 3), 'png': (1, 3, 4)}.get(image_format)
  if holds is not None and channels not in holds:
    raise errors.ConfigError(
        f'--image_format={image_format} cannot hold the images\' '
        f'data.channels={channels} channels (it holds '
        f'{" or ".join(map(str, holds))}): use '
        f'{"--image_format=png or " if channels == 4 else ""}'
        '--image_format=tif.')
  if image_format == 'tif':
    try:
      import tifffile  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise errors.ConfigError(
          "--image_format=tif needs tifffile: pip install 'seg_jax[tiff]'."
      ) from None


def _save_mask(label, path, palette):
  """Writes class ids as a palette PNG with the dataset's colours (it opens
  as colours and reads back as the ids)."""
  im = Image.fromarray(np.asarray(label).astype(np.uint8, copy=False), 'P')
  colours = np.zeros((256, 3), np.uint8)
  colours[:len(palette)] = np.asarray(palette, np.uint8)[:256]
  im.putpalette(colours.ravel().tolist())
  im.save(path, 'PNG')


def _write_record(source, index, stem, dirs, image_format, jpeg_quality):
  """Writes record `index` as `stem`; returns the bytes written, or the
  skip message of a record the source skipped."""
  record = source[index]
  if files.is_skipped(record):
    return record['skipped']
  image_path = os.path.join(dirs[0], f'{stem}.{image_format}')
  mask_path = os.path.join(dirs[1], f'{stem}.png')
  _save_image(record['image'], image_path, image_format, jpeg_quality)
  _save_mask(record['label'], mask_path, source.palette)
  return os.path.getsize(image_path) + os.path.getsize(mask_path)


def _progress(total, desc, enabled):
  """A tqdm bar on stderr, or None (disabled, or tqdm missing)."""
  if not enabled:
    return None
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, unit='img', file=sys.stderr)


def _write_all(source, dirs, split, image_format, jpeg_quality, threads,
               progress):
  """Writes every record on `threads` threads; returns (records written,
  bytes written, skip messages)."""
  written, size, skips = 0, 0, []
  stems, bar = record_stems(source), _progress(len(source), split, progress)
  try:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for result in pool.map(
          lambda i: _write_record(source, i, stems[i], dirs, image_format,
                                  jpeg_quality), range(len(source))):
        if isinstance(result, str):
          skips.append(result)
        else:
          written, size = written + 1, size + result
        if bar is not None:
          bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  return written, size, skips


def convert_split(source, out, split, *, image_format='jpg', jpeg_quality=95,
                  threads=8, progress=True):
  """Writes every record of `source` under `out` as split `split`.

  Returns:
    a `Summary`; records the source skips, and list entries it dropped for
    missing files, count as skipped.
  """
  start, dirs = time.time(), split_dirs(out, split)
  for folder in dirs:
    os.makedirs(folder, exist_ok=True)
  try:
    written, size, skips = _write_all(source, dirs, split, image_format,
                                      jpeg_quality, threads, progress)
  except files.BadSampleError as e:
    raise errors.UserError(
        f'{e} Set --config.data.on_bad_sample=skip to leave such records '
        'out (and pass --overwrite to replace what was written).') from None
  skips = list(getattr(source, 'skipped_at_build', ())) + skips
  if skips:
    logging.warning('%s: skipped %d records; first: %s', split, len(skips),
                    skips[0])
  return Summary(split, written, len(skips), size, time.time() - start,
                 *dirs)


def open_source(config, split):
  """`data.create_source(config, split)`; a missing or malformed dataset
  is a `ConfigError` (one line) rather than a traceback."""
  try:
    return data.create_source(config, split)
  except (FileNotFoundError, ValueError) as e:
    raise errors.ConfigError(str(e).strip('"\'')) from None


def convert(config, out, splits=('train', 'val'), *, image_format='jpg',
            jpeg_quality=95, overwrite=False, threads=8, progress=True):
  """Writes `splits` of the config's dataset to `out` in the folder layout.

  Every split's source is opened and `out` checked before anything is
  written. Returns one `Summary` per split.
  """
  check_format(image_format, config.data.get('channels', 3))
  data.check_config(config)  # e.g. channels other than 3 from a dataset of RGB
  from seg_jax import cli  # pylint: disable=g-import-not-at-top
  cli.check_not_a_file(out)
  root = config.data.get('root') or ''
  if root and os.path.realpath(root) == os.path.realpath(out):
    raise errors.ConfigError(f'--out={out} is the dataset folder itself '
                               '(data.root); choose another --out.')
  sources = {split: open_source(config, split) for split in splits}
  class_names = next(iter(sources.values())).class_names
  check_out(out, splits, class_names, overwrite)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'classes.txt'), 'w') as f:
    f.write(''.join(f'{name}\n' for name in class_names))
  return [convert_split(source, out, split, image_format=image_format,
                        jpeg_quality=jpeg_quality, threads=threads,
                        progress=progress)
          for split, source in sources.items()]


def summary_line(s):
  """The line printed for one converted split."""
  return (f'Converted: split={s.split} records={s.written} '
          f'skipped={s.skipped} size={s.bytes / 2**20:.1f} MiB '
          f'time={s.seconds:.1f} s -> {s.image_dir} + {s.mask_dir}')


# Overrides the folder copy makes unneeded: where and how the source was read.
_SOURCE_KEYS = ('data.name', 'data.root', 'data.tfds.', 'data.train_split',
                'data.val_split', 'data.on_bad_sample', 'data.label_map',
                'data.mask_suffix')


def train_command(config_file, out, config, splits, argv=()):
  """The command that trains on `out`: the config file, the folder
  overrides, and the other `--config.KEY=VALUE` overrides given in `argv`."""
  kept = [a for a in argv if a.startswith('--config.') and '=' in a and
          not a[len('--config.'):].startswith(_SOURCE_KEYS)]
  # The copy's folders are named as --splits gave them: training reads
  # 'train' if copied, else the first other split but 'val' (with 'val'
  # alone, 'train': to be copied too); validation 'val' if copied, else
  # another split, else none.
  train = 'train' if 'train' in splits else next(
      (s for s in splits if s != 'val'), 'train')
  val = 'val' if 'val' in splits else next(
      (s for s in splits if s != train), '')
  split_keys = [f'--config.data.{key}={name}'
                for key, name in (('train_split', train), ('val_split', val))
                if config.data[key] != name]
  # The copy's masks hold class ids and are named as their images: a
  # label map or mask suffix of the config would apply a second time.
  resets = (['--config.data.label_map={}'] if config.data.get('label_map')
            else []) + (['--config.data.mask_suffix='] if config.data.get(
                'mask_suffix') else [])
  stem = os.path.splitext(os.path.basename(config_file))[0]
  args = [f'--config={config_file}', *kept, '--config.data.name=folder',
          f'--config.data.root={out}', *resets, *split_keys,
          f'--workdir=runs/{stem}_folder']
  return 'python -m seg_jax.main ' + ' '.join(map(shlex.quote, args))


def _define_flags():
  """The CLI's flags; defined only when run as a program."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', None, 'The configuration whose dataset (data.*) is copied; '
      'override e.g. --config.data.root. Every config key, with its '
      'meaning, is listed in configs/default.py.', lock_config=True)
  flags.DEFINE_string('out', None, 'Output folder of the folder layout.')
  flags.DEFINE_list('splits', ['train', 'val'], "Splits to copy: 'train' "
                    "(data.train_split), 'val' (data.val_split) or a "
                    "dataset split name such as 'test'.")
  flags.DEFINE_enum('image_format', 'jpg', IMAGE_FORMATS, 'jpg: JPEG '
                    '(small; grey or RGB); png: lossless (grey, RGB or '
                    'RGBA); tif: any data.channels (needs tifffile). Masks '
                    'are always palette PNGs.')
  flags.DEFINE_integer('jpeg_quality', 95, 'JPEG quality (1-100).',
                       lower_bound=1, upper_bound=100)
  flags.DEFINE_integer('threads', 8, 'Threads decoding and encoding.',
                       lower_bound=1)
  flags.DEFINE_bool('overwrite', False, 'Delete OUT/images/SPLIT and '
                    'OUT/masks/SPLIT of the copied splits first, if they '
                    'hold files (without it, such an OUT is refused).')
  flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  """Converts, then prints a line per split and the training command."""
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f, splits = flags.FLAGS, tuple(flags.FLAGS.splits)
  if not splits:
    raise errors.ConfigError('--splits is empty: name at least one split.')
  summaries = convert(f.config, f.out, splits, image_format=f.image_format,
                      jpeg_quality=f.jpeg_quality, overwrite=f.overwrite,
                      threads=f.threads)
  for s in summaries:
    print(summary_line(s), flush=True)
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from seg_jax import cli  # pylint: disable=g-import-not-at-top
  config_file = config_flags.get_config_filename(f['config'])
  print('Train on it: ' + train_command(config_file, f.out, f.config, splits,
                                        cli.GIVEN_ARGV[1:]), flush=True)


if __name__ == '__main__':
  from seg_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  _cli.run(main)
