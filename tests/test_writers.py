"""Tests for seg_jax.writers: event files read back independently, progress.

Run as a program (`python tests/no_tensorflow.py tests/test_writers.py DIR`)
this file writes the events the test reads, with TensorFlow hidden.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np

from seg_jax import writers

from tb_events import crc32c, decode_png, read_events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCALARS = {1: {'train/loss': 0.5, 'train/count': 3},
           2: {'train/loss': np.float32(0.25), 'train/count': np.int64(7)},
           # A class absent from the data has no IoU: not written, no
           # tensorboardX 'NaN or Inf found' warning.
           5: {'train/loss': 1.5, 'train/iou/absent': float('nan')}}
# Distinct values in every pixel and channel, so a transposed or shuffled
# image cannot pass.
BATCH = (np.arange(2 * 3 * 4 * 3).reshape(2, 3, 4, 3) * 7 % 256).astype(
    np.uint8)
GRAY = np.arange(6, dtype=np.float64).reshape(3, 2, 1) * 40 / 255
RAW = np.array([[1.5, -2.0, 0.125]], np.float32)
HPARAMS = {'model': {'name': 'unet', 'width': 8}, 'lr': 0.5}


def write_events(logdir):
  """The child program: writes known values, reports what was imported."""
  writer = writers.create_writer(logdir)
  writer.write_hparams(HPARAMS)
  for step, scalars in SCALARS.items():
    writer.write_scalars(step, scalars)
  writer.write_images(3, {'eval/examples': BATCH, 'eval/gray': GRAY})
  writer.write_texts(3, {'notes': 'hello'})
  writer.write_histograms(4, {'weights': np.arange(10.0)})
  writer.write_summaries(4, {'raw': RAW})
  writer.close()
  print(json.dumps({'tensorflow': sorted(
      m for m in sys.modules if m.split('.')[0] == 'tensorflow')}))


def test_crc32c_known_value():
  assert crc32c(b'123456789') == 0xE3069283


def test_event_files_without_tensorflow(tmp_path):
  logdir = tmp_path / 'logs' / 'train'  # create_writer makes both folders
  child = subprocess.run(
      [sys.executable, 'tests/no_tensorflow.py', 'tests/test_writers.py',
       str(logdir)], cwd=REPO, capture_output=True, text=True, timeout=120,
      check=False)
  assert child.returncode == 0, child.stderr[-3000:]
  assert json.loads(child.stdout.splitlines()[-1]) == {'tensorflow': []}
  assert 'NaN or Inf' not in child.stderr

  events = read_events(logdir)
  assert events[0].file_version == 'brain.Event:2'
  values = {(v.tag, e.step): v for e in events[1:] for v in e.summary.value}
  assert {tag for tag, _ in values} == {
      'hparams', 'train/loss', 'train/count', 'eval/examples/0',
      'eval/examples/1', 'eval/gray', 'notes', 'weights', 'raw'}

  scalars = {k: v.simple_value for k, v in values.items()
             if k[0].startswith('train/')}
  assert scalars == {(tag, step): float(x) for step, s in SCALARS.items()
                     for tag, x in s.items() if not np.isnan(x)}

  for i in range(2):
    image = values[(f'eval/examples/{i}', 3)].image
    assert (image.height, image.width) == (3, 4)
    np.testing.assert_array_equal(decode_png(image), BATCH[i])
  gray = decode_png(values[('eval/gray', 3)].image)
  expected = np.round(GRAY * 255).astype(np.uint8)
  np.testing.assert_array_equal(gray, np.repeat(expected, 3, axis=-1))

  assert values[('notes', 3)].tensor.string_val == [b'hello']
  hparams = values[('hparams', 0)].tensor.string_val[0].decode()
  assert '| model.width | 8 |' in hparams and '| lr | 0.5 |' in hparams
  histo = values[('weights', 4)].histo
  assert (histo.num, histo.sum, histo.min, histo.max) == (10, 45, 0, 9)
  raw = values[('raw', 4)].tensor
  assert [d.size for d in raw.tensor_shape.dim] == [1, 3]
  np.testing.assert_array_equal(
      np.frombuffer(raw.tensor_content, '<f4').reshape(1, 3), RAW)


def test_console_writer_lines():
  lines = []
  writer = writers.ConsoleWriter(log_fn=lines.append)
  writer.write_scalars(7, {'loss': 0.123456789, 'n': np.int32(3),
                           'acc': np.float32(0.5)})
  writer.write_images(7, {'ex': np.zeros((2, 4, 5, 3), np.uint8)})
  writer.write_hparams({'a': {'b': 1}, 'c': 'x'})
  assert lines == ['[7] loss=0.12346, n=3, acc=0.5',
                   '[7] images: ex (2, 4, 5, 3)',
                   'hparams: 2 config values']


def test_create_writer(tmp_path):
  logdir = tmp_path / 'a' / 'b'
  writer = writers.create_writer(logdir, write_files=False)
  assert [type(w) for w in writer.writers] == [writers.ConsoleWriter]
  assert not logdir.exists()  # only the writing process touches the disk
  writer = writers.create_writer(logdir)
  assert isinstance(writer.writers[1], writers.TensorBoardWriter)
  assert isinstance(writer, writers.MetricWriter)
  writer.close()
  assert len(os.listdir(logdir)) == 1


class _FakeClock:

  def __init__(self, times):
    self.times = list(times)

  def __call__(self):
    return self.times.pop(0)


class _ScalarLog:

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, scalars))


def test_progress_every_call():
  lines, log = [], _ScalarLog()
  # Constructed at t=0, resumed at step 2; step 3 (compile) ends at t=10.
  clock = _FakeClock([0.0, 10.0, 10.5, 11.0])
  report = writers.ProgressReporter(10, log, every_secs=0, first_step=2,
                                    time_fn=clock, log_fn=lines.append)
  for step in (3, 4, 5):
    report(step)
  # The first report counts from construction, compile included; later
  # ones from the first call: 2 steps in 1 s, 5 steps left.
  assert lines == ['step 3/10 (30.0%), 0.10 steps/s, ETA 01:10',
                   'step 4/10 (40.0%), 2.00 steps/s, ETA 00:03',
                   'step 5/10 (50.0%), 2.00 steps/s, ETA 00:02']
  assert log.scalars == [(3, {'steps_per_sec': 0.1}),
                         (4, {'steps_per_sec': 2.0}),
                         (5, {'steps_per_sec': 2.0})]


def test_progress_throttled_and_last_step():
  lines = []
  clock = _FakeClock([0.0, 1.0, 5.0, 11.0, 12.0, 13.0])
  report = writers.ProgressReporter(5, every_secs=10, time_fn=clock,
                                    log_fn=lines.append)
  for step in range(1, 6):
    report(step)
  assert lines == ['step 3/5 (60.0%), 0.20 steps/s, ETA 00:10',
                   'step 5/5 (100.0%), 0.33 steps/s, ETA 00:00']


def test_progress_logs_to_absl(caplog):
  caplog.set_level(logging.INFO)
  report = writers.ProgressReporter(4, every_secs=0)
  report(4)
  assert any(r.getMessage().startswith('step 4/4 (100.0%)') and
             'ETA' in r.getMessage() for r in caplog.records)


if __name__ == '__main__':
  write_events(sys.argv[1])
