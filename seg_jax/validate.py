"""The one entry point of config checks: each subsystem's own check, in order.

Run before any data is read or anything is compiled. Each subsystem checks
its own section next to the code that uses it (`optim`, `losses`, `state`
for the model, `data`, `checkpoint`, `evaluators`, `sharding`); this module
only calls them, and checks the two keys of the training loop itself (which
sits above it). Each problem is one line naming the key, its value and what
to do (`errors.ConfigError`); the CLIs print it without a traceback.
"""

import os
import tempfile

from seg_jax import (checkpoint, data, errors, evaluators, losses, optim,
                     sharding, state)
from seg_jax import workdir as run_folder

# The checks, in the order they run: the first problem is the one reported.
CHECKS = (optim.check_config, losses.check_config, state.check_config,
          data.check_config, checkpoint.check_config,
          evaluators.check_config, sharding.check_config)


def _check_loop(config):
  """The training loop's own keys (train.py is above this module)."""
  errors.config_int(config, 'train.log_every_steps')
  if not isinstance(config.train.skip_nonfinite, bool):
    raise errors.ConfigError(
        f'train.skip_nonfinite={config.train.skip_nonfinite!r}: give True or '
        'False.')


def check_workdir(workdir):
  """Creates `workdir` if needed; raises unless files can be written there."""
  if not workdir:
    raise errors.ConfigError('--workdir is empty: name a folder for '
                             'checkpoints and logs.')
  if os.path.isfile(workdir):
    raise errors.ConfigError(f'--workdir={workdir} is a file, not a folder: '
                             'name a folder for checkpoints and logs.')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise errors.ConfigError(f'--workdir={workdir} is not writable '
                             f'({e.strerror}): choose a folder you can write '
                             'to.') from None


def check_config(config, workdir=None, training=True):
  """Raises `errors.ConfigError` for the first problem with `config` (and,
  if given, `workdir`): before any data is read or anything is compiled.
  Without `training` (an evaluation), the training loop's keys are not
  checked."""
  try:
    if training:
      _check_loop(config)
      sharding.check_train_batch(config)  # first, as the other batch sizes
    for check in CHECKS:
      check(config)
    # Starting weights are read by a new run only: a resume or an
    # evaluation does not need them (nor that they still exist).
    if training and not (workdir and run_folder.has_checkpoints(workdir)):
      state.check_init_from(config)
  except errors.ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as e:
    raise errors.ConfigError(str(e).strip('"\'')) from None
  if workdir is not None:
    check_workdir(workdir)
