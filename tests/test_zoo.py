"""The model zoo: reference parameter counts, output sizes, bilinear FCN
upsampling, training under jit on the 8-device mesh in f32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import models, optim, sharding, state, steps
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
    ('deeplabv3_mobilenet_v3_large', {}, 11_025_477),
    ('deeplabv3_mobilenet_v3_large', {'aux_head': True}, 11_029_328),
    ('lraspp_mobilenet_v3_large', {}, 3_221_538),
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


# The ResNet-101 models' shapes are traced with `-m slow` (15 s here; they
# share every line with their ResNet-50 twins, traced by default).
@pytest.mark.parametrize('name', [
    pytest.param(n, marks=[pytest.mark.slow] * n.endswith('101'))
    for n in ALL])
def test_output_is_input_size(name):
  """Odd sizes (VOC's 500x375 and 321x481) and a small one; the parameters
  do not depend on the input's size (initialised at one, applied to all)."""
  model = models.create_model(name, 5)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  for hw in [(321, 481), (500, 375), (64, 64)]:
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
    assert out.shape == (1, *hw, 5), hw


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
    'fcn32s': {'width': 1 / 32}, 'fcn16s': {'width': 1 / 32},
    'fcn8s': {'width': 1 / 32}, 'segnet': {'width': 1 / 16},
    'unet': {'width': 4, 'depth': 3},
    'fcn_resnet50': {'width': 8, 'aux_head': True},
    'fcn_resnet101': {'width': 8},
    'deeplabv3_resnet50': {'width': 8, 'aux_head': True},
    'deeplabv3_resnet101': {'width': 8},
    'deeplabv3plus_resnet50': {'width': 8},
    'deeplabv3plus_resnet101': {'width': 8},
    'pixel_classifier': {'width': 8},
    'deeplabv3_mobilenet_v3_large': {'width': 0.25, 'aux_head': True},
    'lraspp_mobilenet_v3_large': {'width': 0.25},
}


# The ResNet-101 models share every line with their ResNet-50 twins,
# FCN-16s/8s their VGG trunk and training path with FCN-32s, and
# fcn_resnet50 / deeplabv3plus_resnet50 their dilated ResNet-50 trunk, aux
# head and bf16 path with deeplabv3_resnet50 (their heads are checked by the
# forward and parameter-count tests): they run with `pytest -m slow`
# (FCN-8s alone takes ~75 s here: 6 s a step on its 100-pixel-padded
# input), keeping the default suite under 10 minutes on 2 cores.
# deeplabv3_mobilenet_v3_large shares its MobileNetV3 trunk (f32 and bf16,
# depthwise gradients) with lraspp_mobilenet_v3_large and its ASPP and aux
# head with deeplabv3_resnet50 (measured on this loaded 2-core machine,
# nice 19: 39 s, lraspp 33 s, deeplabv3_resnet50 28 s).
# lraspp_mobilenet_v3_large (both precisions, 38 s in a loaded run) runs
# with `-m slow` too: its depthwise convolutions' values and gradients, in
# float32 and bfloat16, are checked against the grouped convolution by
# tests/test_conv_forms.py, its inference against torchvision's logits
# (test_golden_torchvision) and in ONNX. deeplabv3_resnet50 (30 s in a
# loaded run on a slow hour) runs with `-m slow` too: its CPU forms
# (dilated taps, Winograd, the cropped ASPP taps, 1x1 products) are checked
# form by form on values and gradients by tests/test_conv_forms.py, its
# inference against torchvision's logits and in ONNX. segnet runs float32
# alone by default, the precision of its max-unpooling (its bfloat16 step,
# 5 s here, with `-m slow`: bf16 compute is the mixed-precision path the
# U-Net and FCN-32s cases run by default).
SLOW_TRAIN = ('fcn16s', 'fcn8s', 'fcn_resnet50', 'deeplabv3plus_resnet50',
              'deeplabv3_mobilenet_v3_large', 'lraspp_mobilenet_v3_large',
              'deeplabv3_resnet50')
ONE_BY_DEFAULT = {'segnet': 'float32'}
BOTH = ('float32', 'bfloat16')
SHORT = {'float32': 'f32', 'bfloat16': 'bf16'}
TRAIN_CASES = [
    pytest.param(n, BOTH, id=n, marks=[pytest.mark.slow] * (
        n.endswith('101') or n in SLOW_TRAIN))
    for n in ALL if n not in ONE_BY_DEFAULT] + [
        pytest.param(n, (p,), id=f'{n}-{SHORT[p]}',
                     marks=[pytest.mark.slow] * (p != ONE_BY_DEFAULT[n]))
        for n in ONE_BY_DEFAULT for p in BOTH]


@pytest.mark.parametrize('name, precisions', TRAIN_CASES)
def test_trains_on_8_device_mesh_f32_and_bf16(name, precisions, tiny_config):
  """A few steps on one batch lower its loss, in float32 and in bfloat16
  (float32 parameters, bf16 compute, dilated convolutions included)."""
  c = tiny_config
  c.model.name, c.model.kwargs = name, SMALL[name]
  # Without BatchNorm, VGG-FCN needs a gentler rate; DeepLab's dropout and
  # BatchNorm want plain SGD for a steady descent in a few steps.
  c.train.optimizer, c.train.learning_rate, c.train.weight_decay = {
      'fcn32s': ('adamw', 2e-3, 0.0), 'fcn16s': ('adamw', 2e-3, 0.0),
      'fcn8s': ('adamw', 2e-3, 0.0)}.get(
          name, ('sgd', 0.05, 0.0) if 'deeplab' in name else
          ('adamw', 1e-2, 0.0))
  c.train.schedule, c.train.warmup_steps = 'constant', 0
  mesh = sharding.create_mesh((-1,), ('data',))
  assert mesh.devices.size == 8
  tx = optim.create_optimizer(c.train)
  init_state = state.create_train_state(state.create_model(c), tx,
                                        jax.random.key(0), (1, 32, 32, 3),
                                        mesh)
  rng = np.random.default_rng(0)
  # 8x8-pixel blocks of one class each, coloured by class: learnable by
  # every architecture, including those that predict at stride 8 or 32.
  blocks = rng.integers(0, 5, (8, 4, 4))
  labels = blocks.repeat(8, 1).repeat(8, 2).astype(np.uint8)
  palette = np.array([[0, 0, 0], [200, 0, 0], [0, 200, 0], [0, 0, 200],
                      [200, 200, 200]])
  images = (palette[labels] + rng.integers(0, 40, (8, 32, 32, 3))).astype(
      np.uint8)
  labels[:, :2] = 255
  batch = sharding.to_global({'image': images, 'label': labels}, mesh)
  for precision in precisions:
    c.train.precision = precision
    model = state.create_model(c)
    step = steps.make_train_step(model, tx, c, mesh)
    train_state = jax.tree.map(jnp.copy, init_state)  # the step donates it
    losses = []
    for _ in range(6):  # the same batch: the loss must go down
      train_state, m = step(train_state, batch, jax.random.key(1))
      losses.append(float(m.loss.compute()))
    assert np.all(np.isfinite(losses)), (precision, losses)
    assert np.mean(losses[-2:]) < losses[0], (precision, losses)
    assert jax.tree.leaves(train_state.params)[0].dtype == jnp.float32


CONFIGS = ['fcn32s_voc', 'fcn16s_voc', 'fcn8s_voc', 'fcn_resnet50_voc',
           'unet_shapes', 'deeplabv3_resnet50_voc',
           'deeplabv3plus_resnet101_cityscapes', 'segnet_camvid',
           'pixel_shapes', 'unet_shapes_tiny',
           'deeplabv3_mobilenet_v3_large_voc', 'lraspp_mobilenet_v3_large_voc',
           'deeplabv3_mobilenet_v3_large_camvid',
           'lraspp_mobilenet_v3_large_camvid']


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model(name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  model = state.create_model(config)  # validates name and kwargs
  ctor = models.MODELS[config.model.name]
  assert isinstance(model, getattr(ctor, 'func', ctor))
  assert model.num_classes == config.model.num_classes
  lr = optim.create_learning_rate_fn(config.train)
  expected = 0.0 if config.train.warmup_steps else config.train.learning_rate
  np.testing.assert_allclose(float(lr(0)), expected, rtol=1e-6)


def test_summary_counts_params_and_flops(tiny_config):
  from seg_jax import summary  # pylint: disable=g-import-not-at-top
  c = tiny_config
  c.model.name, c.model.kwargs = 'pixel_classifier', {'width': 64, 'depth': 2}
  table, params, gflops = summary.summarize(c)
  assert params == (3 * 64 + 64) + (64 * 64 + 64) + (64 * 5 + 5)
  assert 'Conv_0' in table and f'{3 * 64 + 64:,}' in table
  macs_per_pixel = 3 * 64 + 64 * 64 + 64 * 5
  expected = 2 * macs_per_pixel * 32 * 32 / 1e9  # 32x32 crop, 1 image
  assert expected <= gflops <= 1.1 * expected


def test_summary_cli_last_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from configs import unet_shapes  # pylint: disable=g-import-not-at-top
  from seg_jax import workdir  # pylint: disable=g-import-not-at-top
  # A run folder's config.json, as training writes it, is read for --workdir.
  workdir.write_config(str(tmp_path), unet_shapes.get_config())
  lasts = []
  for given in ('--config=configs/unet_shapes.py', f'--workdir={tmp_path}'):
    out = subprocess.run([sys.executable, '-m', 'seg_jax.summary', given],
                         cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lasts.append(out.stdout.strip().splitlines()[-1])
  assert lasts[0] == lasts[1]
  assert lasts[0].startswith('params=482805 gflops=')
  assert float(lasts[0].split('gflops=')[1]) > 0.1


@pytest.mark.parametrize('kwargs', [{'multi_grid': (1, 2, 4)},
                                    {'deep_stem': True},
                                    {'output_stride': 16}])
def test_resnet_options(kwargs):
  base = models.create_model('deeplabv3_resnet50', 21)
  model = models.create_model('deeplabv3_resnet50', 21, **kwargs)
  x = jax.ShapeDtypeStruct((1, 65, 97, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
  assert out.shape == (1, 65, 97, 21)
  delta = _params(model) - _params(base)
  # A deep stem swaps the 7x7 conv (9,408 + BN 128) for three 3x3 convs.
  expected = ((3 * 9 * 32 + 64) + (32 * 9 * 32 + 64) + (32 * 9 * 64 + 128)
              - (3 * 49 * 64 + 128)) if 'deep_stem' in kwargs else 0
  assert delta == expected
  if 'multi_grid' in kwargs:  # the last stage is unrolled, one block each
    assert {'layer4_0', 'layer4_1', 'layer4_2'} <= set(v['params']['backbone'])


@pytest.mark.slow  # the scanned layout is not the default; ~30 s of compiles
def test_summary_flops_count_every_scanned_block(tiny_config):
  """XLA's cost analysis counts a loop body once; the jaxpr count counts a
  scanned stage like its unrolled twin, and ResNet-101 has exactly its
  extra 17 blocks more than ResNet-50."""
  from seg_jax import flops as seg_flops  # pylint: disable=g-import-not-at-top
  from seg_jax import summary  # pylint: disable=g-import-not-at-top
  flops = {}
  for name in ('fcn_resnet50', 'fcn_resnet101'):
    tiny_config.model.name, tiny_config.model.kwargs = name, {'width': 8}
    _, _, flops[name] = summary.summarize(tiny_config)
  scanned = models.create_model('fcn_resnet101', 5, width=8,
                                scan_blocks=True)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  v = jax.eval_shape(lambda x: scanned.init(jax.random.key(0), x), x)
  fwd = lambda v, x: scanned.apply(v, x, train=False)
  with layers.all_taps():  # as the summary counts
    np.testing.assert_allclose(
        seg_flops.count_flops(fwd, v, x) / 1e9, flops['fcn_resnet101'],
        rtol=1e-12)
  cost = jax.jit(fwd).lower(v, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert flops['fcn_resnet101'] > 1.3 * cost['flops'] / 1e9
  # layer3 at stride 8: 17 more blocks of (1x1 128->32, 3x3 32->32,
  # 1x1 32->128) MACs on a 4x4 map.
  per_block = 2 * 16 * (128 * 32 + 9 * 32 * 32 + 32 * 128)
  np.testing.assert_allclose(flops['fcn_resnet101'] - flops['fcn_resnet50'],
                             17 * per_block / 1e9, rtol=1e-9)


@pytest.mark.parametrize('dilation', [1, 4, 6, 8])
def test_conv_skipping_padding_taps_is_exact(dilation):
  """On a 5x7 map, dilation 6 leaves the off-centre rows in the padding
  only, dilation 8 every off-centre tap; at dilation 4 and 6 most products
  would be with padding, so on CPU the convolution is a sum of per-tap
  products over the valid positions only. Outputs and kernel gradients
  equal the full convolution's (the skipped taps' gradient is exactly
  0)."""
  conv = layers.Conv(6, 3, dilation=dilation)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7, 4)),
                  jnp.float32)
  v = conv.init(jax.random.key(0), x)

  def loss(v):
    return jnp.sum(jnp.sin(conv.apply(v, x)))

  with layers.all_taps():
    full_out, full_grad = conv.apply(v, x), jax.grad(loss)(v)
  out, grad = conv.apply(v, x), jax.grad(loss)(v)
  np.testing.assert_allclose(out, full_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad['params']['kernel'],
                             full_grad['params']['kernel'], rtol=1e-5,
                             atol=1e-5)
  if dilation >= 7:
    assert not np.any(np.asarray(grad['params']['kernel'])[[0, 2]])
  from seg_jax import flops  # pylint: disable=g-import-not-at-top
  # 2 N Cin Cout x (output rows a kept tap computes, summed over the
  # kernel's rows) x (the same for columns).
  rows, cols = {1: (15, 21),  # all 9 taps everywhere (a convolution)
                4: (1 + 5 + 1, 3 + 7 + 3),  # only where each tap is valid
                6: (5, 1 + 7 + 1),  # centre row; valid columns only
                8: (5, 7)}[dilation]  # the centre tap
  assert flops.count_flops(lambda v: conv.apply(v, x), v) == (
      2 * 2 * 4 * 6 * rows * cols)
  with layers.all_taps():  # model FLOPs: every tap everywhere
    assert flops.count_flops(lambda v: conv.apply(v, x), v) == (
        2 * 2 * 4 * 6 * 15 * 21)
