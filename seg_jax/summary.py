"""Model summary: `python -m seg_jax.summary --config=configs/x.py` (or
`--workdir=DIR` of a training run: its config.json).

Prints parameters per module and ends with one line
`params=<int> gflops=<float>`: trainable parameters and forward FLOPs per
image at the config's crop size, counted from the forward pass's jaxpr
(`seg_jax.flops`).
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from seg_jax import cli, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, f'Configuration file (a configs/*.py). '
    f'{cli.CONFIG_KEYS_HELP}', lock_config=True)
flags.DEFINE_string('workdir', None, 'A training run folder: its '
                    'config.json is summarized when --config is not given.')
flags.DEFINE_integer('depth', 1, 'Module nesting depth of the table.')


def count_params(params, depth):
  """{module path (up to `depth` levels): parameter count}, in tree order."""
  counts = collections.OrderedDict()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [p.key for p in path[:-1]][:depth]
    name = '/'.join(keys) or '(top)'
    counts[name] = counts.get(name, 0) + int(np.prod(leaf.shape))
  return counts


def forward_gflops(model, variables, shape):
  """Forward GFLOPs for one input of `shape` (`seg_jax.flops`: 2 x
  multiply-adds of convolutions and matrix products, every iteration of a
  scanned stage counted)."""
  from seg_jax import flops  # pylint: disable=g-import-not-at-top
  from seg_jax.models import layers  # pylint: disable=g-import-not-at-top
  with layers.all_taps():
    return flops.count_flops(
        lambda v, x: model.apply(v, x, train=False), variables,
        jax.ShapeDtypeStruct(shape, jnp.float32)) / 1e9


def summarize(config, depth=2):
  """(table text, total params, forward GFLOPs per image)."""
  from seg_jax import state  # pylint: disable=g-import-not-at-top
  from seg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  model = state.create_model(config)
  shape = (1, *transforms.pair(config.data.crop_size), config.data.channels)
  variables = jax.jit(lambda: model.init(
      jax.random.key(0), jnp.zeros(shape), train=False))()
  counts = count_params(variables['params'], depth)
  total = sum(counts.values())
  width = max(len(k) for k in counts) + 2
  lines = [f'{config.model.name} at {shape[1]}x{shape[2]}, '
           f'{config.model.num_classes} classes',
           f'{"module":<{width}}{"params":>14}']
  lines += [f'{k:<{width}}{v:>14,}' for k, v in counts.items()]
  return '\n'.join(lines), total, forward_gflops(model, variables, shape)


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f'Unexpected arguments: {argv[1:]}; every '
                             'setting is a --flag or --config.a.b=value.')
  cli.require_config()
  if FLAGS.depth < 1:
    raise errors.ConfigError(f'--depth={FLAGS.depth}; use 1 or more.')
  from seg_jax import validate  # pylint: disable=g-import-not-at-top
  validate.check_config(FLAGS.config, training=False)
  table, total, gflops = summarize(FLAGS.config, FLAGS.depth)
  print(table)
  print(f'params={total} gflops={gflops:.3f}')


if __name__ == '__main__':
  cli.run(main)
