"""Metric writers and progress reports that need no TensorFlow.

clu's `create_default_writer`, `LoggingWriter` and `ReportProgress` import
TensorFlow, so on a machine without it nothing would be written. This module
keeps clu's `MetricWriter` API and writes TensorBoard event files through
tensorboardX, logs to the console through absl, and reports progress and
ETA with tqdm's formatting as one plain log line (training logs go to files,
where carriage-return bars are noise).
"""

import collections.abc
import importlib.util
import os
import sys
import time

import numpy as np
import tqdm
from absl import logging
from tensorboardX import FileWriter
from tensorboardX import summary as tbx_summary
from tensorboardX.proto import summary_pb2
from tensorboardX.proto import tensor_pb2
from tensorboardX.proto import tensor_shape_pb2

_INTERFACE = 'clu.metric_writers.interface'
_HISTOGRAM_BUCKETS = 30  # TensorBoard's own default


def _load_metric_writer_base():
  """clu's `MetricWriter` class, without importing TensorFlow.

  Returns:
    `clu.metric_writers.interface.MetricWriter`, the very class object the
    normal import gives, so `isinstance` checks against clu still hold.
  """
  if _INTERFACE in sys.modules:
    return sys.modules[_INTERFACE].MetricWriter
  # clu/metric_writers/__init__.py imports TensorFlow; interface.py does not.
  clu_dir = importlib.util.find_spec('clu').submodule_search_locations[0]
  path = os.path.join(clu_dir, 'metric_writers', 'interface.py')
  spec = importlib.util.spec_from_file_location(_INTERFACE, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[_INTERFACE] = module  # a later clu import reuses this module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[_INTERFACE]
    raise
  return module.MetricWriter


MetricWriter = _load_metric_writer_base()


def flatten_dict(tree, prefix=''):
  """Flattens nested mappings into {'a.b.c': leaf}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, collections.abc.Mapping) and value:
      flat.update(flatten_dict(value, name + '.'))
    else:
      flat[name] = value
  return flat


def _to_uint8(image):
  """Float images in [0, 1] to uint8 in [0, 255], rounding; uint8 as is."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _image_batch(key, images):
  """Yields (tag, HWC uint8 image): `key` for one image, `key/i` for more."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(f'image {key!r}: want (N,H,W,C) or (H,W,C) with C in '
                     f'1/3/4, got shape {images.shape}')
  for i, image in enumerate(images):
    yield (key if len(images) == 1 else f'{key}/{i}'), _to_uint8(image)


_DTYPES = {
    np.dtype(np.float16): 'DT_HALF', np.dtype(np.float32): 'DT_FLOAT',
    np.dtype(np.float64): 'DT_DOUBLE', np.dtype(np.int8): 'DT_INT8',
    np.dtype(np.int16): 'DT_INT16', np.dtype(np.int32): 'DT_INT32',
    np.dtype(np.int64): 'DT_INT64', np.dtype(np.uint8): 'DT_UINT8',
    np.dtype(np.bool_): 'DT_BOOL',
}


def _tensor_proto(value):
  """A numpy-convertible value (numbers or strings) as a `TensorProto`."""
  array = np.asarray(value)
  shape = tensor_shape_pb2.TensorShapeProto(
      dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape])
  if array.dtype.kind in 'SUO':
    strings = [s.encode() if isinstance(s, str) else bytes(s)
               for s in array.reshape(-1).tolist()]
    return tensor_pb2.TensorProto(dtype='DT_STRING', string_val=strings,
                                  tensor_shape=shape)
  if array.dtype not in _DTYPES:
    raise ValueError(f'unsupported summary dtype {array.dtype}')
  return tensor_pb2.TensorProto(
      dtype=_DTYPES[array.dtype], tensor_shape=shape,
      tensor_content=array.astype(array.dtype.newbyteorder('<')).tobytes())


def _summary_metadata(metadata):
  """`SummaryMetadata` from None, serialized bytes or any metadata proto."""
  if metadata is None:
    return summary_pb2.SummaryMetadata()
  if not isinstance(metadata, bytes):
    metadata = metadata.SerializeToString()  # e.g. tensorboard's own proto
  return summary_pb2.SummaryMetadata.FromString(metadata)


def _hparams_markdown(hparams):
  """Flattened hyper-parameters as a two-column markdown table."""
  rows = ['| name | value |', '|---|---|']
  for name, value in sorted(flatten_dict(hparams).items()):
    rows.append(f'| {name} | {str(value).replace("|", chr(92) + "|")} |')
  return '\n'.join(rows)


class TensorBoardWriter(MetricWriter):
  """Writes TensorBoard event files into `logdir` with tensorboardX.

  Images: a batch of N > 1 images under key `k` is written as the tags
  `k/0` ... `k/N-1` (one image each, as TF1 image summaries named theirs);
  a single image, (H, W, C) or N == 1, keeps the tag `k`. Grayscale images
  are stored as RGB.

  Args:
    logdir: folder for the event files (created if needed).
  """

  def __init__(self, logdir):
    # The pid keeps a restart within the same second from overwriting the
    # previous file: tensorboardX names files by time and host only.
    self._writer = FileWriter(os.fspath(logdir),
                              filename_suffix=f'.{os.getpid()}')

  def _add(self, step, summary):
    self._writer.add_summary(summary, int(step))

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      value = np.asarray(value)
      if value.dtype.kind == 'f' and np.isnan(value).all():
        continue  # e.g. the IoU of a class absent from the data: undefined
      self._add(step, tbx_summary.scalar(key, value))

  def write_images(self, step, images):
    for key, batch in images.items():
      for tag, image in _image_batch(key, batch):
        self._add(step, tbx_summary.image(tag, image, dataformats='HWC'))

  def write_texts(self, step, texts):
    for key, text in texts.items():
      summary = tbx_summary.text(key, str(text))
      summary.value[0].tag = key  # tensorboardX appends '/text_summary'
      self._add(step, summary)

  def write_histograms(self, step, arrays, num_buckets=None):
    for key, values in arrays.items():
      buckets = _HISTOGRAM_BUCKETS
      if isinstance(num_buckets, collections.abc.Mapping):
        buckets = num_buckets.get(key, buckets)
      elif num_buckets:
        buckets = num_buckets
      self._add(step, tbx_summary.histogram(key, np.asarray(values), buckets))

  def write_summaries(self, step, values, metadata=None):
    meta = _summary_metadata(metadata)
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=key, tensor=_tensor_proto(v),
                                  metadata=meta)
        for key, v in values.items()])
    self._add(step, summary)

  def write_hparams(self, hparams):
    """Writes the flattened `hparams` as the markdown text 'hparams', step 0."""
    self.write_texts(0, {'hparams': _hparams_markdown(hparams)})

  def write_videos(self, step, videos):
    raise NotImplementedError('seg_jax writes no videos to TensorBoard')

  def write_audios(self, step, audios, *, sample_rate):
    raise NotImplementedError('seg_jax writes no audio to TensorBoard')

  def write_pointcloud(self, step, point_clouds, *, point_colors=None,
                       configs=None):
    raise NotImplementedError('seg_jax writes no point clouds to TensorBoard')

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _format_scalar(value):
  value = np.asarray(value)
  if value.size == 1 and value.dtype.kind in 'biu':
    return str(value.item())
  if value.size == 1 and value.dtype.kind == 'f':
    return f'{value.item():.5g}'
  return str(value.tolist())


def _shapes(arrays):
  return ', '.join(f'{k} {np.shape(v)}' for k, v in arrays.items())


class ConsoleWriter(MetricWriter):
  """Logs what is written, one line per call: scalars in full, the rest as
  keys and shapes.

  Args:
    log_fn: called with one finished line (default: `absl.logging.info`).
  """

  def __init__(self, log_fn=None):
    self._log = log_fn or logging.info

  def _line(self, step, what):
    self._log(f'[{step}] {what}')

  def write_scalars(self, step, scalars):
    self._line(step, ', '.join(f'{k}={_format_scalar(v)}'
                               for k, v in scalars.items()))

  def write_images(self, step, images):
    self._line(step, f'images: {_shapes(images)}')

  def write_texts(self, step, texts):
    self._line(step, 'texts: ' + ', '.join(f'{k} ({len(str(t))} chars)'
                                           for k, t in texts.items()))

  def write_histograms(self, step, arrays, num_buckets=None):
    self._line(step, f'histograms: {_shapes(arrays)}')

  def write_summaries(self, step, values, metadata=None):
    self._line(step, f'summaries: {_shapes(values)}')

  def write_videos(self, step, videos):
    self._line(step, f'videos: {_shapes(videos)}')

  def write_audios(self, step, audios, *, sample_rate):
    self._line(step, f'audios at {sample_rate} Hz: {_shapes(audios)}')

  def write_pointcloud(self, step, point_clouds, *, point_colors=None,
                       configs=None):
    self._line(step, f'point clouds: {_shapes(point_clouds)}')

  def write_hparams(self, hparams):
    # The whole config is a file of the run folder (config.json) and a
    # text in TensorBoard; one log line of every key would be thousands of
    # characters long.
    self._log(f'hparams: {len(flatten_dict(hparams))} config values')

  def flush(self):
    pass

  def close(self):
    pass


def _forward(name):
  """A `MultiWriter` method that calls `name` on every writer in turn."""
  def method(self, *args, **kwargs):
    for writer in self.writers:
      getattr(writer, name)(*args, **kwargs)
  method.__name__ = name
  return method


class MultiWriter(MetricWriter):
  """Writes to every writer in `writers` (clu's own needs TensorFlow)."""

  def __init__(self, writers):
    self.writers = list(writers)

  write_scalars = _forward('write_scalars')
  write_images = _forward('write_images')
  write_texts = _forward('write_texts')
  write_histograms = _forward('write_histograms')
  write_summaries = _forward('write_summaries')
  write_videos = _forward('write_videos')
  write_audios = _forward('write_audios')
  write_pointcloud = _forward('write_pointcloud')
  write_hparams = _forward('write_hparams')
  flush = _forward('flush')
  close = _forward('close')


def create_writer(logdir, write_files=True):
  """The training writer: console logs always, event files if `write_files`.

  Args:
    logdir: folder for the event files; created when `write_files`.
    write_files: whether this process writes event files (callers pass
      `jax.process_index() == 0`, so hosts do not write the same values).

  Returns:
    A `MultiWriter` of a `ConsoleWriter` and, when `write_files`, a
    `TensorBoardWriter`.
  """
  writers = [ConsoleWriter()]
  if write_files:
    os.makedirs(logdir, exist_ok=True)
    writers.append(TensorBoardWriter(logdir))
  return MultiWriter(writers)


class ProgressReporter:
  """Logs progress, speed and ETA as one line, at most every `every_secs`.

  The first call's step carries the compile time, so the clock restarts
  there; until then the rate counts from construction at `first_step`. The
  rate is the average since the restart, evaluation pauses included, so the
  ETA accounts for the evaluations still to come.

  Args:
    num_steps: the last step of the run.
    writer: optional `MetricWriter`; gets the scalar 'steps_per_sec'.
    every_secs: least time between two reports; 0 reports every call. The
      last step is always reported.
    first_step: the step the run starts from (0, or the restored step).
    time_fn: the clock, in seconds (tests pass a fake one).
    log_fn: called with each finished line (default: `absl.logging.info`).
  """

  _FORMAT = ('step {n}/{total} ({percentage:.1f}%), {rate_noinv_fmt}, '
             'ETA {remaining}')

  def __init__(self, num_steps, writer=None, every_secs=30.0, first_step=0,
               time_fn=time.monotonic, log_fn=None):
    self.num_steps = num_steps
    self._writer = writer
    self._every_secs = every_secs
    self._time = time_fn
    self._log = log_fn or logging.info
    self._anchor = (first_step, time_fn())
    self._last_report = None

  def __call__(self, step):
    """Reports if due; call after step `step` has finished."""
    now = self._time()
    rate = self._rate(step, now)
    if self._last_report is None:
      self._anchor = self._last_report = (step, now)
    if now - self._last_report[1] < self._every_secs and step < self.num_steps:
      return
    self._last_report = (step, now)
    self._report(step, rate)

  def _rate(self, step, now):
    """Steps per second since the anchor, or None without a measurement."""
    steps, secs = step - self._anchor[0], now - self._anchor[1]
    return steps / secs if steps > 0 and secs > 0 else None

  def _report(self, step, rate):
    self._log(tqdm.tqdm.format_meter(
        step, self.num_steps, 0, rate=rate, unit=' steps', unit_scale=True,
        bar_format=self._FORMAT))
    if self._writer is not None and rate is not None:
      self._writer.write_scalars(step, {'steps_per_sec': rate})
