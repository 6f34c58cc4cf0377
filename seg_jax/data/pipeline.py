"""grain pipelines: shuffled, augmented, batched training iterator with a
checkpointable state, and padded evaluation batches covering a split once."""

import logging
import math
import threading

import grain
import jax
import numpy as np

from seg_jax import errors, labels
from seg_jax.data import files, transforms


class SkipCounter:
  """Counts the bad records a source skipped ('skip' mode) on this process,
  and logs each bad file once per run.

  Training pipelines replace a skipped record where they read it (in the
  worker processes) and tag each record with 'num_skipped' (1 when its own
  slot held a bad record) and 'skip_reason' (that record's message);
  `count_batch` adds them up here. Evaluation passes each record through
  `keep`. Training raises once `max_in_a_row` records in a row were bad: a
  dataset that is bad everywhere must not spin forever.
  """

  def __init__(self, max_in_a_row=1000):
    self.count, self.max_in_a_row = 0, max_in_a_row
    self.left_out = 0  # pairs a source dropped as it was opened
    self.reasons = set()  # the distinct messages logged
    self._lock = threading.Lock()  # eval reader threads call `keep`

  def _seen(self, reason):
    """Counts one skipped record; logs its reason the first time."""
    with self._lock:
      self.count += 1
      new = reason not in self.reasons
      self.reasons.add(reason)
    if new:
      logging.warning('Skipped bad sample (data.on_bad_sample=\'skip\'; '
                      'each file is reported once): %s', reason)

  def count_batch(self, batch):
    """Adds up and removes a training batch's 'num_skipped' and
    'skip_reason' tags."""
    batch.pop('num_skipped')
    for reason in batch.pop('skip_reason').tolist():
      if reason:
        self._seen(reason)
    return batch

  def keep(self, element):
    """False (and counted, and logged once) for a skipped record's marker."""
    if not files.is_skipped(element):
      return True
    self._seen(element['skipped'])
    return False

  def opened(self, source):
    """Adds the pairs `source` left out as it was opened (its `left_out`,
    each logged then) to the run's total."""
    self.left_out += len(getattr(source, 'left_out', ()))

  def log_total(self):
    """One line with the count, when anything was skipped."""
    parts = []
    if self.count:
      parts.append(f'{self.count} bad samples skipped in this run '
                   f'({len(self.reasons)} distinct files)')
    if self.left_out:
      parts.append(f'{self.left_out} more left out as the splits were '
                   'opened (logged then)')
    if parts:
      logging.warning('%s.', '; '.join(parts))


class _ReplaceSkipped(grain.MapDataset):
  """Slot i holds record i, or when that is a skipped bad record the next
  good one after it in the (shuffled, augmented) stream; tagged with
  'num_skipped' = 1 and 'skip_reason' = its message when slot i's own
  record was bad. A function of i alone, so every process and worker count
  sees the same stream."""

  def __init__(self, parent, max_in_a_row):
    super().__init__(parent)
    self._max = max_in_a_row

  def __len__(self):
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    reason = ''
    for j in range(self._max):
      element = self._parent[index + j]
      if not files.is_skipped(element):
        return {**element, 'num_skipped': np.int32(j > 0),
                'skip_reason': np.str_(reason)}
      if j == 0:
        reason = element['skipped']
    raise errors.BadSampleError(
        f'{self._max} bad samples in a row; the last: {element["skipped"]}')


class _ProcessPart(grain.MapDataset):
  """This process's records of every global batch: its record k is record
  (k // local) * global + process * local + k % local of the global stream,
  so the processes' parts of batch b together are exactly batch b."""

  def __init__(self, parent, global_batch, local_batch, process_index):
    super().__init__(parent)
    self._global, self._local, self._proc = (global_batch, local_batch,
                                             process_index)

  def __len__(self):
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    b, j = divmod(index, self._local)
    return self._parent[b * self._global + self._proc * self._local + j]


class TrainDataset:
  """The endless training batch stream of one process.

  Global batch b (every process's part of it together) is a function of the
  seed and b only: the same for any number of processes, devices or grain
  workers. So the stream's state is just the number of batches taken, and a
  checkpoint resumes on another topology (see `TrainIterator`).
  """

  def __init__(self, batches, *, global_batch_size, seed, process_count,
               read_options, worker_count, skip_counter):
    self._batches = batches  # grain.MapDataset; element b = this part of b
    self.global_batch_size, self.seed = global_batch_size, seed
    self.process_count = process_count
    self._read_options, self._workers = read_options, worker_count
    self._counter = skip_counter

  def __iter__(self):
    return TrainIterator(self)

  def iterate_from(self, position):
    """A grain iterator over this process's batches from batch `position`."""
    ds = self._batches[position:].to_iter_dataset(self._read_options)
    if self._workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._workers))
    return iter(ds.map(self._counter.count_batch))


class TrainIterator:
  """Iterates a `TrainDataset`; its state is JSON:
  {'position': batches taken, 'global_batch_size', 'seed', 'process_count'}.

  `set_state` accepts a state saved with another process count (the stream
  is re-split at the same global batch), and refuses one saved with another
  global batch size or seed, which would not continue the same stream.
  """

  def __init__(self, dataset, position=0):
    self._ds, self.position, self._it = dataset, position, None

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = self._ds.iterate_from(self.position)
    batch = next(self._it)
    self.position += 1
    return batch

  def get_state(self):
    return {'position': self.position,
            'global_batch_size': self._ds.global_batch_size,
            'seed': self._ds.seed, 'process_count': self._ds.process_count}

  def set_state(self, state):
    """Continues at `state['position']`; see the class docstring."""
    if 'position' not in state:
      raise ValueError(f'Data-iterator state {state} is not a seg_jax '
                       'TrainIterator state (written by an older version?).')
    for key, ours in (('global_batch_size', self._ds.global_batch_size),
                      ('seed', self._ds.seed)):
      if state.get(key, ours) != ours:
        raise ValueError(
            f'The checkpoint\'s data stream was drawn with {key}='
            f'{state[key]}, the config has {ours}: the stream would not '
            f'continue. Resume with {key}={state[key]}, or train in a new '
            'workdir.')
    if state.get('process_count', self._ds.process_count) != \
        self._ds.process_count:
      logging.info('Data stream re-split at batch %d: saved by %d '
                   'processes, continued by %d.', state['position'],
                   state['process_count'], self._ds.process_count)
    self.position, self._it = int(state['position']), None


def too_few_for_a_batch(name, examples, global_batch):
  """The error when a training split cannot fill one batch, else None."""
  if examples >= global_batch:
    return None
  return (f'{name}: {examples} example(s), fewer than one training batch '
          f'(train.global_batch_size={global_batch}); give '
          f'--config.train.global_batch_size={examples} or less (a multiple '
          'of the device count) or add images.')


def create_train_dataset(source, transform, *, seed, batch_size,
                         worker_count=0, num_threads=2, prefetch=8,
                         process_index=None, process_count=None,
                         skip_counter=None):
  """An endless, per-epoch reshuffled, augmented and batched stream.

  The global stream shuffles the whole source each epoch and augments
  record i with a key drawn from (seed, i); global batch b is records
  [b * G, (b + 1) * G) of it, G = batch_size x process_count, and process
  p takes the p-th contiguous part. A bad record skipped by the source is
  replaced by the next good one in the stream.

  Args:
    source: random-access source (`len`, `__getitem__`).
    transform: a `grain.transforms.RandomMap` (per-record seeded).
    seed: shuffle and augmentation seed.
    batch_size: per-process batch size.
    worker_count: grain worker processes (0: read in this process).
    num_threads: reader threads per process (or per worker); each reads
      whole batches.
    prefetch: records each reader keeps ready (rounded up to batches).
    process_index, process_count: this process's part (default: JAX's).
    skip_counter: the `SkipCounter` that counts skipped bad records
      (default: a new one).

  Returns:
    `TrainDataset`; `iter()` of it is a `TrainIterator` with
    `get_state`/`set_state`. Decoding, augmentation, replacing skipped
    records and batching run in the worker processes (one batch crosses
    the process boundary at a time).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  short = too_few_for_a_batch(getattr(source, 'name', repr(source)),
                              len(source), count * batch_size)
  if short:
    raise errors.ConfigError(short)
  counter = skip_counter or SkipCounter()
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = ds.random_map(transform, seed=seed + 1)
  ds = _ReplaceSkipped(ds, counter.max_in_a_row)
  ds = _ProcessPart(ds, count * batch_size, batch_size, index)
  batches = ds.batch(batch_size, drop_remainder=True)
  read = grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=max(num_threads, -(-prefetch // batch_size)))
  return TrainDataset(batches, global_batch_size=count * batch_size,
                      seed=seed, process_count=count, read_options=read,
                      worker_count=worker_count, skip_counter=counter)


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
