"""Train a model: `python -m seg_jax.main --config=configs/x.py --workdir=DIR`.

Trains and evaluates as the config says, checkpointing into DIR; a DIR that
holds checkpoints is resumed (model and data stream), and then --config may
be left out: DIR/config.json, written by the first run, is read instead
(overrides such as --config.train.num_steps=N still apply). Ctrl-C or
SIGTERM finishes the step, saves and stops (exit status 130 or 143: the
run is not finished); a second one stops at once.

A job of several processes (launch/*.sh, Slurm, TPU VM slices) joins JAX's
distributed runtime first (`cli.init_distributed`); only process 0 writes
logs, summaries and the final line. One process needs nothing.
"""

# First: the host allocator's settings (before JAX is imported:
# seg_jax.host_memory), and Ctrl-C is clean from here on.
from seg_jax import host_memory, interrupt

if __name__ == '__main__':
  host_memory.configure()
if __name__ in ('__main__', '__mp_main__'):
  interrupt.install('training had not started, nothing needed saving')

# pylint: disable=g-import-not-at-top,wrong-import-position
import os
import signal

import jax
from absl import flags, logging

from seg_jax import cli, workdir as run_folder

FLAGS = flags.FLAGS
cli.define_run_flags('Training configuration file (a configs/*.py).',
                     'Folder for checkpoints, logs and the run\'s '
                     'config.json; a workdir with checkpoints is resumed.')


def _summary(result):
  """The last line printed: the first evaluator's scores (or, without a
  validation split, the last training-batch scores)."""
  if result.get('no_validation'):
    keys = (('loss', 'loss'), ('train_pixel_accuracy', 'pixel_accuracy'),
            ('train_mIoU', 'miou'))
    return (f"Finished: step={result['step']} " + ' '.join(
        f'{name}={result[k]:.4f}' for name, k in keys if k in result) +
            " (no validation split: data.val_split='')")
  return f"Finished: step={result['step']} " + ' '.join(
      f'{k}={result[k]:.4f}' for k in ('loss', 'pixel_accuracy',
                                       'mean_accuracy', 'miou')
      if k in result).replace('miou=', 'mIoU=')


def _remove_if_empty(workdir, existed):
  """A run folder this start created and left empty (it failed before
  writing anything) is removed, so a retry is not a resume of nothing."""
  if existed or jax.process_index() != 0:
    return
  try:
    os.rmdir(workdir)  # only if empty
  except OSError:
    pass


def _stop_status(result):
  """The exit status: 128 + the signal's number when a signal stopped the
  run (130 Ctrl-C, 143 SIGTERM), as when it stops before training starts,
  so `main ... && evaluate ...` does not go on with an unfinished run and a
  scheduler restarts a preempted one; None (0) when it finished."""
  stopped = result.get('stopped')
  return 128 + getattr(signal, stopped) if stopped else None


def main(argv):
  cli.start(argv, keys=run_folder.RESUME_KEYS)
  from seg_jax import train, validate
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  existed = os.path.isdir(FLAGS.workdir)
  validate.check_config(FLAGS.config, FLAGS.workdir)
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except Exception:
    _remove_if_empty(FLAGS.workdir, existed)
    raise
  status = _stop_status(result)
  if jax.process_index() != 0:
    return status
  if result.get('trained') is False:
    print(f"Stopped by {result['stopped']} before a step was trained; "
          f"checkpoints in {os.path.join(FLAGS.workdir, 'checkpoints')} are "
          'kept as they were.', flush=True)
    return status
  if result.get('stopped'):
    print(f"Stopped by {result['stopped']} at step {result['step']}: "
          f"checkpoint {result['step']} saved in "
          f"{os.path.join(FLAGS.workdir, 'checkpoints')}; run the same "
          'command to resume.', flush=True)
    return status
  print(_summary(result), flush=True)


if __name__ == '__main__':
  cli.run(main)
