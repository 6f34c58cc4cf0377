"""The model zoo: reference parameter counts, output sizes, bilinear FCN
upsampling, training under jit on the 8-device mesh in f32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import models, sharding, train
from seg_jax.models import layers

# DESIGN.md's reference table, 21 classes.
REFERENCE_PARAMS = [
    ('fcn32s', {}, 136_152_917),
    ('fcn16s', {}, 134_815_994),
    ('fcn8s', {}, 134_489_759),
    ('fcn_resnet50', {}, 32_957_013),
    ('fcn_resnet50', {'aux_head': True}, 35_322_218),
    ('fcn_resnet101', {}, 51_949_141),
    ('fcn_resnet101', {'aux_head': True}, 54_314_346),
    ('deeplabv3_resnet50', {}, 39_638_869),
    ('deeplabv3_resnet50', {'aux_head': True}, 42_004_074),
    ('deeplabv3_resnet101', {}, 58_630_997),
    ('deeplabv3_resnet101', {'aux_head': True}, 60_996_202),
]


def _params(model, shape=(1, 64, 64, 3)):
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                        train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v['params']))


@pytest.mark.parametrize('name,kwargs,expected', REFERENCE_PARAMS)
def test_reference_parameter_counts(name, kwargs, expected):
  assert _params(models.create_model(name, 21, **kwargs)) == expected


def test_fcn8s_without_upsampling_layers():
  model = models.create_model('fcn8s', 21)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                        jnp.zeros((1, 64, 64, 3))))
  up = sum(int(np.prod(x.shape)) for k, sub in v['params'].items()
           if k.startswith('upscore') for x in jax.tree.leaves(sub))
  assert _params(model) - up == 134_362_751


ALL = sorted(models.MODELS)


@pytest.mark.parametrize('name', ALL)
@pytest.mark.parametrize('hw', [(321, 481), (500, 375), (64, 64)])
def test_output_is_input_size(name, hw):
  model = models.create_model(name, 5)
  x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  assert out.shape == (1, *hw, 5)


@pytest.mark.parametrize('k,stride', [(4, 2), (16, 8), (32, 16), (64, 32)])
def test_bilinear_transposed_conv_is_bilinear_interpolation(k, stride):
  """On a smooth (linear) map, interior pixels equal jax.image.resize's."""
  mod = layers.BilinearConvTranspose(3, k, stride)
  x = jnp.stack(jnp.meshgrid(jnp.arange(12.), jnp.arange(12.),
                             indexing='ij'), -1)
  x = jnp.concatenate([x, x.sum(-1, keepdims=True)], -1)[None]  # (1,12,12,3)
  up = mod.apply(mod.init(jax.random.key(0), x), x)
  assert up.shape == (1, 11 * stride + k, 11 * stride + k, 3)
  off = (k - stride) // 2  # caffe's crop aligning the deconvolution output
  ref = jax.image.resize(x, (1, 12 * stride, 12 * stride, 3), 'bilinear')
  crop = up[:, off:off + 12 * stride, off:off + 12 * stride]
  m = 2 * stride  # interior: away from the zero-padded borders
  np.testing.assert_allclose(crop[:, m:-m, m:-m], ref[:, m:-m, m:-m],
                             atol=1e-4)


@pytest.mark.parametrize('name,kernels', [('fcn32s', (64,)),
                                          ('fcn16s', (4, 32)),
                                          ('fcn8s', (4, 4, 16))])
def test_fcn_upsampling_layers_start_bilinear(name, kernels):
  model = models.create_model(name, 4, width=1 / 16)
  v = model.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)))
  ups = sorted((k for k in v['params'] if k.startswith('upscore')),
               key=lambda k: v['params'][k]['kernel'].shape[0])
  assert sorted(v['params'][k]['kernel'].shape[0] for k in ups) == sorted(
      kernels)
  for k in ups:
    kernel = v['params'][k]['kernel']
    np.testing.assert_array_equal(
        kernel, layers.bilinear_kernel(kernel.shape[0], 4))


# Small widths keep these CPU steps short; the code paths are the full ones.
SMALL = {
    'fcn32s': {'width': 1 / 16}, 'fcn16s': {'width': 1 / 16},
    'fcn8s': {'width': 1 / 16}, 'segnet': {'width': 1 / 16},
    'unet': {'width': 4, 'depth': 3},
    'fcn_resnet50': {'width': 8, 'aux_head': True},
    'fcn_resnet101': {'width': 8},
    'deeplabv3_resnet50': {'width': 8, 'aux_head': True},
    'deeplabv3_resnet101': {'width': 8},
    'deeplabv3plus_resnet50': {'width': 8},
    'deeplabv3plus_resnet101': {'width': 8},
    'pixel_classifier': {'width': 8},
}


@pytest.mark.parametrize('precision', ['float32', 'bfloat16'])
@pytest.mark.parametrize('name', ALL)
def test_trains_on_8_device_mesh(name, precision, tiny_config):
  c = tiny_config
  c.model.name, c.model.kwargs = name, SMALL[name]
  c.train.precision = precision
  c.train.optimizer, c.train.learning_rate = 'adamw', 3e-3
  c.train.schedule, c.train.warmup_steps = 'constant', 0
  mesh = sharding.create_mesh((-1,), ('data',))
  model = train.create_model(c)
  tx = train.create_optimizer(c.train)
  state = train.create_train_state(model, tx, jax.random.key(0),
                                   (1, 32, 32, 3), mesh)
  step = train.make_train_step(model, tx, c, mesh)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, (8, 32, 32)).astype(np.uint8)
  labels[:, :4] = 255
  images = (np.eye(5)[np.minimum(labels, 4)][..., :3] * 200 +
            rng.integers(0, 40, (8, 32, 32, 3))).astype(np.uint8)
  batch = sharding.to_global({'image': images, 'label': labels}, mesh)
  losses = []
  for _ in range(4):  # the same batch: the loss must go down
    state, m = step(state, batch, jax.random.key(1))
    losses.append(float(m.loss.compute()))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  assert jax.tree.leaves(state.params)[0].dtype == jnp.float32


CONFIGS = ['fcn32s_voc', 'fcn16s_voc', 'fcn8s_voc', 'fcn_resnet50_voc',
           'unet_shapes', 'deeplabv3_resnet50_voc',
           'deeplabv3plus_resnet101_cityscapes', 'segnet_camvid',
           'pixel_shapes', 'unet_shapes_tiny']


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model(name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  model = train.create_model(config)  # validates name and kwargs
  assert isinstance(model, models.MODELS[config.model.name].func
                    if hasattr(models.MODELS[config.model.name], 'func')
                    else models.MODELS[config.model.name])
  lr = train.create_learning_rate_fn(config.train)
  expected = 0.0 if config.train.warmup_steps else config.train.learning_rate
  np.testing.assert_allclose(float(lr(0)), expected, rtol=1e-6)
