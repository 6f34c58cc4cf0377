"""Convolution microbenchmark: the shapes the zoo runs, pass by pass, XLA vs
torch, in one process.

    python benchmarks/conv_micro.py [--torch] [--repeats=7] [--only=SUBSTR]

For each shape (batch, input size, channels, kernel, stride, dilation of a
convolution fcn_resnet50 / deeplabv3_resnet50 run at 128x128 and 256x256
with batch 4, and the unet_camvid recipe's at 8 x 176x240), times the
forward pass, the input gradient and the weight gradient: XLA's
convolution (`lax.conv_general_dilated`, jitted, NHWC/HWIO, XLA's
default kernels), seg_jax's `layers.Conv` (its CPU formulations, compiled
with the train steps' options, `layers.compiler_options(train=True)`),
and with --torch torch's `conv2d` (channels-last, `torch.autograd.grad`
of one operand at a time).
Prints one row per shape and pass: milliseconds (median of --repeats),
GFLOP/s (2 x multiply-adds of the valid output positions) and the ratio
torch / seg_jax (> 1: seg_jax is faster). Threads: XLA's CPU backend uses
every core; torch is set to the same count.

Not part of the installed package: a measuring tool.
"""

import argparse
import os

from common import median_seconds  # benchmarks/common.py (first: host memory)
import jax
import jax.numpy as jnp
import numpy as np

from seg_jax.models import layers

# (name, batch, height, width, in channels, out channels, kernel, stride,
# dilation)
SHAPES = (
    ('stem 7x7/2 3->64 @128', 4, 128, 128, 3, 64, 7, 2, 1),
    ('3x3 64 @32', 4, 32, 32, 64, 64, 3, 1, 1),
    ('3x3/2 128 @32', 4, 32, 32, 128, 128, 3, 2, 1),
    ('3x3 128 @16', 4, 16, 16, 128, 128, 3, 1, 1),
    ('3x3 d2 256 @16', 4, 16, 16, 256, 256, 3, 1, 2),
    ('3x3 d4 512 @16', 4, 16, 16, 512, 512, 3, 1, 4),
    ('3x3 64 @64', 4, 64, 64, 64, 64, 3, 1, 1),
    ('3x3 d2 256 @32', 4, 32, 32, 256, 256, 3, 1, 2),
    ('3x3 d4 512 @32', 4, 32, 32, 512, 512, 3, 1, 4),
    ('3x3 d12 2048->256 @32', 4, 32, 32, 2048, 256, 3, 1, 12),
    ('1x1 256->64 @32', 4, 32, 32, 256, 64, 1, 1, 1),
    ('1x1 64->256 @32', 4, 32, 32, 64, 256, 1, 1, 1),
    ('1x1 1024->256 @16', 4, 16, 16, 1024, 256, 1, 1, 1),
    ('1x1 2048->512 @16', 4, 16, 16, 2048, 512, 1, 1, 1),
    ('1x1 512->2048 @32', 4, 32, 32, 512, 2048, 1, 1, 1),
    ('unet 3x3 3->16 @176x240', 8, 176, 240, 3, 16, 3, 1, 1),
    ('unet 3x3 16 @176x240', 8, 176, 240, 16, 16, 3, 1, 1),
    ('unet 3x3 32 @88x120', 8, 88, 120, 32, 32, 3, 1, 1),
    ('unet 3x3 64 @44x60', 8, 44, 60, 64, 64, 3, 1, 1),
    ('unet 3x3 128 @22x30', 8, 22, 30, 128, 128, 3, 1, 1),
    ('unet 3x3 32->16 @176x240', 8, 176, 240, 32, 16, 3, 1, 1),
    ('unet 3x3 64->32 @88x120', 8, 88, 120, 64, 32, 3, 1, 1),
    ('unet 3x3 128->64 @44x60', 8, 44, 60, 128, 64, 3, 1, 1),
    ('unet 3x3 256 @11x15', 8, 11, 15, 256, 256, 3, 1, 1),
)


def flops(b, h, w, ci, co, k, s, d):
  """2 x multiply-adds over the output positions, every tap counted."""
  ho, wo = -(-h // s), -(-w // s)
  return 2 * b * ho * wo * ci * co * k * k


def _time(fn, args, repeats):
  return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def _xla_conv(s, d, k):
  pad = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)] * 2
  if s > 1:
    pad = [((k - 1) // 2, (k - 1) // 2)] * 2

  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (s, s), pad, rhs_dilation=(d, d),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return conv


def _layers_conv(co, k, s, d):
  module = layers.Conv(co, k, s, d)

  def conv(x, w):
    return module.apply({'params': {'kernel': w}}, x)
  return conv


def passes(conv, x, w, options=None):
  """Jitted forward, input-gradient and weight-gradient functions, compiled
  with `options` (XLA's compiler options)."""
  jit = lambda f: jax.jit(f, compiler_options=options)
  fwd = jit(conv)
  y = fwd(x, w)
  g = jnp.asarray(np.random.default_rng(2).normal(size=y.shape),
                  jnp.float32)
  dgrad = jit(lambda x, w, g: jax.vjp(lambda v: conv(v, w), x)[1](g)[0])
  wgrad = jit(lambda x, w, g: jax.vjp(lambda v: conv(x, v), w)[1](g)[0])
  return (('fwd', fwd, (x, w)), ('dgrad', dgrad, (x, w, g)),
          ('wgrad', wgrad, (x, w, g)))


def torch_passes(x, w, s, d, k):
  import torch  # pylint: disable=g-import-not-at-top
  tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  tw = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous(
      memory_format=torch.channels_last)
  pad = d * (k - 1) // 2 if s == 1 else (k - 1) // 2

  def conv(a, b):
    return torch.nn.functional.conv2d(a, b, stride=s, padding=pad,
                                      dilation=d)

  with torch.no_grad():
    y = conv(tx, tw)
  g = torch.randn(y.shape).contiguous(memory_format=torch.channels_last)

  def fwd():
    with torch.no_grad():
      return conv(tx, tw)

  # The backward passes alone: the forward graph is built once and kept.
  a = tx.detach().requires_grad_(True)
  ya = conv(a, tw)
  b = tw.detach().requires_grad_(True)
  yb = conv(tx, b)

  def dgrad():
    return torch.autograd.grad(ya, a, g, retain_graph=True)[0]

  def wgrad():
    return torch.autograd.grad(yb, b, g, retain_graph=True)[0]

  return {'fwd': fwd, 'dgrad': dgrad, 'wgrad': wgrad}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--torch', action='store_true')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--only', default='')
  args = parser.parse_args()
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  print(f'{"shape":<26} {"pass":<6} {"xla ms":>8} {"seg ms":>8} '
        f'{"torch ms":>8} {"seg GF/s":>8} {"torch/seg":>9}', flush=True)
  for name, b, h, w_, ci, co, k, s, d in SHAPES:
    if args.only not in name:
      continue
    x = jnp.asarray(rng.normal(size=(b, h, w_, ci)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, ci, co)) / np.sqrt(k * k * ci),
                    jnp.float32)
    gf = flops(b, h, w_, ci, co, k, s, d) / 1e9
    xla = {p: _time(f, a, args.repeats)
           for p, f, a in passes(_xla_conv(s, d, k), x, w)}
    seg = {p: _time(f, a, args.repeats)
           for p, f, a in passes(_layers_conv(co, k, s, d), x, w,
                                 layers.compiler_options(train=True))}
    tor = ({p: median_seconds(f, args.repeats)
            for p, f in torch_passes(x, w, s, d, k).items()}
           if args.torch else {})
    for p in ('fwd', 'dgrad', 'wgrad'):
      t = tor.get(p)
      print(f'{name:<26} {p:<6} {1e3 * xla[p]:8.2f} {1e3 * seg[p]:8.2f} '
            f'{(1e3 * t if t else float("nan")):8.2f} {gf / seg[p]:8.1f} '
            f'{(t / seg[p] if t else float("nan")):9.2f}', flush=True)


if __name__ == '__main__':
  main()
