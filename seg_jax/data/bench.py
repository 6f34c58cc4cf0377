"""Input pipeline throughput: decoded and augmented train images per second.

  python -m seg_jax.data.bench --config=configs/fcn8s_voc.py --workers=0,1,2 --threads=1,2

Runs the config's training pipeline (decode, rescale, crop, flip, colour
draw, batch) with each worker-process count and reader-thread count (per
process) and reports images/s after a warm-up.
A dataset of files whose `data.root` is not on disk, or --synthetic=N,
first writes N VOC-layout pairs (500x375 JPEG + palette PNG, VOC's
typical size) into a temporary folder and reads those instead, saying so;
the built-in `shapes` and TFDS datasets are measured as they are.
"""

import os
import tempfile
import time

from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

from seg_jax import cli, data, errors
from seg_jax.data import pipeline, sources

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Configuration file (a configs/*.py). Every config key, '
    'with its meaning, is listed in configs/default.py.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'],
                             'grain worker process counts to measure.')
_THREADS = flags.DEFINE_list('threads', [],
                             'reader threads per process to measure '
                             '(default: data.num_threads).')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Batches timed per setting.',
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Batches before timing starts.',
                               lower_bound=0)
_SYNTHETIC = flags.DEFINE_integer(
    'synthetic', 0, 'Write this many synthetic VOC pairs and read them '
    "(0: the config's dataset; 200 where its data.root does not exist).")


def _counts(flag, values, least):
  """The integers of a list flag; a `ConfigError` naming it otherwise."""
  try:
    counts = [int(v) for v in values]
  except ValueError:
    counts = [least - 1]
  if any(c < least for c in counts):
    raise errors.ConfigError(f'{flag}={",".join(values)}: give whole numbers '
                             f'of at least {least}, e.g. {flag}=0,1,2.')
  return counts


def write_voc_like(root, n, size=(375, 500), seed=0):
  """Writes n VOC-layout pairs (JPEG image, palette PNG mask) under root."""
  rng = np.random.default_rng(seed)
  h, w = size
  for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  palette = sources.VOC_PALETTE.ravel().tolist()
  palette += [224, 224, 192] * (256 - len(palette) // 3)
  ids = []
  for i in range(n):
    # Smooth colour fields plus noise: JPEG decodes like a photograph.
    freq = rng.uniform(2, 12, (3, 2))
    image = np.stack([np.sin(freq[c, 0] * y + freq[c, 1] * x + c)
                      for c in range(3)], -1)
    image = (image * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(3):
      cy, cx = rng.uniform(0, h / max(h, w)), rng.uniform(0, w / max(h, w))
      r = rng.uniform(0.1, 0.3)
      inside = (y - cy)**2 + (x - cx)**2 < r * r
      mask[inside] = rng.integers(1, 21)
    ids.append(f'{i:06d}')
    Image.fromarray(image.astype(np.uint8)).save(
        os.path.join(root, 'JPEGImages', f'{ids[-1]}.jpg'), quality=90)
    png = Image.fromarray(mask, 'P')
    png.putpalette(palette)
    png.save(os.path.join(root, 'SegmentationClass', f'{ids[-1]}.png'))
  with open(os.path.join(root, 'ImageSets/Segmentation/train.txt'), 'w') as f:
    f.write('\n'.join(ids) + '\n')


def measure(config, workers, threads, batches, warmup):
  """Images per second of the train pipeline with `workers` processes of
  `threads` reader threads each."""
  source = data.create_source(config, 'train')
  ds = pipeline.create_train_dataset(
      source, pipeline.train_transform(config), seed=config.seed,
      batch_size=config.train.global_batch_size, worker_count=workers,
      num_threads=threads, prefetch=config.data.prefetch)
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  elapsed = time.perf_counter() - start
  del batch, it
  return batches * config.train.global_batch_size / elapsed


def main(argv):
  del argv
  config = _CONFIG.value
  workers = _counts('--workers', _WORKERS.value, 0)
  threads = _counts('--threads', _THREADS.value, 1)
  with tempfile.TemporaryDirectory() as tmp:
    n = _SYNTHETIC.value
    # The built-in and TFDS datasets read no data.root: measured as they are.
    reads_root = config.data.name not in ('shapes', 'tfds')
    if n or (reads_root and not os.path.isdir(config.data.root)):
      why = ('--synthetic' if n else f'data.root={config.data.root!r} is not '
             'a folder')
      n = n or 200
      write_voc_like(tmp, n)
      config.data.name, config.data.root = 'voc', tmp
      config.data.train_split = 'train'
      config.model.num_classes = len(sources.VOC_CLASSES)
      print(f'synthetic ({why}): {n} VOC-layout pairs, 500x375 JPEG + '
            "palette PNG, read instead of the config's dataset")
    crop = tuple(config.data.crop_size)
    print(f'data={config.data.name} crop={crop} '
          f'scale_range={tuple(config.data.scale_range)} '
          f'photometric={config.data.photometric.enabled} '
          f'batch={config.train.global_batch_size} cpus={os.cpu_count()}')
    print('| worker processes | threads each | images/s |')
    print('|---|---|---|')
    for w in workers:
      for t in threads or [config.data.num_threads]:
        rate = measure(config, int(w), int(t), _BATCHES.value, _WARMUP.value)
        print(f'| {w} | {t} | {rate:.1f} |', flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
