"""predict on folders of mixed sizes and on video, the StableHLO export and
its loader in a fresh process, and the dense CRF."""

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from seg_jax import (checkpoint, crf, errors, evaluators, inference, predict,
                     sharding)
from seg_jax.data import shapes

from conftest import REPO

TINY = 'configs/unet_shapes_tiny.py'
SIZES = {'a.png': (32, 32), 'b.jpg': (40, 48), 'c.png': (24, 36)}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir holding a checkpoint of the tiny model, and the in-process
  model and variables it restores to. The classifier (the last 1x1 conv)
  gets seeded random weights and the bias that centres its logits on shapes
  images, so its labels follow the features and several classes appear in
  each image (a predictor that wrote one class everywhere would fail)."""
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  from seg_jax import state, train  # pylint: disable=g-import-not-at-top
  config = unet_shapes_tiny.get_config()
  workdir = str(tmp_path_factory.mktemp('run'))
  trainer = train.Trainer(config, workdir)
  params = dict(trainer.state.params)
  kernel = np.random.default_rng(1).normal(size=(1, 1, 4, 5))
  params['Conv_0'] = {'kernel': jnp.asarray(kernel, jnp.float32),
                      'bias': jnp.zeros(5, jnp.float32)}
  images = np.stack([_image(32, 32, k) for k in range(3)])
  logits = state.create_model(config).apply(
      {'params': params, 'batch_stats': trainer.state.batch_stats},
      inference.normalize(images, config.data.mean, config.data.std),
      train=False)
  params['Conv_0']['bias'] = -jnp.mean(logits, (0, 1, 2))
  trainer.checkpointer.maybe_save(1, trainer.state.replace(params=params),
                                  iter(trainer.train_ds), force=True)
  trainer.checkpointer.close()
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  model, variables, step = checkpoint.restore_for_inference(config, workdir, mesh)
  assert step == 1
  spec = inference.spec_from_config(config, 'whole')
  return config, workdir, predict.Predictor(config, model, variables, spec, 4)


def _image(h, w, seed):
  """A shapes image cropped/tiled to (h, w)."""
  big = shapes.make_example(0, 'val', seed, size=64)['image']
  return np.ascontiguousarray(big[:h, :w])


def _write_inputs(folder):
  folder.mkdir()
  for k, (name, (h, w)) in enumerate(SIZES.items()):
    Image.fromarray(_image(h, w, k)).save(folder / name, quality=95)
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  (folder / 'video').mkdir()
  frames = [_image(32, 48, 10 + k) for k in range(13)]
  import av  # pylint: disable=g-import-not-at-top
  with av.open(str(folder / 'video' / 'clip.mp4'), 'w') as out:
    stream = out.add_stream('libx264', rate=10)
    stream.width, stream.height, stream.pix_fmt = 48, 32, 'yuv420p'
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame,
                                                             format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def _decode(path):
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as source:
    stream = source.streams.video[0]
    frames = [f.to_ndarray(format='rgb24') for f in source.decode(stream)]
    return frames, stream.average_rate


def test_predict_folder_and_video_with_keep_and_a_corrupt_file(run,
                                                               tmp_path):
  config, workdir, predictor = run
  inputs, out = tmp_path / 'in', tmp_path / 'out'
  _write_inputs(inputs)
  (tmp_path / 'broken.mp4').write_bytes(b'not a video' * 100)
  (tmp_path / 'notes.txt').write_text('a text file named by mistake')
  proc = subprocess.run(
      [sys.executable, '-m', 'seg_jax.predict', f'--config={TINY}',
       f'--workdir={workdir}', f'--out={out}', '--keep=circle,2',
       str(inputs), str(tmp_path / 'broken.mp4'), str(tmp_path / 'notes.txt')],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]  # 3 inputs failed...
  assert 'broken.jpg: cannot decode image' in proc.stderr
  assert re.search(r'^Failed: .*notes.txt: not an image file \(its type is '
                   r'none that is read: .jpg, .jpeg, .png, .bmp, .tif, .tiff, '
                   r'.webp, .gif\)\.$', proc.stderr, re.M), proc.stderr[-2000:]
  assert re.search(r'^Failed: .*broken.mp4: cannot be read as a video '
                   r'\(Invalid data found when processing input\)\.$',
                   proc.stderr, re.M), proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1].startswith(
      'Predicted: 3 images, 13 video frames, 3 failed')  # ...the rest ran
  palette = np.zeros((256, 3), np.uint8)
  palette[:5] = shapes.PALETTE
  seen = set()  # the classes predicted
  for name, (h, w) in SIZES.items():
    stem = out / 'in' / os.path.splitext(name)[0]
    with Image.open(f'{stem}.png') as im:
      assert im.mode == 'P' and im.size == (w, h)
      np.testing.assert_array_equal(
          np.asarray(im.getpalette(), np.uint8).reshape(-1, 3)[:256], palette)
      label = np.asarray(im)
    image = np.asarray(Image.open(inputs / name).convert('RGB'))
    expected, = predictor([image])  # same labels as in this process
    np.testing.assert_array_equal(label, expected)
    assert len(np.unique(label)) >= 2, np.unique(label)  # not one class
    seen.update(np.unique(label).tolist())
    with Image.open(f'{stem}_overlay.jpg') as im:
      assert im.size == (w, h)
    with Image.open(f'{stem}_keep.png') as im:
      rgba = np.asarray(im)
    assert rgba.shape == (h, w, 4)
    np.testing.assert_array_equal(rgba[..., 3] == 255, np.isin(label, [1, 2]))
    np.testing.assert_array_equal(rgba[..., :3], image)
  assert len(seen) >= 3, seen
  assert not (out / 'in' / 'broken.png').exists()
  _check_videos(out / 'in' / 'video', inputs / 'video' / 'clip.mp4',
                predictor)


def _check_videos(stem, source, predictor):
  frames_in, rate_in = _decode(str(source))
  overlay, rate = _decode(f'{stem}/clip_overlay.mp4')
  kept, _ = _decode(f'{stem}/clip_keep.mp4')
  assert len(overlay) == len(kept) == len(frames_in) == 13
  assert rate == rate_in == 10
  assert overlay[0].shape == kept[0].shape == (32, 48, 3)
  labels = [l for k in range(0, 13, 4)
            for l in predictor(frames_in[k:k + 4])]
  kept_mask = np.isin(np.stack(labels), [1, 2])
  kept = np.stack(kept).astype(np.float32)
  # Lossy video: everything not kept is black up to codec noise.
  assert kept[~kept_mask].mean() < 12
  if kept_mask.any():
    assert kept[kept_mask].mean() > 40


def test_exported_model_in_a_fresh_process_matches_predict(run, tmp_path):
  config, workdir, predictor = run
  from seg_jax import export  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'tiny.stablehlo')
  meta = export.export_model(config, workdir, path)
  assert meta['input_size'] == [32, 32] and meta['step'] == 1
  images = np.stack([_image(32, 32, k) for k in range(3)])
  np.save(tmp_path / 'images.npy', images)
  code = (
      'import sys, numpy as np\n'
      'from seg_jax.export import load\n'
      f'predict, meta = load({path!r})\n'
      f'images = np.load({str(tmp_path / "images.npy")!r})\n'
      'np.save(sys.argv[1], np.concatenate([predict(images),\n'
      '                                     predict(images[1:2])]))\n'
      'print(sorted(m for m in sys.modules if m.split(".")[0] in\n'
      '             ("flax", "optax", "orbax", "tensorflow")\n'
      '             or m in ("seg_jax.state", "seg_jax.train",\n'
      '                      "seg_jax.models")))\n')
  out = subprocess.run([sys.executable, '-c', code,
                        str(tmp_path / 'labels.npy')], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == '[]'
  got = np.load(tmp_path / 'labels.npy')
  expected = np.stack(predictor(list(images)))
  np.testing.assert_array_equal(got[:3], expected)  # batch of 3
  np.testing.assert_array_equal(got[3], expected[1])  # batch of 1
  with open(path + '.json') as f:
    written = json.load(f)
  assert written['class_names'][1] == 'circle'
  assert written['evaluator'] == {'mode': 'whole', 'scales': [1.0],
                                  'flip': False}


def test_host_mirror_fill_is_the_inference_canvas_fill():
  """`mirror.onto_canvas` (the exported models' loaders) fills a canvas as
  `inference.mirror_beyond` does on device, a canvas over twice the image
  included."""
  from seg_jax import mirror  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).integers(0, 255, (2, 5, 7, 3), np.uint8)
  canvas = np.zeros((2, 16, 12, 3), np.uint8)
  canvas[:, :5, :7] = images
  want = np.asarray(inference.mirror_beyond(
      jnp.asarray(canvas), jnp.array([[5, 7], [5, 7]], jnp.int32)))
  np.testing.assert_array_equal(mirror.onto_canvas(images, 16, 12, 'x'), want)
  np.testing.assert_array_equal(mirror.onto_canvas(images, 5, 7, 'x'), images)
  with pytest.raises(ValueError, match=r'^m.onnx takes images of at most '
                     r'4x7 \(HxW\); got 5x7'):
    mirror.onto_canvas(images, 4, 7, 'm.onnx')
  with pytest.raises(ValueError, match=r'^m.onnx takes uint8 images \(values '
                     r'0..255\); got float32'):
    mirror.onto_canvas(images.astype(np.float32) / 255, 16, 12, 'm.onnx')
  with pytest.raises(ValueError, match=r'^m.onnx: no image in the batch'):
    mirror.onto_canvas(images[:0], 16, 12, 'm.onnx')


def test_loaders_warn_once_per_size_filled_under_a_rescaling_inference():
  """Images smaller than an export whose inference rescales or flips are
  inferred as images of the export's size (its resize and flip take the
  mirror-filled canvas whole): the loaders warn, once per size; not for
  images of the export's size, nor under an inference at scale 1 without
  flip (the canvas beyond the image then changes only what the model sees
  near its border)."""
  from seg_jax import mirror  # pylint: disable=g-import-not-at-top
  images = np.zeros((2, 5, 7, 3), np.uint8)
  run = lambda canvas: np.ones(canvas.shape[:3], np.int32)

  def warnings_of(spec, *batches):
    warned = set()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      for batch in batches:
        labels = mirror.predict_on_canvas(run, batch, 8, 8, 3, 'm.onnx',
                                          {'evaluator': spec}, warned)
        assert labels.shape == batch.shape[:3]
    return [str(w.message) for w in caught]

  scaled = {'mode': 'whole', 'scales': [0.6], 'flip': True}
  assert warnings_of(scaled, images, images, images[:, :4]) == [
      "m.onnx: images of 5x7 are mirror-filled to the export's 8x8, which "
      'its inference (scales (0.6,), flip True) takes whole as the image: '
      "labels near a tie can differ from evaluate's; export with "
      '--size=5,7 for images of this size.',
      "m.onnx: images of 4x7 are mirror-filled to the export's 8x8, which "
      'its inference (scales (0.6,), flip True) takes whole as the image: '
      "labels near a tie can differ from evaluate's; export with "
      '--size=4,7 for images of this size.']
  assert not warnings_of(scaled, np.zeros((1, 8, 8, 3), np.uint8))
  assert not warnings_of({'mode': 'whole', 'scales': [1.0], 'flip': False},
                         images)
  assert len(warnings_of({'mode': 'slide', 'scales': [1.0], 'flip': True},
                         images)) == 1


def test_parse_keep_and_output_names(tmp_path, caplog):
  names = ('background', 'circle', 'ring')
  assert predict.parse_keep(['Ring', '1', 'circle'], names) == [1, 2]
  with pytest.raises(Exception, match=r"--keep='car'.*background, circle"):
    predict.parse_keep(['car'], names)
  (tmp_path / 'f' / 'sub').mkdir(parents=True)
  for p in ('f/x.png', 'f/sub/x.jpg', 'f/notes.txt', 'x.png'):
    (tmp_path / p).write_bytes(b'')
  found = predict.find_inputs([str(tmp_path / 'f'), str(tmp_path / 'x.png'),
                               str(tmp_path / 'x.png')])
  assert [n for _, n in found] == [os.path.join('f', 'x'),
                                   os.path.join('f', 'sub', 'x'), 'x', 'x_2']
  assert f'{tmp_path}/x.png is written as x_2.* (x.png is {tmp_path}/x.png' \
      "'s)" in caplog.text
  # With --keep, x_keep.png is both x.jpg's cut-out and x_keep.jpg's label
  # map: the later input is renamed, and so on (without --keep nothing
  # collides).
  (tmp_path / 'k').mkdir()
  for p in ('k/x.jpg', 'k/x_keep.jpg', 'k/x_keep_2.jpg'):
    (tmp_path / p).write_bytes(b'')
  names = lambda keep: [n for _, n in predict.find_inputs(
      [str(tmp_path / 'k')], keep=keep)]
  assert names(False) == [os.path.join('k', n) for n in (
      'x', 'x_keep', 'x_keep_2')]
  assert names(True) == [os.path.join('k', n) for n in (
      'x', 'x_keep_2', 'x_keep_2_2')]
  assert (f'{tmp_path}/k/x_keep.jpg is written as k/x_keep_2.* (k/x_keep.png '
          f"is {tmp_path}/k/x.jpg's)") in caplog.text
  # A folder given as '.' or '..' is named as itself: its outputs stay in
  # OUT/<its name>/, never OUT/../ (outside OUT).
  for where, given in ((tmp_path / 'f', '.'), (tmp_path / 'f' / 'sub', '..'),
                       (tmp_path / 'f' / 'sub', '../')):
    with contextlib.chdir(where):
      assert [n for _, n in predict.find_inputs([given])] == [
          os.path.join('f', 'x'), os.path.join('f', 'sub', 'x')]


def test_processes_under_a_launcher_predict_their_share_of_the_inputs():
  """Each process of a launcher's job takes every n-th input from its id
  (no two write the same file; together, every input once); one process
  takes all; a job whose process id is unknown is refused."""
  import types  # pylint: disable=g-import-not-at-top
  f = types.SimpleNamespace(coordinator_address=None, num_processes=None,
                            process_id=None, distributed=None)
  found = [(f'x{i}.png', f'x{i}') for i in range(7)]
  shares = [predict.input_share(found, f, {'JAX_NUM_PROCESSES': '3',
                                           'JAX_PROCESS_ID': str(p)})
            for p in range(3)]
  assert [len(mine) for mine, _ in shares] == [3, 2, 2]
  assert sorted(x for mine, _ in shares for x in mine) == sorted(found)
  assert shares[1] == (found[1::3], ' (process 1 of 3: 2 of the 7 inputs)')
  slurm = {'SLURM_NTASKS': '2', 'SLURM_PROCID': '1',
           'SLURM_STEP_NODELIST': 'n1'}
  assert predict.input_share(found, f, slurm)[0] == found[1::2]
  assert predict.input_share(found, f, {}) == (found, '')
  with pytest.raises(errors.ConfigError, match=r'splits the inputs by '
                     r'process id: set JAX_NUM_PROCESSES and JAX_PROCESS_ID'):
    predict.input_share(found, f, {'TPU_WORKER_HOSTNAMES': 'a,b'})


def test_a_folder_with_nothing_to_predict_is_refused_by_name(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'a.txt').write_bytes(b'')
  (tmp_path / 'notes' / '.b.png').write_bytes(b'')  # hidden: left out
  (tmp_path / 'shots' / 'sub').mkdir(parents=True)
  (tmp_path / 'shots' / 'sub' / 'c.jpg').write_bytes(b'')
  for folder in ('empty', 'notes'):
    inputs = [str(tmp_path / 'shots'), str(tmp_path / folder)]
    with pytest.raises(errors.ConfigError,
                       match=f'{tmp_path / folder} holds no image or video'):
      predict.check_found(inputs, predict.find_inputs(inputs))
  inputs = [str(tmp_path / 'shots'), str(tmp_path / 'shots' / 'sub' / 'c.jpg')]
  predict.check_found(inputs, predict.find_inputs(inputs))  # no error
  inputs = [str(tmp_path / 'shots'), str(tmp_path / 'shtos')]  # a typo
  with pytest.raises(errors.ConfigError, match=rf'^{tmp_path}/shtos does not '
                     r'exist: check the path \(give images, videos or '
                     r'folders of them\).$'):
    predict.check_found(inputs, predict.find_inputs(inputs))


def test_inputs_follow_linked_folders_once(tmp_path):
  (tmp_path / 'f' / 'sub').mkdir(parents=True)
  (tmp_path / 'elsewhere').mkdir()
  for p in ('f/a.png', 'f/sub/b.png', 'elsewhere/c.jpg'):
    (tmp_path / p).write_bytes(b'')
  (tmp_path / 'f' / 'linked').symlink_to(tmp_path / 'elsewhere')
  (tmp_path / 'f' / 'sub' / 'loop').symlink_to(tmp_path / 'f')  # a cycle
  (tmp_path / 'f' / '.hidden').mkdir()
  (tmp_path / 'f' / '.hidden' / 'd.png').write_bytes(b'')
  (tmp_path / 'f' / '._a.png').write_bytes(b'')  # macOS's resource forks
  (tmp_path / 'f' / '__MACOSX').mkdir()
  (tmp_path / 'f' / '__MACOSX' / '._a.png').write_bytes(b'')
  found = predict.find_inputs([str(tmp_path / 'f')])
  assert [n for _, n in found] == [os.path.join('f', *p) for p in (
      ('a',), ('linked', 'c'), ('sub', 'b'))]


def test_outputs_never_land_on_or_among_the_inputs(tmp_path):
  (tmp_path / 'shots' / 'sub').mkdir(parents=True)
  for p in ('shots/cat.png', 'shots/sub/dog.jpg', 'one.jpg'):
    (tmp_path / p).write_bytes(b'')
  shots = str(tmp_path / 'shots')

  def check(out, *inputs):
    inputs = [str(tmp_path / i) for i in inputs]
    predict.check_out(str(tmp_path / out), inputs,
                      predict.find_inputs(inputs))

  # OUT/<folder name> is the input folder itself: cat.png -> cat.png.
  with pytest.raises(errors.ConfigError,
                     match=f'would overwrite the input {shots}/cat.png'):
    check('.', 'shots')
  for out in ('shots', 'shots/sub', 'shots/preds'):
    with pytest.raises(errors.ConfigError,
                       match=f'inside the input folder {shots}'):
      check(out, 'shots')
  (tmp_path / 'one.png').write_bytes(b'')  # the label map of one.jpg
  with pytest.raises(errors.ConfigError, match='would overwrite the input'):
    check('.', 'one.jpg', 'one.png')
  with pytest.raises(errors.ConfigError, match='is a file; give a folder'):
    check('one.jpg', 'shots')
  check('preds', 'shots', 'one.jpg')  # beside the inputs: fine
  check('.', 'shots/sub')  # OUT/sub/dog.png is not an input
  # OUT/<folder name> is the input folder: --out its parent.
  with pytest.raises(errors.ConfigError, match=r'puts outputs in .*shots/sub, '
                     r'inside the input folder .*shots/sub'):
    check('shots', 'shots/sub')
  with pytest.raises(errors.ConfigError, match=r'puts the outputs of .*one.jpg '
                     r'beside it'):
    check('.', 'one.jpg')
  (tmp_path / 'elsewhere').mkdir()
  (tmp_path / 'elsewhere' / 'e.png').write_bytes(b'')
  (tmp_path / 'shots' / 'lnk').symlink_to(tmp_path / 'elsewhere')
  with pytest.raises(errors.ConfigError, match=r'inside the input folder '
                     r'.*shots/lnk'):
    check('elsewhere/o', 'shots')
  # Ground-truth masks where the label maps would go: refused; earlier
  # predictions (a label map with its overlay) are replaced.
  (tmp_path / 'gt' / 'shots').mkdir(parents=True)
  (tmp_path / 'gt' / 'shots' / 'cat.png').write_bytes(b'')
  with pytest.raises(errors.ConfigError, match=r'would overwrite .*gt/shots/'
                     r'cat.png, which is not an earlier prediction'):
    check('gt', 'shots')
  (tmp_path / 'gt' / 'shots' / 'cat_overlay.jpg').write_bytes(b'')
  check('gt', 'shots')
  # A user's overlay, cut-out or video file without the output it is
  # written with.
  (tmp_path / 'clips').mkdir()
  (tmp_path / 'clips' / 'v.mp4').write_bytes(b'')
  for inputs, user_file, missing in (
      ('shots', 'shots/sub/dog_overlay.jpg', 'dog.png'),
      ('shots', 'shots/sub/dog_keep.png', 'dog.png and dog_overlay.jpg'),
      ('clips', 'clips/v_keep.mp4', 'v_overlay.mp4')):
    user_file = tmp_path / 'gt' / user_file
    user_file.parent.mkdir(parents=True, exist_ok=True)
    user_file.write_bytes(b'')
    with pytest.raises(errors.ConfigError, match=(
        f'would overwrite {user_file}, which is not an earlier prediction '
        f'\\(no {missing} beside it\\)')):
      check('gt', inputs)
    user_file.unlink()
  for output in ('v_keep.mp4', 'v_overlay.mp4'):  # an earlier prediction
    (tmp_path / 'gt' / 'clips' / output).write_bytes(b'')
  check('gt', 'clips')


def test_predict_flags_out_of_range_are_named():
  predict.check_flags(1, 1, 0.0)
  for args, flag in (((0, 8, .5), '--batch_size=0'),
                     ((-3, 8, .5), '--batch_size=-3'),
                     ((8, 0, .5), '--size_multiple=0'),
                     ((8, 8, 2.0), '--alpha=2.0'),
                     ((8, 8, -.1), '--alpha=-0.1')):
    with pytest.raises(errors.ConfigError, match=flag):
      predict.check_flags(*args)


# --- Dense CRF --------------------------------------------------------------


def _toy(h, w, seed=0, noise=1.0):
  """Three flat-coloured regions, their mask, and a noisy unary."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((h, w), np.int64)
  mask[:, w // 2:] = 1
  yy, xx = np.mgrid[0:h, 0:w]
  mask[(yy - h / 2) ** 2 + (xx - w / 4) ** 2 < (h / 5) ** 2] = 2
  colours = np.array([[200, 60, 60], [60, 60, 200], [60, 200, 60]])
  image = np.clip(colours[mask] + rng.normal(0, 10, (h, w, 3)), 0, 255)
  logits = np.eye(3)[mask] + rng.normal(0, noise, (h, w, 3))
  return image.astype(np.uint8), mask, logits.astype(np.float32)


def _miou(pred, mask):
  return np.mean([np.sum((pred == c) & (mask == c)) /
                  np.sum((pred == c) | (mask == c)) for c in range(3)])


def test_lattice_filter_approximates_the_exact_gaussian():
  """Against the N^2 Gaussian filter of the same (x, y, r, g, b) points."""
  image, _, _ = _toy(40, 40, seed=1, noise=0)
  y, x = np.mgrid[0:40, 0:40]
  features = np.concatenate([np.stack([x, y], -1).reshape(-1, 2) / 10.0,
                             image.reshape(-1, 3) / 13.0], 1)
  values = np.random.default_rng(2).normal(size=(1600, 3)).astype(np.float32)
  lattice = crf.build_lattice(features)
  assert np.allclose(lattice.weights.sum(1), 1.0, atol=1e-5)
  args = (jnp.asarray(lattice.offsets), jnp.asarray(lattice.weights),
          jnp.asarray(lattice.neighbours), lattice.num_vertices)
  approx = np.asarray(crf._lattice_filter(jnp.asarray(values), *args) /  # pylint: disable=protected-access
                      crf._lattice_filter(jnp.ones((1600, 1)), *args))  # pylint: disable=protected-access
  kernel = np.exp(-0.5 * ((features[:, None] - features[None]) ** 2).sum(-1))
  exact = kernel @ values / kernel.sum(1, keepdims=True)
  # 0.97 measured; against the same reference the colour-blind spatial
  # Gaussian scores 0.68 and no filtering 0.23.
  assert np.corrcoef(approx.ravel(), exact.ravel())[0, 1] > 0.95


@pytest.mark.parametrize('height, width', [
    (64, 64),
    (96, 136),  # not square, not a power of two
    pytest.param(512, 512, marks=pytest.mark.slow),  # a VOC-sized image
])
def test_crf_cleans_a_noisy_unary(height, width):
  image, mask, logits = _toy(height, width)
  before = _miou(logits.argmax(-1), mask)
  refined = np.asarray(crf.refine(image, logits, crf.CRFParams()))
  assert refined.shape == (height, width, 3) and np.all(np.isfinite(refined))
  after = _miou(refined.argmax(-1), mask)
  assert before < 0.6 and after > 0.95, (before, after)


def test_evaluation_with_crf_counts_the_refined_predictions(run,
                                                            tiny_config):
  """Evaluator with CRF = the model's logits refined image by image and
  counted in numpy."""
  _, workdir, _ = run
  tiny_config.data.shapes.num_val = 9
  from seg_jax import data  # pylint: disable=g-import-not-at-top
  source = data.create_source(tiny_config, 'val')
  mesh = sharding.create_mesh()
  model, variables, _ = checkpoint.restore_for_inference(tiny_config, workdir,
                                                    mesh)
  params = crf.CRFParams(iterations=3)
  result = evaluators.Evaluator('whole', tiny_config, model, mesh, source,
                                refiner=crf.Refiner(params)).run(variables)
  confusion = np.zeros((5, 5), np.int64)
  step = inference.make_predict_step(
      model, tiny_config, inference.spec_from_config(tiny_config, 'whole'),
      with_logits=True)
  for i in range(9):
    ex = source[i]
    _, logits = step(variables, ex['image'][None],
                     np.array([[32, 32]], np.int32))
    pred = np.asarray(crf.refine(ex['image'], np.asarray(logits)[0],
                                 params)).argmax(-1)
    keep = ex['label'] != 255
    np.add.at(confusion, (ex['label'][keep], pred[keep]), 1)
  np.testing.assert_array_equal(result.confusion, confusion)


class _Recorder:
  """The fixture's predictor, recording each batch's size and running out
  of memory (a real `JaxRuntimeError`, as XLA raises it) on one canvas."""

  def __init__(self, predictor, out_of_memory_on=None, from_batch=0):
    self.predictor, self.batches = predictor, []
    self.out_of_memory_on, self.from_batch = out_of_memory_on, from_batch

  def __getattr__(self, name):
    return getattr(self.predictor, name)

  def __call__(self, images):
    self.batches.append(len(images))
    if (self.predictor.canvas(images[0]) == self.out_of_memory_on and
        len(self.batches) > self.from_batch):
      raise jax.errors.JaxRuntimeError(
          'RESOURCE_EXHAUSTED: Out of memory allocating 27648828496 bytes.')
    return self.predictor(images)


def test_many_sizes_partial_batches_stop_and_out_of_memory(run, tmp_path,
                                                           monkeypatch):
  """Eight images of eight canvas sizes (batch 4): past the held limit the
  fullest queue is predicted at once, each with the labels it gets alone;
  Ctrl-C after the first batch writes nothing more; a batch that runs out
  of memory fails its images with what to change, and the rest go on."""
  config, _, predictor = run
  monkeypatch.setattr(predict, 'HELD_BATCHES', 1)  # at most 4 images held
  folder = tmp_path / 'in'
  folder.mkdir()
  items = []
  for k in range(8):
    path = folder / f'{k}.png'
    Image.fromarray(_image(8 + 8 * k, 24, k)).save(path)
    items.append((str(path), str(k)))
  outputs = predict.Outputs(str(tmp_path / 'out'), np.zeros((5, 3), np.uint8),
                            [], 0.5)
  recorder = _Recorder(predictor)
  written, failures = predict.predict_images(items, recorder, outputs)
  assert (written, failures) == (8, [])
  # From the 5th image read, 5 are held: one goes (each queue holds one).
  assert recorder.batches == [1] * 8
  for k in range(8):
    with Image.open(tmp_path / 'out' / f'{k}.png') as im:
      label = np.asarray(im)
    expected, = predictor([np.asarray(Image.open(folder / f'{k}.png'))])
    np.testing.assert_array_equal(label, expected)

  import signal  # pylint: disable=g-import-not-at-top
  from seg_jax import interrupt  # pylint: disable=g-import-not-at-top
  recorder = _Recorder(predictor)
  with interrupt.deferred():
    written, failures = predict.predict_images(
        items, recorder, predict.Outputs(str(tmp_path / 'cut'),
                                         np.zeros((5, 3), np.uint8), [], 0.5),
        lambda n: os.kill(os.getpid(), signal.SIGINT))
    assert interrupt.received() == 'SIGINT'
  assert (written, failures, recorder.batches) == (1, [], [1])
  assert sorted(os.listdir(tmp_path / 'cut')) == ['0.png', '0_overlay.jpg']

  monkeypatch.setattr(predict, 'HELD_BATCHES', 4)
  big = predictor.canvas(np.zeros((8 + 8 * 3, 24)))
  recorder = _Recorder(predictor, out_of_memory_on=big)
  written, failures = predict.predict_images(
      items, recorder, predict.Outputs(str(tmp_path / 'oom'),
                                       np.zeros((5, 3), np.uint8), [], 0.5))
  assert written == 7
  assert failures == [(items[3][0], f'{items[3][0]}: out of memory '
                       'predicting 32x24 (HxW) images one at a time; use '
                       '--evaluator=slide (windows of the training crop).')]
  assert not (tmp_path / 'oom' / '3.png').exists()
  # A video whose frames do not fit from its second batch: named as such,
  # not as unreadable; the first batch's frames are written and counted.
  import av  # pylint: disable=g-import-not-at-top
  video = str(tmp_path / 'clip.mp4')
  with av.open(video, 'w') as out:
    stream = out.add_stream('libx264', rate=10)
    stream.width, stream.height, stream.pix_fmt = 48, 32, 'yuv420p'
    for k in range(6):
      for packet in stream.encode(av.VideoFrame.from_ndarray(
          _image(32, 48, k), format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  recorder = _Recorder(predictor, out_of_memory_on=(32, 48), from_batch=1)
  assert predict.run([video], recorder, outputs) == (0, 4, [(
      video, f'{video}: the first 4 frames are written; out of '
      'memory predicting its frames one at a time; use --evaluator=slide '
      '(windows of the training crop).')])
  assert recorder.batches == [4, 2]
  with av.open(str(tmp_path / 'out' / 'clip_overlay.mp4')) as written:
    assert sum(1 for _ in written.decode(video=0)) == 4


def test_a_canvas_that_does_not_fit_a_full_batch_goes_one_at_a_time(
    run, tmp_path, monkeypatch):
  """With host memory for one 40x48 image but not for a batch of 4 (XLA's
  CPU runtime would abort the process): the compiled step is refused
  before it runs, the canvas's images are predicted one at a time with the
  labels each gets alone, and other canvases keep full batches. With
  memory for none, the images fail with one line and the rest go on."""
  from seg_jax import host_memory  # pylint: disable=g-import-not-at-top
  config, _, predictor = run
  del config
  # The fixture's predictor with a step of its own (its checks start anew).
  fresh = predict.Predictor.__new__(predict.Predictor)
  fresh.__dict__.update(predictor.__dict__, one_at_a_time=set())
  step = predictor.step.jitted

  def need(batch, h, w):
    args = (predictor.variables, np.zeros((batch, h, w, 3), np.uint8),
            np.zeros((batch, 2), np.int32))
    return host_memory.buffers_bytes(step.lower(*args).compile())

  one, four = need(1, 40, 48), need(4, 40, 48)
  assert 0 < one < four and need(4, 16, 16) < (one + four) // 2
  fresh.step = host_memory.MemoryChecked(step)
  monkeypatch.setattr(host_memory, 'available_bytes',
                      lambda: (one + four) // 2)
  images = [_image(40, 48 - k, k) for k in range(3)]
  labels = fresh(images)
  assert fresh.one_at_a_time == {(40, 48)}
  for image, label in zip(images, labels):
    expected, = predictor([image])
    np.testing.assert_array_equal(label, expected)
  small = [_image(16, 16, k) for k in range(2)]
  for label, image in zip(fresh(small), small):
    np.testing.assert_array_equal(label, predictor([image])[0])
  assert fresh.one_at_a_time == {(40, 48)}

  monkeypatch.setattr(host_memory, 'available_bytes', lambda: one // 2)
  fresh.one_at_a_time, fresh.step = set(), host_memory.MemoryChecked(step)
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=r'^RESOURCE_EXHAUSTED: the compiled step needs '
                     r'[\d.]+ GiB of host memory for its buffers, [\d.]+ GiB '
                     r'are available\.$') as caught:
    fresh(images[:1])
  assert errors.out_of_memory(caught.value)
  folder = tmp_path / 'in'
  folder.mkdir()
  for k, image in enumerate(images[:1] + small[:1]):
    Image.fromarray(image).save(folder / f'{k}.png')
  items = [(str(folder / f'{k}.png'), str(k)) for k in range(2)]
  fresh.one_at_a_time = set()
  written, failures = predict.predict_images(
      items, fresh, predict.Outputs(str(tmp_path / 'out'),
                                    np.zeros((5, 3), np.uint8), [], 0.5))
  assert written == 1 and failures == [(items[0][0], (
      f'{items[0][0]}: out of memory predicting 40x48 (HxW) images one at '
      'a time; use --evaluator=slide (windows of the training crop).'))]


def test_video_keeps_frame_count_rate_and_size(tmp_path):
  """A 360x480 clip of benchmarks/video_fps.py (which measures the real-time
  model's frame rate, docs/evaluate.md) end to end: the overlay video has
  the input's frames, rate and size; a tiny U-Net labels it (the video
  path does not depend on the model; LR-ASPP's inference is checked in
  test_mobilenet and test_onnx)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from seg_jax import models  # pylint: disable=g-import-not-at-top
  from configs import lraspp_mobilenet_v3_large_voc  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'video_fps', os.path.join(REPO, 'benchmarks', 'video_fps.py'))
  video_fps = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(video_fps)
  video = str(tmp_path / 'in.mp4')
  video_fps.write_video(video, 9, 360, 480, rate=15)
  config = lraspp_mobilenet_v3_large_voc.get_config()
  config.model.name, config.model.kwargs = 'unet', {'width': 4, 'depth': 2}
  model = models.create_model('unet', 21, width=4, depth=2)
  variables = jax.jit(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))()
  predictor = predict.Predictor(config, model, variables,
                                inference.spec_from_config(config, 'whole'), 4)
  outputs = predict.Outputs(str(tmp_path / 'out'), np.zeros((21, 3),
                                                            np.uint8), [], 0.5)
  assert predict.predict_video(video, 'clip', predictor, outputs) == 9
  frames_in, rate_in = _decode(video)
  frames_out, rate_out = _decode(str(tmp_path / 'out' / 'clip_overlay.mp4'))
  assert len(frames_out) == len(frames_in) == 9
  assert rate_out == rate_in == 15
  assert frames_out[0].shape == frames_in[0].shape == (360, 480, 3)
  # Ctrl-C after the first batch: that batch ends the video, which is
  # closed properly (it decodes, with those 4 frames).
  import signal  # pylint: disable=g-import-not-at-top
  from seg_jax import interrupt  # pylint: disable=g-import-not-at-top
  with interrupt.deferred():
    count = predict.predict_video(
        video, 'cut', predictor, outputs,
        lambda n, total: os.kill(os.getpid(), signal.SIGINT))
    assert interrupt.received() == 'SIGINT'
  assert count == 4
  frames_cut, _ = _decode(str(tmp_path / 'out' / 'cut_overlay.mp4'))
  assert len(frames_cut) == 4
