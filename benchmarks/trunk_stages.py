"""The dilated ResNet-50 trunk of DeepLab v3 / FCN, inference, stage by
stage, against torchvision's in one process.

    python benchmarks/trunk_stages.py [--torch] [--size=512] [--repeats=5]

The trunk (output stride 8: layer3 and layer4 dilated, as
`deeplabv3_resnet50` and `fcn_resnet50` build it) on one image of
--size x --size, random weights, BatchNorm folded: seg_jax's prefix up to
each stage (stem with max-pooling, layer1..layer4) jitted with the
inference steps' forms and compiler options (`layers.inference_forms`,
`layers.compiler_options`), a stage's time the difference of two prefixes'
(medians of --repeats); with --torch, torchvision's `resnet50(
replace_stride_with_dilation=[False, True, True])` in eval mode,
channels-last, each stage timed on its own input (no_grad, as many
threads as XLA's cores). Prints one row per side: ms per stage and the
total.

Not part of the installed package: a measuring tool.
"""

import argparse
import os

import common  # benchmarks/common.py: the host allocator's settings

STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4')


def seg_jax_stages(size, repeats):
  """{stage: ms} of seg_jax's trunk: differences of timed prefixes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seg_jax.models import layers  # pylint: disable=g-import-not-at-top
  from seg_jax.models.resnet import ResNet  # pylint: disable=g-import-not-at-top
  x = jax.numpy.asarray(np.random.default_rng(0).normal(
      size=(1, size, size, 3)), jax.numpy.float32)
  model = ResNet(depth=50, output_stride=8)
  variables = model.init(jax.random.key(0), x, train=False)
  cumulative = []
  for stage in STAGES:
    def prefix(v, x, stage=stage):
      with layers.inference_forms():
        return model.apply(v, x, train=False)[stage]
    step = jax.jit(prefix, compiler_options=layers.compiler_options())
    cumulative.append(1000 * common.median_seconds(
        lambda step=step: jax.block_until_ready(step(variables, x)), repeats))
  return dict(zip(STAGES, np.diff([0.0] + cumulative)))


def torch_stages(size, repeats):
  """{stage: ms} of torchvision's trunk, each stage on its own input."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  net = torchvision.models.resnet50(
      replace_stride_with_dilation=[False, True, True]).eval()
  net = net.to(memory_format=torch.channels_last)
  modules = [torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
             net.layer1, net.layer2, net.layer3, net.layer4]
  x = torch.randn(1, 3, size, size).to(memory_format=torch.channels_last)
  times = {}
  with torch.no_grad():
    for stage, module in zip(STAGES, modules):
      times[stage] = 1000 * common.median_seconds(
          lambda m=module, x=x: m(x), repeats)
      x = module(x)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--torch', action='store_true')
  args = parser.parse_args()
  if args.size < 32 or args.size % 8:
    parser.error(f'--size={args.size}: give a multiple of 8, at least 32.')
  rows = [('seg_jax', seg_jax_stages(args.size, args.repeats))]
  if args.torch:
    rows.append(('torch', torch_stages(args.size, args.repeats)))
  print(f'dilated ResNet-50 trunk (OS 8), batch 1, {args.size}x{args.size}; '
        f'ms, median of {args.repeats}')
  print(f'{"side":8s} ' + ' '.join(f'{s:>7s}' for s in STAGES) +
        f' {"total":>7s}')
  for name, times in rows:
    print(f'{name:8s} ' + ' '.join(f'{times[s]:7.1f}' for s in STAGES) +
          f' {sum(times.values()):7.1f}', flush=True)


if __name__ == '__main__':
  main()
