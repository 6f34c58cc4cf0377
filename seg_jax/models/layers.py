"""Building blocks shared by the models: conv-BN-ReLU, bilinear resizing,
bilinear-initialised transposed convolutions, max-pooling with indices."""

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def bilinear_kernel(size, channels):
  """(size, size, channels, channels) bilinear upsampling kernel.

  Diagonal over channels (each class upsampled on its own), as FCN's
  `upsample_filt`; a transposed convolution of stride `size // 2` with it is
  exact bilinear interpolation away from the borders.
  """
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  og = np.arange(size)
  filt = 1 - np.abs(og - center) / factor
  filt2d = filt[:, None] * filt[None, :]
  kernel = np.zeros((size, size, channels, channels), np.float32)
  kernel[:, :, np.arange(channels), np.arange(channels)] = filt2d[..., None]
  return kernel


def bilinear_init(key, shape, dtype=jnp.float32):
  del key
  assert shape[0] == shape[1] and shape[2] == shape[3], shape
  return jnp.asarray(bilinear_kernel(shape[0], shape[2]), dtype)


class BilinearConvTranspose(nn.Module):
  """Caffe-style deconvolution (no padding, no bias) initialised bilinear.

  Output size is (in - 1) * stride + kernel. With `fixed`, the kernel gets no
  gradient (FCN's final upsampling); it is still a parameter, as in caffe.
  """
  features: int
  kernel: int
  stride: int
  fixed: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.param('kernel', bilinear_init,
                   (self.kernel, self.kernel, x.shape[-1], self.features))
    if self.fixed:
      k = jax.lax.stop_gradient(k)
    return jax.lax.conv_transpose(
        x.astype(self.dtype), k.astype(self.dtype), (self.stride, self.stride),
        'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def resize_bilinear(x, height, width):
  """Bilinear resize (half-pixel centres, as torch align_corners=False)."""
  if x.shape[1:3] == (height, width):
    return x
  if x.shape[1] == 1 and x.shape[2] == 1:
    return jnp.broadcast_to(x, (x.shape[0], height, width, x.shape[3]))
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]),
                          'bilinear', antialias=False)


def spatial_mean(x):
  """The mean of x (N, H, W, C) over its spatial axes, (N, 1, 1, C).

  Within `inference_forms()` on CPU, a product with ones (per example,
  ones (1, H W) times x (H W, C)): compiled with XLA's own kernels (the
  inference steps, `compiler_options`), a mean over a large map is a slow
  reduce-window pass (measured alone: 64x64 map of 2048 channels,
  DeepLab's image pooling at 512x512, 23-31 ms; as the product 0.6 ms;
  lraspp_mobilenet_v3_large's predict step 35.2-37.5 -> 34.0-35.2 ms).
  The train steps keep `jnp.mean` (YNNPACK's reduction there; the product
  made lraspp's train step 2-4% slower)."""
  if not (cpu_forms() and _INFERENCE_FORMS[-1] and _SKIP_PADDING_TAPS[-1]):
    return jnp.mean(x, axis=(1, 2), keepdims=True)
  n, h, w, c = x.shape
  total = jax.lax.dot_general(
      jnp.ones((n, 1, h * w), x.dtype), x.reshape(n, h * w, c),
      (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  return (total / (h * w)).astype(x.dtype).reshape(n, 1, 1, c)


_INFERENCE_FORMS = [False]


def inference_forms():
  """Within this context, the forms for a step compiled with
  `compiler_options()` (XLA's own kernels): what `inference.infer_logits`
  traces. Spatial means become products (`spatial_mean`), dilated
  convolutions outside Winograd sums of cropped 1x1 convolutions
  (`Conv`), Winograd from 64 channels and as F(4x4, 3x3) in separate
  planes where its tiles fit (`winograd_form`)."""
  return _flag_set(_INFERENCE_FORMS, True)


def one_by_one_as_dot():
  """Whether 1x1 convolutions run as matrix products on this backend.

  On CPU (measured: fcn_resnet50 train step, batch 4, 128x128) this takes
  the step from 1.50 s to 1.18 s: XLA's CPU backend computes a 1x1
  convolution's weight gradient after copying the activations into a
  transposed layout, a dot_general needs no copy. Elsewhere the
  convolution, as measured, stays.
  """
  return jax.default_backend() == 'cpu'


@contextlib.contextmanager
def _flag_set(flag, value):
  """Within this context, flag[-1] is `value` (a flag is a stack, so
  contexts nest)."""
  flag.append(value)
  try:
    yield
  finally:
    flag.pop()


_SKIP_PADDING_TAPS = [True]


def all_taps():
  """Within this context, `Conv` computes every kernel tap, those that only
  ever meet zero padding included: what model FLOPs (torch's convention)
  count."""
  return _flag_set(_SKIP_PADDING_TAPS, False)


def _taps_in_image(kernel, dilation, size):
  """Indices of the kernel taps along one axis that meet the image at
  some output position (stride 1, 'same' padding): a tap at offset
  o = (i - kernel // 2) * dilation reads only padding when |o| >= size."""
  if not _SKIP_PADDING_TAPS[-1]:
    return range(kernel)
  return [i for i in range(kernel)
          if abs((i - kernel // 2) * dilation) < size]


def _valid_taps(kernel, dilation, size):
  """Per tap along one axis: how many output positions it meets the image
  at (stride 1, 'same' padding)."""
  return [max(0, size - abs((i - kernel // 2) * dilation))
          for i in range(kernel)]


def _tap_sum(x, k, dilation, cropped=False):
  """A stride-1 'same' convolution as a sum over kernel taps of matrix
  products, each over only the output positions where its tap meets the
  image: no products with the padding are computed.

  Each tap's input window is a slice of x (copied before its product), or
  with `cropped` a 1x1 convolution of the whole x with negative padding,
  which XLA's own CPU convolution kernels read in place: measured on this
  CPU (benchmarks/aspp_forms.py, medians), DeepLab's ASPP branches at
  512x512 (batch 1, 2048 -> 256 channels on the 64x64 map) 106 -> 76 ms
  at rate 12 (XLA's 3x3 convolution before), 75 -> 54 at 24 and 49 -> 38
  at 36 (sliced taps before), within 8% of their products at the matrix
  product rate; torch's convolutions take 68, 50 and 35. On YNNPACK (the
  train steps' kernels) the cropped form was slower than the slices."""
  _, h, w, _ = x.shape
  kh, kw = k.shape[:2]
  out = None
  for i in range(kh):
    oy = (i - kh // 2) * dilation
    r0, r1 = max(0, -oy), min(h, h - oy)
    for j in range(kw):
      ox = (j - kw // 2) * dilation
      c0, c1 = max(0, -ox), min(w, w - ox)
      if cropped:
        part = jax.lax.conv_general_dilated(
            x, k[i:i + 1, j:j + 1], (1, 1),
            ((-(r0 + oy), r1 + oy - h), (-(c0 + ox), c1 + ox - w)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      else:
        part = jnp.dot(x[:, r0 + oy:r1 + oy, c0 + ox:c1 + ox], k[i, j])
      part = jnp.pad(part, ((0, 0), (r0, h - r1), (c0, w - c1), (0, 0)))
      out = part if out is None else out + part
  return out


def _depthwise_taps(x, k, stride, dilation, pad):
  """A depthwise convolution (k: (kh, kw, 1, C), one filter per channel) as
  a sum over its taps of strided views of the padded input times each
  tap's per-channel weights: elementwise work XLA fuses into one pass.

  Measured on CPU (lraspp_mobilenet_v3_large, 512x512 inference): XLA's
  grouped convolution took 650 of the forward pass's 760 ms. Outside
  `all_taps()` only: the FLOP count (of convolutions and products) sees
  the convolution.
  """
  n, h, w, c = x.shape
  kh, kw = k.shape[:2]
  xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  ho = (xp.shape[1] - dilation * (kh - 1) - 1) // stride + 1
  wo = (xp.shape[2] - dilation * (kw - 1) - 1) // stride + 1
  out = None
  for a in range(kh):
    for b in range(kw):
      view = jax.lax.slice(
          xp, (0, a * dilation, b * dilation, 0),
          (n, a * dilation + stride * (ho - 1) + 1,
           b * dilation + stride * (wo - 1) + 1, c), (1, stride, stride, 1))
      part = view * k[a, b, 0]
      out = part if out is None else out + part
  return out


# A dilated convolution becomes a sum of per-tap products on CPU when at
# most this share of its (output position, tap) pairs meets the image.
# Measured on CPU, forward + backward, 2048 -> 256 channels: ASPP rate 12
# on a 16x16 map (25% valid) 7.6x faster, rate 24 on 64x64 (56%) 1.7x;
# a backbone 3x3 at dilation 4 on 16x16, 512 channels (69%), 1.8x slower.
TAP_SUM_MAX_VALID = 0.6


@jax.custom_vjp
def channel_dot(x, k):
  """x (..., C) @ k (C, D): a 1x1 convolution as a matrix product, whose
  kernel gradient contracts every leading axis of x and of the output
  gradient in one product, laid out (C, D) as it is stored.

  Measured on CPU (benchmarks/conv_micro.py shapes): autodiff of
  `jnp.dot` computes that gradient at 46-160 GFLOP/s, this at 160-400.
  Values and gradients are the same products. The CPU product reads its
  left operand transposed, a copy XLA fuses with the operand's producer
  (BatchNorm, ReLU) and writes slowly: the operand with fewer channels
  goes left, the product's (C, D) result is transposed instead (measured:
  deeplabv3_resnet50 train step, batch 4, 256x256, 3.58 -> 3.00-3.14 s;
  fcn_resnet50 at 128x128 0.76-0.77 -> 0.71-0.75 s).
  """
  return jnp.dot(x, k)


def _channel_dot_fwd(x, k):
  return jnp.dot(x, k), (x, k)


def _channel_dot_bwd(res, g):
  x, k = res
  axes = tuple(range(x.ndim - 1))
  if x.shape[-1] > g.shape[-1]:  # the smaller operand read transposed
    dk = jax.lax.dot_general(g, x, ((axes, axes), ((), ()))).T
  else:
    dk = jax.lax.dot_general(x, g, ((axes, axes), ((), ())))
  return jnp.dot(g, k.T).astype(x.dtype), dk.astype(k.dtype)


channel_dot.defvjp(_channel_dot_fwd, _channel_dot_bwd)


# Winograd's minimal filtering F(2 x 2, 3 x 3) (Lavin & Gray, 2016): each
# 2 x 2 tile of outputs from a 4 x 4 tile of inputs through 16 independent
# channel products instead of 36, with the input transform B^T, the kernel
# transform G and the output transform A^T (interpolation points 0, +-1 and
# infinity; every coefficient 0, +-1 or +-1/2): the train steps' form. The
# code takes any F(m x m, 3 x 3) table. F(4 x 4, 3 x 3) (36 products per
# 4 x 4 tile; points 0, +-1, +-2 and infinity) was measured no faster in
# the ResNet train steps (fcn_resnet50, batch 4, 256x256: 3.31-3.38 s a
# step against F(2 x 2)'s 3.25-3.43 s), slower on small maps, and is 10x
# less accurate in float32 (about 2e-5 of the output's scale); the
# inference steps take it (`winograd_planes`).
_WINOGRAD_M = 2
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
_WINOGRAD4_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0),
                 (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                 (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINOGRAD4_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6),
                (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINOGRAD4_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0),
                 (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def _combine(mat, parts, axis=0):
  """sum_i mat[:, i] * parts[i] in one elementwise pass, row r of `mat`
  at index r of a new axis at `axis` of the parts."""
  mat = np.asarray(mat, np.float64)
  out = None
  for i, part in enumerate(parts):
    col = mat[:, i]
    if not col.any():
      continue
    shape = [1] * (part.ndim + 1)
    shape[axis] = col.size
    term = jnp.expand_dims(part, axis) * jnp.asarray(
        col, part.dtype).reshape(shape)
    out = term if out is None else out + term
  return out


def _overlap_add(parts, m, axis):
  """sum_i parts[i] put at index i % m of a new axis at `axis`."""
  onehot = np.zeros((m, len(parts)))
  onehot[np.arange(len(parts)) % m, np.arange(len(parts))] = 1
  return _combine(onehot, parts, axis)


def _lin(coefs, parts):
  """sum_i coefs[i] * parts[i] (zero coefficients skipped), one elementwise
  pass and its own array."""
  out = None
  for coef, part in zip(np.asarray(coefs, np.float64), parts):
    if coef == 0:
      continue
    term = (part if coef == 1 else -part if coef == -1 else
            part * jnp.asarray(coef, part.dtype))
    out = term if out is None else out + term
  return out


def _winograd_tiles(x_shape, d, m=_WINOGRAD_M):
  """(n, h, w, tiles down, tiles across) of a dilation-d convolution whose
  tiles are m x m outputs."""
  n, h, w, _ = x_shape
  return n, h, w, -(-h // (m * d)), -(-w // (m * d))


def _winograd_forward(x, k, d):
  m, alpha = _WINOGRAD_M, _WINOGRAD_M + 2
  n, h, w, th, tw = _winograd_tiles(x.shape, d)
  c, f = k.shape[2:]
  # With dilation d, a tile's outputs are every d-th row of m d rows (d
  # interleaved tiles), and its input row i is chunk t m + i of the input
  # padded by d, a chunk being d rows: group t + i // m, place i % m of
  # the input reshaped to (groups of m chunks, m d rows). Likewise across.
  xp = jnp.pad(x, ((0, 0), (d, (th + 1) * m * d - h - d),
                   (d, (tw + 1) * m * d - w - d), (0, 0)))
  xr = xp.reshape(n, th + 1, m * d, tw + 1, m * d, c)
  rows = _combine(_WINOGRAD_BT, [
      xr[:, i // m:i // m + th, i % m * d:(i % m + 1) * d]
      for i in range(alpha)])
  v = _combine(_WINOGRAD_BT, [
      rows[..., j // m:j // m + tw, j % m * d:(j % m + 1) * d, :]
      for j in range(alpha)])
  v = v.reshape(alpha * alpha, -1, c)  # (across b, down a), tile, c
  u = _combine(_WINOGRAD_G, [k[i] for i in range(3)])
  u = _combine(_WINOGRAD_G, [u[:, j] for j in range(3)])
  u = u.reshape(alpha * alpha, c, f)
  prod = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))
  prod = prod.reshape(alpha, alpha, n, th, d, tw, d, f)
  y = _combine(_WINOGRAD_AT, [prod[:, a] for a in range(alpha)], axis=3)
  y = _combine(_WINOGRAD_AT, [y[b] for b in range(alpha)], axis=5)
  y = y.reshape(n, th * m * d, tw * m * d, f)[:, :h, :w]
  return y, v, u


def winograd_planes(x, k, d):
  """`winograd_conv`'s convolution as the inference steps run it (inside
  `inference_forms()`; no custom gradient, none is taken there):
  F(4 x 4, 3 x 3), each of the 36 transformed planes its own array and its
  own product ((tiles, c) x (c, f)), the input's and the output's
  transforms one axis at a time (rows, then columns), every intermediate
  its own array too; within about 2e-5 of the output's scale in float32.
  XLA's CPU loop wrote the planes stacked on one axis at a third of the
  rate of separate arrays (F(2 x 2)'s input transform of a 64x64x2048 map
  52 -> 26 ms, this CPU). One convolution alone, 512x512 image, two runs,
  ms: F(2 x 2) stacked / as planes / F(4 x 4) as planes -- layer3's (256
  channels, rate 2) 17.0 / 12.8-17.3 / 10.5-12.5, layer4's (512, rate 4)
  58-80 / 48-53 / 40-44, FCN's head (2048 -> 512) 236-247 / 213-219 /
  156-172. The train steps keep F(2 x 2) stacked (`winograd_conv`): as
  planes, its backward pass differed across device counts by 11x the
  sharded-step test's tolerance."""
  bt, g, at = (np.asarray(t, np.float64) for t in (
      _WINOGRAD4_BT, _WINOGRAD4_G, _WINOGRAD4_AT))
  m, alpha = at.shape
  n, h, w, th, tw = _winograd_tiles(x.shape, d, m)
  c, f = k.shape[2:]
  xp = jnp.pad(x, ((0, 0), (d, (th + 1) * m * d - h - d),
                   (d, (tw + 1) * m * d - w - d), (0, 0)))
  xr = xp.reshape(n, th + 1, m * d, tw + 1, m * d, c)
  rows = [_lin(bt[a], [xr[:, i // m:i // m + th, i % m * d:(i % m + 1) * d]
                       for i in range(alpha)]) for a in range(alpha)]
  v = [_lin(bt[b], [r[:, :, :, j // m:j // m + tw, j % m * d:(j % m + 1) * d]
                    for j in range(alpha)])
       for r in rows for b in range(alpha)]
  taps = [k[i, j] for i in range(3) for j in range(3)]
  u = [_lin(np.outer(g[a], g[b]).ravel(), taps)
       for a in range(alpha) for b in range(alpha)]
  prod = [jnp.dot(vp.reshape(-1, c), up).reshape(n, th, d, tw, d, f)
          for vp, up in zip(v, u)]
  down = [[_lin(at[r], prod[b::alpha]) for b in range(alpha)]
          for r in range(m)]
  # Output (r, s) of each tile at place r down, s across: stacked into
  # (n, th, m, d, tw, m, d, f), which is (n, th m d, tw m d, f).
  y = jnp.stack([jnp.stack([_lin(at[s], down[r]) for s in range(m)], axis=4)
                 for r in range(m)], axis=2)
  return y.reshape(n, th * m * d, tw * m * d, f)[:, :h, :w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv(x, k, dilation):
  """3x3 stride-1 'same' convolution (x NHWC, k HWIO) of this dilation by
  Winograd's F(2 x 2, 3 x 3): the direct convolution's function in exact
  arithmetic, in float32 within about 1e-6 of the output's scale. The
  gradients are the transposed transforms around the backward pass's two
  products (a custom VJP: autodiff of the forward pass was slower)."""
  return _winograd_forward(x, k, dilation)[0]


def _winograd_fwd(x, k, dilation):
  y, v, u = _winograd_forward(x, k, dilation)
  return y, (v, u, x.shape)


def _winograd_bwd(d, res, dy):
  v, u, x_shape = res
  m, alpha = _WINOGRAD_M, _WINOGRAD_M + 2
  n, h, w, th, tw = _winograd_tiles(x_shape, d)
  c, f = u.shape[1:]
  a_mat, b_mat, g_t = (np.asarray(t, np.float64).T for t in (
      _WINOGRAD_AT, _WINOGRAD_BT, _WINOGRAD_G))
  dy = jnp.pad(dy, ((0, 0), (0, th * m * d - h), (0, tw * m * d - w), (0, 0)))
  dy = dy.reshape(n, th, m, d, tw, m, d, f)
  dprod = _combine(a_mat, [dy[:, :, j] for j in range(m)])
  dprod = _combine(a_mat, [dprod[..., j, :, :] for j in range(m)])
  dprod = dprod.reshape(alpha * alpha, -1, f)
  dv = jax.lax.dot_general(dprod, u, (((2,), (2,)), ((0,), (0,))))
  du = jax.lax.dot_general(v, dprod, (((1,), (1,)), ((0,), (0,))))
  du = du.reshape(alpha, alpha, c, f)
  dk = _combine(g_t, [du[b] for b in range(alpha)])  # (kw, a, c, f)
  dk = _combine(g_t, [dk[:, a] for a in range(alpha)])  # (kh, kw, c, f)
  # The input: B's transpose, each tile's chunks added back in place.
  dv = dv.reshape(alpha, alpha, n, th, d, tw, d, c)
  across = _combine(b_mat, [dv[b] for b in range(alpha)])
  across = _overlap_add(
      [jnp.pad(across[j], ((0, 0),) * 4 + ((j // m, 1 - j // m),) +
               ((0, 0),) * 2) for j in range(alpha)], m, axis=5)
  down = _combine(b_mat, [across[a] for a in range(alpha)])
  dx = _overlap_add(
      [jnp.pad(down[i], ((0, 0), (i // m, 1 - i // m)) + ((0, 0),) * 5)
       for i in range(alpha)], m, axis=2)
  dx = dx.reshape(n, (th + 1) * m * d, (tw + 1) * m * d, c)
  return dx[:, d:d + h, d:d + w], dk.astype(u.dtype)


winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)


_DIRECT_CONVOLUTIONS = [False]


def direct_convolutions():
  """Within this context, `Conv` leaves its 3x3 convolutions to XLA (no
  Winograd): what `export` traces, for runtimes with convolution kernels
  of their own. The train and inference steps on CPU take Winograd where
  it applies (inference, measured A/B on this CPU, batch 1, 512x512:
  fcn_resnet50 750-761 -> 611-625 ms, deeplabv3_resnet50 914-916 ->
  832-842 ms, the same labels)."""
  return _flag_set(_DIRECT_CONVOLUTIONS, True)


# Winograd applies to a 3x3 convolution with at least this many input and
# output channels: in the inference steps (`inference_forms()`) from 64,
# in the train steps from 256. Measured on CPU, train steps with
# YNNPACK's convolutions: fcn_resnet50, batch 4, 128x128, 1.04-1.09 ->
# 0.75-0.76 s; 256x256 4.56 -> 3.25-3.43 s; deeplabv3_resnet50 0.94 ->
# 0.84 s and 4.10 -> 3.63 s; the U-Net's 16- and 32-channel convolutions
# at 88x120-176x240 3-5x slower as Winograd (the transforms' memory
# traffic outweighs the products saved). Against XLA's own convolution
# kernels (the train steps' since, `compiler_options`), A/B interleaved:
# unet_camvid 473 / 554 ms a step from 64 channels, 428 / 434 from 256,
# 425 / 430 without Winograd; fcn_resnet50 at 128x128 666 / 654 ms from
# 64, 652 / 642 from 256, 831 / 772 without; at 256x256 2.46 / 2.37 s
# from 64, 2.39 / 2.32 from 256 (deeplabv3_resnet50 2.50 / 2.47 and
# 2.49 / 2.48).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_TRAIN_CHANNELS = 256


def winograd_applies(x_shape, features, dilation, dtype):
  """Whether a 3x3 stride-1 'same' convolution of this float input (NHWC)
  runs as `winograd_conv` on CPU: float32, at least
  `WINOGRAD_MIN_CHANNELS` channels in and out (in a train step, outside
  `inference_forms()`, `WINOGRAD_MIN_TRAIN_CHANNELS`), at most 4x as many in as
  out (DeepLab's ASPP, 2048 -> 256 channels, spends more on the input's
  transform than it saves), the tiles' padding at most 30% of the map
  (large dilations), outside `direct_convolutions()` and `all_taps()`.
  Inside `inference_forms()` it runs as `winograd_planes` where that
  form's 4x4 tiles pad the map by at most 30% too (`winograd_form`)."""
  c = x_shape[-1]
  return (cpu_forms() and dtype == jnp.float32 and _SKIP_PADDING_TAPS[-1] and
          not _DIRECT_CONVOLUTIONS[-1] and
          min(c, features) >= (WINOGRAD_MIN_CHANNELS if _INFERENCE_FORMS[-1]
                               else WINOGRAD_MIN_TRAIN_CHANNELS) and
          c <= 4 * features and
          _tiles_fit(x_shape, dilation, _WINOGRAD_M))


def _tiles_fit(x_shape, d, m):
  """Whether m x m output tiles at dilation d pad the map by <= 30%."""
  _, h, w, th, tw = _winograd_tiles(x_shape, d, m)
  return (th * m * d) * (tw * m * d) <= 1.3 * h * w


def winograd_form(x_shape, dilation):
  """The Winograd function a convolution `winograd_applies` to runs:
  `winograd_planes` inside `inference_forms()` where its tiles fit,
  otherwise `winograd_conv`."""
  if _INFERENCE_FORMS[-1] and _tiles_fit(x_shape, dilation,
                                         len(_WINOGRAD4_AT)):
    return winograd_planes
  return winograd_conv


def cpu_forms():
  """Whether the CPU formulations below are used: on the CPU backend only,
  where they were measured (benchmarks/conv_micro.py, BENCHMARKS.md)."""
  return jax.default_backend() == 'cpu'


# On CPU, XLA hands convolutions, matrix products and reductions to
# YNNPACK by default. Measured (2026-11-30/12-01, this 2-core CPU;
# BENCHMARKS.md): YNNPACK runs many convolutions on one core (the process
# busy 1.0 of 2 cores: the U-Net's 3x3s from 16 -> 32 to 128 -> 64
# channels at 44x60-176x240, forward, input and weight gradients alike),
# XLA's own (Eigen) convolution kernels keep both busy and are as fast or
# faster in every pass measured (e.g. 64 -> 32 channels at 88x120, batch
# 8: 12.7 / 12.5 / 26.6 -> 10.3 / 7.9 / 14.6 ms). So every step here takes
# XLA's own convolution kernels and keeps YNNPACK's matrix products. The
# train steps keep YNNPACK's reductions too (the BatchNorm statistics:
# without them the ResNet train steps were slower, fcn_resnet50 at 128x128
# 1.09 -> 1.48 s); the inference steps, measured first, take XLA's
# (YNNPACK's were within the noise there: fcn_resnet50 / deeplabv3_resnet50
# / lraspp_mobilenet_v3_large predict steps 542-556 / 670-702 / 23-31 ms
# against 546-560 / 658-669 / 29 ms). The train steps, A/B interleaved
# (python -m seg_jax.bench): unet_camvid 505 / 501 -> 453 / 449 ms a step;
# fcn_resnet50 and deeplabv3_resnet50 at 128x128 and 256x256 and the
# MobileNetV3 models at 256x256 unchanged within the noise; with Winograd
# from `WINOGRAD_MIN_TRAIN_CHANNELS` too, segnet_camvid at 128x128 1,021 /
# 1,004 -> 792 / 833 ms, fcn8s_voc 26.9 / 25.8 -> 24.2 / 23.5 s.
_YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
_CPU_COMPILER_OPTIONS = {
    'inference': {_YNN_FUSION_TYPE: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
    'train': {_YNN_FUSION_TYPE: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
                                'LIBRARY_FUSION_TYPE_REDUCE'},
}


def compiler_options(xla_convolutions=True, train=False):
  """XLA options for a step (`jax.jit(..., compiler_options=...)`): on
  CPU, convolutions on XLA's own kernels, reductions on YNNPACK's in a
  train step (see above); none elsewhere, without `xla_convolutions`, or
  where this jaxlib does not know the option."""
  if not xla_convolutions:
    return {}
  return _cpu_compiler_options('train' if train else 'inference')


@functools.cache
def _cpu_compiler_options(kind):
  if not cpu_forms():
    return {}
  options = _CPU_COMPILER_OPTIONS[kind]
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(
        jnp.zeros(1)).compile()
  except Exception:  # pylint: disable=broad-except
    return {}  # another jaxlib: its defaults
  return dict(options)


class Conv(nn.Module):
  """`nn.Conv` (same parameters, same initialisation; a bias only with
  `use_bias`), 'SAME' or 'VALID' padding.

  Exact reformulations (outside `all_taps()`):
  - kernel taps that, at this input size, only ever meet the zero padding
    are not computed (DeepLab's ASPP at rates 12/24/36 on the 16x16 map of
    a 128x128 crop: the rate-24 and rate-36 branches are exactly 1x1
    convolutions with the centre taps; the other taps get the zero
    gradient they get anyway);
  - on CPU, a dilated convolution that would mostly multiply padding (see
    `TAP_SUM_MAX_VALID`) is a sum of per-tap matrix products over only the
    positions each tap meets the image at; in the inference forms every
    float32 dilated convolution Winograd does not take is, each tap a 1x1
    convolution reading its window in place (`_tap_sum`'s `cropped`);
  - a 1x1 kernel is a matrix product over channels where
    `one_by_one_as_dot()`.

  With `feature_group_count` g > 1 (g == input channels: depthwise, as
  MobileNet's), the kernel is (k, k, C_in / g, features), as nn.Conv's; only
  the skipping of padding-only taps applies to it (slicing the kernel's
  spatial axes is exact for any grouping), the per-tap and 1x1 products are
  for ungrouped kernels.
  """
  features: int
  kernel: int = 3
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  use_bias: bool = False
  padding: str = 'SAME'
  feature_group_count: int = 1

  @nn.compact
  def __call__(self, x, scale=None):
    """`scale` (features,): multiplies the kernel's output channels first
    (a folded BatchNorm, see `ConvBN`)."""
    groups = self.feature_group_count
    if x.shape[-1] % groups or self.features % groups:
      raise ValueError(f'Conv: {x.shape[-1]} input and {self.features} output '
                       f'channels do not split into {groups} groups.')
    k = self.param('kernel', nn.initializers.lecun_normal(),
                   (self.kernel, self.kernel, x.shape[-1] // groups,
                    self.features), jnp.float32)
    if scale is not None:
      k = k * scale
    y = self._conv(x.astype(self.dtype), k.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,),
                         jnp.float32).astype(self.dtype)
    return y

  def _conv(self, x, k):
    grouped = self.feature_group_count > 1
    conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=(self.stride,) * 2,
        rhs_dilation=(self.dilation,) * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=self.feature_group_count)
    if self.padding == 'VALID':
      return conv(x, k, padding='VALID')
    if self.kernel > 1 and self.stride == 1 and self.kernel % 2:
      rows = _taps_in_image(self.kernel, self.dilation, x.shape[1])
      cols = _taps_in_image(self.kernel, self.dilation, x.shape[2])
      k = k[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
      valid = (sum(_valid_taps(k.shape[0], self.dilation, x.shape[1])) *
               sum(_valid_taps(k.shape[1], self.dilation, x.shape[2])) /
               (k.shape[0] * k.shape[1] * x.shape[1] * x.shape[2]))
      if (_SKIP_PADDING_TAPS[-1] and cpu_forms() and not grouped and
          k.shape[0] * k.shape[1] > 1):
        if (_INFERENCE_FORMS[-1] and self.dilation > 1 and
            x.dtype == jnp.float32 and not _DIRECT_CONVOLUTIONS[-1] and
            not winograd_applies(x.shape, self.features, self.dilation,
                                 x.dtype)):
          return _tap_sum(x, k, self.dilation, cropped=True)
        if valid <= TAP_SUM_MAX_VALID:
          return _tap_sum(x, k, self.dilation)
    if k.shape[:2] == (1, 1) and one_by_one_as_dot() and not grouped:
      if self.stride > 1:
        x = x[:, ::self.stride, ::self.stride]
      return channel_dot(x, k[0, 0])
    if (k.shape[:2] == (3, 3) and self.stride == 1 and not grouped and
        winograd_applies(x.shape, self.features, self.dilation, x.dtype)):
      return winograd_form(x.shape, self.dilation)(x, k, self.dilation)
    pad = [(self.dilation * (n - 1) // 2,) * 2 for n in k.shape[:2]]
    if (grouped and k.shape[2] == 1 and k.shape[3] == x.shape[-1] and
        cpu_forms() and _SKIP_PADDING_TAPS[-1]):
      return _depthwise_taps(x, k, self.stride, self.dilation, pad)
    return conv(x, k, padding=pad)


class ConvTranspose(nn.Module):
  """`nn.ConvTranspose` with 'SAME' padding (same parameters, same
  initialisation, same result).

  On CPU, when the kernel equals the stride (no two outputs share an input
  pixel: the U-Net's 2x2/2 up-convolution), it is one matrix product per
  input pixel, each pixel's (kernel x kernel x features) block laid out in
  place: measured on the unet_camvid step, XLA's CPU backend runs the
  transposed convolution and its gradients as convolutions over the
  zero-dilated input, 4x the work at a slow rate (about 400 of the step's
  1,230 ms).
  """
  features: int
  kernel: int = 2
  stride: int = 2
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.param('kernel', nn.initializers.lecun_normal(),
                   (self.kernel, self.kernel, x.shape[-1], self.features),
                   jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    s = self.stride
    if self.kernel == s and cpu_forms():
      n, h, w, c = x.shape
      # lax.conv_transpose (transpose_kernel=False) reads the kernel
      # flipped: output (s*i + a, s*j + b) takes tap (s-1-a, s-1-b).
      taps = k[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c, s * s *
                                                         self.features)
      y = channel_dot(x, taps).reshape(n, h, w, s, s, self.features)
      y = y.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * s, w * s,
                                                self.features)
    else:
      y = jax.lax.conv_transpose(x, k, (s, s), 'SAME',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,),
                         jnp.float32).astype(self.dtype)
    return y


def max_pool(x):
  """2x2/2 max-pooling: `nn.max_pool`'s values and gradient (which goes to
  the first maximum of each window, row-major, as XLA's select-and-scatter
  gives it). On CPU with even sizes it is elementwise work over the four
  window positions, which XLA fuses; its select-and-scatter gradient was
  the step's slowest non-convolution (measured on unet_camvid)."""
  if cpu_forms() and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
    return _max_pool_2x2(x)
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _windows(x):
  """The four (N, H/2, W/2, C) views of 2x2 windows, row-major."""
  return [x[:, a::2, b::2] for a in (0, 1) for b in (0, 1)]


@jax.custom_vjp
def _max_pool_2x2(x):
  v = _windows(x)
  return jnp.maximum(jnp.maximum(v[0], v[1]), jnp.maximum(v[2], v[3]))


def _max_pool_fwd(x):
  return _max_pool_2x2(x), x


def _max_pool_bwd(x, g):
  # The first maximum of each window gets g, chosen by comparing the
  # window's four values with each other. Comparing them with the forward's
  # output instead relies on the backward reading bit for bit the values
  # the forward pooled, which XLA does not promise (it may compute x's
  # producer, a BatchNorm + ReLU, again in another fusion): with the tests'
  # compiler flags, one program holding a U-Net's inference pass and its
  # gradient got gradients off by up to 8% that way.
  v = _windows(x)
  wins = [jnp.ones(g.shape, bool) for _ in v]
  for i in range(4):
    for j in range(4):
      if i != j:  # i beats the later j when >=, the earlier j when >
        wins[i] &= v[i] >= v[j] if i < j else v[i] > v[j]
  parts = [jnp.where(win, g, 0).astype(g.dtype) for win in wins]
  n, h, w, c = g.shape
  # (a, b) = (0, 0), (0, 1), (1, 0), (1, 1) back into place.
  grid = jnp.stack(parts, 3).reshape(n, h, w, 2, 2, c)
  return (grid.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape),)


_max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


BN_EPSILON = 1e-5
_FOLD_BATCH_NORM = [True]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon, relu):
  """BatchNorm over the batch's statistics (+ ReLU): (y, mean, var), the
  channels last, flax's statistics (float32, var = E[x^2] - E[x]^2 clipped
  at 0, biased) and normalisation ((x - mean) * rsqrt(var + eps) * scale +
  bias).

  Its VJP takes the gradient in three passes over the activations (the
  ReLU's mask from the output, the two sums with the products they need
  fused into YNNPACK's reductions, dx), where autodiff of flax's
  BatchNorm writes the centred input and the masked and scaled gradients
  out first. Measured on this CPU, forward and backward of one BatchNorm
  + ReLU alone, train steps' compiler options, medians of 9, two runs:
  8x176x240x16 11.0-18.3 -> 6.2-8.7 ms, 8x88x120x32 3.3-3.9 -> 1.8-2.0,
  4x64x64x256 6.3 -> 3.0-3.5, 4x32x32x1024 6.6-7.2 -> 3.5-3.8. The sum
  of the gradient times the centred input is taken as sum(g * x) - mean *
  sum(g), which has the cancellation flax's own fast variance has in the
  forward pass (relative rounding about eps * (mean / std)^2).
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon, relu)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, relu):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(0., jnp.mean(jnp.square(x), axes) - jnp.square(mean))
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (inv * scale) + bias
  if relu:
    y = jnp.maximum(y, 0.)
  return (y, mean, var), (x, y, scale, mean, inv)


def _batch_norm_train_bwd(epsilon, relu, residuals, cotangents):
  del epsilon
  x, y, scale, mean, inv = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  m = x.size // x.shape[-1]
  if relu:
    dy = jnp.where(y > 0, dy, 0.)
  dbias = jnp.sum(dy, axes)
  dscale = inv * (jnp.sum(dy * x, axes) - mean * dbias)
  # dx = a (dy - dbias / m - (x - mean) inv dscale / m), a = inv * scale,
  # plus the statistics' own cotangents (zero where only the running
  # averages read them): dmean / m + 2 (x - mean) dvar / m.
  a = inv * scale
  slope = 2. * dvar / m - a * inv * dscale / m
  offset = dmean / m - a * dbias / m - mean * slope
  dx = a * dy + x * slope + offset
  return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (its variables, defaults, statistics and running
  averages), followed by a ReLU with `relu`.

  On CPU a float32 train step over the batch's statistics (channels last,
  scale and bias, flax's fast variance, no axis_name) runs as
  `batch_norm_train`, whose VJP makes fewer passes over the activations;
  elsewhere, and in inference, flax's own BatchNorm.
  """
  relu: bool = False

  @nn.compact
  def __call__(self, x, use_running_average=None):
    average = nn.merge_param('use_running_average', self.use_running_average,
                             use_running_average)
    if average or not self._fused(x):
      y = super().__call__(x, use_running_average)
      return nn.relu(y) if self.relu else y
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable('batch_stats', 'var',
                           lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param('scale', self.scale_init, (c,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (c,), self.param_dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.relu)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y

  def _fused(self, x):
    return (cpu_forms() and _FUSED_BATCH_NORM[-1] and
            x.dtype == jnp.float32 and
            self.dtype in (None, jnp.float32) and
            self.param_dtype == jnp.float32 and
            self.axis in (-1, x.ndim - 1) and self.axis_name is None and
            self.use_bias and self.use_scale and self.use_fast_variance and
            self.force_float32_reductions)


_FUSED_BATCH_NORM = [True]


def flax_batch_norm():
  """Within this context, `BatchNorm` runs flax's BatchNorm in train steps
  too (the reference `batch_norm_train` is compared with)."""
  return _flag_set(_FUSED_BATCH_NORM, False)


def unfolded_batch_norm():
  """Within this context, `ConvBN` runs its BatchNorm in inference too (the
  reference its folding is compared with)."""
  return _flag_set(_FOLD_BATCH_NORM, False)


class ConvBN(nn.Module):
  """Conv (no bias) + BatchNorm (+ ReLU), torchvision's usual triple.

  In inference (`train=False`) the BatchNorm is folded into the
  convolution: its per-channel scale gamma / sqrt(var + eps) multiplies the
  kernel's output channels and its shift beta - mean * scale becomes the
  bias, the same function up to float rounding with one pass over the
  activations less. On CPU (outside `direct_convolutions()`, which
  exported programs trace) the scale multiplies the convolution's output
  in the pass that adds the bias instead: the same passes over the
  activations, and no pass over the kernel at every step (the scaled
  kernel of a product or of XLA's convolution is written out first;
  predict step A/B, 4 pairs: deeplabv3_resnet50 682/705/690/707 ->
  686/655/673/702 ms, fcn_resnet50 566/582/591/583 -> 566/561/595/578).
  Every inference path (the in-training evaluation, evaluate, predict,
  export, bench --mode=infer) runs through it. Training and
  initialisation run the BatchNorm itself (`BatchNorm`, the ReLU with it).

  `epsilon` and `momentum` are the BatchNorm's (flax's momentum: torch's
  momentum m is 1 - m here); the defaults are torch's BatchNorm2d defaults,
  MobileNetV3 uses 1e-3 and 0.99. `feature_group_count` groups the
  convolution (`Conv`); grouped or not, output channel o is the kernel's
  column [..., o], so the folded scale applies unchanged.
  """
  features: int
  kernel: int = 3
  stride: int = 1
  dilation: int = 1
  relu: bool = True
  dtype: Any = jnp.float32
  feature_group_count: int = 1
  epsilon: float = BN_EPSILON
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train):
    conv = Conv(self.features, self.kernel, self.stride, self.dilation,
                self.dtype, feature_group_count=self.feature_group_count,
                name='conv')
    if train or self.is_initializing() or not _FOLD_BATCH_NORM[-1]:
      return BatchNorm(use_running_average=not train, momentum=self.momentum,
                       epsilon=self.epsilon, dtype=self.dtype, relu=self.relu,
                       name='bn')(conv(x))
    else:
      bn = self.variables['params']['bn']
      stats = self.variables['batch_stats']['bn']
      scale = bn['scale'] * jax.lax.rsqrt(stats['var'] + self.epsilon)
      shift = (bn['bias'] - stats['mean'] * scale).astype(self.dtype)
      if cpu_forms() and not _DIRECT_CONVOLUTIONS[-1]:
        x = conv(x) * scale.astype(self.dtype) + shift
      else:
        x = conv(x, scale) + shift
    return nn.relu(x) if self.relu else x


def max_pool_with_indices(x):
  """2x2/2 max-pooling that also returns which of the 4 inputs won.

  x: (N, H, W, C) with even H, W.  Returns (pooled (N, H/2, W/2, C),
  indices (N, H/2, W/2, C) in 0..3, row-major within the window).
  """
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  windows = windows.reshape(n, h // 2, w // 2, c, 4)
  return windows.max(-1), jnp.argmax(windows, -1)


def max_unpool(x, indices):
  """Inverse of `max_pool_with_indices`: each value back to its position,
  zeros elsewhere.  x, indices: (N, h, w, C) -> (N, 2h, 2w, C)."""
  n, h, w, c = x.shape
  spread = jax.nn.one_hot(indices, 4, dtype=x.dtype) * x[..., None]
  spread = spread.reshape(n, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return spread.reshape(n, 2 * h, 2 * w, c)


def max_pool_ceil(x):
  """2x2/2 max-pooling with caffe's ceil rounding (odd sizes keep the edge)."""
  ph, pw = x.shape[1] % 2, x.shape[2] % 2
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)),
                constant_values=-jnp.inf)
  return nn.max_pool(x, (2, 2), strides=(2, 2))
