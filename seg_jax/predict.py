"""Apply a trained model to images, folders and videos.

    python -m seg_jax.predict --config=configs/x.py --workdir=DIR --out=OUT \\
        INPUT... [--checkpoint=latest|best|STEP] [--keep=CLASS,...] \\
        [--crf] [--tta]

For every image, OUT gets `<name>.png`, the label map as an indexed PNG with
the dataset's palette (it opens as colours and reads back as class ids),
and `<name>_overlay.jpg`, the colours blended over the image; with `--keep`
also `<name>_keep.png`, the image with every pixel of other classes
transparent. For every video (read and written frame by frame with PyAV, in
batches, so memory stays constant), OUT gets `<name>_overlay.mp4` and, with
`--keep`, `<name>_keep.mp4` where everything else is black; frame rate, size
and frame count are the input's. Files inside a folder keep their relative
path under OUT/<folder name>/. An input that cannot be read is reported by
name, the others are still processed, and the exit status is then 1.

Images are read as training reads them (any bit depth, EXIF orientation
applied). --config may be left out: the run folder's config.json (written
by training) is read, with the class names and palette of the data it was
trained on; overrides (--config.a.b=value) still apply.
"""

# First: the host allocator's settings (before JAX is imported:
# seg_jax.host_memory), and Ctrl-C is clean from here on.
from seg_jax import host_memory, interrupt

if __name__ == '__main__':
  host_memory.configure()
if __name__ in ('__main__', '__mp_main__'):
  interrupt.install('outputs written so far are kept')

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import fractions
import functools
import os
import signal
import sys

import jax
import numpy as np
from absl import flags, logging
from PIL import Image

from seg_jax import cli, errors
from seg_jax.data import files

FLAGS = flags.FLAGS

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg',
                    '.mpeg', '.wmv')
# What an input named <name> gives under --out.
OUTPUT_SUFFIXES = ('.png', '_overlay.jpg', '_keep.png', '_overlay.mp4',
                   '_keep.mp4')


def output_suffixes(path, keep):
  """The suffixes of the files written for the input `path` (an image or a
  video), with `--keep` or without."""
  if path.lower().endswith(VIDEO_EXTENSIONS):
    return ('_overlay.mp4', '_keep.mp4') if keep else ('_overlay.mp4',)
  return ('.png', '_overlay.jpg', '_keep.png') if keep else (
      '.png', '_overlay.jpg')


def find_inputs(paths, keep=False):
  """[(path, output name)] for files as given and every image or video in
  the given folders (sorted; names keep the path under the folder; linked
  folders followed and hidden ones left out, as the folder dataset reads
  them); no two inputs write the same file (`_unique_names`, with the
  outputs of `--keep` when `keep`)."""
  found = []
  for path in paths:
    if not os.path.isdir(path):
      found.append((path, os.path.splitext(os.path.basename(path))[0]))
      continue
    # The folder's own name, also when given as '.' or '..'.
    top = os.path.basename(os.path.abspath(path))
    for root, _, names in files.walk(path):
      for name in names:
        if name.startswith('.'):
          continue  # hidden files, as training (`files.walk`: folders)
        if name.lower().endswith(files.IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
          full = os.path.join(root, name)
          rel = os.path.splitext(os.path.relpath(full, path))[0]
          found.append((full, os.path.join(top, rel)))
  return _unique_names(found, keep)


def input_share(found, f=None, environ=None):
  """(this process's share of `found`, a note for the last line) in a job
  of several processes started by a launcher (`JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`, or Slurm's tasks): every n-th input from the
  process's id, so that the processes split the work and write different
  files; (`found`, '') in one process."""
  env = os.environ if environ is None else environ
  wanted, _, n, pid = cli.distributed_settings(f, env)
  if not wanted:
    return found, ''
  if n is None and pid is None and 'SLURM_PROCID' in env:
    n, pid = int(env['SLURM_NTASKS']), int(env['SLURM_PROCID'])
  if n is None or pid is None:
    raise errors.ConfigError(
        'predict in a job of several processes splits the inputs by process '
        'id: set JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run it as one '
        'process.')
  mine = found[pid::n]
  return mine, (f' (process {pid} of {n}: {len(mine)} of the '
                f'{len(found)} inputs)')


def check_found(paths, found):
  """Raises `ConfigError` for a given path that does not exist (a typo,
  found before the checkpoint is read) and for a given folder in which
  `find_inputs` found no image or video (a wrong path, or files of another
  type): nothing would be predicted for it, silently."""
  for path in paths:
    if not os.path.exists(path):
      raise errors.ConfigError(f'{path} does not exist: check the path (give '
                               'images, videos or folders of them).')
    if not os.path.isdir(path):
      continue
    folder = os.path.abspath(path)
    if not any(os.path.abspath(p).startswith(os.path.join(folder, ''))
               for p, _ in found):
      raise errors.ConfigError(
          f'{path} holds no image or video to predict (read recursively: '
          f'{" ".join(files.IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)}; hidden '
          'files left out): check the path.')


def check_out(out, inputs, found):
  """Raises `ConfigError` unless `out` is a folder (or a new path) whose
  outputs (`OUT/<name><suffix>` of each input in `found`) overwrite no
  input, land in no input folder (linked subfolders included: they would
  be mixed with the inputs, and read as inputs by the next run) nor beside
  a single input image, and overwrite no `.png` that is not an earlier
  prediction (one without its `_overlay.jpg`, e.g. a ground-truth mask)."""
  cli.check_not_a_file(out)
  sources = {os.path.realpath(path): path for path, _ in found}
  for _, name in found:
    for suffix in OUTPUT_SUFFIXES:
      target = os.path.realpath(os.path.join(out, name + suffix))
      if target in sources:
        raise errors.ConfigError(
            f'--out={out} would overwrite the input {sources[target]} with '
            'an output; give another --out.')
  # The input folders and every folder an image was found in (linked
  # subfolders included, wherever their real folder is).
  folders = {os.path.realpath(p): p for p in inputs if os.path.isdir(p)}
  for path, name in found:
    if os.sep in name:
      folders.setdefault(os.path.realpath(os.path.dirname(path)),
                         os.path.dirname(path))
  real = functools.lru_cache(maxsize=None)(os.path.realpath)
  wheres = {real(os.path.dirname(os.path.join(out, n))) for _, n in found}
  for where in sorted(wheres | {real(out)}):
    for folder, shown in folders.items():
      if _within(where, folder):
        raise errors.ConfigError(
            f'--out={out} puts outputs in {where}, inside the input folder '
            f'{shown or "."}: they would be written among the images (and '
            'read as inputs by the next run); give an --out outside it.')
  for path, name in found:
    if real(os.path.dirname(os.path.join(out, name))) == real(
        os.path.dirname(path) or '.'):
      raise errors.ConfigError(
          f'--out={out} puts the outputs of {path} beside it, under its '
          'name with other extensions; give an --out outside its folder.')
    _check_earlier_prediction(out, path, name)


def _check_earlier_prediction(out, path, name):
  """Raises `ConfigError` if a file that predicting `path` writes as
  `OUT/name...` is there but is not part of an earlier prediction: an
  image's label map is written with its overlay (a `.png` or
  `_overlay.jpg` without the other, e.g. a ground-truth mask, and a
  `_keep.png` without both are a user's files); a video's `_keep.mp4` is
  written with its `_overlay.mp4`."""
  video = path.lower().endswith(VIDEO_EXTENSIONS)
  written = output_suffixes(path, keep=True)
  pair = written[:1] if video else written[:2]
  there = [s for s in written if os.path.exists(os.path.join(out, name + s))]
  missing = [os.path.basename(name) + s for s in pair if s not in there]
  if there and missing:
    target = os.path.join(out, name + there[0])
    raise errors.ConfigError(
        f'--out={out} would overwrite {target}, which is not an earlier '
        f'prediction (no {" and ".join(missing)} beside it); give another '
        '--out.')


def _within(path, folder):
  """Whether `path` is `folder` or inside it (both real paths)."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_flags(batch_size, size_multiple, alpha):
  """Raises `ConfigError` naming the first out-of-range flag."""
  if batch_size < 1:
    raise errors.ConfigError(f'--batch_size={batch_size}; use 1 or more.')
  if size_multiple < 1:
    raise errors.ConfigError(f'--size_multiple={size_multiple}; use 1 or '
                             'more (8 by default).')
  if not 0 <= alpha <= 1:
    raise errors.ConfigError(f'--alpha={alpha}; use a weight from 0 (the '
                             'image only) to 1 (the class colours only).')


def _unique_names(found, keep=False):
  """`found` with each output name whose files (`output_suffixes`) another
  input's would overwrite given a suffix (_2, _3, ...), and a warning
  naming both inputs: `a.png` and `a.jpg`, or with `--keep` `a.jpg` and
  `a_keep.png` (whose label map is `a.jpg`'s cut-out's file name)."""
  claimed, out = {}, []  # output file name -> the input writing it
  for path, name in found:
    suffixes = output_suffixes(path, keep)
    base, k = name, 1
    while any(name + s in claimed for s in suffixes):
      k += 1
      name = f'{base}_{k}'
    if name != base:
      taken = next(base + s for s in suffixes if base + s in claimed)
      logging.warning('%s is written as %s.* (%s is %s\'s)', path,
                      name, taken, claimed[taken])
    claimed.update((name + s, path) for s in suffixes)
    out.append((path, name))
  return out


def parse_keep(tokens, class_names):
  """Class ids from names (any case) or ids; an unknown one is an error
  listing the valid names."""
  lower = {n.lower(): i for i, n in enumerate(class_names)}
  ids = []
  for token in tokens:
    if token.isdigit() and int(token) < len(class_names):
      ids.append(int(token))
    elif token.lower() in lower:
      ids.append(lower[token.lower()])
    else:
      raise errors.ConfigError(
          f'--keep={token!r} is not a class of this model; use ids '
          f'0..{len(class_names) - 1} or names: {", ".join(class_names)}.')
  return sorted(set(ids))


class Predictor:
  """Label maps for lists of images, one device batch at a time.

  A batch holds images of one canvas size, their own size rounded up to a
  multiple of `size_multiple` (padded with the mean, as evaluation pads),
  and is always `batch_size` long: an image's labels depend on itself
  only, not on what it is batched with, and each canvas size compiles
  once. Label maps come back at each image's own size. Where a full batch
  of a canvas does not fit in memory (e.g. one 12-megapixel photo among
  small images), that canvas's images go one at a time; out-of-memory
  errors are raised only where one image alone does not fit.
  """

  def __init__(self, config, model, variables, spec, batch_size,
               refiner=None, size_multiple=8):
    """`refiner`: an optional refinement step (e.g. `crf.Refiner`), as in
    `evaluators.Evaluator`."""
    from seg_jax import inference  # pylint: disable=g-import-not-at-top
    from seg_jax.data import transforms  # pylint: disable=g-import-not-at-top
    self.variables, self.batch_size = variables, batch_size
    self.spec = spec
    self.size_multiple = size_multiple
    self.refiner = refiner
    self.channels = config.data.channels
    self.fill = transforms.fill_value(config.data.mean)
    self.step = inference.make_predict_step(
        model, config, spec, with_logits=refiner is not None)
    self.one_at_a_time = set()  # canvases a full batch of which did not fit

  def out_of_memory(self, canvas=None):
    """What to say when `canvas`-sized images (None: a video's frames)
    did not fit, one at a time where a full batch did not either."""
    hints = ['--evaluator=slide (windows of the training crop)'] if (
        self.spec.mode == 'whole') else []
    what = (f'{canvas[0]}x{canvas[1]} (HxW) images' if canvas else
            'its frames')
    return (f'out of memory predicting {what} one at a time; '
            + (f'use {" or ".join(hints)}.' if hints else
               'too large for this machine.'))

  def canvas(self, image):
    """The batch canvas of an image: its size rounded up to the multiple."""
    m = self.size_multiple
    return tuple(-(-n // m) * m for n in image.shape[:2])

  def __call__(self, images):
    """(H_i, W_i) int32 label maps of up to `batch_size` uint8 images
    (H_i, W_i, data.channels) that have one `canvas`."""
    assert 0 < len(images) <= self.batch_size
    canvas = self.canvas(images[0])
    assert all(self.canvas(i) == canvas for i in images)
    if self.batch_size > 1 and canvas not in self.one_at_a_time:
      try:
        return self._predict(images, self.batch_size)
      except jax.errors.JaxRuntimeError as e:
        if not errors.out_of_memory(e):
          raise
      self.one_at_a_time.add(canvas)
      logging.warning('%dx%d (HxW) images do not fit %d at a time in memory: '
                      'predicting them one at a time.', *canvas,
                      self.batch_size)
    return [label for image in images for label in self._predict([image], 1)]

  def _predict(self, images, batch_size):
    h, w = self.canvas(images[0])
    batch = np.empty((batch_size, h, w, self.channels), np.uint8)
    batch[...] = self.fill
    sizes = np.tile(np.array([h, w], np.int32), (batch_size, 1))
    for k, image in enumerate(images):
      batch[k, :image.shape[0], :image.shape[1]] = image
      sizes[k] = image.shape[:2]
    out = self.step(self.variables, batch, sizes)
    if self.refiner is None:
      out = np.asarray(out)
      return [out[k, :s[0], :s[1]] for k, s in enumerate(sizes[:len(images)])]
    logits = np.asarray(out[1])
    return [np.asarray(self.refiner(
        image, logits[k, :image.shape[0], :image.shape[1]])).argmax(-1)
            for k, image in enumerate(images)]


@dataclasses.dataclass
class Outputs:
  """Where and how results are written."""
  folder: str
  palette: np.ndarray
  keep: list
  alpha: float

  def path(self, name, suffix):
    path = os.path.join(self.folder, name + suffix)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  def overlay(self, image, label):
    from seg_jax import labels  # pylint: disable=g-import-not-at-top
    return labels.overlay(image, label, self.palette, self.alpha)

  def cut_out(self, image, label, transparent):
    """Kept classes as they are; the rest transparent (RGBA) or black."""
    from seg_jax import labels  # pylint: disable=g-import-not-at-top
    kept = np.isin(label, self.keep)
    image = labels.display_rgb(image)
    if transparent:
      return np.dstack([image, np.where(kept, 255, 0).astype(np.uint8)])
    return np.where(kept[..., None], image, 0).astype(np.uint8)

  def write_image(self, name, image, label):
    indexed = Image.fromarray(label.astype(np.uint8), mode='P')
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(self.palette)] = self.palette
    indexed.putpalette(palette.ravel().tolist())
    indexed.save(self.path(name, '.png'))
    Image.fromarray(self.overlay(image, label)).save(
        self.path(name, '_overlay.jpg'), quality=92)
    if self.keep:
      Image.fromarray(self.cut_out(image, label, True), 'RGBA').save(
          self.path(name, '_keep.png'))


class _VideoWriter:
  """An H.264 (or MPEG-4 Part 2) video written frame by frame with PyAV."""

  def __init__(self, path, rate, width, height):
    import av  # pylint: disable=g-import-not-at-top
    self._container = av.open(path, 'w')
    codec = 'libx264' if 'libx264' in av.codecs_available else 'mpeg4'
    self._stream = self._container.add_stream(codec, rate=rate)
    self._stream.width, self._stream.height = width, height
    # 4:2:0 needs even sides; x264 takes odd ones in 4:4:4.
    even = width % 2 == 0 and height % 2 == 0
    self._stream.pix_fmt = 'yuv420p' if even or codec != 'libx264' \
        else 'yuv444p'
    self._av = av

  def write(self, rgb):
    frame = self._av.VideoFrame.from_ndarray(rgb, format='rgb24')
    for packet in self._stream.encode(frame):
      self._container.mux(packet)

  def close(self):
    for packet in self._stream.encode():
      self._container.mux(packet)
    self._container.close()


def predict_video(path, name, predictor, outputs, progress=None):
  """Overlay (and cut-out) videos of `path`; returns the frame count."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as source:
    stream = source.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
    width, height = stream.codec_context.width, stream.codec_context.height
    writers = [(_VideoWriter(outputs.path(name, '_overlay.mp4'), rate, width,
                             height), outputs.overlay)]
    if outputs.keep:
      writers.append((_VideoWriter(outputs.path(name, '_keep.mp4'), rate,
                                   width, height),
                      lambda im, lab: outputs.cut_out(im, lab, False)))
    count, batch = 0, []

    def flush():
      for image, label in zip(batch, predictor(batch)):
        for writer, render in writers:
          writer.write(render(image, label))
      if progress is not None:
        progress(len(batch), stream.frames or None)
      batch.clear()

    try:
      for frame in source.decode(stream):
        batch.append(frame.to_ndarray(format='rgb24'))
        count += 1
        if len(batch) == predictor.batch_size:
          flush()
          if interrupt.received():  # stop: the video ends here, complete
            break
      if batch:
        flush()
    finally:
      for writer, _ in writers:
        writer.close()
  return count


# Images held waiting for a full batch of their canvas size, at most this
# many batches' worth: past it the fullest queue goes as a partial batch
# (a folder of many sizes is then predicted as it is read, not at the end).
HELD_BATCHES = 4


def predict_images(items, predictor, outputs, progress=None):
  """Writes the outputs of every readable image; returns (images written,
  failures). A batch that runs out of memory fails its images (with what
  to change) and the others go on. After a stop signal
  (`interrupt.deferred`) the batch in progress is finished and nothing
  more is read or predicted.

  Images wait in one queue per canvas size until a batch is full; at most
  `HELD_BATCHES` batches' worth are held, past which the fullest queue is
  predicted as it is.
  """
  from seg_jax.data import files  # pylint: disable=g-import-not-at-top
  failures, queues, written = [], {}, 0

  def flush(queue):
    nonlocal written
    try:
      labels = predictor([image for _, _, image in queue])
    except jax.errors.JaxRuntimeError as e:
      if not errors.out_of_memory(e):
        raise
      reason = predictor.out_of_memory(predictor.canvas(queue[0][2]))
      failures.extend((path, f'{path}: {reason}') for path, _, _ in queue)
      labels = None
    for (_, name, image), label in zip(queue, labels or ()):
      outputs.write_image(name, image, label)
      written += 1
    if progress is not None:
      progress(len(queue))
    queue.clear()

  for path, name in items:
    if interrupt.received():  # stop: nothing more is read
      return written, failures
    try:
      image = files.read_image(path, predictor.channels)
    except (files.BadSampleError, OSError) as e:
      reason = str(e)
      if isinstance(e, files.ChannelCountError):  # the model's is fixed
        reason = (f'{e.found}, but the model was trained on '
                  f'data.channels={predictor.channels}: convert the image.')
      failures.append((path, reason))
      if progress is not None:
        progress(1)
      continue
    queue = queues.setdefault(predictor.canvas(image), [])
    queue.append((path, name, image))
    if len(queue) == predictor.batch_size:
      flush(queue)
    elif (sum(map(len, queues.values())) >
          HELD_BATCHES * predictor.batch_size):
      flush(max(queues.values(), key=len))
  for queue in queues.values():
    if queue and not interrupt.received():
      flush(queue)
  return written, failures


def _bar(total, unit, desc):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr,
              mininterval=2.0)


def run(inputs, predictor, outputs, found=None):
  """Predicts every input (`found`: `find_inputs(inputs)` when already
  listed); returns (images done, frames done, failures)."""
  found = find_inputs(inputs) if found is None else found
  videos = [f for f in found if f[0].lower().endswith(VIDEO_EXTENSIONS)]
  images = [f for f in found if f not in videos]
  failures, done, frames = [], 0, 0
  if images:
    with _bar(len(images), 'img', 'images') as bar:
      done, failures = predict_images(images, predictor, outputs, bar.update)
  for path, name in videos:
    if interrupt.received():
      break
    if predictor.channels != 3:
      failures.append((path, f'{path}: videos are RGB but the model takes '
                             f'data.channels={predictor.channels}.'))
      continue
    written = []  # frames per batch written, counted if the video fails
    try:
      with _bar(None, 'frame', os.path.basename(path)) as bar:
        predict_video(path, name, predictor, outputs,
                      lambda n, total, b=bar: (written.append(n),
                                               _advance(b, n, total)))
    except Exception as e:  # pylint: disable=broad-except
      # PyAV raises many types for a bad file; the other inputs go on.
      if errors.out_of_memory(e):
        failures.append((path, f'{path}: the first {sum(written)} frames are '
                               f'written; {predictor.out_of_memory()}'))
      else:
        reason = getattr(e, 'strerror', None) or f'{type(e).__name__}: {e}'
        failures.append((path,
                         f'{path}: cannot be read as a video ({reason}).'))
    frames += sum(written)
  return done, frames, failures


def _advance(bar, n, total):
  if total and bar.total != total:
    bar.total = total
  bar.update(n)


def _define_flags():
  """The CLI's flags; defined only when run as a program, so that the
  module can be imported (by tests, by other programs) without them."""
  cli.define_run_flags('The configuration the checkpoint was trained with.',
                       'The training run folder (holds checkpoints/ and '
                       'config.json).')
  cli.define_inference_flags()
  flags.DEFINE_string('out', None, 'Output folder (created).')
  flags.DEFINE_list('keep', [], 'Class names or ids to keep in cut-outs; '
                    'everything else becomes transparent (images) or black '
                    '(videos).')
  flags.DEFINE_integer('batch_size', 8, 'Images or frames per device batch.')
  flags.DEFINE_integer('size_multiple', 8, 'Images are padded to a multiple '
                       'of this (one compile per padded size): larger values '
                       'compile less for folders of many sizes, smaller ones '
                       'pad less.')
  flags.DEFINE_float('alpha', 0.5, 'Weight of the class colours in overlays.')
  flags.mark_flags_as_required(['out'])


def main(argv):
  inputs = argv[1:]
  if not inputs:
    raise errors.ConfigError('Give one or more images, folders or videos to '
                             'predict after the flags.')
  if FLAGS.distributed:
    raise errors.ConfigError('predict runs in one process; drop '
                             '--distributed.')
  check_flags(FLAGS.batch_size, FLAGS.size_multiple, FLAGS.alpha)
  cli.check_not_in_checkpoints(FLAGS.workdir)
  cli.check_run_config(cli.require_config(), FLAGS.workdir)
  found = find_inputs(inputs, keep=bool(FLAGS.keep))
  check_found(inputs, found)
  check_out(FLAGS.out, inputs, found)
  found, share = input_share(found)
  cli.enable_compilation_cache(FLAGS.config.compilation_cache_dir)
  from seg_jax import (checkpoint, crf, data, inference,  # pylint: disable=g-import-not-at-top
                       sharding)
  config = FLAGS.config
  class_names, palette = data.class_info(config)
  keep = parse_keep(FLAGS.keep, class_names)
  name, = cli.inference_names(config, one=True)
  spec = inference.spec_from_config(config, name)
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  model, variables, step = checkpoint.restore_for_inference(
      config, FLAGS.workdir, mesh, FLAGS.checkpoint)
  predictor = Predictor(config, model, variables, spec, FLAGS.batch_size,
                        crf.Refiner(crf.CRFParams.from_config(config))
                        if FLAGS.crf else None, FLAGS.size_multiple)
  # Made (and checked writable) once the checkpoint is read, before any
  # image is: a run refused earlier leaves no empty folder behind.
  cli.make_folder(FLAGS.out)
  # A stop signal finishes the batch in progress and closes the files being
  # written (a video stopped midway ends at its last frame, playable).
  with interrupt.deferred(what=(
      'finishing the batch in progress, then stopping',
      'the outputs written so far are kept, the one being written may be '
      'cut short')):
    done, frames, failures = run(
        inputs, predictor, Outputs(FLAGS.out, palette, keep, FLAGS.alpha),
        found)
    stopped = interrupt.received()
  if stopped:
    print(f'Stopped by {stopped}: {done} images, {frames} video frames '
          f'written, each output complete -> {FLAGS.out}', flush=True)
    sys.exit(128 + getattr(signal, stopped))
  for path, reason in failures:
    print(f'Failed: {reason if path in reason else f"{path}: {reason}"}',
          file=sys.stderr)
  logging.info('Checkpoint step %d, inference %s%s.', step, name,
               ' + CRF' if FLAGS.crf else '')
  print(f'Predicted: {done} images, {frames} video frames, {len(failures)} '
        f'failed -> {FLAGS.out}{share}', flush=True)
  if failures:
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
