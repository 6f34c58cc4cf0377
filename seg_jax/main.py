"""Entry point: `python -m seg_jax.main --config=configs/x.py --workdir=DIR`.

A job of several processes (launch/*.sh, Slurm, TPU VM slices) joins JAX's
distributed runtime first (`cli.init_distributed`); only process 0 writes
logs, summaries and the final line. One process needs nothing.
"""

import os

import jax
from absl import flags, logging

from seg_jax import cli

FLAGS = flags.FLAGS
cli.define_run_flags('Training configuration file (a configs/*.py).',
                     'Folder for checkpoints and logs; a workdir with '
                     'checkpoints is resumed.')


def main(argv):
  cli.start(argv)
  from seg_jax import train, validate  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  validate.check_config(FLAGS.config, FLAGS.workdir)
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() != 0:
    return
  if result.get('stopped'):
    print(f"Stopped by {result['stopped']} at step {result['step']}: "
          f"checkpoint {result['step']} saved in "
          f"{os.path.join(FLAGS.workdir, 'checkpoints')}; run the same "
          'command to resume.', flush=True)
    return
  print(f"Finished: step={result['step']} " + ' '.join(
      f'{k}={result[k]:.4f}' for k in ('loss', 'pixel_accuracy',
                                       'mean_accuracy', 'miou')
      if k in result).replace('miou=', 'mIoU='), flush=True)


if __name__ == '__main__':
  cli.run(main)
