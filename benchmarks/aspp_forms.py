"""DeepLab v3's ASPP on the CPU, inference: its four convolution branches in
each exact formulation measured, against torch's, in one process.

    python benchmarks/aspp_forms.py [--torch] [--repeats=5] [--size=64] \
        [--channels=2048] [--features=256]

The branches of `deeplabv3_resnet50`'s ASPP on a 512x512 image (batch 1,
2048 channels on the 64x64 map of output stride 8; 256 channels out each:
a 1x1 and 3x3s at rates 12, 24 and 36), each jitted alone with the
inference steps' compiler options (`layers.compiler_options`), in these
forms:

- `seg_jax`: `layers.Conv` as the predict step runs it (its CPU rule in
  `layers.inference_forms()`: each tap a 1x1 convolution of its input
  window, read in place);
- `xla`: XLA's convolution (`lax.conv_general_dilated`);
- `per-tap`: a product per kernel tap over only the positions it meets the
  image at, each tap's input window sliced (copied) first (`layers._tap_sum`
  without `cropped`; the train steps' form where most taps meet padding);
- `winograd`: `layers.winograd_conv`;
- `rows`: per kernel row, one product over the input rows it meets
  (a contiguous window) with the row's three taps side by side, the
  column shifts applied to the 256-channel outputs (exact; computes the
  column taps' padding);
- `output`: every tap in one product over the whole map, the outputs
  shifted and summed (no input copied; computes all padding).

Prints milliseconds per branch (median of --repeats) and the sum, the
rate of the 1x1 branch's matrix product ((4096, 2048) x (2048, 256) at the
defaults) measured in the same process, the time the branches' exact products (padding-only
positions skipped) would take at that rate, and with --torch torch's
`conv2d` (channels-last, no_grad, as many threads as XLA's cores). Every
form's output is checked against `xla`'s.

Not part of the installed package: a measuring tool.
"""

import argparse
import os

from common import median_seconds  # benchmarks/common.py (first: host memory)
import jax
import jax.numpy as jnp
import numpy as np

from seg_jax.models import layers

RATES = (12, 24, 36)


def _xla(x, k, d):
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), [(d * (k.shape[0] // 2),) * 2] * 2, rhs_dilation=(d, d),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _seg_jax(x, k, d):
  with layers.inference_forms():  # as inference.infer_logits traces
    return layers.Conv(k.shape[-1], k.shape[0], dilation=d).apply(
        {'params': {'kernel': k}}, x)


def _shift(y, offset, axis):
  """y shifted so that out[i] = y[i + offset] along `axis`, zeros where
  i + offset falls outside."""
  n = y.shape[axis]
  lo, hi = max(0, -offset), min(n, n - offset)
  if hi <= lo:
    return jnp.zeros_like(y)
  part = jax.lax.slice_in_dim(y, lo + offset, hi + offset, axis=axis)
  pad = [(0, 0)] * y.ndim
  pad[axis] = (lo, n - hi)
  return jnp.pad(part, pad)


def _rows(x, k, d):
  h, f = x.shape[1], k.shape[-1]
  out = None
  for i in range(k.shape[0]):
    oy = (i - k.shape[0] // 2) * d
    r0, r1 = max(0, -oy), min(h, h - oy)
    if r1 <= r0:
      continue
    y = jnp.dot(x[:, r0 + oy:r1 + oy], jnp.concatenate(list(k[i]), -1))
    part = sum(_shift(y[..., j * f:(j + 1) * f], (j - k.shape[1] // 2) * d, 2)
               for j in range(k.shape[1]))
    part = jnp.pad(part, ((0, 0), (r0, h - r1), (0, 0), (0, 0)))
    out = part if out is None else out + part
  return out


def _output(x, k, d):
  kh, kw, c, f = k.shape
  y = jnp.dot(x, k.reshape(kh * kw, c, f).transpose(1, 0, 2).reshape(c, -1))
  out = 0
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    part = _shift(y[..., t * f:(t + 1) * f], (i - kh // 2) * d, 1)
    out = out + _shift(part, (j - kw // 2) * d, 2)
  return out


FORMS = {'seg_jax': _seg_jax, 'xla': _xla, 'per-tap': layers._tap_sum,  # pylint: disable=protected-access
         'winograd': layers.winograd_conv, 'rows': _rows, 'output': _output}


def _exact_flops(size, kernel, d, channels, features):
  taps = sum(layers._valid_taps(kernel, d, size)) ** 2  # pylint: disable=protected-access
  return 2 * taps * channels * features


def _torch_ms(x, kernels, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  times = []
  with torch.no_grad():
    for (k, d) in kernels:
      tk = torch.from_numpy(np.array(k)).permute(3, 2, 0, 1).contiguous(
          memory_format=torch.channels_last)
      pad = d * (k.shape[0] // 2)
      times.append(1e3 * median_seconds(
          lambda tk=tk, d=d, pad=pad: torch.nn.functional.conv2d(
              tx, tk, padding=pad, dilation=d), repeats))
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--torch', action='store_true')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--size', type=int, default=64,
                      help='the map\'s height and width (64: a 512x512 image; '
                      'more than 36, so that every tap meets the image)')
  parser.add_argument('--channels', type=int, default=2048)
  parser.add_argument('--features', type=int, default=256)
  args = parser.parse_args()
  if args.size <= max(RATES):
    parser.error(f'--size must be more than {max(RATES)}')
  rng = np.random.default_rng(0)
  s, c, f = args.size, args.channels, args.features
  x = jnp.asarray(rng.standard_normal((1, s, s, c), np.float32))
  kernels = [(jnp.asarray(rng.standard_normal((1, 1, c, f), np.float32) /
                          np.sqrt(c)), 1)]
  kernels += [(jnp.asarray(rng.standard_normal((3, 3, c, f), np.float32) /
                           np.sqrt(9 * c)), d) for d in RATES]
  opts = layers.compiler_options()
  names = ['1x1'] + [f'rate {d}' for d in RATES]
  print(f'ASPP branches, batch 1, {s}x{s}, {c} -> {f} channels; '
        f'ms, median of {args.repeats}')
  print(f'{"form":10s}' + ''.join(f'{n:>10s}' for n in names) + f'{"sum":>10s}')
  for form, fn in FORMS.items():
    row = []
    for k, d in kernels:
      if form in ('winograd', 'rows', 'output', 'per-tap') and k.shape[0] == 1:
        fn_k = _seg_jax  # a 1x1 has one form: the product
      else:
        fn_k = fn
      step = jax.jit(lambda x, k, fn_k=fn_k, d=d: fn_k(x, k, d),
                     compiler_options=opts)
      err = float(jnp.abs(step(x, k) - _xla(x, k, d)).max())
      if err > 1e-4:
        raise AssertionError(f'{form} rate {d}: max error {err}')
      row.append(1e3 * median_seconds(
          lambda step=step, k=k: step(x, k).block_until_ready(),
          args.repeats))
    print(f'{form:10s}' + ''.join(f'{t:10.1f}' for t in row) +
          f'{sum(row):10.1f}')
  a = x.reshape(s * s, c)
  b = kernels[0][0][0, 0]
  dot = jax.jit(jnp.dot, compiler_options=opts)
  rate = 2 * s * s * c * f / median_seconds(
      lambda: dot(a, b).block_until_ready(), args.repeats)
  bound = [1e3 * _exact_flops(s, k.shape[0], d, c, f) / rate
           for k, d in kernels]
  print(f'{"bound":10s}' + ''.join(f'{t:10.1f}' for t in bound) +
        f'{sum(bound):10.1f}   (exact products at {rate / 1e9:.0f} GFLOP/s)')
  if args.torch:
    row = _torch_ms(x, kernels, args.repeats)
    print(f'{"torch":10s}' + ''.join(f'{t:10.1f}' for t in row) +
          f'{sum(row):10.1f}')


if __name__ == '__main__':
  main()
