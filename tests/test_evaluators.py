"""Whole, sliding-window and test-time-augmented inference against numpy
references; evaluation on 8 devices equals 1 device; the ignore label is
whatever the config says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import data, errors, evaluators, inference, sharding, state
from seg_jax.inference import InferenceSpec


@pytest.fixture(scope='module')
def tiny_model():
  """The tiny config's U-Net (BatchNorm) with random weights."""
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  config = unet_shapes_tiny.get_config()
  model = state.create_model(config)
  variables = jax.jit(lambda: model.init(
      jax.random.key(3), jnp.zeros((1, 32, 32, 3)), train=False))()
  return config, model, variables


def _apply_fn(tiny_model):
  _, model, variables = tiny_model
  return lambda x: model.apply(variables, x, train=False)


def _images(n, h, w, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, h, w, 3)),
                     jnp.float32)


def _infer(apply_fn, x, sizes, spec):
  return np.asarray(jax.jit(lambda x, s: inference.infer_logits(
      apply_fn, x, s, spec))(x, jnp.asarray(sizes, jnp.int32)))


def _flip_np(a, sizes):
  """Each example's valid columns mirrored, in numpy."""
  out = a.copy()
  for i, (_, w) in enumerate(sizes):
    out[i, :, :w] = a[i, :, :w][:, ::-1]
  return out


def test_slide_with_one_window_covering_the_image_equals_whole(tiny_model):
  apply_fn = _apply_fn(tiny_model)
  x, sizes = _images(3, 32, 32), [[32, 32], [20, 28], [32, 17]]
  whole = _infer(apply_fn, x, sizes, InferenceSpec())
  slide = _infer(apply_fn, x, sizes, InferenceSpec(
      mode='slide', window=(32, 32), stride=(21, 21)))
  np.testing.assert_array_equal(slide, whole)


def test_slide_windows_and_averaging_match_numpy():
  """A window-dependent 'model' (each window adds its own mean) shows where
  windows were placed and how overlaps were averaged."""
  def window_fn(crop):  # (N, h, w, 3) -> (N, h, w, 2)
    return crop[..., :2] + crop[..., :2].mean(axis=(1, 2), keepdims=True)

  (wh, ww), (sh, sw) = (16, 24), (10, 13)
  sizes = [[40, 50], [33, 41], [16, 30]]
  x = np.asarray(_images(3, 40, 50, seed=1))
  got = _infer(window_fn, jnp.asarray(x), sizes, InferenceSpec(
      mode='slide', window=(wh, ww), stride=(sh, sw)))
  assert got.shape == (3, 40, 50, 2)
  for i, (h, w) in enumerate(sizes):
    total, count = np.zeros((h, w, 2)), np.zeros((h, w, 1))
    for ky in range(max(h - wh + sh - 1, 0) // sh + 1):
      for kx in range(max(w - ww + sw - 1, 0) // sw + 1):
        y2, x2 = min(ky * sh + wh, h), min(kx * sw + ww, w)
        y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
        total[y1:y2, x1:x2] += window_fn(x[i:i + 1, y1:y2, x1:x2])[0]
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    np.testing.assert_allclose(got[i, :h, :w], total / count, rtol=1e-5,
                               atol=1e-6, err_msg=f'example {i}')


def _mirror_np(a, sizes):
  """Each example's canvas beyond its valid region filled by numpy's
  'reflect' padding of the region."""
  out = a.copy()
  for i, (h, w) in enumerate(sizes):
    rows = np.pad(np.arange(h), (0, a.shape[1] - h), mode='reflect')
    cols = np.pad(np.arange(w), (0, a.shape[2] - w), mode='reflect')
    out[i] = a[i][rows][:, cols]
  return out


@pytest.mark.parametrize('sizes', [[[5, 7], [1, 3], [2, 1]],
                                   [[4, 2], [5, 7], [3, 3]]])
def test_mirror_beyond_is_numpy_reflect_padding_of_each_region(sizes):
  """Rows and columns beyond (h, w) mirror the region about its last row
  and column, repeated where the canvas is more than twice the region (a
  one-pixel region repeats its pixel); the region is unchanged."""
  x = np.asarray(_images(3, 5, 7, seed=6))
  got = np.asarray(inference.mirror_beyond(jnp.asarray(x),
                                           jnp.asarray(sizes, jnp.int32)))
  np.testing.assert_array_equal(got, _mirror_np(x, sizes))
  for i, (h, w) in enumerate(sizes):
    np.testing.assert_array_equal(got[i, :h, :w], x[i, :h, :w])
  if sizes[1] == [1, 3]:  # by hand: columns 0 1 2 1 0 1 2 of row 0
    np.testing.assert_array_equal(
        got[1], np.broadcast_to(x[1, 0, [0, 1, 2, 1, 0, 1, 2]], (5, 7, 3)))


def test_predictions_do_not_depend_on_the_canvas_around_an_image():
  """A model that reflect-pads its own 3x3 filter gives the same logits for
  an image alone and for the image padded into a larger canvas with any
  padding values (whole and flip inference): beyond the image the model
  sees the image's mirror, not the padding."""
  kernel = jnp.asarray(np.random.default_rng(7).normal(size=(3, 3, 3, 2)),
                       jnp.float32)

  def apply_fn(x):
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  image = np.asarray(_images(1, 13, 9, seed=8))
  canvas = np.full((1, 20, 16, 3), 50.0, np.float32)
  canvas[:, :13, :9] = image
  for spec in (InferenceSpec(), InferenceSpec(flip=True)):
    alone = _infer(apply_fn, jnp.asarray(image), [[13, 9]], spec)
    padded = _infer(apply_fn, jnp.asarray(canvas), [[13, 9]], spec)
    np.testing.assert_allclose(padded[:, :13, :9], alone, rtol=1e-5,
                               atol=1e-5)


def test_flip_tta_averages_the_flipped_pass(tiny_model):
  apply_fn = _apply_fn(tiny_model)
  x, sizes = _images(2, 32, 32, seed=2), [[32, 32], [27, 19]]
  got = _infer(apply_fn, x, sizes, InferenceSpec(flip=True))
  plain = np.asarray(apply_fn(jnp.asarray(_mirror_np(np.asarray(x), sizes))))
  flipped = _flip_np(np.asarray(apply_fn(jnp.asarray(_mirror_np(
      _flip_np(np.asarray(x), sizes), sizes)))), sizes)
  for i, (h, w) in enumerate(sizes):
    np.testing.assert_allclose(got[i, :h, :w],
                               (plain[i, :h, :w] + flipped[i, :h, :w]) / 2,
                               rtol=1e-5, atol=1e-5)


def test_flip_tta_on_a_flip_symmetric_image_is_symmetric(tiny_model):
  """The random U-Net is not flip-equivariant, but flip TTA of a mirror-
  symmetric image must give mirror-symmetric logits."""
  apply_fn = _apply_fn(tiny_model)
  half = np.asarray(_images(1, 32, 16, seed=3))
  x = jnp.asarray(np.concatenate([half, half[:, :, ::-1]], axis=2))
  plain = np.asarray(apply_fn(x))
  assert np.abs(plain - plain[:, :, ::-1]).max() > 1e-3
  got = _infer(apply_fn, x, [[32, 32]], InferenceSpec(flip=True))
  np.testing.assert_allclose(got, got[:, :, ::-1], rtol=1e-5, atol=1e-5)


def test_multi_scale_runs_each_scale_and_returns_the_original_size(
    tiny_model):
  apply_fn = _apply_fn(tiny_model)
  seen = []

  def spy(x):
    seen.append(x.shape[1:3])
    return apply_fn(x)

  x = _images(2, 32, 32, seed=4)
  full = [[32, 32], [32, 32]]
  got = _infer(spy, x, full, InferenceSpec(scales=(0.5, 1.0, 1.5)))
  assert got.shape == (2, 32, 32, 5)
  assert seen == [(16, 16), (32, 32), (48, 48)]
  # A full-size example: plain resizes of the image and of the logits.
  passes = []
  for s in (0.5, 1.0, 1.5):
    side = int(32 * s)
    small = jax.image.resize(x, (2, side, side, 3), 'linear')
    passes.append(jax.image.resize(apply_fn(small), (2, 32, 32, 5),
                                   'linear', antialias=False))
  np.testing.assert_allclose(got, np.mean(passes, axis=0), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize('antialias', [False, True])
def test_resize_within_equals_resizing_the_valid_region_alone(antialias):
  """Whatever the padding holds, each region is resized as if alone."""
  x = np.array(_images(3, 30, 40, seed=5))
  x[1, 17:] = 1e3  # padding must not leak into the region's resize
  x[1, :, 23:] = -1e3
  sizes = np.array([[30, 40], [17, 23], [30, 40]])
  new = np.array([[45, 60], [9, 35], [11, 13]])
  got = np.asarray(inference.resize_within(
      jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(new), (45, 60),
      antialias=antialias))
  for i in range(3):
    (h, w), (nh, nw) = sizes[i], new[i]
    want = jax.image.resize(x[i, :h, :w], (nh, nw, 3), 'linear',
                            antialias=antialias)
    np.testing.assert_allclose(got[i, :nh, :nw], want, rtol=1e-4, atol=1e-4)
    assert np.all(got[i, nh:] == 0) and np.all(got[i, :, nw:] == 0)


def _eval_config(tiny_config, num_val=13):
  tiny_config.data.shapes.num_val = num_val
  tiny_config.eval.global_batch_size = 8
  tiny_config.eval.evaluators.mix = dict(
      mode='slide', window=(24, 24), stride=(16, 16), scales=(0.75, 1.0),
      flip=True, average='probs')
  return tiny_config


def test_eight_devices_give_the_one_device_confusion_matrix(tiny_config,
                                                            tiny_model):
  config = _eval_config(tiny_config)
  _, model, variables = tiny_model
  source = data.create_source(config, 'val')
  assert len(source) == 13
  labelled = sum(int(np.sum(source[i]['label'] != 255)) for i in range(13))
  for name in ('whole', 'mix'):
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = sharding.create_mesh(devices=devices)
      placed = jax.device_put(variables, sharding.replicated(mesh))
      results.append(evaluators.Evaluator(name, config, model, mesh,
                                          source).run(placed))
    one, eight = results
    assert eight.confusion.dtype == np.int64
    assert int(one.confusion.sum()) == labelled  # each example exactly once
    np.testing.assert_array_equal(eight.confusion, one.confusion)
    # The loss is a float sum: on CPU, XLA's convolution kernels (used for
    # inference, models/layers.py) order it by the per-device batch.
    np.testing.assert_allclose(eight.loss, one.loss, rtol=3e-5)


def test_evaluation_batch_is_capped_at_the_split(tiny_config, tiny_model):
  """A split smaller than eval.global_batch_size is one batch of the least
  multiple of the devices that holds it (not 64 images of padding), with
  the metrics of a small batch; running out of memory is one line naming
  the setting."""
  config = _eval_config(tiny_config, num_val=5)
  config.eval.global_batch_size = 64
  _, model, variables = tiny_model
  source = data.create_source(config, 'val')
  results = []
  for devices, want in ((jax.devices()[:1], 5), (jax.devices(), 8)):
    mesh = sharding.create_mesh(devices=devices)
    placed = jax.device_put(variables, sharding.replicated(mesh))
    evaluator = evaluators.Evaluator('whole', config, model, mesh, source)
    assert evaluator.global_batch == want
    results.append(evaluator.run(placed))
  config.eval.global_batch_size = 2  # three batches
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  placed = jax.device_put(variables, sharding.replicated(mesh))
  evaluator = evaluators.Evaluator('whole', config, model, mesh, source)
  assert evaluator.global_batch == 2
  small = evaluator.run(placed)
  for result in results:
    np.testing.assert_array_equal(result.confusion, small.confusion)
  mesh8 = sharding.create_mesh()
  assert [evaluators.split_batch_size(b, mesh8, n) for b, n in
          ((64, 13), (8, 13), (64, 1), (16, 16), (16, 17))] == [16, 8, 8, 16,
                                                                 16]

  def exhausted(*args):
    del args
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Out of memory allocating 26945169168 bytes.')
  evaluator.eval_step = exhausted
  with pytest.raises(errors.ConfigError, match=r'^Evaluation whole ran out of '
                     r'memory on a batch of 2 images of 32x32 \(HxW\): set '
                     r'--config.eval.global_batch_size below 2 \(a multiple '
                     r'of 1\).$'):
    evaluator.run(placed)
  config.eval.global_batch_size = 64
  mesh = sharding.create_mesh()  # 5 images on 8 devices: one image each
  placed = jax.device_put(variables, sharding.replicated(mesh))
  evaluator = evaluators.Evaluator('whole', config, model, mesh, source)
  evaluator.eval_step = exhausted
  with pytest.raises(errors.ConfigError, match=r'^Evaluation whole ran out of '
                     r'memory on a batch of 8 images of 32x32 \(HxW\): the '
                     r'batch is one image a device already: evaluate in '
                     r"windows \(the 'slide' evaluator: --evaluator=slide, "
                     r'in training --config.eval.in_training=slide\).$'):
    evaluator.run(placed)


def test_an_evaluation_beyond_the_host_memory_is_refused_in_one_line(
    tiny_config, tiny_model, monkeypatch):
  """On a CPU the compiled evaluation step is checked against the host
  memory left before it runs (XLA's CPU runtime aborts the process where
  an allocation fails): with 1 KiB left, the evaluation stops with the
  out-of-memory line; with the memory unknown it runs as before."""
  from seg_jax import host_memory  # pylint: disable=g-import-not-at-top
  config = _eval_config(tiny_config, num_val=5)
  config.eval.global_batch_size = 2
  _, model, variables = tiny_model
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  placed = jax.device_put(variables, sharding.replicated(mesh))
  source = data.create_source(config, 'val')
  expected = evaluators.Evaluator('whole', config, model, mesh,
                                  source).run(placed)
  monkeypatch.setattr(host_memory, 'available_bytes', lambda: 1024)
  with pytest.raises(errors.ConfigError, match=r'^Evaluation whole ran out of '
                     r'memory on a batch of 2 images of 32x32 \(HxW\): set '
                     r'--config.eval.global_batch_size below 2 '):
    evaluators.Evaluator('whole', config, model, mesh, source).run(placed)
  monkeypatch.setattr(host_memory, 'available_bytes', lambda: None)
  result = evaluators.Evaluator('whole', config, model, mesh,
                                source).run(placed)
  np.testing.assert_array_equal(result.confusion, expected.confusion)


def test_ignore_label_254_on_relabelled_data_gives_the_same_metrics(
    tiny_config, tiny_model):
  """The shapes borders carry data.ignore_label: 254 instead of 255 must
  change neither the confusion matrix nor the loss (padding of the last
  batch included: 11 examples in batches of 8)."""
  _, model, variables = tiny_model
  mesh = sharding.create_mesh()
  placed = jax.device_put(variables, sharding.replicated(mesh))
  out = {}
  for ignore in (255, 254):
    config = _eval_config(tiny_config.copy_and_resolve_references(), 11)
    config.data.ignore_label = ignore
    source = data.create_source(config, 'val')
    assert ignore in np.unique(source[0]['label'])
    out[ignore] = evaluators.Evaluator('whole', config, model, mesh,
                                       source).run(placed)
  np.testing.assert_array_equal(out[255].confusion, out[254].confusion)
  assert out[255].loss == out[254].loss
  assert out[255].scores['miou'] == out[254].scores['miou']
  assert out[255].confusion.sum() == sum(
      int(np.sum(source[i]['label'] != 254)) for i in range(11))


def test_ignore_label_must_not_be_a_class_id(tiny_config):
  tiny_config.data.ignore_label = 3
  with pytest.raises(ValueError, match='data.ignore_label=3 must be in 5..255'):
    data.create_source(tiny_config, 'val')


def test_unknown_evaluator_and_bad_settings_name_the_key(tiny_config):
  with pytest.raises(ValueError, match="Unknown evaluator 'multi'.*'slide'"):
    inference.spec_from_config(tiny_config, 'multi')
  tiny_config.eval.evaluators.whole.mode = 'tiles'
  with pytest.raises(ValueError, match="mode='tiles'"):
    inference.spec_from_config(tiny_config, 'whole')
  tiny_config.eval.evaluators.slide.scales = (0.0,)
  with pytest.raises(ValueError, match='positive scales'):
    inference.spec_from_config(tiny_config, 'slide')


def test_bad_window_stride_and_scales_name_the_key(tiny_config):
  slide = tiny_config.eval.evaluators.slide
  slide.window, slide.stride = (16, 16), (20, 8)
  with pytest.raises(ValueError, match=r'eval.evaluators.slide: stride=\(20, '
                     r'8\) is larger than window'):
    inference.spec_from_config(tiny_config, 'slide')
  slide.window = (32, 32, 3)
  with pytest.raises(ValueError, match=r'eval.evaluators.slide.window=\(32, '
                     r'32, 3\): give \(height, width\)'):
    inference.spec_from_config(tiny_config, 'slide')
  # A config file may give one int per size and one scale.
  tiny_config.eval.evaluators.mine = dict(mode='slide', window=24, stride=12,
                                          scales=0.5)
  spec = inference.spec_from_config(tiny_config, 'mine')
  assert spec.window == (24, 24) and spec.stride == (12, 12)
  assert spec.scales == (0.5,)


def test_scaled_size_never_exceeds_the_scaled_canvas():
  """45 * 0.7 rounds to 31 on the host (the canvas) and to 32 in float32 on
  the device: the scaled size is capped at the canvas, so the pass equals a
  plain resize to 31 and back, and no pixel is left without logits."""
  seen = []

  def shifted(x):  # nonzero everywhere
    seen.append(x.shape[1:3])
    return x[..., :2] + 5.0

  x = _images(1, 45, 45, seed=6)
  got = _infer(shifted, x, [[45, 45]], InferenceSpec(scales=(0.7,)))
  assert seen == [(31, 31)]
  small = jax.image.resize(x, (1, 31, 31, 3), 'linear')
  want = jax.image.resize(shifted(small), (1, 45, 45, 2), 'linear',
                          antialias=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(got > 1.0)


def test_probs_average_of_one_confident_pass_keeps_the_loss_finite():
  def confident(x):  # class 0 wins by 200 everywhere
    return jnp.concatenate([x[..., :1] * 0 + 200.0, x[..., :2] * 0], -1)

  x = _images(1, 8, 8)
  got = _infer(confident, x, [[8, 8]], InferenceSpec(average='probs'))
  assert np.all(np.isfinite(got)) and np.all(got.argmax(-1) == 0)
  from seg_jax import losses  # pylint: disable=g-import-not-at-top
  labels = np.ones((1, 8, 8), np.int32)
  labels[0, :4] = 255
  assert np.isfinite(float(losses.cross_entropy(jnp.asarray(got),
                                                jnp.asarray(labels))))


def test_default_slide_window_is_the_crop_and_stride_two_thirds(tiny_config):
  spec = inference.spec_from_config(tiny_config, 'slide')
  assert spec.window == (32, 32) and spec.stride == (21, 21)
  assert spec.mode == 'slide' and spec.scales == (1.0,)
