"""Datasets by name and the pipelines that feed them to the devices."""

import logging
import os

import numpy as np

from seg_jax import labels
from seg_jax.data import files, shapes, sources


def _shapes(config, split):
  c = config.data.shapes
  return shapes.ShapesSource(
      split, c.num_train if split == 'train' else c.num_val,
      seed=c.seed, size=c.image_size, max_shapes=c.max_shapes,
      ignore_label=labels.ignore_label(config))


def _files(builder):
  def build(config, split):
    return builder(config.data.root, split, config.data.on_bad_sample,
                   ignore_label=labels.ignore_label(config))
  return build


def _folder(config, split):
  return sources.folder(config.data.root, split, config.model.num_classes,
                        config.data.on_bad_sample,
                        ignore_label=labels.ignore_label(config),
                        label_map=dict(config.data.label_map))


def _tfds(config, split):
  c = config.data.tfds
  if not c.name:
    raise ValueError("data.name='tfds' needs data.tfds.name, e.g. "
                     "'oxford_iiit_pet'.")
  names = tuple(c.class_names) or tuple(
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
  its files (prediction runs where the training data is not): `folder`
  reads `classes.txt` when its root is there, `tfds` uses
  `data.tfds.class_names`; otherwise `class_<i>` and the VOC colour map."""
  num = config.model.num_classes
  if config.data.name in _CLASSES:
    names, palette = _CLASSES[config.data.name]
  else:
    names = tuple(config.data.tfds.class_names) if config.data.name == 'tfds' \
        else ()
    listed = os.path.join(config.data.root or '', 'classes.txt')
    if config.data.name == 'folder' and os.path.isfile(listed):
      names = tuple(files.read_list(listed, 'folder'))
    names = names or tuple(f'class_{i}' for i in range(num))
    palette = labels.color_map(len(names))
  if len(names) != num:
    raise ValueError(f'data.name={config.data.name!r} has {len(names)} '
                     f'classes but model.num_classes={num}; make them equal.')
  return tuple(names), np.asarray(palette, np.uint8)


def create_source(config, split):
  """The random-access source of `split` ('train' or 'val') for a config.

  For file datasets the split read is `data.train_split` / `data.val_split`
  (e.g. VOC's 'train_aug').
  """
  name = config.data.name
  if name not in DATASETS:
    raise ValueError(f'Unknown data.name={name!r}; choose one of '
                     f'{sorted(DATASETS)}.')
  files.check_on_bad_sample(config.data.on_bad_sample)
  if name != 'shapes':
    split = {'train': config.data.train_split,
             'val': config.data.val_split}.get(split, split)
  source = DATASETS[name](config, split)
  if len(source.class_names) != config.model.num_classes:
    raise ValueError(
        f'data.name={name!r} has {len(source.class_names)} classes but '
        f'model.num_classes={config.model.num_classes}; make them equal.')
  dropped = getattr(source, 'skipped_at_build', ())
  if dropped:
    logging.warning('%s: skipped %d list entries with missing files '
                    "(data.on_bad_sample='skip'); first: %s", source,
                    len(dropped), dropped[0])
  return source
