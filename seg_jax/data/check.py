"""Check a whole dataset before training, in one pass.

    python -m seg_jax.data.check --config=configs/x.py [--workdir=DIR] \\
        [--splits=train,val] [--config.a.b=value ...]

Reads every file of each split once (decoding images and masks as training
does) and lists every problem, one line per file: undecodable or empty
files, images without a mask, masks without an image, names that collide
across extensions, JPEG masks, image/mask size mismatches, mask values
that are not classes of the config (e.g. a class id >= model.num_classes),
colour and (with two classes) 0/255 binary masks, float images outside
0..1, validation images larger than data.eval_pad_size, a training split
smaller than one batch. What is read but converted (EXIF orientation,
grayscale or 16-bit images, alpha channels) is listed as a note, grouped.
Then, per split, a table of each class's pixels and the images it appears
in. Exit status 1 when anything is wrong, else 0.

With --workdir and no --config, the run folder's config.json is checked.
"""

from seg_jax import interrupt  # first: Ctrl-C is clean from here on

if __name__ in ('__main__', '__mp_main__'):
  interrupt.install('nothing was changed')

# pylint: disable=g-import-not-at-top,wrong-import-position
import concurrent.futures
import copy
import dataclasses
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from seg_jax import cli, data, errors, labels
from seg_jax.data import files, pipeline, transforms

FLAGS = flags.FLAGS


@dataclasses.dataclass
class SplitReport:
  """What checking one split found.

  Attributes:
    split: 'train' or 'val'.
    name: the source's name, e.g. 'folder/train'.
    examples: pairs (or records) read.
    errors: one line per problem, each naming its file.
    notes: {kind: [files]} of what was read but converted.
    pixels: (num_classes + 1,) labelled pixels per class; the last entry
      counts ignored pixels.
    images: (num_classes,) examples in which each class appears.
    counted: masks read and counted in `pixels` and `images`.
    sizes: (height, width) of each readable image.
  """
  split: str
  name: str = ''
  examples: int = 0
  errors: list = dataclasses.field(default_factory=list)
  notes: dict = dataclasses.field(default_factory=dict)
  pixels: np.ndarray = None
  images: np.ndarray = None
  counted: int = 0
  sizes: list = dataclasses.field(default_factory=list)


def _pairing_errors(pairing):
  """One line per colliding name, unpaired image and unpaired mask."""
  lines = [f'{a} and {b}: the same name but for the extension; which one '
           'pairs with a mask is ambiguous: rename or remove one.'
           for a, b in pairing.collisions]
  lines += [f'{image}: no mask {pairing.expected_mask(image)} (or with '
            f'another image extension; {pairing.rule})'
            f'{pairing.why_unpaired(image)}.'
            for image in pairing.unmatched]
  lines += [f'{mask}: mask without an image ({pairing.rule})'
            f'{pairing.why_unpaired(mask)}.'
            for mask in pairing.orphans]
  return lines  # JPEG masks: found by their contents when read


def _inspect_pair(source, image_path, mask_path, pad):
  """(errors, notes, mapped label or None, image (h, w) or None)."""
  problems, notes, image = [], [], None
  try:
    image, notes = files.read_image_notes(image_path, source.channels)
  except errors.UserError as e:
    problems.append(str(e))
  try:
    raw = source.read_mask(mask_path)
  except errors.UserError as e:
    return problems + [str(e)], notes, None, None
  if image is None:
    return problems, notes, None, None
  size = image.shape[:2]
  if raw.shape != size:
    return problems + [files.size_mismatch(mask_path, raw.shape, image_path,
                                           size)], notes, None, size
  try:
    label = files.apply_table(raw, source.table, mask_path)
  except errors.UserError as e:
    return problems + [str(e)], notes, None, size
  if pad and (size[0] > pad[0] or size[1] > pad[1]):
    problems.append(f'{image_path}: {size[0]}x{size[1]} (HxW) is larger than '
                    f'data.eval_pad_size={tuple(pad)}; raise it, or set () '
                    'to fit the largest validation image.')
  return problems, notes, label, size


def _count(report, label, num_classes, ignore):
  counts = np.bincount(label.ravel(), minlength=256)
  report.pixels[:num_classes] += counts[:num_classes]
  report.pixels[num_classes] += counts[ignore]
  report.images += counts[:num_classes] > 0
  report.counted += 1


def check_split(config, split, threads=4):
  """Checks every example of `split`; returns a `SplitReport`."""
  num, ignore = config.model.num_classes, labels.ignore_label(config)
  report = SplitReport(split, pixels=np.zeros(num + 1, np.int64),
                       images=np.zeros(num, np.int64))
  loose = copy.deepcopy(config)
  loose.data.on_bad_sample = 'skip'  # list missing files, do not stop
  try:
    source = data.create_source(loose, split, strict=False)
  except errors.UserError as e:
    report.errors.append(str(e))
    return report
  report.name = getattr(source, 'name', split)
  report.errors += list(getattr(source, 'skipped_at_build', ()))
  if getattr(source, 'pairing', None) is not None:
    report.errors += _pairing_errors(source.pairing)
  given = data.given_eval_pad_size(config)
  pad = transforms.pair(given) if split == 'val' and given else None
  if isinstance(source, files.FileSource):
    _check_files(source, report, pad, num, ignore, threads)
  else:
    _check_records(source, report, num, ignore)
  if split == 'train':
    short = pipeline.too_few_for_a_batch(report.name, report.examples,
                                         config.train.global_batch_size)
    report.errors += [short] if short else []
  return report


def _check_files(source, report, pad, num, ignore, threads):
  report.examples = len(source.pairs)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    results = pool.map(lambda p: (p, _inspect_pair(source, *p, pad)),
                       source.pairs)
    for (image_path, _), (problems, notes, label, size) in results:
      report.errors += problems
      for note in notes:
        report.notes.setdefault(note, []).append(image_path)
      if size is not None:
        report.sizes.append(tuple(size))
      if label is not None:
        _count(report, label, num, ignore)


def _check_records(source, report, num, ignore):
  report.examples = len(source)
  for i in range(len(source)):
    element = source[i]
    if files.is_skipped(element):
      report.errors.append(element['skipped'])
      continue
    report.sizes.append(tuple(element['label'].shape))
    _count(report, element['label'], num, ignore)


def format_report(report, class_names):
  """The lines printed for one split."""
  lines = [f'{report.split}: {report.name or "(not opened)"}, '
           f'{report.examples} examples'
           + (f', images {data.size_range(report.sizes)}' if report.sizes
              else '')]
  lines += [f'  ERROR {e}' for e in report.errors]
  for note, paths in sorted(report.notes.items()):
    shown = ', '.join(paths[:3]) + (', ...' if len(paths) > 3 else '')
    lines.append(f'  NOTE {len(paths)} image(s): {note}: {shown}')
  if report.examples and report.pixels is not None:
    if not report.counted:
      lines.append('  no mask could be read: no class table')
    else:
      if report.counted < report.examples:
        lines.append(f'  classes of the {report.counted} of '
                     f'{report.examples} masks read:')
      lines += _class_table(report, class_names)
  return lines


def _class_table(report, class_names):
  total = max(int(report.pixels.sum()), 1)
  width = max(len(n) for n in list(class_names) + ['ignored'])
  lines = [f'  {"id":>3}  {"class":<{width}}  {"pixels":>14}  {"share":>6}  '
           f'{"images":>7}']
  for i, name in enumerate(class_names):
    lines.append(f'  {i:>3}  {name:<{width}}  {report.pixels[i]:>14,}  '
                 f'{100 * report.pixels[i] / total:>5.1f}%  '
                 f'{report.images[i]:>7,}')
  lines.append(f'  {"":>3}  {"ignored":<{width}}  {report.pixels[-1]:>14,}  '
               f'{100 * report.pixels[-1] / total:>5.1f}%')
  absent = [n for n, k in zip(class_names, report.images) if not k]
  if absent:
    lines.append(f'  classes absent from {report.split}: {", ".join(absent)}')
  return lines


def check(config, splits=('train', 'val'), out=sys.stdout):
  """Checks `splits` of the config's dataset, prints the report; returns
  the number of problems found."""
  class_names, _ = data.class_info(config)
  problems, seen = 0, set()
  for split in splits:
    if split == 'val' and not config.data.val_split:
      print("val: data.val_split='': no validation split to check.",
            file=out)
      continue
    report = check_split(config, split)
    # A problem of the dataset as a whole (its data.root) is said once.
    repeated = [e for e in report.errors if e in seen]
    report.errors = [e for e in report.errors if e not in seen]
    seen.update(report.errors)
    problems += len(report.errors)
    lines = format_report(report, class_names)
    if repeated:
      lines.append(f'  ERROR {len(repeated)} problem(s) as above')
    print('\n'.join(lines), file=out)
  print(f'{problems} problem(s) found' if problems else
        'No problems found.', file=out, flush=True)
  return problems


def _define_flags():
  config_flags.DEFINE_config_file(
      'config', None, 'The configuration whose dataset is checked (a '
      'configs/*.py). Default: the config.json of --workdir. '
      f'{cli.CONFIG_KEYS_HELP}', lock_config=True)
  flags.DEFINE_string('workdir', None, 'A training run folder: its '
                      'config.json is checked when --config is not given.')
  flags.DEFINE_list('splits', ['train', 'val'], "Splits to check: 'train' "
                    "(data.train_split), 'val' (data.val_split) or names "
                    'of the dataset (e.g. test).')


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f'Unexpected arguments: {argv[1:]}.')
  cli.require_config()
  from seg_jax import validate
  validate.check_config(FLAGS.config)
  sys.exit(1 if check(FLAGS.config, tuple(FLAGS.splits)) else 0)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
