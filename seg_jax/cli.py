"""Command-line plumbing shared by seg_jax's CLIs (main, evaluate, ...)."""

import logging as pylogging
import sys

from absl import app, logging

_HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull')


class _QuietLibraries:
  """Keeps orbax's and grain's per-save INFO chatter out of the logs."""

  def filter(self, record):
    noisy = ('/orbax/' in record.pathname or '/grain/' in record.pathname)
    return record.levelno >= pylogging.WARNING or not noisy


def quiet_library_logs():
  """Filters library INFO lines out of absl's log handler."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


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
