"""A user's own folder of images: read right or refused in one line, checked
before training, never losing trained steps, and a run folder that
remembers its config."""

import copy
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from seg_jax import checkpoint, data, errors, predict, train
from seg_jax.data import check, files

import user_data as ud
from conftest import REPO


def _cli(module, *args, timeout=240):
  """Runs `python -m seg_jax.<module>`; returns (rc, stdout, stderr)."""
  proc = subprocess.run([sys.executable, '-m', f'seg_jax.{module}', *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr


def _user_lines(stderr):
  """stderr without absl's log lines (I/W/E1130 ...) and tqdm bars."""
  return [l for l in stderr.splitlines()
          if l.strip() and not re.match(r'^[IWE]\d{4} ', l) and
          '|' not in l]


def _one_line_error(rc, stderr, code, *patterns):
  lines = _user_lines(stderr)
  assert rc == code, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  for pattern in patterns:
    assert re.search(pattern, lines[0]), lines[0]
  return lines[0]


# --- Reading images as they are meant ------------------------------------


def test_16bit_and_float_images_read_as_their_8bit_version(tmp_path):
  """16-bit grayscale (PNG, TIFF) and float TIFFs decode to exactly the 8-bit
  image they hold (value * 255 / 65535, float * 255), not solid white."""
  grey = ud.example(0)[0][..., 0]
  Image.fromarray(grey).save(tmp_path / 'eight.png')
  for name in ('sixteen.png', 'sixteen.tif'):
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == 'I;16'
  Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / 'float.tif')
  want = files.read_image(str(tmp_path / 'eight.png'))
  assert want.shape == (24, 32, 3) and want.max() < 255
  for name in ('sixteen.png', 'sixteen.tif', 'float.tif'):
    image, notes = files.read_image_notes(str(tmp_path / name))
    np.testing.assert_array_equal(image, want)
    assert 'scaled to 8 bits' in notes[0]
    assert len(notes) == 1  # the whole 16-bit range is used: no warning
  # A 12-bit camera's values stored as they came read nearly black: said.
  twelve = (grey.astype(np.uint16) * 16) | 15  # up to 4095
  Image.fromarray(twelve).save(tmp_path / 'twelve.png')
  for channels in (3, 1):
    image, notes = files.read_image_notes(str(tmp_path / 'twelve.png'),
                                          channels)
    assert image.max() == (int(twelve.max()) * 255 + 32767) // 65535 <= 16
    assert notes[1:] == [
        '16-bit image using only 12 of its bits (values up to 4095): read as '
        '0..65535, it becomes at most 0..16 of 0..255, nearly black; rescale '
        'such images to the 16-bit range (x 16) or save them as 8-bit']
  Image.fromarray(grey.astype(np.float32)).save(tmp_path / 'raw.tif')
  with pytest.raises(files.BadSampleError,
                     match=r'raw.tif: float image holds values .* as 0..1'):
    files.read_image(str(tmp_path / 'raw.tif'))


def test_exif_rotated_photo_is_read_upright_and_aligned(tmp_path):
  """A photo stored sideways with EXIF orientation 6 is read as viewers show
  it: its size is the upright one (headers too), so it pairs with its mask,
  and its pixels line up with the mask's classes (also when square, where a
  rotated read would silently misalign)."""
  for size in ((24, 32), (32, 32)):
    root = tmp_path / f'{size[0]}x{size[1]}'
    (image_path, mask_path), = ud.write_folder(root, n=1, form='exif6',
                                               size=size)
    with Image.open(image_path) as stored:
      assert stored.size == (size[0], size[1])  # W x H stored sideways
    assert files.image_size(image_path) == size
    src = data.create_source(ud.folder_config(root), 'train')
    example = src.load(image_path, mask_path)
    assert example['image'].shape == size + (3,)
    _, mask = ud.example(0, size)
    np.testing.assert_array_equal(example['label'], mask)
    for k, colour in enumerate(ud.COLOURS):  # JPEG noise stays < 40
      mean = example['image'][mask == k].mean(0)
      assert np.abs(mean - colour).max() < 40, (k, mean, colour)
    if size[0] != size[1]:  # a mask drawn on the stored, sideways pixels
      ud.save_mask(str(mask_path), np.zeros(size[::-1], np.uint8))
      _, problem = files.header_check(str(image_path), str(mask_path))
      assert problem == (
          f'{mask_path}: mask is 32x24 (HxW) but its image {image_path} is '
          '24x32 as shown upright (EXIF orientation 6): the mask matches the '
          'stored, sideways pixels; rotate the mask to match the upright '
          'image, or save the image without its EXIF orientation.')


def test_gif_masks_pair_with_jpeg_photos_and_animations_are_refused(
    tmp_path):
  """JPEG photos with `<name>_mask.gif` masks (as the Carvana dataset ships
  them): paired with data.mask_suffix, the masks read as their palette
  indices (class ids), as palette PNGs are; GIF images read as RGB; an
  animated GIF, image or mask, is refused naming the file."""
  masks = []
  for i in range(3):
    image, mask = ud.example(i)
    ud.save_image(str(tmp_path / 'images' / 'train' / f'car_{i}.jpg'), image)
    im = Image.fromarray(mask, 'P')
    im.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * 759)
    os.makedirs(tmp_path / 'masks' / 'train', exist_ok=True)
    im.save(tmp_path / 'masks' / 'train' / f'car_{i}_mask.gif')
    masks.append(mask)
  src = data.create_source(ud.folder_config(tmp_path, **{
      'data.mask_suffix': '_mask'}), 'train')
  assert [os.path.basename(m) for _, m in src.pairs] == [
      'car_0_mask.gif', 'car_1_mask.gif', 'car_2_mask.gif']
  for (image_path, mask_path), mask in zip(src.pairs, masks):
    np.testing.assert_array_equal(src.load(image_path, mask_path)['label'],
                                  mask)
  image, _ = ud.example(0)
  Image.fromarray(image).quantize(256).save(tmp_path / 'photo.gif')
  want = np.asarray(Image.open(tmp_path / 'photo.gif').convert('RGB'))
  np.testing.assert_array_equal(files.read_image(str(tmp_path / 'photo.gif')),
                                want)
  frames = [Image.fromarray(np.full(ud.SIZE, k, np.uint8)) for k in range(3)]
  frames[0].save(tmp_path / 'anim.gif', save_all=True,
                 append_images=frames[1:])
  for read, what in ((files.read_mask, 'mask'), (files.read_image, 'image')):
    with pytest.raises(files.BadSampleError, match=(
        rf'anim.gif: the {what} is an animation of 3 frames; seg_jax reads '
        rf'one frame per {what} file')):
      read(str(tmp_path / 'anim.gif'))


def test_grey_mask_saved_as_rgb_is_read_and_colour_masks_are_refused(
    tmp_path):
  _, mask = ud.example(0)
  Image.fromarray(np.repeat(mask[..., None], 3, -1)).save(tmp_path / 'g.png')
  np.testing.assert_array_equal(files.read_mask(str(tmp_path / 'g.png')),
                                mask)
  colour = ud.PALETTE[mask]
  Image.fromarray(colour).save(tmp_path / 'c.png')
  with pytest.raises(files.BadSampleError, match=r"c.png: mask has mode 'RGB'"):
    files.read_mask(str(tmp_path / 'c.png'))
  # With an opaque alpha channel, grey RGBA and LA masks read the same.
  opaque = np.full_like(mask, 255)
  Image.fromarray(np.stack([mask] * 3 + [opaque], -1), 'RGBA').save(
      tmp_path / 'rgba.png')
  Image.fromarray(np.stack([mask, opaque], -1), 'LA').save(tmp_path / 'la.png')
  for name in ('rgba.png', 'la.png'):
    np.testing.assert_array_equal(files.read_mask(str(tmp_path / name)), mask)
  # A transparent pixel is refused, naming the file and the mode.
  opaque[0, 0] = 0
  Image.fromarray(np.stack([mask, opaque], -1), 'LA').save(tmp_path / 'la.png')
  with pytest.raises(files.BadSampleError, match=(
      r"la.png: mask has mode 'LA' with transparent pixels; save it as a "
      r'single-channel')):
    files.read_mask(str(tmp_path / 'la.png'))


# --- Pairing images and masks ---------------------------------------------


def test_nested_folders_pair_by_relative_path_and_counts_are_logged(
    tmp_path, caplog):
  """Images in subfolders are all used, each with the mask at the same
  relative path (a name repeated in two subfolders is two examples; a
  linked subfolder is read, a link back up is not followed again), and
  opening a split logs its count, size range and classes."""
  ud.write_folder(tmp_path, n=9, nested=3)
  ud.write_folder(tmp_path / 'other', n=1)
  for sub in ('images', 'masks'):  # g3/img_000.png: the name of g0's first
    os.makedirs(tmp_path / sub / 'train' / 'g3')
    os.replace(tmp_path / 'other' / sub / 'train' / 'img_000.png',
               tmp_path / sub / 'train' / 'g3' / 'img_000.png')
    # g1 held elsewhere and linked in, as a dataset assembled from links.
    os.replace(tmp_path / sub / 'train' / 'g1', tmp_path / f'{sub}_g1')
    os.symlink(tmp_path / f'{sub}_g1', tmp_path / sub / 'train' / 'g1')
    os.symlink(tmp_path / sub / 'train', tmp_path / sub / 'train' / 'g0' /
               'up')
  with caplog.at_level(logging.INFO):
    src, sizes = data.open_split(ud.folder_config(tmp_path), 'train')
  assert len(src) == 10 and sizes == [ud.SIZE] * 10
  rel = [os.path.relpath(p, tmp_path / 'images' / 'train')
         for p, _ in src.pairs]
  assert rel[:4] == ['g0/img_000.png', 'g0/img_001.png', 'g0/img_002.png',
                     'g1/img_003.png'] and rel[-1] == 'g3/img_000.png'
  for image, mask in src.pairs:
    assert mask == image.replace('/images/', '/masks/')
  assert ('folder/train: 10 examples, images 24x32 (HxW), 3 classes: '
          'class_0, class_1, class_2') in caplog.text
  # Sizes that differ: each side's range (no image need be the smallest
  # height and width at once).
  assert data.size_range([(480, 640), (640, 480)]) == (
      '480..640 x 480..640 (HxW)')
  assert data.size_range([(240, 320), (480, 320)]) == '240..480 x 320 (HxW)'


def test_files_of_types_not_read_are_named_where_they_would_pair(tmp_path):
  ud.write_folder(tmp_path, n=10)
  train = lambda sub, name: tmp_path / sub / 'train' / name
  os.replace(train('masks', 'img_001.png'), train('masks', 'img_001.npy'))
  os.replace(train('images', 'img_002.png'), train('images', 'img_002.jfif'))
  with pytest.raises(errors.MissingFileError,
                     match=r'img_001.png has no mask .* '
                     rf"{train('masks', 'img_001.npy')} has its name but a "
                     r'file type that is not read \(use one of .jpg, .*; masks '
                     r'as .png\)\. Add the masks'):
    data.create_source(ud.folder_config(tmp_path), 'train')
  report = check.check_split(ud.folder_config(tmp_path), 'train')
  assert [e.split(': ')[0] for e in report.errors] == [
      str(train('images', 'img_001.png')), str(train('masks', 'img_002.png'))]
  assert report.errors[1].endswith(
      f"; {train('images', 'img_002.jfif')} has its name but a file type "
      'that is not read (use one of .jpg, .jpeg, .png, .bmp, .tif, .tiff, '
      '.webp, .gif; masks as .png).')


def test_colliding_names_are_refused_naming_both(tmp_path):
  ud.write_folder(tmp_path, n=3)
  image = tmp_path / 'images' / 'train' / 'img_001.png'
  Image.open(image).save(tmp_path / 'images' / 'train' / 'img_001.jpg')
  with pytest.raises(errors.ConfigError,
                     match=r'images/train/img_001.jpg and .*images/train/'
                           r'img_001.png have the same name but for the '
                           r'extension'):
    data.create_source(ud.folder_config(tmp_path), 'train')
  os.remove(tmp_path / 'images' / 'train' / 'img_001.jpg')
  mask = tmp_path / 'masks' / 'train' / 'img_002.png'
  Image.open(mask).save(tmp_path / 'masks' / 'train' / 'img_002.bmp')
  with pytest.raises(errors.ConfigError,
                     match=r'masks/train/img_002.bmp and .*img_002.png'):
    data.create_source(ud.folder_config(tmp_path, **{
        'data.on_bad_sample': 'skip'}), 'train')


def test_mask_suffix_and_the_pairing_rule_in_every_pairing_error(tmp_path):
  ud.write_folder(tmp_path, n=4, mask_suffix='_mask')
  rule = (r'images pair with masks by their path under .*images/train and '
          r'.*masks/train without the extension, the mask adding '
          r"data.mask_suffix=''")
  with pytest.raises(errors.MissingFileError,
                     match=rf'no image has a mask: {rule}.*; these masks look '
                           r"named with --config.data.mask_suffix='_mask'"):
    data.create_source(ud.folder_config(tmp_path), 'train')
  with pytest.raises(errors.MissingFileError, match=rule):  # skip mode too
    data.create_source(ud.folder_config(tmp_path, **{
        'data.on_bad_sample': 'skip'}), 'train')
  cfg = ud.folder_config(tmp_path, **{'data.mask_suffix': '_mask'})
  src = data.create_source(cfg, 'train')
  assert [os.path.basename(m) for _, m in src.pairs] == [
      f'img_{i:03d}_mask.png' for i in range(4)]
  os.remove(tmp_path / 'masks' / 'train' / 'img_001_mask.png')
  with pytest.raises(errors.MissingFileError,
                     match=r'img_001.png has no mask .*masks/train/'
                           r'img_001_mask.png .*: images pair with masks'):
    data.create_source(cfg, 'train')
  cfg.data.on_bad_sample = 'skip'
  assert len(data.create_source(cfg, 'train')) == 3


# --- Training on them -----------------------------------------------------


def test_16bit_nested_dataset_reads_as_its_8bit_version(tmp_path):
  """The same grayscale examples saved as flat 8-bit PNGs and as 16-bit
  PNGs in subfolders give training bit-identical batches, in the same
  order (nested files sort as the flat names) over two epochs, the same
  validation examples, and `predict`'s reader the same pixels."""
  from seg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  plain, deep = tmp_path / 'plain', tmp_path / 'deep'
  for split, n in (('train', 10), ('val', 3)):
    ud.write_folder(plain, n=n, split=split, grey=True)
    ud.write_folder(deep, n=n, split=split, grey=True, form='gray16',
                    nested=4)
  batches, examples = [], []
  for root in (plain, deep):
    config = ud.folder_config(root)
    source, _ = data.open_split(config, 'train')
    stream = iter(pipeline.create_train_dataset(
        source, pipeline.train_transform(config), seed=0, batch_size=8,
        num_threads=1))
    batches.append([next(stream) for _ in range(3)])  # 24 of 10 records
    val, _ = data.open_split(config, 'val', training=False)
    examples.append([val[i] for i in range(len(val))])
  for got, want in ((batches[1], batches[0]), (examples[1], examples[0])):
    assert len(got) == len(want)
    for a, b in zip(got, want):
      assert sorted(a) == sorted(b)
      for key in ('image', 'label'):
        np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(
      files.read_image(str(deep / 'images' / 'val' / 'g0' / 'img_001.png')),
      files.read_image(str(plain / 'images' / 'val' / 'img_001.png')))


def test_skip_mode_reports_each_bad_file_once_and_no_validation_split(
    tmp_path, caplog):
  """'skip' mode over several epochs: one warning per bad file per run and
  a final count; data.val_split='' trains without evaluating and reports
  the training batches' scores."""
  ud.write_folder(tmp_path, n=10)
  Image.fromarray(np.full(ud.SIZE, 9, np.uint8)).save(
      tmp_path / 'masks' / 'train' / 'img_003.png')
  with open(tmp_path / 'images' / 'train' / 'img_006.png', 'r+b') as f:
    f.truncate(100)
  # Found by its header as the split is opened: left out then.
  (tmp_path / 'images' / 'train' / 'img_008.png').write_bytes(b'')
  config = ud.folder_config(tmp_path, **{
      'data.on_bad_sample': 'skip', 'data.val_split': '',
      'train.num_steps': 6, 'train.log_every_steps': 6,
      'checkpoint.every_steps': 6})
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  reports = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith('Skipped bad sample')]
  assert len(reports) == 2, reports
  assert any('img_003.png: mask values [9]' in r for r in reports)
  assert any('img_006.png: cannot decode image' in r for r in reports)
  # 6 steps x 8 = 48 records of a 9-record stream: each bad one met 5-6x;
  # the total counts the file left out at the start too.
  total = re.search(r'(\d+) bad samples skipped in this run \(2 distinct '
                    r'files\); 1 more left out as the splits were opened',
                    caplog.text)
  assert total and 10 <= int(total.group(1)) <= 12, caplog.text[-2000:]
  assert 'img_008.png: cannot read it (the file is empty)' in caplog.text
  assert result['no_validation'] and result['step'] == 6
  assert 0 < result['miou'] <= 1 and 'mean_accuracy' not in result
  assert "No validation split (data.val_split='')" in caplog.text
  assert not [r for r in caplog.records if 'eval' in r.getMessage()[:6]]
  stored = json.load(open(tmp_path / 'run' / 'config.json'))
  assert stored['data']['val_split'] == ''
  _one_line_error(*_cli('evaluate', f'--workdir={tmp_path}/run')[::2], 2,
                  r"data.val_split is '' .* give --split=")


def test_macos_resource_forks_are_left_out_as_predict_leaves_them(tmp_path):
  """A zip made on a Mac unpacks `__MACOSX/` folders (here with a real
  image in it): the folder dataset reads past them, as `predict` does."""
  paths = ud.write_folder(tmp_path, n=8)
  fork = tmp_path / 'images' / 'train' / '__MACOSX'
  fork.mkdir()
  (fork / 'img_009.png').write_bytes(open(paths[0][0], 'rb').read())
  source = data.create_source(ud.folder_config(tmp_path), 'train')
  assert len(source) == 8 and '__MACOSX' not in ' '.join(
      p for pair in source.pairs for p in pair)
  assert [n for _, n in predict.find_inputs([str(tmp_path / 'images')])] == [
      f'images/train/img_{k:03d}' for k in range(8)]


def test_an_evaluation_of_only_skipped_images_says_so(tmp_path, caplog):
  """'skip' mode with the one validation mask bad: the evaluation scores
  no pixel, and the log says why its scores are nan."""
  ud.write_folder(tmp_path, n=8)
  val = ud.write_folder(tmp_path, n=1, split='val')
  ud.save_mask(val[0][1], np.full(ud.SIZE, 9, np.uint8))
  config = ud.folder_config(tmp_path, **{
      'data.on_bad_sample': 'skip', 'train.num_steps': 2,
      'eval.every_steps': 2, 'checkpoint.every_steps': 2})
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 2 and np.isnan(result['miou'])
  assert re.search(r"eval whole at step 2 scored no pixel, so its scores are "
                   r"nan: every validation image was skipped "
                   r"\(data.on_bad_sample='skip', reasons above\)",
                   caplog.text), caplog.text[-2000:]
  assert 'img_000.png: mask values [9]' in caplog.text


def test_class_names_skip_comments_and_a_count_mismatch_names_its_source(
    tmp_path):
  ud.write_folder(tmp_path, n=8)
  (tmp_path / 'classes.txt').write_text(
      '# my classes\nroad  # asphalt\n\ncar\t# any vehicle\nsky\n')
  config = ud.folder_config(tmp_path)
  assert data.class_info(config)[0] == ('road', 'car', 'sky')
  assert tuple(data.create_source(config, 'train').class_names) == (
      'road', 'car', 'sky')
  config.model.num_classes = 4
  with pytest.raises(errors.ConfigError, match=rf'^{tmp_path}/classes.txt '
                     r'names 3 classes but model.num_classes=4; make them'):
    data.class_info(config)
  config.data.class_names = ('a', 'b')
  with pytest.raises(errors.ConfigError, match=r'^data.class_names names 2 '
                     r'classes but model.num_classes=4'):
    data.class_info(config)
  config.model.num_classes = 3  # a BOM (Windows' Notepad) is no character
  config.data.class_names = ()
  (tmp_path / 'classes.txt').write_bytes('road\ncar\nroad\n'.encode(
      'utf-8-sig'))
  with pytest.raises(errors.ConfigError, match=rf'^{tmp_path}/classes.txt: '
                     r"the class name 'road' is given twice"):
    data.class_info(config)
  # Training applies the same rules in the same words (one home).
  with pytest.raises(errors.ConfigError, match=r"^data.name='folder': the "
                     r"class name 'road' is given twice"):
    data.create_source(config, 'train')
  config.data.class_names = ('a', 'b')
  with pytest.raises(errors.ConfigError, match=r'^data.class_names names 2 '
                     r'classes but model.num_classes=3'):
    data.create_source(config, 'train')
  config.data.class_names = ()
  (tmp_path / 'classes.txt').write_bytes('road\ncar\nsky\n'.encode(
      'utf-8-sig'))
  assert data.class_info(config)[0] == ('road', 'car', 'sky')
  # One that names no class, in training and in the class table alike.
  for text in ('', '\n  \n', '# my classes\n\n#todo\n'):
    (tmp_path / 'classes.txt').write_text(text)
    for read in (data.class_info, lambda c: data.create_source(c, 'train')):
      with pytest.raises(errors.ConfigError, match=(
          rf'^{tmp_path}/classes.txt names no class \(it is empty, blank or '
          r'only comments\): write one class name a line, in class-id '
          r'order, or remove it \(the classes are then named class_0')):
        read(config)
  (tmp_path / 'classes.txt').write_text('road\ncar\nsky\n')
  # On the command line, --config.data.class_names=bg,lane,sky arrives as
  # one string in a tuple: its names are the comma-separated ones.
  config.data.class_names = ('bg, lane,sky',)
  assert data.class_info(config)[0] == ('bg', 'lane', 'sky')
  assert data.create_source(config, 'train').class_names == ('bg', 'lane',
                                                             'sky')
  # A name with a comma (classes.txt, or a tuple) is one name, also read
  # back from the run folder's config.
  config.data.class_names = ()
  (tmp_path / 'classes.txt').write_text('bg\nbuilding, edifice\nsky\n')
  resolved = data.resolved_config(config, data.create_source(config,
                                                             'train'))
  assert resolved.data.class_names == ('bg', 'building, edifice', 'sky')
  assert data.class_info(resolved)[0] == ('bg', 'building, edifice', 'sky')


def test_data_root_unset_or_one_level_too_deep_is_named(tmp_path):
  ud.write_folder(tmp_path, n=8)
  with pytest.raises(errors.MissingFileError, match=r'^folder: data.root is '
                     r'not set; give --config.data.root=<the dataset folder> '
                     r'\(it must hold images/ and masks/\).$'):
    data.create_source(ud.folder_config(''), 'train')
  with pytest.raises(errors.MissingFileError, match=rf'^folder: data.root='
                     rf"'{tmp_path}/images/' is the images folder; give the "
                     r'folder that holds images/ and masks/: '
                     rf'--config.data.root={tmp_path}.$'):
    data.create_source(ud.folder_config(f'{tmp_path}/images/'), 'train')


def test_a_missing_validation_split_says_how_to_train_without_one(tmp_path):
  ud.write_folder(tmp_path, n=8)
  with pytest.raises(errors.MissingFileError,
                     match=r'^folder/val: folder .*images/val does not exist\. '
                     r"To train without validation: "
                     r"--config.data.val_split=''\.$"):
    data.open_split(ud.folder_config(tmp_path), 'val')
  # evaluate's: another split, not training advice.
  with pytest.raises(errors.MissingFileError,
                     match=r'images/val does not exist\. Evaluate another '
                     r'split with --split=NAME \(e\.g\. --split=train\), or '
                     r'point data.val_split at one\.$'):
    data.open_split(ud.folder_config(tmp_path), 'val', training=False)
  # No dataset folder at all: no advice about splits.
  with pytest.raises(errors.MissingFileError, match=r'does not exist; it '
                     r'must hold images/ and masks/.$'):
    data.open_split(ud.folder_config(tmp_path / 'gone'), 'val', training=False)
  # A run trained without validation: --split=val names no split.
  from seg_jax import evaluate  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=r"--split=val \(evaluate's "
                     r'default, which reads data.val_split\) names no split: '
                     r"name the dataset's split with --config.data.val_split="
                     r'NAME \(e.g. val\), or give --split=train.$'):
    evaluate.evaluate(ud.folder_config(tmp_path, **{'data.val_split': ''}),
                      str(tmp_path / 'run'))


def test_validation_sizes_are_fitted_or_refused_at_startup(tmp_path):
  """Unset, data.eval_pad_size fits the largest validation image (rounded
  up to 32) and is stored; set too small, `main` refuses in one line that
  names the image and the setting, before any step."""
  ud.write_folder(tmp_path, n=10)
  ud.write_folder(tmp_path, n=2, split='val', size=(40, 20))
  config = ud.folder_config(tmp_path)
  train_src, _ = data.open_split(config, 'train')
  val_src, sizes = data.open_split(config, 'val')
  resolved = data.resolved_config(config, train_src, val_src, sizes)
  assert resolved.data.eval_pad_size == (64, 32)
  # The run folder's config says the value was fitted: another split (or
  # larger images later) is fitted again, not refused; one given by hand
  # is kept and checked.
  assert resolved.data.eval_pad_size_fitted == (64, 32)
  assert data.fit_eval_pad_size(resolved, val_src, [(100, 20)] * 2) == (
      128, 32)
  assert data.resolved_config(resolved, train_src, val_src, [(
      100, 20)] * 2).data.eval_pad_size_fitted == (128, 32)
  by_hand = copy.deepcopy(resolved)
  by_hand.data.eval_pad_size = (64, 64)
  assert data.fit_eval_pad_size(by_hand, val_src, sizes) == (64, 64)
  with pytest.raises(errors.ConfigError, match=r'is 100x20 \(HxW\), larger '
                     r'than data.eval_pad_size=\(64, 64\)'):
    data.fit_eval_pad_size(by_hand, val_src, [(100, 20)] * 2)
  assert data.resolved_config(by_hand, train_src, val_src,
                              sizes).data.eval_pad_size_fitted == ()
  relative = ud.folder_config(os.path.relpath(tmp_path))  # stored absolute
  assert data.resolved_config(relative, train_src).data.root == str(tmp_path)
  assert resolved.data.class_names == ('class_0', 'class_1', 'class_2')
  assert np.array_equal(resolved.data.palette, ud.PALETTE)
  rc, _, stderr = _cli('main', *ud.cli_args(tmp_path),
                       f'--workdir={tmp_path}/run',
                       '--config.data.eval_pad_size=(32,32)')
  _one_line_error(rc, stderr, 2, r'images/val/img_00\d.png is 40x20 \(HxW\), '
                  r'larger than data.eval_pad_size=\(32, 32\)',
                  r'--config.data.eval_pad_size="\(64, 32\)"')
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_bad_validation_mask_keeps_the_trained_steps_and_workdir_remembers(
    tmp_path):
  """A validation mask that fails only when evaluated: the run stops in
  one line saying the checkpoint of the step it reached is saved. Fixed,
  the run resumes with `--workdir` alone (its config.json keeps the
  overrides), and evaluate, predict and export need nothing else either;
  predictions are palette PNGs with the masks' own palette."""
  ud.write_folder(tmp_path / 'data', n=10)
  paths = ud.write_folder(tmp_path / 'data', n=3, split='val')
  good = open(paths[1][1], 'rb').read()
  ud.save_mask(paths[1][1], np.full(ud.SIZE, 7, np.uint8))
  run = f'--workdir={tmp_path}/run'
  rc, _, stderr = _cli('main', *ud.cli_args(tmp_path / 'data', **{
      'model.kwargs.width': 2}), run)
  _one_line_error(rc, stderr, 1, r'^error: Evaluation at step 4 failed: '
                  r'.*masks/val/img_001.png: mask values \[7\]',
                  r'checkpoint 4 is saved in .*run/checkpoints')
  assert checkpoint.Checkpointer(f'{tmp_path}/run/checkpoints', 4,
                                 3).all_steps() == [4]
  open(paths[1][1], 'wb').write(good)
  rc, stdout, stderr = _cli('main', run, '--config.train.num_steps=6')
  assert rc == 0, stderr[-3000:]
  assert re.search(r'^Finished: step=6 .*mIoU=', stdout, re.M)
  assert 'Resumed from step 4' in stderr
  # The failed evaluation of step 4 runs on resume, stored with its
  # checkpoint (which can then be the best; its file list still checks).
  assert 'Checkpoint 4 was saved without its evaluation' in stderr
  miou4 = re.search(r'eval whole at step 4 took .*: mIoU=([\d.]+)', stderr)
  kept = checkpoint.Checkpointer(f'{tmp_path}/run/checkpoints', 4, 3)
  assert f'{kept.score(4):.4f}' == miou4.group(1)
  assert kept.score(6) is not None and kept.all_steps() == [4, 6]
  checkpoint.verify(f'{tmp_path}/run/checkpoints', 4)
  stored = json.load(open(tmp_path / 'run' / 'config.json'))
  assert stored['model']['kwargs']['width'] == 2
  assert stored['train']['num_steps'] == 6
  rc, stdout, stderr = _cli('evaluate', run)
  assert rc == 0, stderr[-3000:]
  assert re.search(r'Evaluated: step=6 split=val evaluator=whole', stdout)
  # In skip mode the report says how many images were scored.
  ud.save_mask(paths[1][1], np.full(ud.SIZE, 7, np.uint8))
  rc, stdout, stderr = _cli('evaluate', run, '--config.data.on_bad_sample=skip',
                            f'--out={tmp_path}/skip')
  assert rc == 0, stderr[-3000:]
  assert "1 of 3 images skipped (data.on_bad_sample='skip'): the scores are " \
      'of the other 2.' in stdout
  with open(tmp_path / 'skip' / 'val_whole_step6.json') as f:
    report = json.load(f)
  assert (report['images'], report['skipped']) == (2, 1)
  assert report['data'] == {'name': 'folder', 'root': str(tmp_path / 'data')}
  open(paths[1][1], 'wb').write(good)
  rc, stdout, stderr = _cli('predict', run, f'--out={tmp_path}/pred',
                            f'{tmp_path}/data/images/val')
  assert rc == 0, stderr[-3000:]
  with Image.open(tmp_path / 'pred' / 'val' / 'img_000.png') as im:
    assert im.mode == 'P'
    palette = np.asarray(im.getpalette()[:9]).reshape(3, 3)
  np.testing.assert_array_equal(palette, ud.PALETTE)
  rc, stdout, stderr = _cli('export', run, f'--out={tmp_path}/model.bin')
  assert rc == 0, stderr[-3000:]
  assert json.load(open(f'{tmp_path}/model.bin.json'))['class_names'] == [
      'class_0', 'class_1', 'class_2']
  # An override that contradicts the checkpoints is refused, named.
  _one_line_error(*_cli('evaluate', run, '--config.model.kwargs.width=4')[::2],
                  2, r'model.kwargs.width=4 contradicts the run in .*run, whose '
                  r'checkpoints were trained with model.kwargs.width=2 ')
  # data.channels shapes the stem's kernel: refused before the restore,
  # and the run folder's config.json keeps what the checkpoints hold.
  _one_line_error(*_cli('main', run, '--config.data.channels=1',
                        '--config.data.mean=(0.5,)',
                        '--config.data.std=(0.2,)')[::2],
                  2, r'data.channels=1 contradicts the run in .*run, whose '
                  r'checkpoints were trained with data.channels=3 ')
  stored = json.load(open(tmp_path / 'run' / 'config.json'))
  assert stored['data']['channels'] == 3 and len(stored['data']['mean']) == 3
  _one_line_error(*_cli('evaluate', run, '--config.data.nope=1')[::2], 2,
                  r'--config.data.nope: .*run/config.json has no such key')
  _one_line_error(*_cli('predict', run, f'--out={tmp_path}/p2',
                        '--keep=sky', paths[0][0])[::2],
                  2, r"--keep='sky' is not a class of this model")


@pytest.mark.parametrize('fault, code, pattern', [
    ('suffix', 2, r"no image has a mask: .*mask_suffix='_mask'"),
    ('empty', 1, r'img_003.png: cannot read it \(the file is empty\)'),
    ('size', 1, r'img_002.png: mask is 16x16 \(HxW\) but its image .* is '
                r'24x32'),
    ('class', 1, r'Reading the batch of step 1 failed: .*img_00\d.png: mask '
                 r'values \[3\].*data.check` lists every bad file.*no step '
                 r'had been trained'),
    ('ignore', 2, r'data.ignore_label=1 must be in 3..255'),
    ('collision', 2, r'img_001.jpg and .*img_001.png have the same name'),
    ('jpeg', 2, r'folder/train: .*masks/train/img_004.jpg is a JPEG mask: '
                r"JPEG's lossy compression changes the class ids"),
    ('batch', 2, r'folder/train: 10 example\(s\), fewer than one training '
                 r'batch \(train.global_batch_size=16\); give '
                 r'--config.train.global_batch_size=10 or less'),
])
def test_errors_a_user_can_cause_are_one_line(tmp_path, fault, code, pattern):
  ud.write_folder(tmp_path, n=10, mask_suffix='_mask' if fault == 'suffix'
                  else '')
  ud.write_folder(tmp_path, n=2, split='val')
  extra = []
  if fault == 'empty':
    open(tmp_path / 'images' / 'train' / 'img_003.png', 'w').close()
  elif fault == 'size':
    ud.save_mask(str(tmp_path / 'masks' / 'train' / 'img_002.png'),
                 np.zeros((16, 16), np.uint8))
  elif fault == 'class':
    for i in range(10):
      ud.save_mask(str(tmp_path / 'masks' / 'train' / f'img_{i:03d}.png'),
                   np.full(ud.SIZE, 3, np.uint8))
  elif fault == 'ignore':
    extra = ['--config.data.ignore_label=1']
  elif fault == 'jpeg':
    os.remove(tmp_path / 'masks' / 'train' / 'img_004.png')
    Image.fromarray(ud.example(4)[1]).save(
        tmp_path / 'masks' / 'train' / 'img_004.jpg')
  elif fault == 'batch':
    extra = ['--config.train.global_batch_size=16']
  elif fault == 'collision':
    Image.open(tmp_path / 'images' / 'train' / 'img_001.png').save(
        tmp_path / 'images' / 'train' / 'img_001.jpg')
  rc, _, stderr = _cli('main', *ud.cli_args(tmp_path), *extra,
                       f'--workdir={tmp_path}/run')
  _one_line_error(rc, stderr, code, pattern)
  if fault == 'batch':  # a start that wrote nothing leaves no folder
    assert not os.path.exists(tmp_path / 'run'), os.listdir(tmp_path / 'run')


# --- Ctrl-C ---------------------------------------------------------------


# Ctrl-C during training, saved and resumed: release runs only (by default
# test_resume's signal test checks that save, its SIGKILL test the resume).
@pytest.mark.parametrize('moment', [
    0.4, 3.0, pytest.param('trained', marks=pytest.mark.slow)])
def test_sigint_at_any_moment_exits_cleanly_and_a_saved_run_resumes(
    tmp_path, moment):
  """SIGINT during imports, set-up and compilation, or training: never a
  traceback or a crash; a run that saved resumes to the end."""
  args = ['--config=configs/unet_shapes_tiny.py', f'--workdir={tmp_path}',
          '--config.train.num_steps=100000', '--config.checkpoint.every_steps=5',
          '--config.eval.every_steps=100000',
          '--config.compilation_cache_dir=']
  proc = subprocess.Popen([sys.executable, '-m', 'seg_jax.main', *args],
                          cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    if moment == 'trained':
      deadline = time.time() + 120
      while not os.path.isdir(tmp_path / 'checkpoints' / '5'):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    else:
      time.sleep(moment)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 130, out[-3000:]  # 128 + SIGINT: not finished
  assert 'Traceback' not in out and 'Fatal Python error' not in out, out
  last = out.strip().splitlines()[-1]
  assert re.match(r'Stopped by SIGINT', last), last
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints')
                 if s.isdigit()) if os.path.isdir(tmp_path / 'checkpoints') \
      else []
  if moment == 'trained':
    assert steps and steps[-1] >= 5
  if steps:
    rc, stdout, stderr = _cli('main', f'--workdir={tmp_path}',
                              f'--config.train.num_steps={steps[-1] + 2}')
    assert rc == 0, stderr[-3000:]
    assert f'Finished: step={steps[-1] + 2}' in stdout


# --- seg_jax.data.check ---------------------------------------------------


def _faulty_dataset(root):
  """Eleven kinds of faults, one file each; returns the faulty files."""
  ud.write_folder(root, n=14)
  ud.write_folder(root, n=3, split='val')
  img = lambda i: root / 'images' / 'train' / f'img_{i:03d}.png'
  msk = lambda i: root / 'masks' / 'train' / f'img_{i:03d}.png'
  faults = {}
  img(0).write_bytes(b'not an image at all')
  faults['undecodable'] = img(0)
  img(1).write_bytes(b'')
  faults['empty'] = img(1)
  os.remove(msk(2))
  faults['no mask'] = img(2)
  ud.save_mask(str(root / 'masks' / 'train' / 'extra.png'),
               np.zeros(ud.SIZE, np.uint8))
  faults['no image'] = root / 'masks' / 'train' / 'extra.png'
  Image.open(img(3)).save(root / 'images' / 'train' / 'img_003.jpg')
  faults['collision'] = root / 'images' / 'train' / 'img_003.jpg'
  ud.save_mask(str(msk(4)), np.zeros((10, 10), np.uint8))
  faults['size'] = msk(4)
  ud.save_mask(str(msk(5)), np.full(ud.SIZE, 5, np.uint8))
  faults['class id'] = msk(5)
  Image.fromarray(ud.PALETTE[ud.example(6)[1]]).save(msk(6))
  faults['colour mask'] = msk(6)
  binary = np.zeros(ud.SIZE, np.uint8)  # 3 classes: background + ignored
  binary[4:9] = 255
  Image.fromarray(binary).save(msk(7))
  Image.fromarray(np.full(ud.SIZE, 3.0, np.float32)).save(
      root / 'images' / 'train' / 'img_008.tif')
  os.remove(img(8))
  faults['float range'] = root / 'images' / 'train' / 'img_008.tif'
  ud.save_image(str(root / 'images' / 'val' / 'img_002.png'),
                ud.example(2, (40, 32))[0])
  ud.save_mask(str(root / 'masks' / 'val' / 'img_002.png'),
               ud.example(2, (40, 32))[1])
  faults['larger than eval_pad_size'] = root / 'images' / 'val' / 'img_002.png'
  os.remove(msk(10))  # flat, so the JPEG keeps its values: only the format
  Image.fromarray(np.zeros(ud.SIZE, np.uint8)).save(
      root / 'masks' / 'train' / 'img_010.jpg')
  faults['JPEG mask'] = root / 'masks' / 'train' / 'img_010.jpg'
  Image.fromarray(np.zeros(ud.SIZE, np.uint8)).save(msk(11), format='JPEG')
  faults['JPEG named .png'] = msk(11)
  return faults


def test_check_lists_every_faulty_file_and_exits_1(tmp_path):
  faults = _faulty_dataset(tmp_path)
  ud.save_image(str(tmp_path / 'images' / 'train' / 'img_009.png'),
                ud.example(9)[0], form='gray16')
  rc, stdout, _ = _cli('data.check', *ud.cli_args(tmp_path),
                       '--config.data.eval_pad_size=(32,32)')
  assert rc == 1, stdout
  errors_ = [l for l in stdout.splitlines() if l.startswith('  ERROR ')]
  for kind, path in faults.items():
    assert [e for e in errors_ if str(path) in e], (kind, path, stdout)
  assert len(errors_) == len(faults), stdout
  assert re.search(r'NOTE 1 image\(s\): 16-bit grayscale .*img_009.png',
                   stdout)
  assert f'{len(faults)} problem(s) found' in stdout
  # The class table counts the masks that were read, and says so.
  assert '  classes of the 5 of 13 masks read:' in stdout, stdout


def test_check_says_a_missing_data_root_once(tmp_path):
  out = io.StringIO()
  assert check.check(ud.folder_config(tmp_path / 'gone'), out=out) == 1
  problem = (f"folder: dataset folder data.root='{tmp_path}/gone' does not "
             'exist; it must hold images/ and masks/.')
  assert out.getvalue().splitlines() == [
      'train: (not opened), 0 examples', f'  ERROR {problem}',
      'val: (not opened), 0 examples', '  ERROR 1 problem(s) as above',
      '1 problem(s) found']


def test_check_has_no_class_table_when_no_mask_is_read(tmp_path):
  ud.write_folder(tmp_path, n=2)
  for name in os.listdir(tmp_path / 'masks' / 'train'):
    (tmp_path / 'masks' / 'train' / name).write_bytes(b'')
  report = check.check_split(ud.folder_config(tmp_path), 'train')
  assert report.examples == 2 and report.counted == 0
  lines = check.format_report(report, ['a', 'b', 'c'])
  assert lines[-1] == '  no mask could be read: no class table', lines
  assert len([l for l in lines
              if l.startswith('  ERROR ') and 'cannot decode mask' in l]) == 2


def test_check_prints_the_class_table_of_a_clean_dataset(tmp_path):
  ud.write_folder(tmp_path, n=8)
  ud.write_folder(tmp_path, n=2, split='val')
  rc, stdout, _ = _cli('data.check', *ud.cli_args(tmp_path))
  assert rc == 0, stdout
  masks = np.stack([ud.example(i)[1] for i in range(8)])
  counts = np.bincount(masks.ravel(), minlength=3)
  total = counts.sum()
  for k in range(3):
    images = sum(int((m == k).any()) for m in masks)
    assert re.search(rf'^\s+{k}\s+class_{k}\s+{counts[k]:,}\s+'
                     rf'{100 * counts[k] / total:.1f}%\s+{images}$', stdout,
                     re.M), stdout
  assert 'No problems found.' in stdout
  report = check.check_split(ud.folder_config(tmp_path), 'val')
  assert report.errors == [] and report.examples == 2
  # Training needs one full batch of the split.
  report = check.check_split(
      ud.folder_config(tmp_path, **{'train.global_batch_size': 16}), 'train')
  assert report.errors == [
      'folder/train: 8 example(s), fewer than one training batch '
      '(train.global_batch_size=16); give --config.train.global_batch_size=8 '
      'or less (a multiple of the device count) or add images.']


def test_check_reads_a_run_folders_config(tmp_path):
  """--workdir alone: the stored config.json is the one checked."""
  ud.write_folder(tmp_path / 'data', n=8)
  ud.write_folder(tmp_path / 'data', n=2, split='val')
  from seg_jax import workdir  # pylint: disable=g-import-not-at-top
  workdir.write_config(tmp_path / 'run', ud.folder_config(tmp_path / 'data'))
  out = io.StringIO()
  assert check.check(workdir.read_config(tmp_path / 'run'), out=out) == 0
  assert 'train: folder/train, 8 examples' in out.getvalue()
  rc, stdout, _ = _cli('data.check', f'--workdir={tmp_path}/run')
  assert rc == 0 and 'val: folder/val, 2 examples' in stdout, stdout
