"""Parity with torchvision: the same weights give the same logits.

Needs torch and torchvision (optional; skipped when absent). Models are
randomly initialised — no download — with their BatchNorm statistics
randomised too, so the eval-mode comparison covers every mapped tensor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
tv_seg = pytest.importorskip('torchvision.models.segmentation')
tv_models = pytest.importorskip('torchvision.models')

from seg_jax import models  # noqa: E402
from seg_jax.models import convert, weights  # noqa: E402

pytestmark = pytest.mark.torch


def _randomize_bn(module, seed=0):
  g = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _torch_logits(tmodel, x):
  with torch.no_grad():
    return tmodel(torch.from_numpy(x).permute(0, 3, 1, 2))['out'].permute(
        0, 2, 3, 1).numpy()


def _relative_error(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('name,aux,scan', [
    ('fcn_resnet50', False, False), ('fcn_resnet50', True, False),
    ('deeplabv3_resnet50', False, False), ('deeplabv3_resnet50', True, False),
    ('deeplabv3_resnet50', True, True),
    ('deeplabv3_mobilenet_v3_large', True, False),
    ('lraspp_mobilenet_v3_large', False, False)])
def test_logits_match_torchvision(name, aux, scan):
  """Both stage layouts: one module per block (default) and scanned; the
  MobileNetV3 models (measured: relative error 6e-7 and 4e-7)."""
  torch.manual_seed(0)
  tmodel = getattr(tv_seg, name)(
      weights=None, weights_backbone=None, num_classes=21,
      **({'aux_loss': True} if aux else {})).eval()  # lraspp takes no aux
  _randomize_bn(tmodel)
  x = np.random.default_rng(0).normal(size=(2, 97, 131, 3)).astype(np.float32)
  expected = _torch_logits(tmodel, x)

  variables = convert.from_torchvision(name, tmodel.state_dict(),
                                       scan_blocks=scan)
  kwargs = {'aux_head': aux} if aux else {}
  model = models.create_model(name, 21, **kwargs,
                              **({'scan_blocks': True} if scan else {}))
  init = model.init(jax.random.key(0), jnp.zeros((1, 97, 131, 3)))
  variables, n, skipped = convert.load_pretrained(init, variables)
  assert not skipped and n == len(jax.tree.leaves(init))
  # Jitted: one compile beats compiling each of MobileNet's many small ops.
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(x)))
  assert got.shape == expected.shape
  assert _relative_error(got, expected) < 1e-4


@pytest.mark.parametrize('arch', ['resnet50', 'vgg16'])
def test_imagenet_backbones_load(arch):
  torch.manual_seed(0)
  tmodel = getattr(tv_models, arch)(weights=None).eval()
  _randomize_bn(tmodel)
  pretrained = convert.from_torchvision(arch, tmodel.state_dict())
  name = 'deeplabv3_resnet50' if arch == 'resnet50' else 'fcn8s'
  model = models.create_model(name, 21)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, 64, 64, 3))))
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  variables, n, _ = convert.load_pretrained(init, pretrained)
  assert n == len(jax.tree.leaves(pretrained))
  if arch == 'resnet50':  # backbone features equal torchvision's
    x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(
        np.float32)
    from seg_jax.models import resnet  # pylint: disable=g-import-not-at-top
    ours = resnet.ResNet(50, 32).apply(
        {'params': variables['params']['backbone'],
         'batch_stats': variables['batch_stats']['backbone']},
        jnp.asarray(x), train=False)['layer4']
    body = torch.nn.Sequential(*list(tmodel.children())[:-2])
    with torch.no_grad():
      ref = body(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(
          0, 2, 3, 1).numpy()
    assert _relative_error(np.asarray(ours), ref) < 1e-4
  else:  # fc6 as a 7x7 conv equals the Linear layer on the flattened pool5
    w = tmodel.classifier[0].weight.detach().numpy()
    feat = np.random.default_rng(2).normal(size=(1, 7, 7, 512)).astype(
        np.float32)
    linear = w @ feat.transpose(0, 3, 1, 2).reshape(-1)
    conv = np.einsum('hwio,hwi->o', variables['params']['fc6']['kernel'],
                     feat[0])
    np.testing.assert_allclose(conv, linear, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dilated', [False, True])
def test_imagenet_mobilenet_v3_large_loads(dilated):
  """torchvision's ImageNet `mobilenet_v3_large` state dict (its classifier
  ignored) fills every backbone variable of both MobileNetV3 models, and
  our backbone gives torchvision's `features` on it, as the ImageNet model
  (output stride 32) and dilated as the segmentation models build it."""
  from seg_jax.models import mobilenet_v3  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  tmodel = tv_models.mobilenet_v3_large(weights=None, dilated=dilated).eval()
  _randomize_bn(tmodel)
  pretrained = convert.from_torchvision('mobilenet_v3_large',
                                        tmodel.state_dict())
  for name in ('deeplabv3_mobilenet_v3_large', 'lraspp_mobilenet_v3_large'):
    model = models.create_model(name, 21)
    init = jax.eval_shape(lambda: model.init(jax.random.key(0),  # pylint: disable=cell-var-from-loop
                                             jnp.zeros((1, 64, 64, 3))))
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
    _, n, _ = convert.load_pretrained(init, pretrained)
    assert n == len(jax.tree.leaves(pretrained)) == len(jax.tree.leaves(
        {k: v['backbone'] for k, v in init.items()}))
  x = np.random.default_rng(1).normal(size=(1, 75, 61, 3)).astype(np.float32)
  ours = jax.jit(lambda v, x: mobilenet_v3.MobileNetV3Large(
      dilated=dilated).apply(v, x, train=False)['high'])(
          {'params': pretrained['params']['backbone'],
           'batch_stats': pretrained['batch_stats']['backbone']},
          jnp.asarray(x))
  with torch.no_grad():
    ref = tmodel.features(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(
        0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape == (1, *((5, 4) if dilated else (3, 2)), 960)
  assert _relative_error(np.asarray(ours), ref) < 1e-4


def test_torch_file_loads_without_torch_unpickling(tmp_path):
  tmodel = tv_models.resnet50(weights=None)
  path = str(tmp_path / 'r50.pth')
  torch.save(tmodel.state_dict(), path)
  tensors = weights.load_torch_state_dict(path)
  sd = tmodel.state_dict()
  assert set(tensors) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(tensors[k], v.numpy())


@pytest.mark.parametrize('config_name', ['fcn_resnet50_voc',
                                         'deeplabv3_resnet50_voc'])
def test_train_step_flops_match_torch_flop_counter(config_name):
  """seg_jax's FLOPs for the default train step (aux head, output stride 8)
  vs. torch's FlopCounterMode on the torchvision twin's forward+backward."""
  import importlib  # pylint: disable=g-import-not-at-top
  from seg_jax import bench, sharding  # pylint: disable=g-import-not-at-top
  config = bench.configure(
      importlib.import_module(f'configs.{config_name}').get_config(),
      batch=8, crop=(64, 96))
  ours = bench.step_flops(config, sharding.create_mesh(), 'train')
  model, images, labels, loss_fn, _, _, _ = bench.torch_twin(config)
  theirs = bench.torch_flops(model.train(), images, labels, loss_fn)
  assert theirs > 1e10
  np.testing.assert_allclose(ours, theirs, rtol=0.05)
  # Inference: the twin drops the aux head that torchvision runs in eval
  # mode, as seg_jax's predict step computes the main head alone.
  assert model.aux_classifier is not None
  ours = bench.step_flops(config, sharding.create_mesh(), 'infer')
  model, images = bench.torch_twin(config, 'infer')[:2]
  assert model.aux_classifier is None
  theirs = bench.torch_infer_flops(model.eval(), images)
  np.testing.assert_allclose(ours, theirs, rtol=0.005)


@pytest.mark.parametrize('config_name', ['deeplabv3_mobilenet_v3_large_voc',
                                         'lraspp_mobilenet_v3_large_voc'])
def test_mobilenet_flops_match_torch_flop_counter(config_name):
  """seg_jax's FLOPs of the default train step (deeplabv3: aux head) and of
  inference (without the aux head, which torchvision runs in eval mode)
  within 1% of FlopCounterMode on the torchvision twin. For the train step
  torch's count of a grouped convolution's kernel gradient is divided by
  its groups (`bench._conv_backward_flops`): torch 2.14 counts it
  `groups` times, 3.4x (deeplabv3) and 12.7x (lraspp) the whole step's
  FLOPs. Measured: train 1.0001 and 1.0004, inference 1.0000."""
  import importlib  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  from seg_jax import bench, sharding  # pylint: disable=g-import-not-at-top
  config = bench.configure(
      importlib.import_module(f'configs.{config_name}').get_config(),
      batch=8, crop=(64, 96))
  mesh = sharding.create_mesh()
  ours = bench.step_flops(config, mesh, 'train')
  model, images, labels, loss_fn, _, _, _ = bench.torch_twin(config)
  theirs = bench.torch_flops(model.train(), images, labels, loss_fn)
  assert theirs > 2e9
  np.testing.assert_allclose(ours, theirs, rtol=0.01)
  with FlopCounterMode(display=False) as uncorrected:
    loss_fn(model(images), labels).backward()
  assert uncorrected.get_total_flops() > 3 * theirs  # the overcount fixed

  ours = bench.step_flops(config, mesh, 'infer')  # without the aux head
  model = bench.torch_twin(config, 'infer')[0]
  assert getattr(model, 'aux_classifier', None) is None
  np.testing.assert_allclose(
      ours, bench.torch_infer_flops(model.eval(), images), rtol=0.01)
