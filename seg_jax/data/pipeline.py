"""grain pipelines: shuffled, augmented, batched training iterator with a
checkpointable state, and padded evaluation batches covering a split once."""

import logging
import math

import grain
import jax
import numpy as np

from seg_jax.data import files, transforms
from seg_jax.metrics import IGNORE_LABEL


class SkipCounter(grain.transforms.Filter):
  """Drops the markers of bad records skipped by a source, counting them.

  Runs in the main process (after the worker processes), so `count` is the
  number of records this process's loader has skipped. Raises once
  `max_in_a_row` records in a row were bad: a dataset that is bad
  everywhere must not spin forever.
  """

  def __init__(self, max_in_a_row=1000):
    self.count, self._in_a_row, self._max = 0, 0, max_in_a_row

  def filter(self, element):
    if not files.is_skipped(element):
      self._in_a_row = 0
      return True
    self.count += 1
    self._in_a_row += 1
    logging.warning('Skipped bad sample #%d: %s', self.count,
                    element['skipped'])
    if self._in_a_row >= self._max:
      raise RuntimeError(f'{self._in_a_row} bad samples in a row; the '
                         f'last: {element["skipped"]}')
    return False


def create_train_dataset(source, transform, *, seed, batch_size,
                         worker_count=0, num_threads=2, prefetch=8,
                         process_index=None, process_count=None,
                         skip_counter=None):
  """An endless, per-epoch reshuffled, augmented and batched grain dataset.

  Args:
    source: random-access source (`len`, `__getitem__`).
    transform: a `grain.transforms.RandomMap` (per-record seeded).
    seed: shuffle and augmentation seed.
    batch_size: per-process batch size.
    worker_count: grain worker processes (0: read in this process).
    num_threads: reader threads per process (or per worker).
    prefetch: elements each reader keeps ready.
    process_index, process_count: this process's shard (default: JAX's).
    skip_counter: the `SkipCounter` that drops and counts bad records
      (default: a new one).

  Returns:
    `grain.IterDataset`; `iter()` of it has `get_state`/`set_state`.
    Decoding and augmentation run in the worker processes; dropping skipped
    records and batching run in this one.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if len(source) < count * batch_size:
    raise ValueError(f'{source!r} has {len(source)} examples, fewer than one '
                     f'global batch ({count} x {batch_size}).')
  ds = grain.MapDataset.source(source)[index::count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(transform, seed=seed + 1)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch))
  it_ds = it_ds.filter(skip_counter or SkipCounter())
  return it_ds.batch(batch_size, drop_remainder=True)


class _PaddedEvalSource:
  """Maps each slot of a padded evaluation pass to an example or a blank.

  Slots are laid out so that global batch b holds examples
  [b * global_batch, (b + 1) * global_batch), with process p taking its
  contiguous part; slots past the end of the split are blanks whose label is
  all ignore and whose 'index' is -1, so every example counts exactly once.
  """

  def __init__(self, source, transform, global_batch, local_batch,
               process_index, skip_counter):
    self._source, self._transform = source, transform
    self._skips = skip_counter
    self._global, self._local, self._proc = global_batch, local_batch, \
        process_index
    self.num_batches = math.ceil(len(source) / global_batch)
    self._blank = None

  def __len__(self):
    return self.num_batches * self._local

  def __getitem__(self, slot):
    b, j = divmod(slot, self._local)
    g = b * self._global + self._proc * self._local + j
    if g < len(self._source):
      example = self._transform.map(self._source[g])
      if self._skips.filter(example):
        return {**example, 'index': np.int32(g)}
    return self._blank_like()

  def _blank_like(self):
    if self._blank is None:
      first = next(e for e in (self._transform.map(self._source[i])
                               for i in range(len(self._source)))
                   if not files.is_skipped(e))
      self._blank = {'image': np.zeros_like(first['image']),
                     'label': np.full_like(first['label'], IGNORE_LABEL),
                     'index': np.int32(-1)}
    return self._blank


def create_eval_dataset(source, transform, *, global_batch_size,
                        num_threads=2, process_index=None, process_count=None,
                        skip_counter=None):
  """Batches covering every example of `source` exactly once.

  The last batch is padded with blank examples (label all ignore, 'index'
  -1), so batch shapes stay static and nothing is dropped or repeated.
  Every process yields the same number of batches. A bad record skipped by
  the source becomes a blank too, counted by `skip_counter`.

  Returns:
    (`grain.IterDataset` of dict batches with 'image', 'label', 'index';
    number of batches).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  local = global_batch_size // count
  padded = _PaddedEvalSource(source, transform, global_batch_size, local,
                             index, skip_counter or SkipCounter())
  ds = grain.MapDataset.source(padded).batch(local, drop_remainder=True)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))
  return it_ds, padded.num_batches


def train_transform(config):
  """The training transform a config asks for."""
  p = config.data.photometric
  photometric = transforms.Photometric(
      brightness_delta=p.brightness_delta,
      contrast_range=tuple(p.contrast_range),
      saturation_range=tuple(p.saturation_range),
      hue_delta=p.hue_delta) if p.enabled else None
  return transforms.TrainTransform(
      crop_size=transforms.pair(config.data.crop_size),
      scale_range=tuple(config.data.scale_range), flip=config.data.flip,
      mean=tuple(config.data.mean), ignore_label=config.data.ignore_label,
      cat_max_ratio=config.data.cat_max_ratio, photometric=photometric)


def eval_transform(config):
  """The evaluation transform: whole label, padded to `data.eval_pad_size`;
  the image resized by `data.eval_scale`."""
  size = config.data.eval_pad_size or config.data.crop_size
  return transforms.EvalTransform(pad_size=transforms.pair(size),
                                  mean=tuple(config.data.mean),
                                  ignore_label=config.data.ignore_label,
                                  scale=config.data.eval_scale)
