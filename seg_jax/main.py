"""Entry point: `python -m seg_jax.main --config=configs/x.py --workdir=DIR`.

Multi-host jobs call `jax.distributed.initialize()` first; on one machine
nothing is needed.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from seg_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file (a configs/*.py).',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints and logs; a '
                    'workdir with checkpoints is resumed.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                  '(multi-host; coordinator and ranks come from the '
                  'environment: Slurm, TPU VM, or JAX_COORDINATOR_ADDRESS...).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_library_logs()
  if FLAGS.distributed:
    jax.distributed.initialize()
  from seg_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  os.makedirs(FLAGS.workdir, exist_ok=True)
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(f"Finished: step={result['step']} " + ' '.join(
      f'{k}={result[k]:.4f}' for k in ('loss', 'pixel_accuracy',
                                       'mean_accuracy', 'miou')
      if k in result).replace('miou=', 'mIoU='), flush=True)


if __name__ == '__main__':
  cli.run(main)
