"""Errors a user can cause and fix: the leaf module every layer may raise.

The CLIs print a `UserError` as one line, without a traceback, and exit with
its `exit_code`.
"""

import os


class UserError(Exception):
  """An error the user can fix; the CLIs print its one-line message (no
  traceback) and exit with `exit_code`."""
  exit_code = 1


class ConfigError(UserError, ValueError):
  """A config value, flag or checkpoint that cannot work with the others."""
  exit_code = 2


class MissingFileError(UserError, FileNotFoundError):
  """A dataset or checkpoint file or folder that a setting names is missing."""
  exit_code = 2


class NonFiniteError(UserError, RuntimeError):
  """Training met a NaN/Inf loss or gradient norm and stopped."""


class BadSampleError(UserError, ValueError):
  """A dataset file that cannot be used as it is; the message names it."""


class StepFailedError(UserError):
  """Training stopped on an error after steps were trained; the message
  says which checkpoint keeps them."""


def user_error(error):
  """The `UserError` that `error` is or was caused by, or None (grain's
  reader threads re-raise a record's error inside their own)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, UserError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def not_a_folder(path):
  """Why `path`, which is no folder, is not one: for a one-line error."""
  return 'is a file, not a folder' if os.path.isfile(path) else (
      'does not exist')


def out_of_memory(error):
  """Whether `error` (a JAX runtime error) is an allocation that failed."""
  return 'RESOURCE_EXHAUSTED' in str(error)


def config_int(config, key, minimum=1):
  """The integer at `key` ('a.b') of `config`; ConfigError naming the key
  unless it is an int >= `minimum`."""
  value = config
  for part in key.split('.'):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'{key}={value!r}: give an integer >= {minimum}.')
  return value
