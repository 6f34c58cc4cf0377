"""Images that are not RGB (data.channels): grayscale, RGBA, multi-channel
TIFF; read, augmented, trained, evaluated and predicted end to end."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from seg_jax import data, errors, evaluate, steps, train
from seg_jax.data import files, transforms

import user_data as ud


def test_files_are_read_with_the_configured_channel_count(tmp_path):
  grey = ud.example(0)[0][..., 0]
  Image.fromarray(grey).save(tmp_path / 'grey.png')
  Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'grey16.png')
  rgb = ud.example(1)[0]
  Image.fromarray(rgb).save(tmp_path / 'rgb.png')
  rgba = np.dstack([rgb, grey])
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
  for name in ('grey.png', 'grey16.png'):
    np.testing.assert_array_equal(
        files.read_image(str(tmp_path / name), 1), grey[..., None])
  np.testing.assert_array_equal(files.read_image(str(tmp_path / 'rgba.png'),
                                                 4), rgba)
  with pytest.raises(files.BadSampleError,
                     match=r"rgb.png: the image has 3 channel\(s\) \(PIL mode "
                           r"'RGB'\) but data.channels=1: set data.channels"):
    files.read_image(str(tmp_path / 'rgb.png'), 1)
  with pytest.raises(files.BadSampleError, match=r'but data.channels=4'):
    files.read_image(str(tmp_path / 'rgb.png'), 4)
  # A dataset of RGB images opened as data.channels=1: refused as the split
  # is opened (before any step), naming the first image.
  ud.write_folder(tmp_path / 'rgb_data', n=2)
  with pytest.raises(files.BadSampleError, match=r'rgb_data/images/train/'
                     r"img_000.png: the image has 3 channel\(s\) \(PIL mode "
                     r"'RGB'\) but data.channels=1"):
    data.open_split(ud.folder_config(tmp_path / 'rgb_data', **{
        'data.channels': 1, 'data.mean': (127.0,), 'data.std': (60.0,)}),
                    'train')
  # The configured count of bands in another colour model: a palette image
  # is not grey values, CMYK is not RGBA, and counts other than 1, 3 and 4
  # come from TIFFs only.
  for name, im, channels, model, form in [
      ('palette.png', Image.fromarray(grey).convert('P'), 1,
       r"a palette image \(PIL mode 'P'\)", r'grayscale: 8, 16-bit or float'),
      ('cmyk.jpg', Image.fromarray(rgb).convert('CMYK'), 4,
       r"a CMYK image \(PIL mode 'CMYK'\)", r'RGBA, or a 4-channel TIFF'),
      ('la.png', Image.fromarray(rgba[..., 2:], 'LA'), 2,
       r"a grayscale with alpha \(PIL mode 'LA'\)", r'a multi-channel TIFF')]:
    im.save(tmp_path / name)
    with pytest.raises(files.BadSampleError,
                       match=rf'^.*{re.escape(name)}: {model} is not read as '
                             rf'data.channels={channels} \({form}\); convert '
                             r'the image to that.$'):
      files.read_image(str(tmp_path / name), channels)


def test_multi_channel_tiffs_interleaved_planar_and_16_bit(tmp_path):
  tifffile = pytest.importorskip('tifffile')
  rng = np.random.default_rng(0)
  six = rng.integers(0, 256, (7, 9, 6)).astype(np.uint8)
  tifffile.imwrite(tmp_path / 'hwc.tif', six)
  tifffile.imwrite(tmp_path / 'chw.tif', np.moveaxis(six, -1, 0))
  tifffile.imwrite(tmp_path / 'hwc16.tif', six.astype(np.uint16) * 257)
  tifffile.imwrite(tmp_path / 'four.tif', six[..., :4])
  for name in ('hwc.tif', 'chw.tif', 'hwc16.tif'):
    np.testing.assert_array_equal(files.read_image(str(tmp_path / name), 6),
                                  six)
  np.testing.assert_array_equal(files.read_image(str(tmp_path / 'four.tif'),
                                                 4), six[..., :4])
  with pytest.raises(files.BadSampleError,
                     match=r'hwc.tif: the TIFF holds an array of shape '
                           r'\(7, 9, 6\) but data.channels=5'):
    files.read_image(str(tmp_path / 'hwc.tif'), 5)
  # The header check (before training) sizes them as they are read.
  tifffile.imwrite(tmp_path / 'chw_sep.tif', np.moveaxis(six, -1, 0),
                   planarconfig='separate')
  for name in ('hwc.tif', 'chw.tif', 'hwc16.tif', 'four.tif', 'chw_sep.tif'):
    assert files.image_size(str(tmp_path / name)) == (7, 9), name
  Image.fromarray(np.zeros((7, 9), np.uint8)).save(tmp_path / 'mask.png')
  assert files.header_check(str(tmp_path / 'hwc.tif'),
                            str(tmp_path / 'mask.png')) == ((7, 9), None)


@pytest.mark.parametrize('channels', [1, 4])
def test_photometric_is_brightness_and_contrast_for_other_channel_counts(
    channels):
  """Saturation and hue are colour notions: for 1 or 4 channels the drawn
  matrix is a gain and an offset shared by every channel."""
  x = np.random.default_rng(1).integers(0, 256, (2, 5, 6, channels),
                                        np.uint8)
  for seed in range(10):
    m = transforms.Photometric().sample(np.random.default_rng(seed), channels)
    assert m.shape == (channels, channels + 1)
    gain, offset = m[0, 0], m[0, -1]
    np.testing.assert_allclose(m[:, :-1], gain * np.eye(channels), atol=1e-6)
    np.testing.assert_allclose(m[:, -1], offset, atol=1e-6)
    out = steps.apply_colour(x, np.stack([m, m]))
    np.testing.assert_allclose(out, np.clip(x * gain + offset, 0, 255),
                               rtol=1e-5, atol=1e-3)


def _write(root, channels, n, split):
  """A folder dataset whose images have `channels` channels (grey PNGs,
  RGBA PNGs) and learnable colours."""
  for i in range(n):
    image, mask = ud.example(i)
    if channels == 1:
      image = image[..., :1]
      im = Image.fromarray(image[..., 0])
    else:
      image = np.dstack([image, 255 - image[..., 0]])
      im = Image.fromarray(image, 'RGBA')
    os.makedirs(root / 'images' / split, exist_ok=True)
    im.save(root / 'images' / split / f'img_{i:03d}.png')
    ud.save_mask(str(root / 'masks' / split / f'img_{i:03d}.png'), mask)


def _channels(n):
  """Config overrides for `n`-channel images."""
  return {'data.channels': n, 'data.mean': (127.0,) * n,
          'data.std': (60.0,) * n}


@pytest.mark.parametrize('channels,image_format', [(1, 'png'), (1, 'jpg'),
                                                  (4, 'png')])
def test_to_folder_copies_grey_and_rgba_datasets_with_their_palette(
    tmp_path, channels, image_format):
  """data.to_folder keeps the channel count (grey JPEG/PNG, RGBA PNG) and
  the masks' palette; the copy reads back as the original (JPEG: close)."""
  from seg_jax import data  # pylint: disable=g-import-not-at-top
  from seg_jax.data import to_folder  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  _write(root, channels, 3, 'train')
  config = ud.folder_config(root, **_channels(channels))
  summary, = to_folder.convert(config, str(tmp_path / 'copy'), ('train',),
                               image_format=image_format, progress=False)
  assert (summary.written, summary.skipped) == (3, 0)
  original = data.create_source(config, 'train')
  copy = data.create_source(
      ud.folder_config(tmp_path / 'copy', **_channels(channels)),
      'train')
  np.testing.assert_array_equal(copy.palette, original.palette)
  np.testing.assert_array_equal(copy.palette, ud.PALETTE)
  for i in range(3):
    a, b = original[i], copy[i]
    assert b['image'].shape == a['image'].shape == (*ud.SIZE, channels)
    np.testing.assert_array_equal(b['label'], a['label'])
    if image_format == 'png':
      np.testing.assert_array_equal(b['image'], a['image'])
    else:
      diff = np.abs(b['image'].astype(int) - a['image'].astype(int))
      assert diff.mean() < 2, diff.mean()


def test_to_folder_refuses_a_format_that_drops_channels():
  from seg_jax.data import to_folder  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=r'^--image_format=jpg cannot '
                     r"hold the images' data.channels=4 channels \(it holds "
                     r'1 or 3\): use --image_format=png or '
                     r'--image_format=tif\.$'):
    to_folder.check_format('jpg', 4)
  with pytest.raises(errors.ConfigError, match=r'^--image_format=png cannot '
                     r'hold .*data.channels=6 .*: use --image_format=tif\.$'):
    to_folder.check_format('png', 6)
  to_folder.check_format('png', 4)
  # The data section's own check: a dataset of RGB images has 3 channels.
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  config = unet_shapes_tiny.get_config()
  config.data.channels = 1
  with pytest.raises(errors.ConfigError, match=r"data.name='shapes' gives "
                     r'RGB images'):
    to_folder.convert(config, '/nonexistent/out', ('train',))


def test_to_folder_copies_a_six_channel_tiff_dataset_exactly(tmp_path):
  tifffile = pytest.importorskip('tifffile')
  from seg_jax import data  # pylint: disable=g-import-not-at-top
  from seg_jax.data import to_folder  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  rng = np.random.default_rng(0)
  for i in range(2):
    os.makedirs(root / 'images' / 'train', exist_ok=True)
    tifffile.imwrite(root / 'images' / 'train' / f'img_{i}.tif',
                     rng.integers(0, 256, (*ud.SIZE, 6)).astype(np.uint8))
    ud.save_mask(str(root / 'masks' / 'train' / f'img_{i}.png'),
                 ud.example(i)[1])
  config = ud.folder_config(root, **_channels(6))
  to_folder.convert(config, str(tmp_path / 'copy'), ('train',),
                    image_format='tif', progress=False)
  original = data.create_source(config, 'train')
  copy = data.create_source(
      ud.folder_config(tmp_path / 'copy', **_channels(6)), 'train')
  for i in range(2):
    np.testing.assert_array_equal(copy[i]['image'], original[i]['image'])
    np.testing.assert_array_equal(copy[i]['label'], original[i]['label'])


@pytest.mark.parametrize('channels', [1, 4])
def test_a_grey_and_a_four_channel_dataset_train_evaluate_and_predict(
    tmp_path, channels, capsys):
  from seg_jax import checkpoint, crf, inference, predict, sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  _write(root, channels, 10, 'train')
  _write(root, channels, 3, 'val')
  config = ud.folder_config(root, **{
      'data.channels': channels, 'data.mean': (127.0,) * channels,
      'data.std': (60.0,) * channels, 'data.photometric.enabled': True})
  run = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, run)
  assert result['step'] == 4 and 0 <= result['miou'] <= 1
  kernel = checkpoint.read_state(f'{run}/checkpoints', 4)['params'][
      'DoubleConv_0']['Conv_0']['kernel']
  assert kernel.shape[2] == channels  # the model takes the channels
  (_, report), = evaluate.evaluate(config, run)
  assert report['mIoU'] == pytest.approx(result['miou'], abs=1e-6)
  assert report['dataset_split'] == 'val'
  if channels == 1:
    # A split whose every pixel is ignored (a test split without public
    # labels): nan scores, and a line saying why.
    _write(root, channels, 2, 'test')
    for mask in (root / 'masks' / 'test').iterdir():
      ud.save_mask(str(mask), np.full(ud.SIZE, 255, np.uint8))
    capsys.readouterr()
    (_, unlabelled), = evaluate.evaluate(config, run, split='test')
    assert unlabelled['mIoU'] is None  # nan, written as JSON's null
    assert unlabelled['dataset_split'] == 'test'
    assert ('Every pixel of test is ignored (labelled data.ignore_label=255, '
            'e.g. a test split whose labels are not public') in (
                capsys.readouterr().out)
  model, variables, _ = checkpoint.restore_for_inference(
      config, run, sharding.create_mesh(devices=jax.devices()[:1]))
  predictor = predict.Predictor(config, model, variables,
                                inference.spec_from_config(config, 'whole'),
                                2)
  outputs = predict.Outputs(str(tmp_path / 'out'), ud.PALETTE, [1], 0.5)
  items = predict.find_inputs([str(root / 'images' / 'val')])
  assert predict.predict_images(items, predictor, outputs) == (len(items), [])
  with Image.open(tmp_path / 'out' / 'val' / 'img_000.png') as im:
    assert im.size == (ud.SIZE[1], ud.SIZE[0])
    labels = np.asarray(im)
  # The dense CRF builds its lattice over the image's channels; with both
  # kernel weights 0 it keeps the model's labels, and so its score.
  config.crf.gaussian_weight = config.crf.bilateral_weight = 0.0
  (_, crf_report), = evaluate.evaluate(config, run, use_crf=True)
  assert crf_report['mIoU'] == pytest.approx(report['mIoU'], abs=1e-6)
  refined = predict.Predictor(config, model, variables,
                              inference.spec_from_config(config, 'whole'), 2,
                              refiner=crf.Refiner(
                                  crf.CRFParams.from_config(config)))
  with Image.open(root / 'images' / 'val' / 'img_000.png') as im:
    image = np.asarray(im)
  np.testing.assert_array_equal(refined([image.reshape(
      image.shape[:2] + (channels,))])[0], labels)
  with Image.open(tmp_path / 'out' / 'val' / 'img_000_overlay.jpg') as im:
    assert im.mode == 'RGB'
  # An RGB photo given to the trained model: convert it (the model's count
  # is fixed), not "set data.channels".
  photo = tmp_path / 'photo.png'
  Image.fromarray(ud.example(0)[0]).save(photo)
  assert predict.predict_images([(str(photo), 'photo')], predictor,
                                outputs) == (0, [(str(photo), (
      f"{photo}: the image has 3 channel(s) (PIL mode 'RGB'), but the "
      f'model was trained on data.channels={channels}: convert the '
      'image.'))])
  # Grey files are read as RGB for 3 channels (documented); RGBA files for
  # 1 channel, or grey files for 4, are refused naming file and setting.
  wrong = ud.folder_config(root, **{'data.channels': 4 if channels == 1
                                    else 1})
  wrong.data.mean, wrong.data.std = ((1.0,) * wrong.data.channels,
                                     (1.0,) * wrong.data.channels)
  with pytest.raises(errors.UserError, match=r'data.channels=\d'):
    train.train_and_evaluate(wrong, str(tmp_path / 'wrong'))


def test_pretrained_rgb_stem_adapted_to_1_and_4_channels():
  """timm's rule: summed for 1 channel (a grey image then responds as the
  RGB model to that grey repeated), repeated and scaled by 3/C for more
  (for a multiple of 3, equal channels respond as the RGB model to
  (x, x, x)); a stem of neither 3 nor the data's channels is one line
  naming all three."""
  import jax  # pylint: disable=g-import-not-at-top
  from seg_jax.models import weights  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  grey = rng.normal(size=(1, 8, 9, 1)).astype(np.float32)
  conv = lambda x, k: np.asarray(jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  one = weights.adapt_input_channels(kernel, 1)
  np.testing.assert_allclose(one, kernel.sum(2, keepdims=True))
  np.testing.assert_allclose(conv(grey, one),
                             conv(np.repeat(grey, 3, -1), kernel), rtol=1e-5,
                             atol=1e-5)
  four = weights.adapt_input_channels(kernel, 4)
  np.testing.assert_allclose(four[:, :, :3], kernel * 0.75)
  np.testing.assert_allclose(four[:, :, 3], kernel[:, :, 0] * 0.75)
  six = weights.adapt_input_channels(kernel, 6)
  np.testing.assert_allclose(conv(np.repeat(grey, 6, -1), six),
                             conv(np.repeat(grey, 3, -1), kernel), rtol=1e-5,
                             atol=1e-5)
  model = {'stem': {'kernel': np.zeros((3, 3, 4, 5))},
           'head': {'kernel': np.zeros((1, 1, 5, 2))}}
  pretrained = {'stem': {'kernel': kernel},
                'head': {'kernel': np.ones((1, 1, 5, 2))}}
  adapted = weights.adapt_stem(pretrained, model, 4, 'model.init_from=w.pth')
  np.testing.assert_array_equal(adapted['stem']['kernel'], four)
  np.testing.assert_array_equal(adapted['head']['kernel'], np.ones((1, 1, 5,
                                                                     2)))
  pretrained['stem']['kernel'] = np.zeros((3, 3, 2, 5))
  with pytest.raises(ValueError,
                     match=r'^model.init_from=w.pth: stem/kernel: the stem '
                           r'takes 2 channels; only an RGB stem \(3\) is '
                           r"adapted .*data.channels=4 \(the model's input\); "
                           r"the weights' stem has 2.$"):
    weights.adapt_stem(pretrained, model, 4, 'model.init_from=w.pth')
