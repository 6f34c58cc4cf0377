"""Public datasets in their published on-disk layouts, and user folders.

Every builder returns a random-access source (`len`, `__getitem__`) whose
records are {'image': (H, W, 3) uint8, 'label': (H, W) uint8 train ids,
`ignore_label` (`config.data.ignore_label`, 255 by default) = ignore}, with
`class_names` and `palette`. Raw mask values are mapped
through a per-dataset table; a raw value the dataset does not define is an
error naming the file, never a silent label.
"""

import dataclasses
import glob
import logging
import os

import numpy as np

from seg_jax import errors
from seg_jax.data import files
from seg_jax.labels import IGNORE_LABEL, color_map


# --- Pascal VOC 2012 ------------------------------------------------------

VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat',
               'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'diningtable',
               'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep',
               'sofa', 'train', 'tvmonitor')
VOC_PALETTE = color_map(len(VOC_CLASSES))


def voc(root, split, on_bad_sample='raise', ignore_label=IGNORE_LABEL):
  """Pascal VOC 2012 segmentation.

  Args:
    root: `VOCdevkit/VOC2012` (or `VOCdevkit`, holding `VOC2012/`).
    split: 'train', 'val', 'trainval' (ImageSets/Segmentation lists, masks
      from SegmentationClass/), or 'train_aug': the 10,582 SBD-augmented
      training ids, masks from SegmentationClassAug/, list
      ImageSets/Segmentation/train_aug.txt (or aug.txt).
    on_bad_sample: 'raise' or 'skip'.
    ignore_label: the train id of ignored pixels (VOC's raw 255 boundaries).
  """
  files.check_root(root, 'voc', 'point it at VOCdevkit/VOC2012')
  if os.path.isdir(os.path.join(root, 'VOC2012')):
    root = os.path.join(root, 'VOC2012')
  if not os.path.isdir(os.path.join(root, 'JPEGImages')):
    raise errors.MissingFileError(
        f'voc: VOC2012 not found under data.root={root}: expected '
        'JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/ there.')
  lists = os.path.join(root, 'ImageSets', 'Segmentation')
  if split == 'train_aug':
    masks = os.path.join(root, 'SegmentationClassAug')
    if not os.path.isdir(masks):
      raise errors.MissingFileError(
          f'voc: {masks} does not exist. The train_aug split needs the SBD '
          'masks converted to VOC indices in SegmentationClassAug/; without '
          "them use data.train_split='train'.")
    candidates = [os.path.join(lists, n) for n in ('train_aug.txt', 'aug.txt')]
    list_file = next((p for p in candidates if os.path.isfile(p)),
                     candidates[0])
  else:
    masks = os.path.join(root, 'SegmentationClass')
    list_file = os.path.join(lists, f'{split}.txt')
  pairs = [_voc_pair(root, masks, line, list_file)
           for line in files.read_list(list_file, 'voc')]
  # Masks are palette PNGs: indices 0..20, 255 on object boundaries.
  return files.FileSource(f'voc/{split}', pairs, VOC_CLASSES, VOC_PALETTE,
                          files.label_table(len(VOC_CLASSES),
                                            ignore_label=ignore_label),
                          on_bad_sample,
                          origin=list_file)


def _voc_pair(root, masks, line, list_file):
  """(image, mask) of one list line: an id (`2007_000032`), or an image and
  a mask path under the VOC2012 folder, as DeepLab's train_aug.txt lists
  them (`/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`)."""
  fields = line.split()
  if len(fields) == 1:
    return (os.path.join(root, 'JPEGImages', f'{fields[0]}.jpg'),
            os.path.join(masks, f'{fields[0]}.png'))
  if len(fields) == 2:
    return tuple(os.path.join(root, f.lstrip('/')) for f in fields)
  raise errors.ConfigError(
      f'voc: {list_file}: the line {line!r} is neither an image id nor an '
      'image path and a mask path.')


# --- Cityscapes -----------------------------------------------------------

# (label id, train id, name, colour) of the 19 evaluated classes.
CITYSCAPES_LABELS = (
    (7, 0, 'road', (128, 64, 128)), (8, 1, 'sidewalk', (244, 35, 232)),
    (11, 2, 'building', (70, 70, 70)), (12, 3, 'wall', (102, 102, 156)),
    (13, 4, 'fence', (190, 153, 153)), (17, 5, 'pole', (153, 153, 153)),
    (19, 6, 'traffic light', (250, 170, 30)),
    (20, 7, 'traffic sign', (220, 220, 0)),
    (21, 8, 'vegetation', (107, 142, 35)), (22, 9, 'terrain', (152, 251, 152)),
    (23, 10, 'sky', (70, 130, 180)), (24, 11, 'person', (220, 20, 60)),
    (25, 12, 'rider', (255, 0, 0)), (26, 13, 'car', (0, 0, 142)),
    (27, 14, 'truck', (0, 0, 70)), (28, 15, 'bus', (0, 60, 100)),
    (31, 16, 'train', (0, 80, 100)), (32, 17, 'motorcycle', (0, 0, 230)),
    (33, 18, 'bicycle', (119, 11, 32)))
CITYSCAPES_CLASSES = tuple(name for _, _, name, _ in CITYSCAPES_LABELS)
CITYSCAPES_PALETTE = np.array([c for *_, c in CITYSCAPES_LABELS], np.uint8)


def cityscapes_table(ignore_label=IGNORE_LABEL):
  """labelIds 0..33 -> the 19 train ids, every other id -> `ignore_label`."""
  mapping = {i: ignore_label for i in range(34)}
  mapping.update({label_id: train_id
                  for label_id, train_id, _, _ in CITYSCAPES_LABELS})
  return files.label_table(19, mapping, ignore_label=ignore_label)


def cityscapes(root, split, on_bad_sample='raise',
               ignore_label=IGNORE_LABEL):
  """Cityscapes fine annotations: leftImg8bit/ + gtFine/*_labelIds.png.

  Args:
    root: folder holding `leftImg8bit/` and `gtFine/`.
    split: 'train', 'val' or 'test' (a folder of each).
  """
  files.check_root(root, 'cityscapes',
                   'it must hold leftImg8bit/ and gtFine/')
  image_dir = os.path.join(root, 'leftImg8bit', split)
  if not os.path.isdir(image_dir):
    raise errors.MissingFileError(
        f'cityscapes: {image_dir} does not exist; is split {split!r} '
        f'unpacked under {root}?')
  images = sorted(glob.glob(os.path.join(image_dir, '*',
                                         '*_leftImg8bit.png')))
  if not images:
    raise errors.MissingFileError(f'cityscapes: no *_leftImg8bit.png under {image_dir}.')
  pairs = []
  for path in images:
    city = os.path.basename(os.path.dirname(path))
    stem = os.path.basename(path)[:-len('_leftImg8bit.png')]
    pairs.append((path, os.path.join(root, 'gtFine', split, city,
                                     f'{stem}_gtFine_labelIds.png')))
  return files.FileSource(f'cityscapes/{split}', pairs, CITYSCAPES_CLASSES,
                          CITYSCAPES_PALETTE, cityscapes_table(ignore_label),
                          on_bad_sample, origin=image_dir)


# --- ADE20K (SceneParsing, 150 classes) -----------------------------------

ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed',
    'windowpane', 'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door',
    'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp',
    'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace',
    'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill',
    'bench', 'countertop', 'stove', 'palm', 'kitchen island', 'computer',
    'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel',
    'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television receiver', 'airplane', 'dirt track', 'apparel', 'pole',
    'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet',
    'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy',
    'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food',
    'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle',
    'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce',
    'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen',
    'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag')
ADE20K_PALETTE = color_map(len(ADE20K_CLASSES) + 1)[1:]
_ADE20K_SPLITS = {'train': 'training', 'val': 'validation'}


def ade20k_table(ignore_label=IGNORE_LABEL):
  """Raw 0 ("other") -> `ignore_label`, raw k in 1..150 -> k - 1."""
  mapping = {k: k - 1 for k in range(1, 151)}
  mapping[0] = ignore_label
  return files.label_table(150, mapping, ignore=(), ignore_label=ignore_label)


def ade20k(root, split, on_bad_sample='raise', ignore_label=IGNORE_LABEL):
  """ADE20K SceneParsing: images/{training,validation}/*.jpg and
  annotations/{...}/*.png, matched by file stem.

  Args:
    root: `ADEChallengeData2016`.
    split: 'train' / 'val' (or 'training' / 'validation').
  """
  files.check_root(root, 'ade20k', 'point it at ADEChallengeData2016')
  folder = _ADE20K_SPLITS.get(split, split)
  pairing = pair_files(os.path.join(root, 'images', folder),
                       os.path.join(root, 'annotations', folder), 'ade20k')
  check_pairing(pairing, f'ade20k/{split}', on_bad_sample)
  pairs = pairing.pairs
  return files.FileSource(f'ade20k/{split}', pairs, ADE20K_CLASSES,
                          ADE20K_PALETTE, ade20k_table(ignore_label),
                          on_bad_sample,
                          origin=os.path.join(root, 'images', folder))


# --- CamVid (SegNet's 11-class version) -----------------------------------

CAMVID_CLASSES = ('sky', 'building', 'pole', 'road', 'pavement', 'tree',
                  'sign_symbol', 'fence', 'car', 'pedestrian', 'bicyclist')
CAMVID_PALETTE = np.array(
    [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128],
     [60, 40, 222], [128, 128, 0], [192, 128, 128], [64, 64, 128],
     [64, 0, 128], [64, 64, 0], [0, 128, 192]], np.uint8)
CAMVID_UNLABELLED = 11


def _resolve_camvid(root, path):
  """A list entry like /SegNet/CamVid/train/x.png -> {root}/train/x.png."""
  marker = 'CamVid/'
  if marker in path:
    path = path[path.index(marker) + len(marker):]
  return os.path.join(root, path.lstrip('/'))


def camvid(root, split, on_bad_sample='raise', ignore_label=IGNORE_LABEL):
  """CamVid as SegNet distributes it: {split}.txt lists of
  `IMAGE LABEL` paths (absolute, under /SegNet/CamVid/), label 11 = ignore.

  Args:
    root: the CamVid folder holding train.txt, val.txt, train/, trainannot/.
    split: 'train', 'val' or 'test'.
  """
  files.check_root(root, 'camvid', 'it must hold train.txt and train/')
  list_file = os.path.join(root, f'{split}.txt')
  pairs = []
  for n, line in enumerate(files.read_list(list_file, 'camvid'), 1):
    parts = line.split()
    if len(parts) != 2:
      raise errors.ConfigError(f'camvid: {list_file} line {n} is {line!r}; expected '
                       '"IMAGE LABEL".')
    pairs.append(tuple(_resolve_camvid(root, p) for p in parts))
  table = files.label_table(len(CAMVID_CLASSES),
                            ignore=(CAMVID_UNLABELLED, 255),
                            ignore_label=ignore_label)
  return files.FileSource(f'camvid/{split}', pairs, CAMVID_CLASSES,
                          CAMVID_PALETTE, table, on_bad_sample,
                          origin=list_file)


# --- Any folder of images and masks ---------------------------------------


@dataclasses.dataclass
class Pairing:
  """How the files of an images folder and a masks folder pair up.

  Attributes:
    pairs: (image, mask) paths, sorted by the image's relative path.
    unmatched: images with no mask.
    orphans: masks with no image.
    collisions: (file, file) whose relative paths differ only in the
      extension (one folder each).
    rule: the pairing rule in words, for messages.
    image_dir, mask_dir, mask_suffix: what was paired, and how.
    unsupported: {unpaired file: the file of a type not read (not one of
      `files.IMAGE_EXTENSIONS`) it would have paired with}.
  """
  pairs: list
  unmatched: list
  orphans: list
  collisions: list
  rule: str
  image_dir: str = ''
  mask_dir: str = ''
  mask_suffix: str = ''
  unsupported: dict = dataclasses.field(default_factory=dict)

  def why_unpaired(self, path):
    """'; X.gif has its name but a type not read (...)' or ''."""
    other = self.unsupported.get(path)
    if other is None:
      return ''
    return (f'; {other} has its name but a file type that is not read (use '
            f'one of {", ".join(files.IMAGE_EXTENSIONS)}; masks as .png)')

  @property
  def jpeg_masks(self):
    """Paired masks stored as JPEG, whose lossy compression changes class
    ids along edges."""
    return [m for _, m in self.pairs
            if m.lower().endswith(('.jpg', '.jpeg'))]

  def expected_mask(self, image):
    """Where the mask of `image` would be (as .png)."""
    key = os.path.splitext(os.path.relpath(image, self.image_dir))[0]
    return os.path.join(self.mask_dir, f'{key}{self.mask_suffix}.png')


def _files_by_key(folder, others=None):
  """{relative path without extension: [files]} of the images under
  `folder`, every subfolder included (hidden files left out); files of
  other types go into `others` (the same mapping) when given."""
  found = {}
  for root, _, names in files.walk(folder):
    for name in names:
      if name.startswith('.'):
        continue
      path = os.path.join(root, name)
      key = os.path.splitext(os.path.relpath(path, folder))[0]
      if name.lower().endswith(files.IMAGE_EXTENSIONS):
        found.setdefault(key, []).append(path)
      elif others is not None:
        others.setdefault(key, []).append(path)
  return found


def pairing_rule(image_dir, mask_dir, mask_suffix=''):
  """The folder source's pairing rule, said with the folders at hand."""
  return (f'images pair with masks by their path under {image_dir} and '
          f'{mask_dir} without the extension, the mask adding '
          f'data.mask_suffix={mask_suffix!r} (a/x.jpg <-> '
          f'a/x{mask_suffix}.png)')


def pair_files(image_dir, mask_dir, name, mask_suffix=''):
  """Pairs the images under `image_dir` with the masks under `mask_dir`
  (subfolders included) by relative path without extension, a mask's name
  ending in `mask_suffix` before its extension. See `Pairing`."""
  for d in (image_dir, mask_dir):
    if not os.path.isdir(d):
      raise errors.MissingFileError(f'{name}: folder {d} does not exist.')
  other_images, other_masks = {}, {}
  images = _files_by_key(image_dir, other_images)
  masks = _files_by_key(mask_dir, other_masks)
  if not images:
    raise errors.MissingFileError(
        f'{name}: no images in {image_dir} or its subfolders (looked for '
        f'{", ".join(files.IMAGE_EXTENSIONS)}).')
  collisions = [tuple(p[:2]) for found in (images, masks)
                for p in found.values() if len(p) > 1]
  by_image_key = {}
  for key, paths in masks.items():
    if key.endswith(mask_suffix):
      by_image_key[key[:len(key) - len(mask_suffix)]] = paths[0]
  pairs, unmatched = [], []
  for key, paths in sorted(images.items()):
    if key in by_image_key:
      pairs.append((paths[0], by_image_key.pop(key)))
    else:
      unmatched.append(paths[0])
  orphans = sorted(set(p[0] for p in masks.values()) -
                   {m for _, m in pairs})
  # A mask (image) of another file type that an unpaired image (mask)
  # would have paired with: said in the messages.
  lone_images, lone_masks = set(unmatched), set(orphans)
  unsupported = {paths[0]: other_masks[key + mask_suffix][0]
                 for key, paths in images.items() if paths[0] in lone_images
                 and key + mask_suffix in other_masks}
  unsupported.update(
      {paths[0]: other_images[key[:len(key) - len(mask_suffix)]][0]
       for key, paths in masks.items()
       if paths[0] in lone_masks and key.endswith(mask_suffix) and
       key[:len(key) - len(mask_suffix)] in other_images})
  return Pairing(pairs, unmatched, orphans, collisions,
                 pairing_rule(image_dir, mask_dir, mask_suffix), image_dir,
                 mask_dir, mask_suffix, unsupported)


def _suffix_hint(pairing):
  """"; set data.mask_suffix='_mask'" when every unpaired mask's name is an
  unpaired image's name plus one common suffix, else ''."""
  stems = {os.path.splitext(os.path.basename(p))[0] for p in pairing.unmatched}
  found = set()
  for mask in pairing.orphans:
    stem = os.path.splitext(os.path.basename(mask))[0]
    match = max((s for s in stems if stem.startswith(s) and stem != s),
                key=len, default=None)
    if match is None:
      return ''
    found.add(stem[len(match):])
  if len(found) != 1:
    return ''
  return f"; these masks look named with --config.data.mask_suffix='{found.pop()}'"


def check_pairing(pairing, name, on_bad_sample):
  """Refuses what pairing cannot settle, in one line each: colliding
  names, no pair at all, and (in 'raise' mode) an image without a mask;
  in 'skip' mode those images are left out with one warning each. Masks
  without an image are counted in one warning."""
  if pairing.collisions:
    a, b = pairing.collisions[0]
    more = len(pairing.collisions) - 1
    raise errors.ConfigError(
        f'{name}: {a} and {b} have the same name but for the extension, so '
        'which one pairs with a mask is ambiguous; rename or remove one'
        + (f' ({more} more such pairs; `python -m seg_jax.data.check` lists '
           'them)' if more else '') + '.')
  if not pairing.pairs:
    raise errors.MissingFileError(
        f'{name}: no image has a mask: {pairing.rule}'
        f'{_suffix_hint(pairing)}.')
  if pairing.jpeg_masks:
    more = len(pairing.jpeg_masks) - 1
    raise errors.ConfigError(
        f'{name}: {pairing.jpeg_masks[0]} is a JPEG mask'
        + (f' ({more} more)' if more else '') +
        f': {files.JPEG_MASK_PROBLEM}')
  if pairing.unmatched and on_bad_sample == 'raise':
    more = len(pairing.unmatched) - 1
    first = pairing.unmatched[0]
    raise errors.MissingFileError(
        f'{name}: {first} has no mask {pairing.expected_mask(first)} (or '
        'with another image extension)'
        + (f', nor do {more} more images' if more else '') +
        f': {pairing.rule}{_suffix_hint(pairing)}'
        f'{pairing.why_unpaired(first)}. Add the masks, or set '
        "data.on_bad_sample='skip' to leave such images out.")
  for image in pairing.unmatched:
    logging.warning('%s: skipped %s: it has no mask %s (%s).', name, image,
                    pairing.expected_mask(image), pairing.rule)
  if pairing.orphans:
    logging.warning('%s: %d masks have no image and are not used, e.g. %s '
                    '(%s).', name, len(pairing.orphans), pairing.orphans[0],
                    pairing.rule)


def folder_dirs(root, split):
  """(images folder, masks folder) of `split`: `{root}/images/{split}` and
  `{root}/masks/{split}`, or `{root}/{split}/images` and `.../masks`."""
  layouts = [(os.path.join(root, 'images', split),
              os.path.join(root, 'masks', split)),
             (os.path.join(root, split, 'images'),
              os.path.join(root, split, 'masks'))]
  return next((l for l in layouts if os.path.isdir(l[0])), layouts[0])


def folder(root, split, num_classes, on_bad_sample='raise',
           ignore_label=IGNORE_LABEL, label_map=None, mask_suffix='',
           strict=True, channels=3):
  """A user dataset: images and single-channel masks paired by path.

  Layout: `{root}/images/{split}/` + `{root}/masks/{split}/`, or
  `{root}/{split}/images/` + `{root}/{split}/masks/`, subfolders included:
  `images/train/a/x.jpg` pairs with `masks/train/a/x{mask_suffix}.png`
  (any image extension). Mask values are class ids 0..num_classes-1 and
  `ignore_label` (palette PNGs are read as indices). Images are read as
  `files.read_image_notes` says (any bit depth, EXIF orientation applied).
  Class names come from `{root}/classes.txt` (one per line) when present;
  colours from the masks' own palette when they are palette PNGs.

  Args:
    label_map: optional {raw mask value: class id (or ignore_label)}; its
      entries replace the default reading (0..num_classes-1 as themselves,
      `ignore_label` ignored), e.g. {255: 1} for 0/255 binary masks.
      Without it, with two classes, a mask holding exactly 0 and 255 is an
      error: 255 would be read as ignore and the foreground never learnt
      (with more classes it is a background-only mask with ignored
      pixels).
    mask_suffix: what a mask's name adds to its image's, e.g. '_mask'.
    strict: False leaves colliding names, images without masks and masks
      without images in `source.pairing` (for `seg_jax.data.check`) instead
      of refusing them (`check_pairing`).
    channels: image channels (`files.read_image_notes` says which files
      give how many).
  """
  files.check_root(root, 'folder', 'it must hold images/ and masks/')
  parent, base = os.path.split(os.path.normpath(root))
  if base in ('images', 'masks') and all(
      os.path.isdir(os.path.join(parent, d)) for d in ('images', 'masks')):
    raise errors.MissingFileError(
        f'folder: data.root={root!r} is the {base} folder; give the folder '
        f'that holds images/ and masks/: --config.data.root={parent}.')
  image_dir, mask_dir = folder_dirs(root, split)
  names = _folder_class_names(root, num_classes)
  pairing = pair_files(image_dir, mask_dir, f'folder/{split}', mask_suffix)
  if strict:
    check_pairing(pairing, f'folder/{split}', on_bad_sample)
  elif not pairing.pairs:
    raise errors.MissingFileError(
        f'folder/{split}: no image has a mask: {pairing.rule}'
        f'{_suffix_hint(pairing)}.')
  palette = files.mask_palette(pairing.pairs[0][1], num_classes)
  source = FolderSource(f'folder/{split}', pairing.pairs, names,
                        color_map(num_classes) if palette is None else palette,
                        folder_table(num_classes, ignore_label, label_map),
                        on_bad_sample, origin=image_dir,
                        refuse_binary_export=(not label_map and
                                              ignore_label == 255 and
                                              num_classes == 2),
                        channels=channels)
  source.pairing = pairing
  if strict:  # a 0/255 export fails before training
    source.check_mask(source.pairs[0][1])
  return source


def _folder_class_names(root, num_classes):
  names_file = os.path.join(root, 'classes.txt')
  if not os.path.isfile(names_file):
    return [f'class_{i}' for i in range(num_classes)]
  names = files.read_class_names(names_file)
  if len(names) != num_classes:
    raise errors.ConfigError(
        f'folder: {names_file} names {len(names)} classes but '
        f'model.num_classes={num_classes}; make them equal.')
  return names


def folder_table(num_classes, ignore_label=IGNORE_LABEL, label_map=None):
  """The folder source's raw value -> train id table, `label_map` applied."""
  mapping = {i: i for i in range(num_classes)}
  mapping[ignore_label] = ignore_label
  for raw, train_id in (label_map or {}).items():
    raw, train_id = int(raw), int(train_id)
    if not 0 <= raw <= 255 or not (0 <= train_id < num_classes or
                                   train_id == ignore_label):
      raise errors.ConfigError(
          f'data.label_map has {raw}: {train_id}; map mask values 0..255 to '
          f'class ids 0..{num_classes - 1} or data.ignore_label='
          f'{ignore_label}.')
    mapping[raw] = train_id
  return files.label_table(num_classes, mapping, ignore=(),
                           ignore_label=ignore_label)


class FolderSource(files.FileSource):
  """A `FileSource` that, with `refuse_binary_export`, refuses 0/255 binary
  masks (read without a `data.label_map` their foreground is ignored)."""

  def __init__(self, *args, refuse_binary_export=False, **kwargs):
    super().__init__(*args, **kwargs)
    self.refuse_binary_export = refuse_binary_export

  def read_mask(self, path):
    raw = files.read_mask(path)
    if (self.refuse_binary_export and raw.size and raw.max() == 255 and
        raw.min() == 0 and not np.any((raw != 0) & (raw != 255))):
      raise errors.ConfigError(
          f'{path} holds only the values 0 and 255, a binary mask '
          'export: 255 would be read as ignore (data.ignore_label) and the '
          'foreground never learnt. Set data.label_map={255: 1} '
          '(foreground = class 1), or data.label_map={255: 255} if 255 '
          'really marks ignored pixels.')
    return raw

  def check_mask(self, path):
    """Reads one mask and refuses a 0/255 export (BadSampleErrors are left
    to loading)."""
    try:
      self.read_mask(path)
    except files.BadSampleError:
      pass


# --- TFDS (ArrayRecord) ---------------------------------------------------


def _tfds_open_error(tfds, where, name, split, data_dir, error):
  """Why `tfds.data_source(name, split)` failed, in one line: no such
  data_dir, no such dataset there, not prepared, no such split (naming
  those there), or prepared in a format without random access."""
  prepare = (f'prepare it with `tfds build {name.split(":")[0]} '
             f'--data_dir={data_dir or "DIR"} --file_format=array_record`')
  if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    return (f'{where}: data.tfds.data_dir={data_dir!r} does not exist: give '
            f'the folder the dataset was prepared in, or {prepare}.')
  folder = os.path.expanduser(data_dir or '~/tensorflow_datasets')
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception:  # pylint: disable=broad-except
    held = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder)
                              else ()) if not n.startswith('.'))
    return (f'{where}: no dataset {name!r} is prepared in {folder} (it holds '
            f'{", ".join(held[:10]) or "nothing"}) nor known to tfds: check '
            'data.tfds.name and data.tfds.data_dir.')
  if not builder.is_prepared():
    return (f'{where}: {name} is not prepared in {folder} (nothing at '
            f'{builder.data_dir}): {prepare}.')
  splits = list(builder.info.splits)
  if split not in splits:
    return (f'{where}: {name} has no split {split!r}; it has '
            f'{", ".join(splits)}: set data.train_split / data.val_split '
            "to one of them (data.val_split='' trains without validation).")
  return (f'{where}: cannot read it from {builder.data_dir} '
          f'({str(error).splitlines()[0]}); {prepare}.')


class TfdsSource:
  """A TFDS dataset prepared as ArrayRecord, read through
  `tfds.data_source` (random access, no tf.data)."""

  def __init__(self, name, split, *, data_dir, image_key, label_key,
               label_offset, ignore_values, class_names,
               on_bad_sample='raise', ignore_label=IGNORE_LABEL):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name = f'tfds:{name}/{split}'
    try:
      self._source = tfds.data_source(name, split=split,
                                      data_dir=data_dir or None,
                                      download=False)  # prepared, never fetched
    except Exception as e:  # tfds raises several types for a missing set
      raise errors.MissingFileError(
          _tfds_open_error(tfds, self.name, name, split, data_dir, e)) from e
    if len(self._source) == 0:
      raise errors.MissingFileError(f'{self.name}: the split is empty.')
    self.class_names = tuple(class_names)
    self.palette = color_map(len(self.class_names))
    self._keys = (image_key, label_key)
    mapping = {raw: raw + label_offset for raw in range(256)
               if 0 <= raw + label_offset < len(self.class_names)}
    self.table = files.label_table(
        len(self.class_names), mapping,
        ignore=tuple(ignore_values) + (ignore_label,),
        ignore_label=ignore_label)
    self._on_bad = files.check_on_bad_sample(on_bad_sample)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return files.load_or_skip(self._on_bad, self.load, index)

  def load(self, index):
    """Checked example {'image', 'label'} of record `index`."""
    where = f'{self.name}[{index}]'
    record = self._source[index]
    for key in self._keys:
      if key not in record:
        raise KeyError(f'{where}: no feature {key!r}; it has '
                       f'{sorted(record)}. Set data.tfds.image_key/'
                       'label_key.')
    image = np.asarray(record[self._keys[0]])
    raw = np.asarray(record[self._keys[1]])
    if raw.ndim == 3 and raw.shape[-1] == 1:
      raw = raw[..., 0]
    if image.ndim == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, -1)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise files.BadSampleError(
          f'{where}: image is {image.dtype}{list(image.shape)}; expected '
          'uint8 (H, W, 3).')
    if raw.dtype != np.uint8 and raw.size and (raw.min() < 0 or
                                               raw.max() > 255):
      raise files.BadSampleError(f'{where}: mask values outside 0..255.')
    return files.to_example(image, raw.astype(np.uint8, copy=False),
                            self.table,
                            f'{where} {self._keys[1]}',
                            f'{where} {self._keys[0]}')

  def __repr__(self):
    return f'TfdsSource({self.name!r}, n={len(self)})'
