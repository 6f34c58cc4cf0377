"""Parity with torchvision without torch: stored golden logits.

`benchmarks/torchvision_golden.py` (run by hand, with torch) filled every
tensor of torchvision's `fcn_resnet50`, `deeplabv3_resnet50`,
`deeplabv3_mobilenet_v3_large` (the deeplabv3 models with their aux heads)
and `lraspp_mobilenet_v3_large` from a seeded rule, ran the models in eval
mode on a seeded 37x45 input and stored input, logits and the state dict's
manifest in `tests/golden/`. Here the same rule regenerates the weights from the
manifest, `from_torchvision` maps them and seg_jax's model must give the
stored logits: the check `tests/test_torchvision.py` makes with torch,
run in every CI job.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import models
from seg_jax.models import convert, fcn, layers

from conftest import REPO

GOLDEN = os.path.join(REPO, 'tests', 'golden')


def _golden_module():
  """benchmarks/torchvision_golden.py: the one copy of the seeded rule
  (it imports torch only inside the function that runs torchvision)."""
  path = os.path.join(REPO, 'benchmarks', 'torchvision_golden.py')
  spec = importlib.util.spec_from_file_location('torchvision_golden', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


golden = _golden_module()


def _relative_error(a, b):
  """As tests/test_torchvision.py: max abs difference over max abs value."""
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _logits(model, variables, x):
  """{'out': logits[, 'aux': the aux head's logits]} in eval mode.

  torchvision returns the aux head's logits in eval mode too; seg_jax's
  model runs that head in training only, so it is applied here as
  `fcn.with_aux_head` would, to the features it reads in the same call
  (ResNet's layer3, MobileNetV3's stride-8 'low').
  """
  out, state = model.apply(
      variables, x, train=False,
      capture_intermediates=lambda m, _: m.name == 'backbone')
  result = {'out': out}
  if 'aux' in variables['params']:
    feats = state['intermediates']['backbone']['__call__'][0]
    aux = fcn.FCNHead(model.num_classes).apply(
        {'params': variables['params']['aux'],
         'batch_stats': variables['batch_stats']['aux']},
        feats['layer3'] if 'layer3' in feats else feats['low'], False)
    result['aux'] = layers.resize_bilinear(aux, *out.shape[1:3])
  return result


def test_seeded_rule():
  """What the golden files rely on: values depend on the key alone (not on
  the order or number of keys), BatchNorm statistics in their ranges,
  integer tensors zero."""
  manifest = [('a.bn.weight', (4,), 'float32'),
              ('a.bn.running_var', (4,), 'float32'),
              ('a.bn.num_batches_tracked', (), 'int64'),
              ('a.conv.weight', (8, 4, 3, 3), 'float32'),
              ('a.conv.bias', (8,), 'float32')]
  sd = golden.seeded_state_dict(manifest, seed=1)
  again = golden.seeded_state_dict(manifest[::-1][:3], seed=1)
  for k, v in again.items():
    np.testing.assert_array_equal(v, sd[k])
  assert {k: v.dtype for k, v in sd.items()} == {
      k: np.dtype(d) for k, _, d in manifest}
  for k in ('a.bn.weight', 'a.bn.running_var'):
    assert np.all((sd[k] >= 0.5) & (sd[k] < 1.5)), k
  assert sd['a.bn.num_batches_tracked'] == 0
  # LeCun scale: std 1 / sqrt(fan_in) = 1/6 here.
  assert 0.12 < sd['a.conv.weight'].std() < 0.22
  assert not np.array_equal(sd['a.conv.weight'],
                            golden.seeded_state_dict(manifest, 2)[
                                'a.conv.weight'])


@functools.cache
def _golden(name):
  """(input, logits, manifest, meta, seeded state dict) of a golden file;
  cached: the scanned and unscanned layouts share one state dict."""
  x, expected, manifest, meta = golden.load_golden(
      os.path.join(GOLDEN, f'{name}.npz'))
  return (x, expected, manifest, meta,
          golden.seeded_state_dict(manifest, meta['seed']))


@pytest.mark.parametrize('name,scan', [
    ('fcn_resnet50', False), ('deeplabv3_resnet50', False),
    ('deeplabv3_resnet50', True), ('deeplabv3_mobilenet_v3_large', False),
    ('lraspp_mobilenet_v3_large', False)])
def test_logits_match_torchvision_golden(name, scan):
  """Both stage layouts, as tests/test_torchvision.py: one module per block
  and, where `from_torchvision` stacks the blocks' tensors, scanned (the
  ResNet models); the MobileNetV3 models, depthwise kernels and BatchNorm
  eps 1e-3 included."""
  x, expected, manifest, meta, state_dict = _golden(name)
  assert meta['name'] == name and meta['rule_version'] == golden.RULE_VERSION
  # The weights are those torch ran: otherwise a failure below would blame
  # the mapping for an edited rule (regenerate the golden files then).
  sums = np.array([state_dict[k].sum(dtype=np.float64)
                   for k, *_ in manifest])
  np.testing.assert_allclose(sums, [t for *_, t in manifest], rtol=1e-9,
                             atol=1e-9, err_msg='seeded weights changed')

  aux = meta['aux_loss']
  model = models.create_model(name, meta['num_classes'],
                              **({'aux_head': True} if aux else {}),
                              **({'scan_blocks': True} if scan else {}))
  converted = models.from_torchvision(name, state_dict, scan_blocks=scan)
  # Every model variable comes from the state dict, with its shape.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 32, 32, 3))))
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  variables, n, skipped = convert.load_pretrained(init, converted)
  assert not skipped and n == len(jax.tree.leaves(init))

  # Jitted, although each model runs once: compiling each network whole
  # (1.4-1.6 s) beats eager dispatch, which compiles every op on first use
  # (3.8 s for the first model). Measured for this file's three cases on
  # the 2-core CI machine: 6.3-7.6 s jitted, 10.6 s with JAX_DISABLE_JIT=1.
  got = jax.jit(functools.partial(_logits, model))(variables, jnp.asarray(x))
  assert set(got) == set(expected) == ({'out', 'aux'} if aux else {'out'})
  for k, v in expected.items():
    assert got[k].shape == v.shape
    # The bound tests/test_torchvision.py uses against live torch; this
    # comparison measures 1.3e-6 (the ResNet models, out and aux), 5e-7
    # (deeplabv3_mobilenet_v3_large, out and aux), 4e-7 (lraspp), f32 on CPU.
    error = _relative_error(np.asarray(got[k]), v)
    assert error < 1e-4, f'{name} {k}: relative error {error:.3g}'
