"""The CPU formulations of `models.layers` equal the plain operations:
values and gradients (float32 tolerance), odd sizes and edge cases, the
same parameters and FLOP count; the U-Net built on them keeps the
parameter names and initial values flax's own layers gave it."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import flops
from seg_jax.models import layers, unet


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol,
                               atol=tol * max(1.0, float(np.abs(y).max())))


def _plain(monkeypatch):
  monkeypatch.setattr(layers, 'cpu_forms', lambda: False)


@pytest.mark.parametrize('kernel, stride, hw', [(2, 2, (3, 5)), (2, 2, (4, 4)),
                                                (3, 3, (2, 3)),
                                                (3, 2, (3, 4))])
def test_conv_transpose_equals_flax_values_and_gradients(kernel, stride, hw,
                                                         monkeypatch):
  """kernel == stride: one product per input pixel; else the plain
  transposed convolution. Both equal nn.ConvTranspose ('SAME'), and the
  parameters are nn.ConvTranspose's, initial values included."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *hw, 5)),
                  jnp.float32)
  ours = layers.ConvTranspose(7, kernel, stride)
  ref = nn.ConvTranspose(7, (kernel, kernel), strides=(stride, stride))
  v = ours.init(jax.random.key(3), x)
  _close(v, ref.init(jax.random.key(3), x), 0)

  def loss(module, v, x):
    return jnp.sum(jnp.sin(module.apply(v, x)))

  want = (ref.apply(v, x), jax.grad(loss, (1, 2))(ref, v, x))
  got = (ours.apply(v, x), jax.grad(loss, (1, 2))(ours, v, x))
  assert got[0].shape == (2, hw[0] * stride, hw[1] * stride, 7)
  _close(got, want)
  with layers.all_taps():
    counted = flops.count_flops(lambda v: ours.apply(v, x), v)
  _plain(monkeypatch)
  assert counted == flops.count_flops(lambda v: ours.apply(v, x), v)


def test_max_pool_equals_flax_with_ties_and_odd_sizes():
  """Values and the gradient, which goes to the first maximum of each
  window (row-major), as nn.max_pool's select-and-scatter gives it: ties
  in every position pattern; odd sizes take nn.max_pool itself."""
  rng = np.random.default_rng(1)
  x = rng.integers(0, 3, size=(3, 8, 10, 4)).astype(np.float32)  # many ties
  x[0, :2, :2, 0] = 5.0  # a window of four equal maxima
  x = jnp.asarray(x)
  g = jnp.asarray(rng.normal(size=(3, 4, 5, 4)), jnp.float32)
  ref = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(layers.max_pool(x), ref(x))
  vjp = lambda f: jax.vjp(f, x)[1](g)[0]
  np.testing.assert_array_equal(vjp(layers.max_pool), vjp(ref))
  assert float(vjp(layers.max_pool)[0, 0, 0, 0]) == float(g[0, 0, 0, 0])
  odd = jnp.asarray(rng.normal(size=(1, 5, 7, 2)), jnp.float32)
  np.testing.assert_array_equal(layers.max_pool(odd), ref(odd))


@pytest.mark.parametrize('padding, bias, kernel', [('SAME', True, 3),
                                                   ('VALID', True, 3),
                                                   ('SAME', False, 1),
                                                   ('VALID', False, 3)])
def test_conv_with_bias_and_valid_padding_equals_flax(padding, bias, kernel):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 9, 3)),
                  jnp.float32)
  ours = layers.Conv(4, kernel, padding=padding, use_bias=bias)
  ref = nn.Conv(4, (kernel, kernel), padding=padding, use_bias=bias)
  v = ours.init(jax.random.key(5), x)
  _close(v, ref.init(jax.random.key(5), x), 0)
  loss = lambda m, v: jnp.sum(jnp.sin(m.apply(v, x)))
  _close((ours.apply(v, x), jax.grad(loss, 1)(ours, v)),
         (ref.apply(v, x), jax.grad(loss, 1)(ref, v)))


class _FlaxUNet(nn.Module):
  """The U-Net as flax's own layers built it (seg_jax before the shared
  layers), for its parameter names and initial values."""
  width: int
  depth: int
  upsample: str
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    skips = []
    for level in range(self.depth):
      x = DoubleConv(self.width * 2**level, self.batch_norm)(x, train)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = DoubleConv(self.width * 2**self.depth, self.batch_norm)(x, train)
    for level in reversed(range(self.depth)):
      f = self.width * 2**level
      if self.upsample == 'transpose':
        x = nn.ConvTranspose(f, (2, 2), strides=(2, 2))(x)
      else:
        n, h, w, c = x.shape
        x = nn.Conv(f, (1, 1))(jax.image.resize(x, (n, 2 * h, 2 * w, c),
                                                'bilinear'))
      x = DoubleConv(f, self.batch_norm)(jnp.concatenate([skips[level], x], -1),
                                     train)
    return nn.Conv(3, (1, 1))(x)


class DoubleConv(nn.Module):
  features: int
  batch_norm: bool

  @nn.compact
  def __call__(self, x, train):
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3), use_bias=not self.batch_norm)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    return x


@pytest.mark.parametrize('upsample, batch_norm', [('transpose', True),
                                                  ('bilinear', True),
                                                  ('transpose', False)])
def test_unet_keeps_flax_parameter_names_values_and_outputs(upsample,
                                                            batch_norm):
  """Checkpoints and init_from files of the flax-layer U-Net still load:
  the same parameter tree and initial values, and the same outputs and
  gradients (float32 tolerance)."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 24, 3)),
                  jnp.float32)
  ours = unet.UNet(3, width=4, depth=2, upsample=upsample,
                   batch_norm=batch_norm)
  ref = _FlaxUNet(4, 2, upsample, batch_norm)
  v = jax.jit(ours.init)(jax.random.key(7), x)
  _close(v, jax.jit(ref.init)(jax.random.key(7), x), 0)

  def outputs_and_gradients(m):  # compiled whole: op by op is slower
    def loss(p):
      out, _ = m.apply({**v, 'params': p}, x, train=True,
                       mutable=['batch_stats'])
      return jnp.mean(out ** 2)
    return jax.jit(lambda p: (m.apply({**v, 'params': p}, x),
                              jax.grad(loss)(p)))(v['params'])

  _close(outputs_and_gradients(ours), outputs_and_gradients(ref))


@pytest.mark.parametrize('dtype, channels', [(jnp.float32, (8, 6)),
                                             (jnp.bfloat16, (8, 6)),
                                             (jnp.float32, (6, 8))])
def test_channel_dot_equals_dot_values_gradients_and_flops(dtype, channels):
  """The 1x1 convolution's product: the same values, gradients (one
  product contracting batch and space for the kernel's, either operand
  read transposed) and FLOPs as `jnp.dot`."""
  rng = np.random.default_rng(6)
  c, d = channels
  x = jnp.asarray(rng.normal(size=(2, 5, 3, c)), dtype)
  k = jnp.asarray(rng.normal(size=(c, d)), dtype)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k).astype(jnp.float32)))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  _close((layers.channel_dot(x, k).astype(jnp.float32),
          jax.grad(loss(layers.channel_dot), (0, 1))(x, k)),
         (jnp.dot(x, k).astype(jnp.float32),
          jax.grad(loss(jnp.dot), (0, 1))(x, k)), tol)
  grads = jax.grad(loss(layers.channel_dot), (0, 1))(x, k)
  assert [g.dtype for g in grads] == [dtype, dtype]
  step = lambda f: lambda x, k: jax.grad(loss(f), (0, 1))(x, k)
  assert (flops.count_flops(step(layers.channel_dot), x, k) ==
          flops.count_flops(step(jnp.dot), x, k) == 3 * 2 * 30 * 8 * 6)


def test_batch_norm_folded_into_the_convolution_for_inference():
  """Inference folds each ConvBN's BatchNorm (trained statistics) into its
  convolution: the same logits as running it (float32 tolerance); training
  and initialisation run the BatchNorm itself."""
  from seg_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model('deeplabv3_resnet50', 5, width=8)
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 37, 29, 3)),
                  jnp.float32)
  v = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  rng = np.random.default_rng(9)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, a: a * rng.uniform(0.5, 1.5, a.shape).astype(np.float32) + (
          rng.normal(0, 0.2, a.shape).astype(np.float32)
          if 'mean' in jax.tree_util.keystr(p) else 0), v['batch_stats'])
  v = {'params': v['params'], 'batch_stats': stats}
  # Each form compiled whole: the switches act when a function is traced,
  # so each call jits a new function (JAX caches traces by function). Op by
  # op, a ResNet-50 dispatches thousands of small programs.
  infer = lambda: jax.jit(lambda v: model.apply(v, x, train=False))
  folded = infer()(v)
  with layers.unfolded_batch_norm():
    plain = infer()(v)
  _close(folded, plain)
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(v))
  with layers.unfolded_batch_norm():
    plain_jaxpr = str(jax.make_jaxpr(
        lambda v: model.apply(v, x, train=False))(v))
  assert jaxpr.count('rsqrt') < plain_jaxpr.count('rsqrt') or (
      len(jaxpr) < len(plain_jaxpr))
  with layers.direct_convolutions():  # exports: the scale in the kernel
    _close(infer()(v), plain)
  train = lambda: jax.jit(lambda v: model.apply(
      v, x, train=True, mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(1)})[0])
  trained = train()(v)  # folding on: training still normalises by the batch
  with layers.unfolded_batch_norm():
    np.testing.assert_array_equal(trained, train()(v))
  assert not np.allclose(trained, folded, atol=1e-3)


def _entry_ops(compiled):
  """The kinds of operation the compiled module's entry computation runs:
  'convolution(' (XLA's own kernels), 'ynn_fusion' (YNNPACK's) and
  'reduce' (XLA's own: a wrapped reduce fusion with XLA's fusion emitters,
  a bare reduce with its older ones, which the tests compile with)."""
  text = compiled.as_text()
  entry = text[text.index('ENTRY'):]
  kinds = {kind for kind in ('convolution(', 'ynn_fusion') if kind in entry}
  if 'wrapped_reduce' in entry or ' reduce(' in entry:
    kinds.add('reduce')
  return kinds


def test_cpu_compiler_options_keep_the_results():
  """The steps' XLA options are known to this jaxlib: a convolution runs
  on XLA's own CPU kernels (not in a YNNPACK fusion), its reduction on
  YNNPACK's in a train step and on XLA's in an inference step, and both
  give what the defaults give (float32 tolerance)."""
  inference = layers.compiler_options()
  train = layers.compiler_options(train=True)
  assert inference == {'xla_cpu_experimental_ynn_fusion_type':
                       'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
  assert train == {'xla_cpu_experimental_ynn_fusion_type':
                   'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
                   'LIBRARY_FUSION_TYPE_REDUCE'}
  assert layers.compiler_options(xla_convolutions=False) == {}
  rng = np.random.default_rng(10)
  # Channels YNNPACK takes by default (64 -> 32 at 88x120 did).
  x = jnp.asarray(rng.normal(size=(2, 12, 10, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 64, 32)), jnp.float32)

  def conv(x, w):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y, y.sum((0, 1, 2))

  default = jax.jit(conv).lower(x, w).compile()
  assert _entry_ops(default) == {'ynn_fusion'}
  expected = default(x, w)
  for options, ops in ((inference, {'convolution(', 'reduce'}),
                       (train, {'convolution(', 'ynn_fusion'})):
    compiled = jax.jit(conv, compiler_options=options).lower(x, w).compile()
    assert _entry_ops(compiled) == ops
    for got, want in zip(compiled(x, w), expected):
      _close(got, want)


@pytest.mark.parametrize('groups, features, kernel, stride, dilation, hw', [
    (6, 6, 3, 1, 1, (5, 7)),  # depthwise
    (6, 12, 3, 1, 1, (5, 7)),  # depthwise, channel multiplier 2
    (6, 6, 5, 2, 1, (8, 9)),  # MobileNet's strided 5x5 depthwise
    (6, 6, 5, 1, 2, (3, 9)),  # dilated: the outer rows meet padding only
    (6, 6, 3, 1, 8, (5, 7)),  # only the centre tap meets the image
    (2, 4, 3, 1, 4, (5, 7)),  # ungrouped, this would be a per-tap sum
    (3, 6, 1, 2, 1, (5, 7)),  # grouped 1x1: a convolution, not a product
])
def test_grouped_conv_equals_flax_values_gradients_and_flops(
    groups, features, kernel, stride, dilation, hw):
  """Feature groups (depthwise included) through every branch of
  `layers.Conv`: the same parameters, initial values, outputs and
  gradients as nn.Conv with torch's symmetric padding; FLOPs as counted
  without padding-only taps, all taps as nn.Conv's."""
  x = jnp.asarray(np.random.default_rng(11).normal(size=(2, *hw, 6)),
                  jnp.float32)
  pad = dilation * (kernel - 1) // 2
  ours = layers.Conv(features, kernel, stride, dilation,
                     feature_group_count=groups)
  ref = nn.Conv(features, (kernel, kernel), (stride, stride),
                ((pad, pad), (pad, pad)), kernel_dilation=dilation,
                feature_group_count=groups, use_bias=False)
  v = ours.init(jax.random.key(5), x)
  assert v['params']['kernel'].shape == (kernel, kernel, 6 // groups,
                                         features)
  _close(v, ref.init(jax.random.key(5), x), 0)
  loss = lambda m, v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  want = (ref.apply(v, x), jax.grad(loss, (1, 2))(ref, v, x))
  _close((ours.apply(v, x), jax.grad(loss, (1, 2))(ours, v, x)), want)
  with layers.all_taps():
    _close((ours.apply(v, x), jax.grad(loss, (1, 2))(ours, v, x)), want)
    assert flops.count_flops(lambda v: ours.apply(v, x), v) == (
        flops.count_flops(lambda v: ref.apply(v, x), v))


@pytest.mark.parametrize('groups', [1, 8])
def test_conv_bn_epsilon_and_momentum_folded_and_trained(groups):
  """ConvBN's BatchNorm epsilon is the one its inference folding uses (an
  epsilon as large as the variances would show a mismatch) and its
  momentum the one training's running averages use, depthwise too."""
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(2, 6, 5, 8)), jnp.float32)
  mod = layers.ConvBN(8, 3, relu=False, feature_group_count=groups,
                      epsilon=0.5, momentum=0.99)
  v = mod.init(jax.random.key(0), x, False)
  stats = {'bn': {'mean': jnp.asarray(rng.normal(size=8), jnp.float32),
                  'var': jnp.asarray(rng.uniform(0.2, 1.0, 8), jnp.float32)}}
  v = {'params': v['params'], 'batch_stats': stats}
  folded = mod.apply(v, x, False)
  with layers.unfolded_batch_norm():
    _close(folded, mod.apply(v, x, False))
  y = layers.Conv(8, 3, feature_group_count=groups).apply(
      {'params': v['params']['conv']}, x)
  bn = v['params']['bn']
  _close(folded, (y - stats['bn']['mean']) / np.sqrt(stats['bn']['var'] + 0.5)
         * bn['scale'] + bn['bias'])
  _, new = mod.apply(v, x, True, mutable=['batch_stats'])
  _close(new['batch_stats']['bn']['mean'],
         0.99 * stats['bn']['mean'] + 0.01 * y.mean((0, 1, 2)))


@pytest.mark.parametrize('hw, kernel, stride, dilation, dtype', [
    ((13, 11), 3, 1, 1, jnp.float32), ((13, 11), 3, 2, 1, jnp.float32),
    ((14, 9), 5, 2, 1, jnp.float32), ((12, 12), 3, 1, 2, jnp.float32),
    ((9, 7), 5, 1, 1, jnp.float32), ((10, 8), 3, 2, 1, jnp.float32),
    ((4, 5), 3, 1, 4, jnp.float32),
    ((13, 11), 5, 2, 1, jnp.bfloat16)])  # MobileNetV3's mixed precision
def test_depthwise_taps_equal_the_grouped_convolution(hw, kernel, stride,
                                                      dilation, dtype):
  """On CPU a depthwise convolution is a sum of strided views times each
  tap's weights: the grouped convolution's values and gradients, on odd
  sizes, strides and dilations, in float32 and in bfloat16 compute
  (float32 parameters); FLOPs are counted on the convolution."""
  x = jnp.asarray(np.random.default_rng(11).normal(size=(2, *hw, 8)),
                  jnp.float32)
  conv = layers.Conv(8, kernel, stride, dilation, feature_group_count=8,
                     dtype=dtype)
  v = conv.init(jax.random.key(0), x)
  loss = lambda v, x: jnp.sum(jnp.sin(conv.apply(v, x).astype(jnp.float32)))
  # Each compiled as one program (op by op takes about twice as long).
  both = lambda: jax.jit(lambda v, x: (conv.apply(v, x),
                                       jax.grad(loss, (0, 1))(v, x)))(v, x)
  got = both()
  assert 'conv_general_dilated' not in str(jax.make_jaxpr(
      lambda v: conv.apply(v, x))(v))
  with layers.all_taps():  # the plain grouped convolution
    want = both()
    counted = flops.count_flops(lambda v: conv.apply(v, x), v)
  assert got[0].dtype == dtype
  _close(jax.tree.map(lambda a: a.astype(jnp.float32), got),
         jax.tree.map(lambda a: a.astype(jnp.float32), want),
         2e-5 if dtype == jnp.float32 else 2e-2)
  assert counted == 2 * got[0].size * kernel * kernel


@pytest.mark.parametrize('hw, kernel, stride, dilation, pad', [
    ((7, 6), 3, 2, 3, ((3, 3), (3, 3))), ((3, 4), 3, 1, 5, ((5, 5), (5, 5))),
    ((9, 8), 3, 2, 1, ((0, 1), (2, 0))), ((8, 9), 5, 2, 1, ((2, 2), (1, 2))),
    ((6, 6), 5, 1, 2, ((4, 4), (4, 4))), ((5, 7), 2, 1, 1, ((0, 1), (1, 0)))])
def test_depthwise_tap_forms_with_padding_only_taps(hw, kernel, stride,
                                                    dilation, pad):
  """Both forms of `_depthwise_taps` (3x3 and smaller: per-tap padded
  views; larger: views of one padded copy) against the grouped
  convolution, values and gradients, with taps that meet only padding,
  uneven padding and strides that skip the last rows."""
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(2, *hw, 6)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)

  def plain(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), pad, rhs_dilation=(dilation, dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=6)

  def ours(x, k):
    return layers._depthwise_taps(x, k, stride, dilation, pad)  # pylint: disable=protected-access

  loss = lambda f, x, k: jnp.sum(jnp.sin(f(x, k)))
  both = lambda f: jax.jit(lambda x, k: (
      f(x, k), jax.grad(loss, (1, 2))(f, x, k)))(x, k)
  want, got = both(plain), both(ours)
  assert got[0].shape == want[0].shape
  _close(got, want, 2e-5)


@pytest.mark.parametrize('shape', [(2, 5, 7, 3), (1, 64, 64, 16),
                                   (3, 1, 1, 8)])
def test_spatial_mean_equals_jnp_mean_values_gradients_and_compiled(shape):
  """In the inference forms the spatial mean is a product with ones:
  jnp.mean's values and gradient, float32 and bfloat16, also compiled with
  the inference steps' compiler options. Outside them (train steps) and in
  the FLOP count it is jnp.mean."""
  rng = np.random.default_rng(14)
  x = jnp.asarray(rng.normal(size=shape) + 3.0, jnp.float32)
  weights = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)) * weights)
  ref = lambda x: jnp.mean(x, axis=(1, 2), keepdims=True)
  want = (ref(x), jax.grad(loss(ref))(x))
  # A new function each time: traces are cached by function, not context.
  ours = lambda: lambda x: layers.spatial_mean(x)
  assert 'dot_general' not in str(jax.make_jaxpr(ours())(x))
  with layers.inference_forms():
    assert 'dot_general' in str(jax.make_jaxpr(ours())(x))
    _close((ours()(x), jax.grad(loss(ours()))(x)), want)
    inference = jax.jit(ours(), compiler_options=layers.compiler_options())
    _close(inference(x), want[0])
    assert ours()(x).shape == (shape[0], 1, 1, shape[-1])
    xb = x.astype(jnp.bfloat16)
    assert ours()(xb).dtype == jnp.bfloat16
    _close(ours()(xb).astype(jnp.float32), ref(xb.astype(jnp.float32)), 1e-2)
    with layers.all_taps():  # model FLOPs: jnp.mean's
      assert flops.count_flops(ours(), x) == flops.count_flops(ref, x)
  # Every inference path traces its model in these forms.
  from seg_jax import inference  # pylint: disable=g-import-not-at-top
  sizes = jnp.array([shape[1:3]] * shape[0])
  assert 'dot_general' in str(jax.make_jaxpr(
      lambda x: inference.infer_logits(ours(), x, sizes,
                                       inference.InferenceSpec()))(x))


def _direct(x, k, dilation):
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), [(dilation, dilation)] * 2,
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('hw, dilation', [
    ((8, 8), 1),  # whole tiles
    ((13, 11), 1),  # odd sizes: the last tiles half outside
    ((1, 1), 1),  # one pixel: every tap but the centre meets padding
    ((13, 11), 3),  # dilated: interleaved tiles, partial last chunks
    ((16, 16), 4),  # OS 8's layer4 at a 128x128 crop
    ((5, 9), 2),
    ((7, 7), 5),  # most of the kernel meets padding
])
def test_winograd_conv_equals_the_direct_convolution(hw, dilation):
  """Winograd's F(2x2, 3x3): the direct convolution's values, input and
  kernel gradients (float32 tolerance), for odd sizes, dilations that
  leave partial tiles and single pixels."""
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(2, *hw, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k, dilation)))
  # One compiled program for all three forms (op by op takes twice as long).
  ours, ref, planes = jax.jit(lambda x, k: (
      (layers.winograd_conv(x, k, dilation),
       jax.grad(loss(layers.winograd_conv), (0, 1))(x, k)),
      (_direct(x, k, dilation), jax.grad(loss(_direct), (0, 1))(x, k)),
      layers.winograd_planes(x, k, dilation)))(x, k)
  _close(ours, ref)
  # The inference steps' F(4x4, 3x3) as separate planes: the same values
  # to F(4x4)'s float32 accuracy (about 2e-5 of the output's scale).
  _close(planes, ref[0], tol=1e-4)
  with layers.inference_forms():
    assert layers.winograd_form(x.shape, dilation) is (
        layers.winograd_planes if -(-hw[0] // (4 * dilation)) *
        -(-hw[1] // (4 * dilation)) * 16 * dilation ** 2 <= 1.3 * hw[0] *
        hw[1] else layers.winograd_conv)
  assert layers.winograd_form(x.shape, dilation) is layers.winograd_conv


def test_winograd_planes_at_the_zoo_scale():
  """F(4x4, 3x3) as planes on a 256-channel dilated map with partial
  tiles (layer3 of a 520x520 image, 65x65 at rate 2): the direct
  convolution's values, within 1e-4 of the output's scale."""
  rng = np.random.default_rng(14)
  x = jnp.asarray(rng.normal(size=(1, 65, 65, 256)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 256, 64)) / 48, jnp.float32)
  _close(layers.winograd_planes(x, k, 2), _direct(x, k, 2), tol=1e-4)


def test_conv_runs_winograd_except_for_export_and_flops():
  """`layers.Conv` takes the Winograd form for a 256-channel 3x3 on CPU
  (in a train step, and so under autodiff, from 256 channels): the same
  values and gradients as nn.Conv; the exported programs (inside
  `direct_convolutions()`) and the FLOP count (`all_taps()`) see the
  convolution."""
  x = jnp.asarray(np.random.default_rng(13).normal(size=(2, 10, 12, 256)),
                  jnp.float32)
  ours = layers.Conv(256, 3, dilation=2)
  ref = nn.Conv(256, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=2,
                use_bias=False)
  v = ours.init(jax.random.key(0), x)
  loss = lambda m, v: jnp.sum(jnp.sin(m.apply(v, x)))
  _close((ours.apply(v, x), jax.grad(loss, 1)(ours, v)),
         (ref.apply(v, x), jax.grad(loss, 1)(ref, v)))
  ops = lambda: str(jax.make_jaxpr(lambda v: ours.apply(v, x))(v))
  assert 'dot_general' in ops() and 'conv_general_dilated' not in ops()
  with layers.direct_convolutions():
    assert 'conv_general_dilated' in ops() and 'dot_general' not in ops()
  with layers.all_taps():
    assert 'conv_general_dilated' in ops()
    assert flops.count_flops(lambda v: ours.apply(v, x), v) == (
        2 * 2 * 10 * 12 * 256 * 256 * 9)


@pytest.mark.parametrize('shape, features, dilation, dtype, train, infer', [
    ((4, 32, 32, 64), 64, 1, jnp.float32, False, True),  # layer1, 128 crop
    ((4, 16, 16, 512), 512, 4, jnp.float32, True, True),  # layer4, dilated
    ((4, 16, 16, 2048), 512, 1, jnp.float32, True, True),  # FCN's head
    ((4, 64, 64, 2048), 256, 12, jnp.float32, False, False),  # ASPP: 8x in
    ((8, 176, 240, 16), 16, 1, jnp.float32, False, False),  # U-Net, level 0
    ((8, 88, 120, 32), 32, 1, jnp.float32, False, False),
    ((8, 44, 60, 128), 128, 1, jnp.float32, False, True),  # level 2
    ((8, 11, 15, 256), 256, 1, jnp.float32, True, True),  # the bottom
    ((4, 32, 32, 64), 64, 1, jnp.bfloat16, False, False),
    ((4, 16, 16, 256), 256, 12, jnp.float32, False, False),  # mostly padding
    ((4, 65, 65, 256), 256, 2, jnp.float32, True, True),  # 68x68 tiles: 9%
])
def test_winograd_applies_where_measured_faster(shape, features, dilation,
                                                dtype, train, infer):
  """From 256 channels in a train step, from 64 in the inference forms."""
  assert layers.winograd_applies(shape, features, dilation, dtype) is train
  with layers.inference_forms():
    assert layers.winograd_applies(shape, features, dilation,
                                   dtype) is infer
  with layers.direct_convolutions():
    assert not layers.winograd_applies(shape, features, dilation, dtype)


class _Net(nn.Module):
  """Two 3x3 ConvBNs and a classifier: the second (256 channels in and
  out) is a Winograd convolution in training, the first (3 in) is not."""

  @nn.compact
  def __call__(self, x, train):
    x = layers.ConvBN(256, 3)(x, train)
    x = layers.ConvBN(256, 3, dilation=2)(x, train)
    return layers.Conv(3, 1)(x)


def test_inference_steps_trace_winograd_and_the_export_does_not(
    monkeypatch, tiny_config):
  """The predict step (predict, bench --mode=infer) and the evaluation step
  run the Winograd form where the train step does (its one 256-channel
  convolution); the exported function (StableHLO, ONNX) the convolution."""
  from seg_jax import export, inference, steps  # pylint: disable=g-import-not-at-top
  from seg_jax import sharding  # pylint: disable=g-import-not-at-top
  calls = []
  for name in ('winograd_conv', 'winograd_planes'):
    real = getattr(layers, name)
    monkeypatch.setattr(layers, name, functools.partial(
        lambda real, name, *a: calls.append(name) or real(*a), real, name))
  model = _Net()
  x = jnp.zeros((1, 16, 16, 3), jnp.float32)
  v = model.init(jax.random.key(0), x, train=False)
  images = jnp.asarray(np.random.default_rng(3).integers(
      0, 256, (2, 16, 16, 3)), jnp.uint8)
  sizes = jnp.array([[16, 16]] * 2)
  spec = inference.InferenceSpec()

  def traced(fn, *args):
    calls.clear()
    jax.make_jaxpr(fn)(*args)
    return len(calls)

  assert traced(lambda v: model.apply(
      v, x, train=True, mutable=['batch_stats']), v) == 1
  assert calls == ['winograd_conv']
  predict = inference.make_predict_fn(model, tiny_config, spec,
                                      with_logits=True)
  assert traced(predict, v, images, sizes) == 1
  assert calls == ['winograd_planes']
  evaluate = steps.make_eval_step(model, tiny_config,
                                  sharding.create_mesh((1,), ('data',),
                                                       jax.devices()[:1]),
                                  spec)
  calls.clear()
  evaluate.trace(v, {'image': images[:1], 'size': sizes[:1],
                     'label': jnp.zeros((1, 16, 16), jnp.uint8)})
  assert calls == ['winograd_planes']
  exported = export.make_export_fn(model, tiny_config, spec, v, 16, 16)
  assert traced(exported, images) == 0
  # Both forms, one function: the same logits to float32 tolerance.
  want = predict(v, images, sizes)[1]
  with layers.direct_convolutions():
    direct = predict(v, images, sizes)[1]
  _close(want, direct, tol=1e-4)


@pytest.mark.parametrize('hw, dilation', [
    ((13, 11), 2),
    ((7, 9), 3),
    ((5, 5), 4),  # every tap meets the image at one row/column only
    ((1, 9), 2),  # one row: the kernel's other rows meet only padding
    ((64, 64), 36),  # ASPP's rate 36 on a 512x512 image's map
])
def test_cropped_tap_sum_equals_the_convolution(hw, dilation):
  """In the inference forms, a float32 dilated convolution Winograd does not
  take (40 -> 8 channels) is a sum of 1x1 convolutions of cropped windows
  (negative padding, read in place by XLA's kernels): nn.Conv's values and
  gradients, also compiled with the inference steps' compiler options.
  Outside the inference forms, for export (`direct_convolutions()`) and in
  bfloat16 it is not; the FLOP count sees the convolution."""
  rng = np.random.default_rng(21)
  x = jnp.asarray(rng.normal(size=(2, *hw, 40)), jnp.float32)
  ours = layers.Conv(8, 3, dilation=dilation)
  ref = nn.Conv(8, (3, 3), padding=((dilation, dilation),) * 2,
                kernel_dilation=dilation, use_bias=False)
  v = ours.init(jax.random.key(0), x)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  both = lambda m: jax.jit(lambda v, x: (m.apply(v, x),
                                         jax.grad(loss(m), (0, 1))(v, x)))
  want = both(ref)(v, x)
  rows = layers._taps_in_image(3, dilation, hw[0])  # pylint: disable=protected-access
  cols = layers._taps_in_image(3, dilation, hw[1])  # pylint: disable=protected-access
  taps = len(rows) * len(cols)

  def convs(dtype=jnp.float32):
    """The (kernel shape, padding) of each convolution traced."""
    conv = layers.Conv(8, 3, dilation=dilation, dtype=dtype)
    jaxpr = jax.make_jaxpr(lambda v, x: conv.apply(v, x))(v, x)
    return [(e.invars[1].aval.shape[:2], e.params['padding'])
            for e in jaxpr.eqns if e.primitive.name == 'conv_general_dilated']

  with layers.inference_forms():
    got = convs()
    assert len(got) == taps and all(s == (1, 1) for s, _ in got)
    assert any(lo < 0 or hi < 0 for _, pad in got for lo, hi in pad)
    assert all(lo <= 0 and hi <= 0 for _, pad in got for lo, hi in pad)
    _close(both(ours)(v, x), want)
    compiled = jax.jit(lambda v, x: ours.apply(v, x),
                       compiler_options=layers.compiler_options())
    _close(compiled(v, x), want[0])
    assert all(s != (1, 1) for s, _ in convs(jnp.bfloat16))
    with layers.direct_convolutions():  # no negative padding exported
      assert all(s == (len(rows), len(cols)) for s, _ in convs())
    with layers.all_taps():
      assert [s for s, _ in convs()] == [(3, 3)]
      assert flops.count_flops(lambda v: ours.apply(v, x), v) == (
          2 * 2 * hw[0] * hw[1] * 40 * 8 * 9)
  assert all(s != (1, 1) for s, _ in convs())  # train steps: not cropped


def test_folded_scale_multiplies_the_output_on_cpu_and_the_kernel_in_exports():
  """On CPU a folded BatchNorm's scale multiplies the convolution's output
  (no scaled copy of the kernel at every step); in exported programs
  (`direct_convolutions()`) the kernel. The same values either way."""
  bn = layers.ConvBN(4, 1)
  x = jnp.asarray(np.random.default_rng(22).normal(size=(2, 5, 3, 8)),
                  jnp.float32)
  v = bn.init(jax.random.key(0), x, train=False)
  v = {'params': v['params'], 'batch_stats': jax.tree.map(
      lambda a: a + 0.5, v['batch_stats'])}

  def products():
    """The shapes of the multiplications by a (4,)-vector traced."""
    jaxpr = jax.make_jaxpr(lambda v: bn.apply(v, x, train=False))(v)
    return {e.outvars[0].aval.shape for e in jaxpr.eqns
            if e.primitive.name == 'mul' and
            e.outvars[0].aval.shape[-1:] == (4,) and
            len(e.outvars[0].aval.shape) > 1}

  assert products() == {(2, 5, 3, 4)}
  on_output = bn.apply(v, x, train=False)
  with layers.direct_convolutions():
    assert products() == {(1, 1, 8, 4)}
    _close(bn.apply(v, x, train=False), on_output)
  with layers.unfolded_batch_norm():
    _close(bn.apply(v, x, train=False), on_output)


def _plain_batch_norm(x, scale, bias, epsilon, relu):
  """flax's train-mode BatchNorm math under plain autodiff: (y, mean, var)."""
  mean = jnp.mean(x, (0, 1, 2))
  var = jnp.maximum(0., jnp.mean(x * x, (0, 1, 2)) - mean * mean)
  y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
  return (jnp.maximum(y, 0.) if relu else y), mean, var


@pytest.mark.parametrize('shape, offset', [((2, 5, 7, 3), 0.), ((3, 4, 4, 16), 0.),
                                           ((1, 9, 6, 8), 20.)])
@pytest.mark.parametrize('relu', [True, False])
def test_batch_norm_train_vjp_equals_autodiff(shape, offset, relu):
  """`batch_norm_train`'s own VJP: the values and the gradients of x, scale
  and bias autodiff gives, cotangents on the statistics included, inputs
  with a mean far from 0 too (the form's cancellation)."""
  rng = np.random.default_rng(5)
  c = shape[-1]
  x = jnp.asarray(rng.normal(size=shape) * 2 + offset, jnp.float32)
  scale = jnp.asarray(rng.normal(size=c), jnp.float32).at[0].set(0.)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  cts = (jnp.asarray(rng.normal(size=shape), jnp.float32),
         jnp.asarray(rng.normal(size=c), jnp.float32),
         jnp.asarray(rng.normal(size=c), jnp.float32))
  ours, ours_vjp = jax.vjp(
      lambda *a: layers.batch_norm_train(*a, 1e-5, relu), x, scale, bias)
  ref, ref_vjp = jax.vjp(
      lambda *a: _plain_batch_norm(*a, 1e-5, relu), x, scale, bias)
  _close(ours, ref)
  _close(ours_vjp(cts), ref_vjp(cts), 2e-5)
  # The statistics' cotangents are not dropped: without them dx changes.
  zero = (cts[0], jnp.zeros(c), jnp.zeros(c))
  assert float(jnp.abs(ours_vjp(zero)[0] - ours_vjp(cts)[0]).max()) > 1e-3


def _custom_vjps(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count('custom_vjp_call')


@pytest.mark.parametrize('relu', [True, False])
def test_batch_norm_module_equals_flax_in_train_and_inference(relu):
  """`layers.BatchNorm` is flax's BatchNorm (+ ReLU): the same variables and
  initial values, outputs, running averages and gradients in a train step
  (where on CPU it runs `batch_norm_train`) and in inference; flax's own
  code in bfloat16, and under `flax_batch_norm()`."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 6, 5, 8)) + 1., jnp.float32)
  ours = layers.BatchNorm(use_running_average=False, momentum=0.8,
                          epsilon=1e-3, relu=relu)
  ref = nn.BatchNorm(use_running_average=False, momentum=0.8, epsilon=1e-3)
  act = nn.relu if relu else (lambda y: y)
  v = ours.init(jax.random.key(0), x)
  _close(v, ref.init(jax.random.key(0), x), 0)
  v = {'params': {'scale': jnp.asarray(rng.normal(size=8), jnp.float32),
                  'bias': jnp.asarray(rng.normal(size=8), jnp.float32)},
       'batch_stats': {'mean': jnp.full(8, 0.5), 'var': jnp.full(8, 2.)}}

  def step(mod, post, params, x):
    y, new = mod.apply({**v, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(post(y))), new

  def grads(mod, post):
    (_, new), g = jax.value_and_grad(
        lambda p, x: step(mod, post, p, x), (0, 1), has_aux=True)(
            v['params'], x)
    return post(mod.apply(v, x, mutable=['batch_stats'])[0]), new, g

  assert _custom_vjps(lambda x: ours.apply(v, x, mutable=['batch_stats']),
                      x) == 1
  _close(grads(ours, lambda y: y), grads(ref, act))
  with layers.flax_batch_norm():
    assert _custom_vjps(lambda x: ours.apply(v, x, mutable=['batch_stats']),
                        x) == 0
    _close(grads(ours, lambda y: y), grads(ref, act))
  half = layers.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  assert _custom_vjps(lambda x: half.apply(
      v, x.astype(jnp.bfloat16), mutable=['batch_stats']), x) == 0
  infer = ours.clone(use_running_average=True)
  assert _custom_vjps(lambda x: infer.apply(v, x), x) == 0
  _close(infer.apply(v, x),
         act(ref.clone(use_running_average=True).apply(v, x)))
