"""The synthetic dataset and the grain pipelines: determinism, coverage, resume."""

import json

import numpy as np
import pytest

from seg_jax import data, errors, steps
from seg_jax.data import pipeline, shapes, transforms


def test_shapes_deterministic_and_split_dependent():
  a = shapes.make_example(0, 'train', 5)
  b = shapes.make_example(0, 'train', 5)
  c = shapes.make_example(0, 'val', 5)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(a['image'], c['image'])
  assert a['image'].shape == (64, 64, 3) and a['image'].dtype == np.uint8
  assert a['label'].shape == (64, 64) and a['label'].dtype == np.uint8


def test_shapes_labels_borders_and_classes():
  labels = np.stack([shapes.make_example(0, 'train', i)['label']
                     for i in range(100)])
  values = set(np.unique(labels).tolist())
  assert values == {0, 1, 2, 3, 4, 255}
  # Every pixel next to a different class is on an ignored border.
  for label in labels:
    for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
      both = (a != 255) & (b != 255)
      assert np.all(a[both] == b[both])
  ignored = np.mean(labels == 255)
  assert 0.02 < ignored < 0.2  # borders are thin: most pixels are labelled


def test_shape_colour_does_not_decide_class():
  """Mean instance colour is spread over the whole cube for every class."""
  per_class = {k: [] for k in range(1, 5)}
  for i in range(200):
    ex = shapes.make_example(0, 'train', i)
    for k in per_class:
      mask = ex['label'] == k
      if mask.sum() > 20:
        per_class[k].append(ex['image'][mask].mean(0))
  for k, colours in per_class.items():
    colours = np.array(colours)
    assert len(colours) > 20
    assert np.all(colours.std(0) > 40), (k, colours.std(0))
  means = np.array([np.mean(c, 0) for c in per_class.values()])
  assert np.ptp(means, 0).max() < 40  # no class has its own colour


def test_unknown_dataset_and_class_mismatch(tiny_config):
  tiny_config.data.name = 'nope'
  with pytest.raises(ValueError, match="data.name='nope'"):
    data.create_source(tiny_config, 'train')
  tiny_config.data.name = 'shapes'
  tiny_config.model.num_classes = 3
  with pytest.raises(ValueError, match='model.num_classes=3'):
    data.create_source(tiny_config, 'train')


def _train_ds(config, worker_count=0, **kw):
  return pipeline.create_train_dataset(
      data.create_source(config, 'train'), pipeline.train_transform(config),
      seed=config.seed, batch_size=config.train.global_batch_size,
      worker_count=worker_count, num_threads=1, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_train_batches_shapes_and_epoch_reshuffle(tiny_config):
  it = iter(_train_ds(tiny_config))
  batches = _take(it, 16)  # 64 examples / batch 8 = 8 steps per epoch
  assert batches[0]['image'].shape == (8, 32, 32, 3)
  assert batches[0]['label'].shape == (8, 32, 32)
  # Epoch 2 differs from epoch 1 (new order and new augmentation).
  assert not np.array_equal(batches[0]['image'], batches[8]['image'])


# Worker processes are covered by the file-dataset test below (against the
# 0-worker stream); the shapes variant with workers runs with -m slow.
@pytest.mark.parametrize('workers',
                         [0, pytest.param(2, marks=pytest.mark.slow)])
def test_same_seed_same_batches_and_exact_resume(tiny_config, workers):
  """Worker processes change neither the stream nor how it resumes."""
  reference = _take(iter(_train_ds(tiny_config, 0)), 7)
  it = iter(_train_ds(tiny_config, workers))
  first = _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  assert state == {'position': 3, 'global_batch_size': 8, 'seed': 0,
                   'process_count': 1}
  restored = iter(_train_ds(tiny_config, workers))
  restored.set_state(state)
  _assert_same_batches(first + _take(restored, 4), reference)


def _part_ds(src, batch_size, p, count, seed=0):
  return pipeline.create_train_dataset(
      src, transforms.TrainTransform(crop_size=(32, 32), flip=True,
                                     scale_range=(0.5, 1.5)),
      seed=seed, batch_size=batch_size, num_threads=1, process_index=p,
      process_count=count)


@pytest.mark.parametrize('count', [2, 4])
def test_process_parts_make_up_the_global_batch(tiny_config, count):
  """Over 10 batches (past the 8-batch epoch), the processes' parts of each
  batch, in process order, are exactly the batch one process reads with the
  same seed; and a state saved by `count` processes continues on one."""
  src = data.create_source(tiny_config, 'train')
  whole = _take(iter(_part_ds(src, 8, 0, 1)), 10)
  parts = [_take(iter(_part_ds(src, 8 // count, p, count)), 10)
           for p in range(count)]
  joined = [{k: np.concatenate([parts[p][b][k] for p in range(count)])
             for k in ('image', 'label')} for b in range(10)]
  _assert_same_batches(joined, whole)
  it = iter(_part_ds(src, 8 // count, 1, count))
  _take(it, 6)
  one = iter(_part_ds(src, 8, 0, 1))
  one.set_state(json.loads(json.dumps(it.get_state())))
  _assert_same_batches(_take(one, 4), whole[6:])


def test_state_of_another_stream_is_refused(tiny_config):
  src = data.create_source(tiny_config, 'train')
  it = iter(_part_ds(src, 8, 0, 1))
  next(it)
  state = it.get_state()
  with pytest.raises(ValueError, match='global_batch_size=8, the config has '
                     '4: the stream would not continue'):
    iter(_part_ds(src, 4, 0, 1)).set_state(state)
  with pytest.raises(ValueError, match='seed=0, the config has 3'):
    iter(_part_ds(src, 8, 0, 1, seed=3)).set_state(state)
  with pytest.raises(ValueError, match='not a seg_jax TrainIterator state'):
    iter(_part_ds(src, 8, 0, 1)).set_state({'next_index': 5})


@pytest.mark.parametrize('n,global_batch,processes', [(21, 8, 1), (21, 8, 2),
                                                     (16, 8, 2), (5, 8, 4)])
def test_eval_covers_every_example_exactly_once(tiny_config, n, global_batch,
                                                processes):
  tiny_config.data.shapes.num_val = n
  src = data.create_source(tiny_config, 'val')
  indices, num_batches = [], None
  for p in range(processes):
    ds, num_batches = pipeline.create_eval_dataset(
        src, pipeline.eval_transform(tiny_config),
        global_batch_size=global_batch, process_index=p,
        process_count=processes)
    batches = list(ds)
    assert len(batches) == num_batches == -(-n // global_batch)
    for b in batches:
      assert b['image'].shape[0] == global_batch // processes
      for i, label in zip(b['index'], b['label']):
        if i < 0:
          assert np.all(label == 255)  # padding: all ignored
        else:
          np.testing.assert_array_equal(label, src[int(i)]['label'])
      indices.extend(int(i) for i in b['index'] if i >= 0)
  assert sorted(indices) == list(range(n))


def test_train_transform_crop_pad_flip():
  ex = {'image': np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3),
        'label': np.arange(30, dtype=np.uint8).reshape(5, 6)}
  t = transforms.TrainTransform(crop_size=(8, 4), flip=False,
                                mean=(10, 20, 30))
  out = t.random_map(ex, np.random.default_rng(0))
  assert out['image'].shape == (8, 4, 3) and out['label'].shape == (8, 4)
  # Rows 5..7 are padding: label ignored, image the mean.
  assert np.all(out['label'][5:] == 255)
  assert np.all(out['image'][5:] == [10, 20, 30])
  left = int(out['label'][0, 0])
  np.testing.assert_array_equal(out['label'][:5], ex['label'][:, left:left + 4])
  flipped = transforms.TrainTransform(crop_size=(5, 6), flip=True)
  outs = [flipped.random_map(ex, np.random.default_rng(s))['label']
          for s in range(20)]
  assert any(np.array_equal(o, ex['label'][:, ::-1]) for o in outs)
  assert any(np.array_equal(o, ex['label']) for o in outs)


def test_train_transform_rescale_keeps_aspect_and_label_values():
  ex = {'image': np.zeros((40, 60, 3), np.uint8),
        'label': np.repeat(np.arange(6, dtype=np.uint8), 10)[None].repeat(40, 0)}
  t = transforms.TrainTransform(crop_size=(200, 200), scale_range=(2.0, 2.0),
                                flip=False)
  out = t.random_map(ex, np.random.default_rng(0))
  valid = out['label'] != 255
  assert valid.sum() == 80 * 120
  assert set(np.unique(out['label'][valid])) == set(range(6))


def _neutral(**kw):
  """A Photometric that changes nothing except what `kw` sets."""
  args = dict(brightness_delta=0.0, contrast_range=(1.0, 1.0),
              saturation_range=(1.0, 1.0), hue_delta=0.0)
  args.update(kw)
  return transforms.Photometric(**args)


def test_photometric_brightness_and_contrast_are_exact():
  x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), np.uint8)
  offsets, factors = [], []
  for seed in range(40):
    m = _neutral(brightness_delta=32.0).sample(np.random.default_rng(seed))
    np.testing.assert_allclose(m[:, :3], np.eye(3), atol=1e-7)
    assert m[0, 3] == m[1, 3] == m[2, 3] and abs(m[0, 3]) <= 32
    offsets.append(float(m[0, 3]))
    c = _neutral(contrast_range=(0.5, 1.5)).sample(np.random.default_rng(seed))
    k = c[0, 0]
    np.testing.assert_allclose(c, np.diag([k, k, k, 0])[:3], atol=1e-7)
    assert 0.5 <= k <= 1.5
    factors.append(float(k))
    out = steps.apply_colour(x, np.stack([c, c]))
    np.testing.assert_allclose(out, np.clip(x * k, 0, 255), rtol=1e-6,
                               atol=1e-4)
  # Each operation is applied with probability one half.
  assert 10 < sum(o != 0 for o in offsets) < 30
  assert 10 < sum(k != 1 for k in factors) < 30


def test_photometric_saturation_and_hue_keep_grey_and_luma():
  grey = np.full((1, 2, 2, 3), 117, np.uint8)
  colour = np.array([[[[200, 30, 90], [10, 220, 60]]]], np.uint8)
  for seed in range(20):
    rng = np.random.default_rng(seed)
    m = transforms.Photometric(brightness_delta=0.0,
                               contrast_range=(1.0, 1.0)).sample(rng)
    # Grey has no chroma: saturation and hue leave it as it is.
    np.testing.assert_allclose(steps.apply_colour(grey, m[None]), grey,
                               atol=1e-3)
    # Both keep luma (Y of YIQ) where nothing clips.
    out = steps.apply_colour(colour.astype(np.float32) * 0.5 + 60,
                                  m[None])
    luma = np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out @ luma, (colour * 0.5 + 60) @ luma,
                               atol=1e-3)
  desat = _neutral(saturation_range=(0.0, 0.0))
  m = next(m for m in (desat.sample(np.random.default_rng(s))
                       for s in range(10)) if not np.allclose(m[:, :3],
                                                              np.eye(3)))
  out = steps.apply_colour(colour, m[None])
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)
  np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-3)


def test_photometric_numpy_and_jax_agree():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, (3, 4, 5, 3), np.uint8)
  m = np.stack([transforms.Photometric().sample(np.random.default_rng(s))
                for s in range(3)])
  np.testing.assert_allclose(
      np.asarray(steps.apply_colour(jnp.asarray(x), jnp.asarray(m))),
      steps.apply_colour(x, m), rtol=1e-5, atol=1e-3)


def test_cat_max_ratio_redraws_dominated_crops():
  label = np.zeros((40, 40), np.uint8)
  label[:, 30:] = 1  # class 0 covers 75% of the image
  ex = {'image': np.zeros((40, 40, 3), np.uint8), 'label': label}
  def share(t, seed):
    crop = t.random_map(ex, np.random.default_rng(seed))['label']
    return np.bincount(crop.ravel(), minlength=2).max() / crop.size
  plain = transforms.TrainTransform(crop_size=(10, 10), flip=False)
  capped = transforms.TrainTransform(crop_size=(10, 10), flip=False,
                                     cat_max_ratio=0.75)
  plain_shares = [share(plain, s) for s in range(50)]
  capped_shares = [share(capped, s) for s in range(50)]
  # 5 of the 31 crop positions pass: 16% of plain crops, and
  # 1 - (26/31)^10 = 83% of capped ones (seeds fixed: deterministic).
  assert sum(s < 0.75 for s in plain_shares) < 15
  assert sum(s < 0.75 for s in capped_shares) > 33


def test_eval_transform_pads_image_and_label_and_records_the_size():
  ex = {'image': np.full((30, 40, 3), 9, np.uint8),
        'label': np.arange(1200).reshape(30, 40).astype(np.uint8) % 7}
  out = transforms.EvalTransform(pad_size=(32, 48), mean=(1, 2, 3),
                                 ignore_label=254).map(ex)
  assert out['image'].shape == (32, 48, 3) and out['label'].shape == (32, 48)
  np.testing.assert_array_equal(out['label'][:30, :40], ex['label'])
  assert np.all(out['label'][30:] == 254) and np.all(out['label'][:, 40:] == 254)
  assert np.all(out['image'][:30, :40] == 9)
  np.testing.assert_array_equal(out['image'][31, 47], [1, 2, 3])
  np.testing.assert_array_equal(out['size'], [30, 40])
  with pytest.raises(ValueError, match='larger than data.eval_pad_size'):
    transforms.EvalTransform(pad_size=(16, 48)).map(ex)


def _jpeg_folder(root, n=12):
  """A `folder` dataset of n 40x48 JPEG + PNG pairs (3 classes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for sub in ('images/train', 'masks/train'):
    (root / sub).mkdir(parents=True)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(
        root / 'images' / 'train' / f'{i:03d}.jpg')
    Image.fromarray(rng.integers(0, 3, (40, 48), np.uint8)).save(
        root / 'masks' / 'train' / f'{i:03d}.png')


@pytest.mark.parametrize('workers', [0, 2])
def test_file_dataset_same_seed_same_batches_and_exact_resume(
    tiny_config, tmp_path, workers):
  """JPEG/PNG decoding, rescale, crop, flip and colour draws: a restored
  loader continues exactly where the uninterrupted one goes."""
  _jpeg_folder(tmp_path)
  tiny_config.data.name, tiny_config.data.root = 'folder', str(tmp_path)
  tiny_config.model.num_classes = 3
  tiny_config.data.crop_size = (24, 24)
  tiny_config.data.scale_range = (0.5, 1.5)
  tiny_config.data.photometric.enabled = True
  tiny_config.train.global_batch_size = 4
  reference = _take(iter(_train_ds(tiny_config, 0)), 8)  # workers: same
  assert reference[0]['colour'].shape == (4, 3, 4)
  it = iter(_train_ds(tiny_config, workers))
  first = _take(it, 5)  # past the first epoch (3 batches)
  state = json.loads(json.dumps(it.get_state()))
  restored = iter(_train_ds(tiny_config, workers))
  restored.set_state(state)
  rest = _take(restored, 3)
  _assert_same_batches(first + rest, reference)
  for x, y in zip(first + rest, reference):
    np.testing.assert_array_equal(x['colour'], y['colour'])


def test_train_crop_equals_rescaling_the_whole_image_then_cropping():
  """The image is rescaled only inside the crop window: same pixels (up to
  one grey level of rounding) as rescaling all of it and cropping."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (75, 100, 3), np.uint8)
  label = rng.integers(0, 21, (75, 100)).astype(np.uint8)
  t = transforms.TrainTransform(crop_size=(64, 96), scale_range=(0.5, 2.0),
                                flip=False)
  for seed in range(8):
    out = t.random_map({'image': image, 'label': label},
                       np.random.default_rng(seed))
    r = np.random.default_rng(seed)  # replays the transform's draws
    s = r.uniform(0.5, 2.0)
    sh, sw = int(75 * s + 0.5), int(100 * s + 0.5)
    full = np.asarray(Image.fromarray(image).resize((sw, sh),
                                                    Image.BILINEAR))
    full_label = np.asarray(Image.fromarray(label).resize((sw, sh),
                                                          Image.NEAREST))
    top = int(r.integers(0, max(sh, 64) - 64 + 1))
    left = int(r.integers(0, max(sw, 96) - 96 + 1))
    ref = full[top:top + 64, left:left + 96]
    ref_label = full_label[top:top + 64, left:left + 96]
    h, w = ref_label.shape
    np.testing.assert_array_equal(out['label'][:h, :w], ref_label)
    assert np.all(out['label'][h:] == 255) and np.all(out['label'][:, w:] == 255)
    diff = np.abs(out['image'][:h, :w].astype(int) - ref)
    assert diff.max() <= 1  # PIL rounds fixed-point sums per window


def test_shapes_splits_and_sizes_are_config_errors(tiny_config):
  with pytest.raises(errors.ConfigError, match=r"shapes: no split 'test'; "
                     r"the built-in dataset has 'train' and 'val'"):
    data.create_source(tiny_config, 'test')
  tiny_config.data.shapes.num_val = 0
  with pytest.raises(errors.ConfigError, match=r"^data.shapes.num_val=0: "
                     r"split 'val' needs 1 example or more"):
    data.create_source(tiny_config, 'val')
  assert len(data.create_source(tiny_config, 'train')) == (
      tiny_config.data.shapes.num_train)


def test_shapes_images_larger_than_the_crop_fit_the_eval_canvas(tiny_config):
  """Known before any step: the canvas fits the built-in images, or a
  canvas set too small is refused naming the setting."""
  tiny_config.data.shapes.image_size = 40
  train_source, _ = data.open_split(tiny_config, 'train')
  val_source, sizes = data.open_split(tiny_config, 'val')
  assert sizes == [(40, 40)] * len(val_source)
  resolved = data.resolved_config(tiny_config, train_source, val_source,
                                  sizes)
  assert resolved.data.eval_pad_size == (64, 64)
  tiny_config.data.eval_pad_size = (32, 32)
  with pytest.raises(errors.ConfigError, match=r'^shapes/val example 0 is '
                     r'40x40 \(HxW\), larger than data.eval_pad_size=\(32, '
                     r'32\)'):
    data.resolved_config(tiny_config, train_source, val_source, sizes)


def test_tfds_without_a_name_is_a_config_error(tiny_config):
  tiny_config.data.name = 'tfds'
  with pytest.raises(errors.ConfigError, match=r"^data.name='tfds' needs "
                     r'data.tfds.name'):
    data.create_source(tiny_config, 'train')
