"""seg_jax.data.to_folder on a tiny CamVid written in SegNet's layout: the
folder copy reads back with the same labels (CamVid's 11 became 255), the
same images (within JPEG error, or exactly as PNG) and CamVid's class names.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seg_jax import data, errors
from seg_jax.data import sources, to_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 24, 32


def _gradient(seed):
  """A smooth (H, W, 3) uint8 image: JPEG keeps it within a few levels."""
  y, x = np.mgrid[0:H, 0:W].astype(np.float64)
  channels = [40 + 5 * x + seed * 7, 30 + 6 * y + seed * 11,
              120 + 2 * x - 3 * y + seed * 5]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _camvid(root, n, split):
  """Writes `n` SegNet-layout CamVid pairs of `split` under `root`; masks
  hold classes 0..10 and the unlabelled class 11."""
  lines = []
  for i in range(n):
    stem = f'0001TP_{split}_{i:06d}'
    for folder in (split, f'{split}annot'):
      os.makedirs(root / folder, exist_ok=True)
    Image.fromarray(_gradient(i)).save(root / split / f'{stem}.png')
    mask = (np.arange(H * W).reshape(H, W) // 17 + i) % 12
    Image.fromarray(mask.astype(np.uint8)).save(
        root / f'{split}annot' / f'{stem}.png')
    lines.append(f'/SegNet/CamVid/{split}/{stem}.png '
                 f'/SegNet/CamVid/{split}annot/{stem}.png')
  (root / f'{split}.txt').write_text('\n'.join(lines) + '\n')


def _config(name, root, **data_kw):
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.data.name, c.data.root = name, str(root)
  c.model.num_classes = 11
  for k, v in data_kw.items():
    setattr(c.data, k, v)
  return c


@pytest.fixture
def camvid(tmp_path):
  root = tmp_path / 'camvid'
  _camvid(root, 3, 'train')
  _camvid(root, 2, 'val')
  return root


def _by_stem(source):
  return {os.path.splitext(os.path.basename(image))[0]: i
          for i, (image, _) in enumerate(source.pairs)}


def _check_copy(camvid, out, image_format, max_mad):
  """The folder copy matches CamVid record by record; returns the
  images' mean absolute differences."""
  mads = []
  for split, n in (('train', 3), ('val', 2)):
    original = data.create_source(_config('camvid', camvid), split)
    copy = data.create_source(_config('folder', out), split)
    assert len(copy) == len(original) == n
    assert copy.class_names == sources.CAMVID_CLASSES
    index = _by_stem(copy)
    for i, (image_path, _) in enumerate(original.pairs):
      stem = os.path.splitext(os.path.basename(image_path))[0]
      assert os.path.isfile(out / 'images' / split / f'{stem}.{image_format}')
      want, got = original[i], copy[index[stem]]
      np.testing.assert_array_equal(got['label'], want['label'])
      assert 255 in got['label'] and 11 not in got['label']
      mads.append(np.abs(got['image'].astype(int) - want['image']).mean())
      assert mads[-1] <= max_mad, (stem, mads[-1])
  return mads


def test_jpeg_copy_reads_back_same_labels_and_close_images(camvid, tmp_path):
  out = tmp_path / 'out'
  summaries = to_folder.convert(_config('camvid', camvid), str(out),
                                progress=False)
  assert [(s.split, s.written, s.skipped) for s in summaries] == [
      ('train', 3, 0), ('val', 2, 0)]
  assert summaries[0].bytes == sum(
      os.path.getsize(p) for d in ('images', 'masks')
      for p in (out / d / 'train').iterdir())
  mads = _check_copy(camvid, out, 'jpg', max_mad=3.0)
  assert max(mads) > 0  # really JPEG: lossy
  assert (out / 'classes.txt').read_text().splitlines() == list(
      sources.CAMVID_CLASSES)
  with Image.open(next((out / 'masks' / 'val').iterdir())) as im:
    assert im.mode == 'P'  # class ids, shown in CamVid's colours
    np.testing.assert_array_equal(
        np.asarray(im.getpalette()[:33]).reshape(11, 3),
        sources.CAMVID_PALETTE)
  raw = np.asarray(Image.open(camvid / 'valannot' / '0001TP_val_000001.png'))
  copied = np.asarray(Image.open(out / 'masks/val/0001TP_val_000001.png'))
  np.testing.assert_array_equal(copied, np.where(raw == 11, 255, raw))


def test_png_copy_is_exact_and_overwrite_leaves_no_stale_files(camvid,
                                                               tmp_path):
  out = tmp_path / 'out'
  to_folder.convert(_config('camvid', camvid), str(out), progress=False)
  with pytest.raises(errors.ConfigError,
                     match=re.escape(f'{out / "images" / "val"} already '
                                     'holds 2 files')):
    to_folder.convert(_config('camvid', camvid), str(out), ('val', 'train'),
                      image_format='png', progress=False)
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(errors.ConfigError, match=r'^--out=.*a_file is a file; '
                     r'give a folder.$'):
    to_folder.convert(_config('camvid', camvid), str(tmp_path / 'a_file'),
                      progress=False)
  to_folder.convert(_config('camvid', camvid), str(out), image_format='png',
                    overwrite=True, threads=2, progress=False)
  assert max(_check_copy(camvid, out, 'png', max_mad=0.0)) == 0.0
  assert sorted(p.suffix for p in (out / 'images' / 'train').iterdir()) == [
      '.png'] * 3


def test_skipped_records_are_left_out_and_counted(camvid, tmp_path):
  (camvid / 'train' / '0001TP_train_000001.png').write_bytes(b'not a png')
  (camvid / 'train' / '0001TP_train_000002.png').unlink()
  config = _config('camvid', camvid, on_bad_sample='skip')
  out = tmp_path / 'out'
  [s] = to_folder.convert(config, str(out), ('train',), progress=False)
  assert (s.written, s.skipped) == (1, 2)
  assert os.listdir(out / 'images' / 'train') == ['0001TP_train_000000.jpg']
  Image.fromarray(_gradient(2)).save(camvid / 'train' /
                                     '0001TP_train_000002.png')
  with pytest.raises(errors.UserError,
                     match=r'000001\.png: cannot decode image .*'
                     'on_bad_sample=skip'):
    to_folder.convert(_config('camvid', camvid), str(tmp_path / 'o2'),
                      ('train',), progress=False)


class _Pairs:
  def __init__(self, pairs):
    self.pairs = pairs

  def __len__(self):
    return len(self.pairs)


def test_record_stems_unique():
  pairs = _Pairs([('/d/a/x.jpg', ''), ('/d/b/x.jpg', ''), ('/d/a/y.png', ''),
                  ('/e/a/y.png', ''), ('/d/c/z.tif', '')])
  assert to_folder.record_stems(pairs) == [
      'a_x', 'b_x', 'a_y_000002', 'a_y_000003', 'z']
  assert to_folder.record_stems([0, 0]) == ['000000', '000001']


def test_source_without_files_gets_index_stems(tmp_path):
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  config = unet_shapes_tiny.get_config()
  config.data.shapes.num_val = 2
  original = data.create_source(config, 'val')
  out = tmp_path / 'shapes'
  to_folder.convert(config, str(out), ('val',), image_format='png',
                    progress=False)
  assert sorted(os.listdir(out / 'masks' / 'val')) == ['000000.png',
                                                       '000001.png']
  config.data.name, config.data.root = 'folder', str(out)
  copy = data.create_source(config, 'val')
  assert copy.class_names == original.class_names
  for i in range(2):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(copy[i][key], original[i][key])


def test_cli_refuses_a_filled_out_then_overwrites(camvid, tmp_path):
  out = tmp_path / 'out'
  to_folder.convert(_config('camvid', camvid), str(out), ('val',),
                    progress=False)
  image = out / 'images' / 'val' / '0001TP_val_000000.jpg'
  size_at_95 = os.path.getsize(image)
  args = [sys.executable, '-m', 'seg_jax.data.to_folder',
          '--config=configs/unet_camvid.py', f'--config.data.root={camvid}',
          '--config.train.num_steps=7', f'--out={out}', '--splits=val']
  refused = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                           check=False)
  assert refused.returncode == 2, refused.stderr
  assert refused.stderr.strip().splitlines() == [
      f'error: --out={out}: {out / "images" / "val"} already holds 2 files '
      "of split 'val'; pass --overwrite to replace them, or choose another "
      '--out.']
  done = subprocess.run(args + ['--overwrite', '--jpeg_quality=50'], cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.strip().splitlines()
  assert lines[0].startswith('Converted: split=val records=2 skipped=0 ')
  assert lines[-1] == (
      'Train on it: python -m seg_jax.main --config=configs/unet_camvid.py '
      '--config.train.num_steps=7 --config.data.name=folder '
      f'--config.data.root={out} --workdir=runs/unet_camvid_folder')
  assert os.path.getsize(image) < size_at_95
  assert not (out / 'images' / 'train').exists()


def test_train_command_does_not_map_the_copys_labels_again():
  """The copy holds class ids under its images' names: the printed command
  resets a label map and a mask suffix the config (file or flags) set."""
  config = _config('camvid', '/data')
  config.data.label_map = {1: 0, 2: 1}
  config.data.mask_suffix = '_mask'
  command = to_folder.train_command(
      'configs/x.py', '/out', config, ('train', 'val'),
      ['--config.data.label_map={1: 0, 2: 1}', '--config.data.mask_suffix=_m',
       '--config.train.num_steps=7'])
  assert command == (
      "python -m seg_jax.main --config=configs/x.py --config.train.num_steps=7 "
      "--config.data.name=folder --config.data.root=/out "
      "'--config.data.label_map={}' --config.data.mask_suffix= "
      '--workdir=runs/x_folder')
  # The splits copied are the ones trained and validated on.
  config = _config('camvid', '/data')
  config.data.train_split = 'train_aug'
  keys = lambda splits: [a for a in to_folder.train_command(
      'x.py', '/o', config, splits).split() if '_split=' in a]
  assert keys(('train', 'val')) == ['--config.data.train_split=train']
  assert keys(('trainval', 'val')) == ['--config.data.train_split=trainval']
  assert keys(('train', 'test')) == ['--config.data.train_split=train',
                                     '--config.data.val_split=test']
  assert keys(('train',)) == ['--config.data.train_split=train',
                              '--config.data.val_split=']
  assert keys(('val',)) == ['--config.data.train_split=train']
