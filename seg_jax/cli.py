"""Command-line plumbing shared by seg_jax's CLIs (main, evaluate, ...)."""

import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull')


class _QuietLibraries:
  """Keeps orbax's and grain's per-save INFO chatter out of the logs."""

  def filter(self, record):
    noisy = ('/orbax/' in record.pathname or '/grain/' in record.pathname)
    return record.levelno >= pylogging.WARNING or not noisy


def quiet_library_logs():
  """Filters library INFO lines out of absl's log handler."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def define_run_flags(config_help, workdir_help):
  """--config (a configs/*.py, overridable), --workdir and --distributed:
  the flags of the CLIs that work on a training run's folder."""
  config_flags.DEFINE_config_file('config', None, config_help,
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                    '(multi-host; coordinator and ranks come from the '
                    'environment: Slurm, TPU VM, or '
                    'JAX_COORDINATOR_ADDRESS...).')
  flags.mark_flags_as_required(['config', 'workdir'])


def enable_compilation_cache(directory):
  """Keeps compiled XLA programs in `directory` ('' : off), so that a
  restart of the same config on the same machine loads its steps instead
  of compiling them again. `JAX_COMPILATION_CACHE_DIR`, when set, wins."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR') or not directory:
    return
  jax.config.update('jax_compilation_cache_dir',
                    os.path.expanduser(directory))
  # Cache every program that took a second or more to compile.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def start(argv):
  """Common start of a run-folder CLI: no stray arguments, quiet library
  logs, the compilation cache (`config.compilation_cache_dir`),
  `jax.distributed` when --distributed."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  enable_compilation_cache(flags.FLAGS.config.get('compilation_cache_dir',
                                                  ''))
  if flags.FLAGS.distributed:
    jax.distributed.initialize()


def run(main):
  """`absl.app.run(main)`, where `--help` (or `-h`) prints help and exits 0.

  absl exits with status 1 after printing help; asking for help is not an
  error.
  """
  sys.argv = ['--help' if a == '-h' else a for a in sys.argv]
  wants_help = any(a in _HELP_FLAGS for a in sys.argv[1:])
  try:
    app.run(main)
  except SystemExit as e:
    if wants_help and e.code == 1:
      sys.exit(0)
    raise
