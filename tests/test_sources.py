"""Dataset sources on small fixtures written in each dataset's on-disk format.

Every test asserts exact label values after loading: palette indices (not
colours), the Cityscapes id -> train id table, the ADE20K shift, CamVid's
ignore class, and 255 kept as ignore.
"""

import os

import numpy as np
import pytest
from PIL import Image

from seg_jax import data, errors
from seg_jax.data import files, pipeline, sources

CAMVID = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                      'camvid')


def _image(path, h, w, seed=0, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(array).save(path, format=fmt)
  return array


def _mask(path, values, mode='L', palette=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(np.asarray(values, np.uint8), mode)
  if palette is not None:  # a full 256-entry palette, as VOC's files have
    im.putpalette(list(palette) + [0] * (768 - len(palette)))
  im.save(path)


def _grid(values, h=6, w=8):
  """An (h, w) mask holding `values` in row-major order, repeated."""
  flat = np.resize(np.asarray(values, np.uint8), h * w)
  return flat.reshape(h, w)


def _config(name, root, num_classes, **data_kw):
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.data.name, c.data.root = name, str(root)
  c.model.num_classes = num_classes
  for k, v in data_kw.items():
    setattr(c.data, k, v)
  return c


# --- Pascal VOC -----------------------------------------------------------


def _voc(root, ids=('2007_000032', '2007_000039'), split='train'):
  voc = root / 'VOCdevkit' / 'VOC2012'
  palette = sources.VOC_PALETTE.ravel().tolist()
  masks = {}
  for n, i in enumerate(ids):
    _image(str(voc / 'JPEGImages' / f'{i}.jpg'), 6, 8, seed=n)
    masks[i] = _grid([0, 1, 15, 20, 255, 7], 6, 8)
    _mask(str(voc / 'SegmentationClass' / f'{i}.png'), masks[i], 'P',
          palette)
  lists = voc / 'ImageSets' / 'Segmentation'
  lists.mkdir(parents=True, exist_ok=True)
  (lists / f'{split}.txt').write_text('\n'.join(ids) + '\n')
  return voc, masks


def test_voc_palette_png_reads_indices_not_colours(tmp_path):
  voc, masks = _voc(tmp_path)
  # The mask file really is a colour-palette PNG.
  with Image.open(voc / 'SegmentationClass' / '2007_000032.png') as im:
    assert im.mode == 'P'
    assert np.asarray(im.convert('RGB'))[0, 1].tolist() == [128, 0, 0]
  for root in (voc, voc.parent):  # VOC2012 or the VOCdevkit above it
    src = data.create_source(_config('voc', root, 21), 'train')
    assert len(src) == 2 and len(src.class_names) == 21
    ex = src[0]
    np.testing.assert_array_equal(ex['label'], masks['2007_000032'])
    assert ex['label'].dtype == np.uint8 and ex['image'].shape == (6, 8, 3)
  assert src.palette[15].tolist() == [192, 128, 128]  # person


def test_voc_train_aug_uses_sbd_masks(tmp_path):
  voc, _ = _voc(tmp_path)
  cfg = _config('voc', voc, 21, train_split='train_aug')
  with pytest.raises(FileNotFoundError, match='SegmentationClassAug'):
    data.create_source(cfg, 'train')
  aug = _grid([3, 4, 255, 0], 6, 8)
  _mask(str(voc / 'SegmentationClassAug' / '2007_000039.png'), aug)
  (voc / 'ImageSets' / 'Segmentation' / 'train_aug.txt').write_text(
      '2007_000039\n')
  src = data.create_source(cfg, 'train')
  assert len(src) == 1
  np.testing.assert_array_equal(src[0]['label'], aug)
  # DeepLab's two-column list: image and mask paths under VOC2012.
  (voc / 'ImageSets' / 'Segmentation' / 'train_aug.txt').write_text(
      '/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n'
      '/JPEGImages/2007_000032.jpg /SegmentationClass/2007_000032.png\n')
  src = data.create_source(cfg, 'train')
  assert len(src) == 2
  np.testing.assert_array_equal(src[0]['label'], aug)
  np.testing.assert_array_equal(src[1]['label'], _grid([0, 1, 15, 20, 255, 7]))
  (voc / 'ImageSets' / 'Segmentation' / 'train_aug.txt').write_text(
      'a b c\n')
  with pytest.raises(errors.ConfigError, match=r"train_aug.txt: the line "
                     r"'a b c' is neither an image id nor an image path and "
                     r'a mask path.$'):
    data.create_source(cfg, 'train')


# --- Cityscapes -----------------------------------------------------------


def test_cityscapes_label_ids_to_train_ids(tmp_path):
  root = tmp_path / 'cityscapes'
  stem = 'aachen_000000_000019'
  _image(str(root / 'leftImg8bit/train/aachen' / f'{stem}_leftImg8bit.png'),
         6, 8)
  raw = _grid([0, 1, 6, 7, 8, 11, 17, 23, 24, 26, 31, 33, 9, 29], 6, 8)
  _mask(str(root / 'gtFine/train/aachen' / f'{stem}_gtFine_labelIds.png'),
        raw)
  src = data.create_source(_config('cityscapes', root, 19), 'train')
  expected = {0: 255, 1: 255, 6: 255, 7: 0, 8: 1, 11: 2, 17: 5, 23: 10,
              24: 11, 26: 13, 31: 16, 33: 18, 9: 255, 29: 255}
  np.testing.assert_array_equal(src[0]['label'],
                                np.vectorize(expected.get)(raw))
  assert src.class_names[13] == 'car'
  assert src.palette[0].tolist() == [128, 64, 128]
  _mask(str(root / 'gtFine/train/aachen' / f'{stem}_gtFine_labelIds.png'),
        _grid([7, 34]))
  with pytest.raises(files.BadSampleError,
                     match=rf'{stem}_gtFine_labelIds.png: mask values \[34\]'):
    src[0]


# --- ADE20K ---------------------------------------------------------------


def test_ade20k_zero_ignored_and_shifted(tmp_path):
  root = tmp_path / 'ADEChallengeData2016'
  _image(str(root / 'images/validation/ADE_val_00000001.jpg'), 6, 8)
  raw = _grid([0, 1, 2, 150, 75], 6, 8)
  _mask(str(root / 'annotations/validation/ADE_val_00000001.png'), raw)
  src = data.create_source(_config('ade20k', root, 150), 'val')
  expected = np.where(raw == 0, 255, raw.astype(int) - 1)
  np.testing.assert_array_equal(src[0]['label'], expected)
  assert src.class_names[0] == 'wall' and src.class_names[149] == 'flag'
  assert len(set(map(tuple, src.palette.tolist()))) == 150
  _mask(str(root / 'annotations/validation/ADE_val_00000001.png'),
        _grid([1, 151]))
  with pytest.raises(files.BadSampleError, match=r'mask values \[151\]'):
    src[0]


# --- CamVid ---------------------------------------------------------------


def _camvid(root, n=3, split='train'):
  lines, masks = [], []
  for i in range(n):
    _image(str(root / split / f'0001TP_{i:06d}.png'), 6, 8, seed=i)
    masks.append(_grid([0, 3, 10, 11, 5, i], 6, 8))
    _mask(str(root / f'{split}annot' / f'0001TP_{i:06d}.png'), masks[-1])
    lines.append(f'/SegNet/CamVid/{split}/0001TP_{i:06d}.png '
                 f'/SegNet/CamVid/{split}annot/0001TP_{i:06d}.png')
  (root / f'{split}.txt').write_text('\n'.join(lines) + '\n')
  return masks


def test_camvid_list_paths_resolved_and_11_ignored(tmp_path):
  masks = _camvid(tmp_path)
  src = data.create_source(_config('camvid', tmp_path, 11), 'train')
  assert len(src) == 3
  assert src.pairs[1][0] == os.path.join(str(tmp_path),
                                         'train/0001TP_000001.png')
  for i in range(3):
    np.testing.assert_array_equal(
        src[i]['label'], np.where(masks[i] == 11, 255, masks[i]))
  assert src.class_names[9] == 'pedestrian'


def test_a_training_split_has_its_headers_read_before_any_step(tmp_path):
  """A list dataset's training split has its headers read as it is
  opened: an empty mask stops the run before any step; evaluated, the
  split's canvas is fitted (or a hand-set one too small refused naming the
  image) before any step. An image found too large only as it is
  evaluated (a tfds split) is a one-line ConfigError giving the setting
  that fits."""
  from seg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  _camvid(tmp_path)
  c = _config('camvid', tmp_path, 11, crop_size=(4, 4))
  assert data.open_split(c, 'train')[1] == [(6, 8)] * 3
  assert data.open_split(c, 'train', training=False)[1] == [(6, 8)] * 3
  c.data.eval_pad_size = (4, 40)
  with pytest.raises(errors.ConfigError, match=r'0001TP_000000.png is 6x8 '
                     r'\(HxW\), larger than data.eval_pad_size=\(4, 40\)'):
    data.fit_eval_pad_size(c, *data.open_split(c, 'train', training=False))
  element = {'image': np.zeros((40, 70, 3), np.uint8),
             'label': np.zeros((40, 70), np.uint8)}
  with pytest.raises(errors.ConfigError, match=(
      r'^An evaluation image is 40x70 \(HxW\), larger than data.eval_pad_'
      r'size=\(32, 96\) that evaluation pads to: set --config.data.eval_'
      r'pad_size="\(64, 96\)" or larger')):
    transforms.EvalTransform(pad_size=(32, 96)).map(element)
  (tmp_path / 'trainannot' / '0001TP_000001.png').write_bytes(b'')
  c.data.eval_pad_size = ()
  with pytest.raises(errors.BadSampleError, match=r'trainannot/0001TP_000001'
                     r'.png: cannot read it \(the file is empty\)'):
    data.open_split(c, 'train')


@pytest.mark.skipif(not os.path.isdir(CAMVID), reason='no ../shared/data')
def test_camvid_real_data_counts_and_values():
  cfg = _config('camvid', CAMVID, 11)
  train, val = (data.create_source(cfg, s) for s in ('train', 'val'))
  assert (len(train), len(val)) == (367, 101)
  ex = val[0]
  assert ex['image'].shape == (360, 480, 3) and ex['label'].shape == (360, 480)
  raw = np.asarray(Image.open(val.pairs[0][1]))
  np.testing.assert_array_equal(ex['label'], np.where(raw == 11, 255, raw))
  assert set(np.unique(ex['label'])) <= set(range(11)) | {255}


# --- Folder ---------------------------------------------------------------


def _folder(root, n=4, split='train', layout='images/split'):
  masks = []
  for i in range(n):
    if layout == 'images/split':
      image_dir, mask_dir = root / 'images' / split, root / 'masks' / split
    else:
      image_dir, mask_dir = root / split / 'images', root / split / 'masks'
    _image(str(image_dir / f'im{i}.jpg'), 6, 8, seed=i)
    masks.append(_grid([0, 1, 2, 255, i % 3], 6, 8))
    _mask(str(mask_dir / f'im{i}.png'), masks[-1], 'P',
          sources.color_map(3).ravel().tolist())
  return masks


@pytest.mark.parametrize('layout', ['images/split', 'split/images'])
def test_folder_matched_by_stem_with_class_names(tmp_path, layout):
  masks = _folder(tmp_path, layout=layout)
  (tmp_path / 'classes.txt').write_text('ground\nplant\nweed\n')
  src = data.create_source(_config('folder', tmp_path, 3), 'train')
  assert src.class_names == ('ground', 'plant', 'weed')
  assert len(src) == 4
  for i in range(4):
    np.testing.assert_array_equal(src[i]['label'], masks[i])
  with pytest.raises(ValueError, match='classes.txt names 3 classes'):
    data.create_source(_config('folder', tmp_path, 4), 'train')


# --- TFDS -----------------------------------------------------------------


def _png_bytes(array):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  buffer.seek(0)
  return buffer


def test_tfds_array_record_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('array_record')
  masks = [_grid([1, 2, 3, 2], 6, 8), _grid([3, 3, 1], 6, 8)]
  images = [np.random.default_rng(i).integers(0, 256, (6, 8, 3), np.uint8)
            for i in range(2)]

  class TinyPets(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'segmentation_mask': tfds.features.Image(shape=(None, None, 1),
                                                   use_colormap=False)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      # Encoded PNGs: TFDS stores them as they are, without TensorFlow.
      for i in range(2):
        yield i, {'image': _png_bytes(images[i]),
                  'segmentation_mask': _png_bytes(masks[i])}

  TinyPets(data_dir=str(tmp_path), file_format='array_record'
           ).download_and_prepare()
  cfg = _config('tfds', '', 3)
  cfg.data.tfds.name = 'tiny_pets'
  cfg.data.tfds.data_dir = str(tmp_path)
  cfg.data.tfds.label_offset = -1  # pets trimaps: 1, 2, 3 -> 0, 1, 2
  cfg.data.tfds.class_names = ('pet', 'background', 'border')
  src = data.create_source(cfg, 'train')
  assert len(src) == 2
  # Each way of not finding it, in one line saying which.
  with pytest.raises(FileNotFoundError, match=r"^tfds:tiny_pets/val: tiny_pets "
                     r"has no split 'val'; it has train: set data.train_split"):
    data.create_source(cfg, 'val')
  cfg.data.tfds.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match=r"data.tfds.data_dir='.*nowhere' "
                     r'does not exist: give the folder the dataset was '
                     r'prepared in, or prepare it with `tfds build tiny_pets'):
    data.create_source(cfg, 'train')
  cfg.data.tfds.data_dir, cfg.data.tfds.name = str(tmp_path), 'tiny_pats'
  with pytest.raises(FileNotFoundError, match=r"no dataset 'tiny_pats' is "
                     r'prepared in .* \(it holds .*tiny_pets\) nor known to '
                     r'tfds: check data.tfds.name and data.tfds.data_dir.$'):
    data.create_source(cfg, 'train')
  cfg.data.tfds.name = 'tiny_pets'
  got = sorted((src[i] for i in range(2)), key=lambda e: e['label'].sum())
  want = sorted(zip(images, masks), key=lambda p: (p[1] - 1).sum())
  for ex, (image, mask) in zip(got, want):
    np.testing.assert_array_equal(ex['image'], image)
    np.testing.assert_array_equal(ex['label'], mask - 1)
  cfg.data.tfds.ignore_values = (3,)
  cfg.data.tfds.class_names = ('pet', 'background')
  cfg.model.num_classes = 2
  src = data.create_source(cfg, 'train')
  labels = sorted((src[i]['label'] for i in range(2)), key=lambda l: l.sum())
  want = sorted((np.where(m == 3, 255, m - 1) for m in masks),
                key=lambda l: l.sum())
  for got_label, want_label in zip(labels, want):
    np.testing.assert_array_equal(got_label, want_label)


# --- Bad input ------------------------------------------------------------


def test_missing_root_list_and_empty_split_name_the_path(tmp_path):
  missing = tmp_path / 'nowhere'
  for name in ('voc', 'cityscapes', 'ade20k', 'camvid', 'folder'):
    with pytest.raises(FileNotFoundError, match='data.root=.*nowhere'):
      data.create_source(_config(name, missing, 11), 'train')
  with pytest.raises(FileNotFoundError, match=r'VOC2012 not found under '
                     r'data.root=.*: expected JPEGImages/'):
    data.create_source(_config('voc', tmp_path, 21), 'val')
  (tmp_path / 'JPEGImages').mkdir()
  (tmp_path / 'ImageSets' / 'Segmentation').mkdir(parents=True)
  with pytest.raises(FileNotFoundError,
                     match=r'ImageSets/Segmentation/val.txt does not exist'):
    data.create_source(_config('voc', tmp_path, 21), 'val')
  (tmp_path / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('\n\n')
  with pytest.raises(ValueError, match=r'Segmentation/val.txt is empty'):
    data.create_source(_config('voc', tmp_path, 21), 'val')
  (tmp_path / 'images' / 'train').mkdir(parents=True)
  (tmp_path / 'masks' / 'train').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r'no images in .*images/train'):
    data.create_source(_config('folder', tmp_path, 2), 'train')


def test_list_entry_without_file_raises_or_is_skipped(tmp_path):
  _camvid(tmp_path, n=3)
  os.remove(tmp_path / 'trainannot' / '0001TP_000001.png')
  with pytest.raises(FileNotFoundError,
                     match=r'trainannot/0001TP_000001.png \(listed in .*'
                           r'train.txt\) does not exist'):
    data.create_source(_config('camvid', tmp_path, 11), 'train')
  src = data.create_source(
      _config('camvid', tmp_path, 11, on_bad_sample='skip'), 'train')
  assert len(src) == 2 and len(src.skipped_at_build) == 1
  # Every mask missing (skip mode, as data.check reads): said so, naming
  # one, not 'no examples found'; a whole folder missing, in any mode.
  for i in (0, 2):
    os.remove(tmp_path / 'trainannot' / f'0001TP_00000{i}.png')
  with pytest.raises(FileNotFoundError, match=r'^camvid/train: none of the 3 '
                     r'examples listed in .*train.txt has both its files; the '
                     r'first missing: .*trainannot/0001TP_000000.png\.$'):
    data.create_source(
        _config('camvid', tmp_path, 11, on_bad_sample='skip'), 'train')
  os.rmdir(tmp_path / 'trainannot')
  for mode in ('raise', 'skip'):
    with pytest.raises(FileNotFoundError, match=(
        r'0001TP_000000.png \(listed in .*train.txt\) does not exist, nor '
        r'does its folder .*/trainannot: is the dataset complete')):
      data.create_source(
          _config('camvid', tmp_path, 11, on_bad_sample=mode), 'train')
  # A folder image without a mask is the same problem.
  _folder(tmp_path / 'f', n=2)
  os.remove(tmp_path / 'f' / 'masks' / 'train' / 'im0.png')
  with pytest.raises(FileNotFoundError, match=r'masks/train/im0.png'):
    data.create_source(_config('folder', tmp_path / 'f', 3), 'train')


def _bad_folder(root):
  """8 good pairs and 4 bad ones (kinds by stem); returns the bad paths."""
  _folder(root, n=8)
  imgs, msks = root / 'images' / 'train', root / 'masks' / 'train'
  bad = {}
  # Truncated JPEG: the first half of a valid file.
  _image(str(imgs / 'bad_truncated.jpg'), 64, 64, seed=9)
  content = (imgs / 'bad_truncated.jpg').read_bytes()
  (imgs / 'bad_truncated.jpg').write_bytes(content[:len(content) // 2])
  _mask(str(msks / 'bad_truncated.png'), _grid([0], 64, 64))
  bad['truncated'] = str(imgs / 'bad_truncated.jpg')
  # Not an image at all.
  (imgs / 'bad_garbage.png').write_bytes(b'not an image' * 10)
  _mask(str(msks / 'bad_garbage.png'), _grid([0]))
  bad['garbage'] = str(imgs / 'bad_garbage.png')
  # Mask of another size.
  _image(str(imgs / 'bad_size.jpg'), 6, 8)
  _mask(str(msks / 'bad_size.png'), _grid([0], 6, 7))
  bad['size'] = str(msks / 'bad_size.png')
  # Label out of range (3 classes: 0..2 and 255 are valid).
  _image(str(imgs / 'bad_range.jpg'), 6, 8)
  _mask(str(msks / 'bad_range.png'), _grid([0, 1, 7]))
  bad['range'] = str(msks / 'bad_range.png')
  return bad


def test_each_bad_file_raises_naming_it(tmp_path):
  bad = _bad_folder(tmp_path)
  src = data.create_source(_config('folder', tmp_path, 3), 'train')
  assert len(src) == 12
  stems = [os.path.splitext(os.path.basename(p[0]))[0] for p in src.pairs]
  expect = {'truncated': 'corrupt or truncated',
            'garbage': 'corrupt or truncated',
            'size': r'mask is 6x7 \(HxW\) but its image .*bad_size.jpg is 6x8',
            'range': r'mask values \[7\] are not labels'}
  for kind, message in expect.items():
    with pytest.raises(files.BadSampleError) as e:
      src[stems.index(f'bad_{kind}')]
    assert str(e.value).startswith(bad[kind] + ':'), str(e.value)
    assert e.match(message)
  # A colour (RGB) mask is refused rather than read as something else.
  _image(str(tmp_path / 'masks' / 'train' / 'bad_range.png'), 6, 8)
  with pytest.raises(files.BadSampleError, match="mode 'RGB'"):
    src[stems.index('bad_range')]


def test_skip_mode_counts_bad_samples_in_train_and_eval(tmp_path):
  _bad_folder(tmp_path)
  cfg = _config('folder', tmp_path, 3, on_bad_sample='skip',
                crop_size=(6, 8), scale_range=(1.0, 1.0), eval_pad_size=(6, 8))
  src = data.create_source(cfg, 'train')
  counter = pipeline.SkipCounter()
  ds = pipeline.create_train_dataset(
      src, pipeline.train_transform(cfg), seed=0, batch_size=4,
      num_threads=1, skip_counter=counter)
  it = iter(ds)
  batches = [next(it) for _ in range(5)]  # 20 good pairs: 2.5 epochs
  assert counter.count == _bad_slots(src, seed=0, n=20) >= 4
  assert all(b['image'].shape == (4, 6, 8, 3) for b in batches)
  # Every image trained on is one of the good ones.
  good = [src[i]['image'] for i in range(len(src))
          if not files.is_skipped(src[i])]
  assert len(good) == 8
  good = {g.tobytes() for g in good} | {
      np.ascontiguousarray(g[:, ::-1]).tobytes() for g in good}  # flipped
  for b in batches:
    assert {img.tobytes() for img in b['image']} <= good
  eval_counter = pipeline.SkipCounter()
  eval_ds, n = pipeline.create_eval_dataset(
      src, pipeline.eval_transform(cfg), global_batch_size=4,
      skip_counter=eval_counter)
  indices = [int(i) for b in eval_ds for i in b['index'] if i >= 0]
  assert n == 3 and eval_counter.count == 4
  assert [os.path.basename(src.pairs[i][0]) for i in indices] == [
      f'im{i}.jpg' for i in range(8)]


def test_skip_mode_gives_up_when_everything_is_bad(tmp_path):
  _image(str(tmp_path / 'images' / 'train' / 'a.jpg'), 6, 8)
  _mask(str(tmp_path / 'masks' / 'train' / 'a.png'), _grid([9]))
  cfg = _config('folder', tmp_path, 3, on_bad_sample='skip',
                crop_size=(6, 8), scale_range=(1.0, 1.0))
  ds = pipeline.create_train_dataset(
      data.create_source(cfg, 'train'), pipeline.train_transform(cfg),
      seed=0, batch_size=1, num_threads=1,
      skip_counter=pipeline.SkipCounter(max_in_a_row=20))
  with pytest.raises(files.BadSampleError,
                     match=r'20 bad samples in a row.*a.png'):
    next(iter(ds))


def test_unknown_on_bad_sample_value(tmp_path):
  _folder(tmp_path)
  with pytest.raises(ValueError, match="data.on_bad_sample='ignore'"):
    data.create_source(_config('folder', tmp_path, 3,
                               on_bad_sample='ignore'), 'train')


def _bad_slots(src, seed, n):
  """How many of the first n slots of the loader's own (shuffled, repeated)
  order hold a bad record."""
  import grain  # pylint: disable=g-import-not-at-top
  order = grain.MapDataset.source(list(range(len(src)))).shuffle(
      seed=seed).repeat(None)
  return sum(_is_bad(src, order[i]) for i in range(n))


def _is_bad(src, i):
  return os.path.basename(src.pairs[i][0]).startswith('bad_')


def test_skip_count_is_exactly_the_bad_records_read(tmp_path):
  """The count equals the bad records in the first 16 slots of the loader's
  order; each is replaced by the next good record in that order."""
  _bad_folder(tmp_path)
  cfg = _config('folder', tmp_path, 3, on_bad_sample='skip')
  src = data.create_source(cfg, 'train')
  expected = _bad_slots(src, seed=5, n=16)
  counter = pipeline.SkipCounter()
  cfg.data.crop_size, cfg.data.scale_range = (6, 8), (1.0, 1.0)
  cfg.data.flip = False
  it = iter(pipeline.create_train_dataset(
      src, pipeline.train_transform(cfg), seed=5, batch_size=4,
      num_threads=1, skip_counter=counter))
  images = np.concatenate([next(it)['image'] for _ in range(4)])
  assert counter.count == expected >= 4
  import grain  # pylint: disable=g-import-not-at-top
  order = grain.MapDataset.source(list(range(len(src)))).shuffle(
      seed=5).repeat(None)
  for slot, image in enumerate(images):
    k = slot
    while _is_bad(src, order[k]):
      k += 1
    np.testing.assert_array_equal(
        image, np.asarray(src[order[k]]['image'], np.uint8)[:6, :8])


def test_one_bit_and_sixteen_bit_masks_read_as_values(tmp_path):
  ones = np.array([[0, 1, 1], [1, 0, 0]], bool)
  Image.fromarray(ones).save(tmp_path / 'bits.png')
  np.testing.assert_array_equal(files.read_mask(str(tmp_path / 'bits.png')),
                                ones.astype(np.uint8))
  wide = np.array([[0, 3, 255], [7, 1, 2]], np.uint16)
  Image.fromarray(wide).save(tmp_path / 'wide.png')
  np.testing.assert_array_equal(files.read_mask(str(tmp_path / 'wide.png')),
                                wide.astype(np.uint8))
  Image.fromarray(np.array([[0, 300]], np.uint16)).save(tmp_path / 'big.png')
  with pytest.raises(files.BadSampleError, match=r'big.png: mask holds values '
                     r'up to 300'):
    files.read_mask(str(tmp_path / 'big.png'))
