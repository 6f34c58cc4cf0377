"""grain pipelines: shuffled, augmented, batched training iterator with a
checkpointable state, and padded evaluation batches covering a split once."""

import math

import grain
import jax
import numpy as np

from seg_jax.data import transforms
from seg_jax.metrics import IGNORE_LABEL


def create_train_dataset(source, transform, *, seed, batch_size,
                         worker_count=0, num_threads=2, prefetch=8,
                         process_index=None, process_count=None):
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

  Returns:
    `grain.IterDataset`; `iter()` of it has `get_state`/`set_state`.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if len(source) < count * batch_size:
    raise ValueError(f'{source!r} has {len(source)} examples, fewer than one '
                     f'global batch ({count} x {batch_size}).')
  ds = grain.MapDataset.source(source)[index::count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(transform, seed=seed + 1)
  ds = ds.batch(batch_size, drop_remainder=True)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count))
  return it_ds


class _PaddedEvalSource:
  """Maps each slot of a padded evaluation pass to an example or a blank.

  Slots are laid out so that global batch b holds examples
  [b * global_batch, (b + 1) * global_batch), with process p taking its
  contiguous part; slots past the end of the split are blanks whose label is
  all ignore and whose 'index' is -1, so every example counts exactly once.
  """

  def __init__(self, source, transform, global_batch, local_batch,
               process_index):
    self._source, self._transform = source, transform
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
      return {**self._transform.map(self._source[g]), 'index': np.int32(g)}
    if self._blank is None:
      first = self._transform.map(self._source[0])
      self._blank = {'image': np.zeros_like(first['image']),
                     'label': np.full_like(first['label'], IGNORE_LABEL),
                     'index': np.int32(-1)}
    return self._blank


def create_eval_dataset(source, transform, *, global_batch_size,
                        num_threads=2, process_index=None, process_count=None):
  """Batches covering every example of `source` exactly once.

  The last batch is padded with blank examples (label all ignore, 'index'
  -1), so batch shapes stay static and nothing is dropped or repeated.
  Every process yields the same number of batches.

  Returns:
    (`grain.IterDataset` of dict batches with 'image', 'label', 'index';
    number of batches).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  local = global_batch_size // count
  padded = _PaddedEvalSource(source, transform, global_batch_size, local,
                             index)
  ds = grain.MapDataset.source(padded).batch(local, drop_remainder=True)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))
  return it_ds, padded.num_batches


def train_transform(config):
  """The training transform a config asks for."""
  return transforms.TrainTransform(
      crop_size=transforms.pair(config.data.crop_size),
      scale_range=tuple(config.data.scale_range), flip=config.data.flip,
      mean=tuple(config.data.mean), ignore_label=config.data.ignore_label)


def eval_transform(config):
  """The evaluation transform: whole image, padded to `data.eval_pad_size`."""
  size = config.data.eval_pad_size or config.data.crop_size
  return transforms.EvalTransform(pad_size=transforms.pair(size),
                                  mean=tuple(config.data.mean),
                                  ignore_label=config.data.ignore_label)
