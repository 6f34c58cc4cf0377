"""grain pipelines: shuffled, augmented, batched training iterator with a
checkpointable state, and padded evaluation batches covering a split once."""

import logging
import math
import threading

import grain
import jax
import numpy as np

from seg_jax import labels
from seg_jax.data import files, transforms


class SkipCounter:
  """Counts the bad records a source skipped ('skip' mode) on this process.

  Training pipelines drop skipped records where they are read (in the worker
  processes) and tag each batch with how many were dropped while forming it
  ('num_skipped'); `count_batch` adds that up here. Evaluation passes each
  record through `keep`. Either raises once `max_in_a_row` records in a row
  were bad: a dataset that is bad everywhere must not spin forever.
  """

  def __init__(self, max_in_a_row=1000):
    self.count, self.max_in_a_row = 0, max_in_a_row
    self._lock = threading.Lock()  # eval reader threads call `keep`

  def count_batch(self, batch):
    """Adds up and removes a training batch's 'num_skipped' tags."""
    skipped = int(np.sum(batch.pop('num_skipped')))
    if skipped:
      self.count += skipped
      logging.warning('%d bad samples skipped so far on this process.',
                      self.count)
    return batch

  def keep(self, element):
    """False (and counted, and logged) for a skipped record's marker."""
    if not files.is_skipped(element):
      return True
    with self._lock:
      self.count += 1
      n = self.count
    logging.warning('Skipped bad sample #%d: %s', n, element['skipped'])
    return False


class _DropSkipped(grain.IterDataset):
  """Drops skipped-record markers; tags each record kept with 'num_skipped',
  the number dropped just before it. Checkpoints as its parent does."""

  def __init__(self, parent, max_in_a_row):
    super().__init__(parent)
    self._max = max_in_a_row

  def __iter__(self):
    return _DropSkippedIterator(self._parent.__iter__(), self._max)


class _DropSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent, max_in_a_row):
    super().__init__(parent)
    self._max = max_in_a_row

  def __next__(self):
    dropped = 0
    while True:
      element = next(self._parent)
      if not files.is_skipped(element):
        return {**element, 'num_skipped': np.int32(dropped)}
      dropped += 1
      logging.warning('Skipped bad sample: %s', element['skipped'])
      if dropped >= self._max:
        raise RuntimeError(f'{dropped} bad samples in a row; the last: '
                           f'{element["skipped"]}')

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


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
    skip_counter: the `SkipCounter` that counts skipped bad records
      (default: a new one).

  Returns:
    `grain.IterDataset`; `iter()` of it has `get_state`/`set_state`.
    Decoding, augmentation, dropping skipped records and batching run in the
    worker processes (one batch crosses the process boundary at a time).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if len(source) < count * batch_size:
    raise ValueError(f'{source!r} has {len(source)} examples, fewer than one '
                     f'global batch ({count} x {batch_size}).')
  ds = grain.MapDataset.source(source)[index::count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(transform, seed=seed + 1)
  counter = skip_counter or SkipCounter()
  it_ds = _DropSkipped(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch)),
                       counter.max_in_a_row)
  it_ds = it_ds.batch(batch_size, drop_remainder=True)
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count))
  return it_ds.map(counter.count_batch)


class _PaddedEvalSource:
  """Maps each slot of a padded evaluation pass to an example or a blank.

  Slots are laid out so that global batch b holds examples
  [b * global_batch, (b + 1) * global_batch), with process p taking its
  contiguous part; slots past the end of the split are blanks whose label is
  all ignore (the transform's `ignore_label`) and whose 'index' is -1, so
  every example counts exactly once.
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
      if self._skips.keep(example):
        return {**example, 'index': np.int32(g)}
    return self._blank_like()

  def _blank_like(self):
    if self._blank is None:
      first = next(e for e in (self._transform.map(self._source[i])
                               for i in range(len(self._source)))
                   if not files.is_skipped(e))
      self._blank = {**first, 'image': np.zeros_like(first['image']),
                     'label': np.full_like(first['label'],
                                           self._transform.ignore_label),
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
      mean=tuple(config.data.mean), ignore_label=labels.ignore_label(config),
      cat_max_ratio=config.data.cat_max_ratio, photometric=photometric)


def eval_transform(config):
  """The evaluation transform: whole image and label, padded to
  `data.eval_pad_size` (default: the crop size)."""
  size = config.data.eval_pad_size or config.data.crop_size
  return transforms.EvalTransform(pad_size=transforms.pair(size),
                                  mean=tuple(config.data.mean),
                                  ignore_label=labels.ignore_label(config))
