"""MobileNetV3-Large and its segmentation models without torch: torchvision's
channel rounding, parameter counts, strides and dilation, the aux head, and
inference with the backbone's BatchNorms (eps 1e-3) folded. Parity of the
logits with torchvision is tests/test_torchvision.py (with torch) and
tests/test_golden_torchvision.py (stored logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import models
from seg_jax.models import layers, mobilenet_v3


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_make_divisible_is_torchvisions():
  """Values torchvision 0.29's `_make_divisible(v, 8)` gives."""
  values = (4, 16 * 0.25, 72 * 0.75, 120 * 0.35, 960 * 0.25, 3.9, 100)
  assert [mobilenet_v3.make_divisible(v) for v in values] == [
      8, 8, 56, 40, 240, 8, 104]


@pytest.mark.parametrize('width, dilated, expected', [
    (1.0, True, 2_971_952), (0.25, False, 218_880)])
def test_backbone_parameters_strides_and_channels(width, dilated, expected):
  """Parameter counts of torchvision's `mobilenet_v3_large(width_mult=...)
  .features`; on a 97x131 input (torchvision: 13x17 and 7x9, dilated),
  block 4 is at stride 8 and the last features at stride 16 (dilated) or
  32, with 40 and 960 channels at width 1."""
  net = mobilenet_v3.MobileNetV3Large(width, dilated)
  x = jax.ShapeDtypeStruct((1, 97, 131, 3), jnp.float32)
  v = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, False), x)
  assert _count(v['params']) == expected
  feats = jax.eval_shape(lambda v, x: net.apply(v, x, False), v, x)
  high = (7, 9) if dilated else (4, 5)
  channels = (40, 960) if width == 1.0 else (16, 240)
  assert feats['low'].shape == (1, 13, 17, channels[0])
  assert feats['high'].shape == (1, *high, channels[1])
  configs = mobilenet_v3.block_configs(width, dilated)
  assert [c.dilation for c in configs] == [1] * 12 + [2 if dilated else 1] * 3
  # Depthwise: one input channel per group, BatchNorm with torch's 1e-3.
  kernel = v['params']['block13']['depthwise']['conv']['kernel']
  assert kernel.shape == (5, 5, 1, configs[12].expanded)
  assert 'expand' not in v['params']['block1']
  assert 'se' in v['params']['block4'] and 'se' not in v['params']['block7']


def test_deeplab_aux_head_in_training_only():
  """With `aux_head`, training returns (logits, aux logits) at the input
  size, the aux FCNHead reading block 4 (40 channels -> 10); evaluation
  returns the logits."""
  model = models.create_model('deeplabv3_mobilenet_v3_large', 5,
                              aux_head=True, width=0.25)
  x = jax.ShapeDtypeStruct((2, 45, 37, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  assert v['params']['aux']['conv']['conv']['kernel'].shape == (3, 3, 16, 4)
  (out, aux), _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': jax.random.key(1)}), v, x)
  assert out.shape == aux.shape == (2, 45, 37, 5)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  assert out.shape == (2, 45, 37, 5)


# deeplabv3_mobilenet_v3_large's trunk is lraspp's, its ASPP is folded in
# deeplabv3_resnet50's test (test_conv_forms): release runs only.
@pytest.mark.parametrize('name', [
    pytest.param('deeplabv3_mobilenet_v3_large', marks=pytest.mark.slow),
    'lraspp_mobilenet_v3_large'])
def test_folded_inference_equals_batch_norm(name):
  """Inference folds every BatchNorm (the backbone's eps 1e-3, the heads'
  1e-5) into its convolution, depthwise ones included: the logits of
  running them, with random statistics."""
  model = models.create_model(name, 5, width=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 41, 35, 3)),
                  jnp.float32)
  v = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  rng = np.random.default_rng(1)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, a: (rng.normal(0, 0.3, a.shape) if 'mean' in
                    jax.tree_util.keystr(p) else rng.uniform(
                        0.02, 2, a.shape)).astype(np.float32),
      v['batch_stats'])
  v = {'params': v['params'], 'batch_stats': stats}
  # Jitted (one compile per network beats compiling every op eagerly),
  # each its own function: jit caches traces per function.
  folded = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
  with layers.unfolded_batch_norm():
    plain = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
  np.testing.assert_allclose(folded, plain, rtol=1e-4,
                             atol=1e-4 * float(np.abs(plain).max()))
  assert float(np.abs(plain).std()) > 1e-3  # not a degenerate comparison
