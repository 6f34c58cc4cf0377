"""ONNX export (seg_jax.to_onnx): ONNX Runtime labels images as predict does.

The ONNX model is converted from the export's own function (weights baked
in, the configured inference, argmax) and run by ONNX Runtime on odd-sized
images padded with the mean to the export's fixed input size; predict's
`Predictor` labels the same padded images. Models: small widths, seeded
weights with random BatchNorm statistics, the classifier bias centred so
that several classes are predicted. Skipped without the [onnx] extra.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip('onnx', reason='needs the [onnx] extra: '
                           'pip install onnx onnxruntime')
ort = pytest.importorskip('onnxruntime', reason='needs the [onnx] extra: '
                          'pip install onnx onnxruntime')

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default
from seg_jax import errors, export, inference, models, predict, to_onnx
from seg_jax.data import shapes, transforms

SIZE = (200, 264)  # the export's input size
IMAGES = ((187, 251), (199, 229))  # odd sizes, padded to SIZE
NUM_CLASSES = 5
# Model, options, evaluators checked.
CASES = (
    ('unet', {'width': 8, 'depth': 3}, ('whole', 'tta')),
    ('fcn_resnet50', {'width': 8}, ('whole',)),
    ('deeplabv3_resnet50', {'width': 8}, ('whole', 'slide')),
    ('deeplabv3_mobilenet_v3_large', {'width': 0.25}, ('whole',)),
    ('lraspp_mobilenet_v3_large', {'width': 0.25}, ('whole',)),
)


def _config(name, kwargs):
  config = default.get_config()
  config.model.name, config.model.num_classes = name, NUM_CLASSES
  config.model.kwargs = kwargs
  config.data.crop_size = (128, 160)  # the slide window
  config.eval.evaluators.tta.scales = (0.75, 1.25)  # and flipped
  return config


def _images():
  """Shapes images of the odd sizes, padded with the mean to SIZE."""
  fill = transforms.fill_value(default.get_config().data.mean)
  out = []
  for k, (h, w) in enumerate(IMAGES):
    image = shapes.make_example(0, 'val', k, size=256)['image'][:h, :w]
    out.append(transforms.pad_image(image, *SIZE, fill))
  return np.stack(out)


def _random_variables(model, seed):
  """Seeded weights (lecun-normal kernels), random BatchNorm statistics."""
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    key = path[-1].key
    if key == 'kernel':
      fan_in = np.prod(x.shape[:-1])
      return rng.normal(0, 1 / np.sqrt(fan_in), x.shape).astype(np.float32)
    if key in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return rng.normal(0, 0.1, x.shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _onnx_labels(fn, images):
  session = ort.InferenceSession(
      to_onnx.convert(fn, images.shape[1:]).SerializeToString(),
      providers=['CPUExecutionProvider'])
  return session.run(None, {'images': images})[0]


def _centre_classifier(model, config, variables, images):
  """Shifts the biases of shape (classes,) by minus the mean logits (the
  classifier's, or LR-ASPP's two summed ones), so that no class dominates;
  the logits are computed by ONNX Runtime through the converter."""
  logits = _onnx_labels(lambda x: model.apply(variables, inference.normalize(
      x, config.data.mean, config.data.std), train=False), images)
  shift = logits.mean((0, 1, 2))
  paths = [p for p, x in jax.tree_util.tree_leaves_with_path(
      variables['params']) if p[-1].key == 'bias' and
           x.shape == (NUM_CLASSES,)]
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x - shift / len(paths) if p[1:] in paths else x,
      variables)


@pytest.fixture(scope='module')
def images():
  return _images()


# fcn_resnet50's trunk is deeplabv3_resnet50's: release runs only.
@pytest.mark.parametrize('name,kwargs,evaluators', [
    pytest.param(*c, marks=[pytest.mark.slow] * (c[0] == 'fcn_resnet50'))
    for c in CASES], ids=[c[0] for c in CASES])
def test_onnx_runtime_gives_predicts_labels(name, kwargs, evaluators,
                                            images):
  if name not in models.MODELS:
    pytest.skip(f'{name} is not in seg_jax.models.MODELS yet')
  config = _config(name, kwargs)
  model = models.create_model(name, NUM_CLASSES, **kwargs)
  variables = _centre_classifier(model, config,
                                 _random_variables(model, seed=1), images)
  for evaluator in evaluators:
    spec = inference.spec_from_config(config, evaluator)
    got = _onnx_labels(export.make_export_fn(model, config, spec, variables,
                                             *SIZE), images)
    predictor = predict.Predictor(config, model, variables, spec,
                                  batch_size=len(images))
    expected = np.stack(predictor(list(images)))
    assert got.dtype == np.int32 and got.shape == (len(images), *SIZE)
    assert len(np.unique(expected)) >= 3, (evaluator, np.unique(expected))
    differ = got != expected
    # Measured (3 runs each, deterministic): 0 or 1 of the 105,600 pixels
    # differ per case (which cases, depends on XLA's optimisation level),
    # each a tie of the top two logits to float rounding (gap < 1e-7).
    assert differ.mean() <= 1e-3, (evaluator, differ.mean())
    if differ.any():  # the predict step's own logits
      logits = np.asarray(inference.make_predict_step(
          model, config, spec, with_logits=True)(
              variables, images,
              np.array([SIZE] * len(images), np.int32))[1])
      top2 = np.sort(logits, -1)[..., -2:]
      gap = (top2[..., 1] - top2[..., 0])[differ]
      assert gap.max() < 1e-5, (evaluator, gap)


def test_export_cli_path_writes_onnx_that_load_onnx_runs(tmp_path):
  """export_model(format='onnx') from a checkpoint, loaded by load_onnx
  (any batch size), equals the StableHLO export's labels and meta."""
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  from seg_jax import train  # pylint: disable=g-import-not-at-top
  config = unet_shapes_tiny.get_config()
  workdir = str(tmp_path / 'run')
  trainer = train.Trainer(config, workdir)
  trainer.checkpointer.maybe_save(1, trainer.state, iter(trainer.train_ds),
                                  force=True)
  trainer.checkpointer.close()
  path = str(tmp_path / 'tiny.onnx')
  meta = export.export_model(config, workdir, path, format='onnx')
  assert meta['format'] == 'onnx' and meta['opset'] == to_onnx.OPSET
  assert meta['input_size'] == [32, 32] and meta['inference'] == 'whole'
  with open(path + '.json') as f:
    assert json.load(f)['class_names'][1] == 'circle'
  stablehlo = str(tmp_path / 'tiny.stablehlo')
  export.export_model(config, workdir, stablehlo)
  run_onnx, _ = to_onnx.load_onnx(path)
  run_stablehlo, _ = export.load(stablehlo)
  batch = np.stack([shapes.make_example(0, 'val', k, size=32)['image']
                    for k in range(3)])
  labels = run_onnx(batch)
  assert labels.dtype == np.int32 and labels.shape == (3, 32, 32)
  np.testing.assert_array_equal(labels, run_stablehlo(batch))
  np.testing.assert_array_equal(run_onnx(batch[1:2]), labels[1:2])
  # A smaller image is mirror-filled to the canvas, as evaluate fills its
  # canvas: the labels of the predict step given its size.
  small = batch[:, 5:25, 2:29]
  from seg_jax import checkpoint, sharding  # pylint: disable=g-import-not-at-top
  model, variables, _ = checkpoint.restore_for_inference(
      config, workdir, sharding.create_mesh(devices=jax.devices()[:1]))
  canvas = np.zeros_like(batch)
  canvas[:, :20, :27] = small
  want = np.asarray(inference.make_predict_fn(
      model, config, inference.spec_from_config(config, 'whole'))(
          variables, canvas, np.array([[20, 27]] * 3, np.int32)))
  np.testing.assert_array_equal(run_onnx(small), want[:, :20, :27])
  np.testing.assert_array_equal(run_stablehlo(small), want[:, :20, :27])
  with pytest.raises(ValueError, match=r'takes images of at most 32x32 '
                     r'\(HxW\); got 40x32: export again with --size=40,32'):
    run_onnx(np.zeros((1, 40, 32, 3), np.uint8))
  with pytest.raises(ValueError,
                     match=r'\(b, h, w, 3\); got \(3, 32, 32, 2\)'):
    run_stablehlo(batch[..., :2])
  with pytest.raises(errors.ConfigError, match='--platforms'):
    export.export_model(config, workdir, path, format='onnx',
                        platforms=('cuda',))


def _hard_swish_se(x):
  """A depthwise convolution, hard-swish and squeeze-and-excitation."""
  k = jnp.linspace(-1, 1, 3 * 3 * 3).reshape(3, 3, 1, 3)
  y = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                   feature_group_count=3,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = jax.nn.hard_swish(y)
  return y * jax.nn.hard_sigmoid(y.mean((1, 2), keepdims=True)) + \
      jax.nn.sigmoid(y)


def _transposed_and_pooled(x):
  """A transposed convolution (input dilation), max and average pooling."""
  k = jnp.linspace(-1, 1, 4 * 4 * 3 * 2).reshape(4, 4, 3, 2)
  up = jax.lax.conv_transpose(x, k, (2, 2), 'SAME',
                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  pooled = jax.lax.reduce_window(up, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                 (1, 2, 2, 1), 'SAME')
  summed = jax.lax.reduce_window(up, 0.0, jax.lax.add, (1, 2, 2, 1),
                                 (1, 2, 2, 1), 'VALID')
  return pooled + summed


def _scanned_rows(x):
  """A scan over rows with per-step outputs; a permutation gather (not
  separable by axis); scatter-adds on a box and off one; an update of a
  slice."""
  def step(carry, row):
    carry = carry * 0.5 + row
    return carry, carry.sum(-1)

  _, ys = jax.lax.scan(step, jnp.zeros(x.shape[2:]), x[0])
  flat = ys.reshape(-1)
  perm = np.random.default_rng(0).permutation(flat.size)
  picked = flat[perm].reshape(ys.shape)
  spots = np.array([[0, 0], [2, 3], [5, 1]])
  picked = picked.at[spots[:, 0], spots[:, 1]].add(1.0)
  picked = picked.at[1:3, 2:5].add(ys[4:6, :3])
  return jax.lax.dynamic_update_slice(picked, ys[:2, :2] * 2, (7, 3))[None]


@pytest.mark.parametrize('fn', [_hard_swish_se, _transposed_and_pooled,
                                _scanned_rows])
def test_converted_primitives_match_jax(fn):
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 12, 10, 3)))
  images = (x * 40 + 128).clip(0, 255).astype(np.uint8)
  f = lambda im: fn(im.astype(jnp.float32) / 64.0 - 2.0)
  got = _onnx_labels(f, images)
  np.testing.assert_allclose(got, np.asarray(jax.jit(f)(images)), rtol=1e-5,
                             atol=1e-5)


def test_unsupported_primitive_is_a_one_line_error_naming_it():
  with pytest.raises(errors.UserError) as info:
    to_onnx.convert(lambda x: jnp.cumsum(x, 1), (8, 8, 3), 'model toy')
  message = str(info.value)
  assert '\n' not in message
  assert "'cumsum'" in message and 'model toy' in message
  with pytest.raises(errors.UserError, match="'gather' at indices computed "
                     'from the image'):
    to_onnx.convert(lambda x: x[:, :, x[0, 0, :, 0] % 8], (8, 8, 3))


# Small versions of every model of the zoo (the slow test below).
SMALL = {'unet': {'width': 4, 'depth': 2}, 'segnet': {'width': 1 / 16},
         'fcn32s': {'width': 1 / 16}, 'fcn16s': {'width': 1 / 16},
         'fcn8s': {'width': 1 / 16}, 'pixel_classifier': {'width': 4}}


def _small(name):
  if name in SMALL:
    return SMALL[name]
  return {'width': 8} if 'resnet' in name else {'width': 0.25}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_every_model_converts_with_every_evaluator(name):
  """The primitives of the whole zoo's inference (whole, slide, tta) are
  all converted, and ONNX Runtime labels as the predict step does."""
  config = _config(name, _small(name))
  config.data.crop_size = (48, 64)
  model = models.create_model(name, NUM_CLASSES, **_small(name))
  variables = _random_variables(model, seed=2)
  images = np.stack([shapes.make_example(0, 'val', k, size=96)['image'][:72]
                     for k in range(2)])
  for evaluator in ('whole', 'slide', 'tta'):
    spec = inference.spec_from_config(config, evaluator)
    got = _onnx_labels(export.make_export_fn(model, config, spec, variables,
                                             72, 96), images)
    expected = inference.make_predict_step(model, config, spec)(
        variables, images, np.array([[72, 96]] * 2, np.int32))
    assert np.mean(got != np.asarray(expected)) <= 1e-3, evaluator
