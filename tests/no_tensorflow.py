"""Runs a module as if TensorFlow were not installed.

Usage: python tests/no_tensorflow.py -m some.module [args...]
   or: python tests/no_tensorflow.py path/to/script.py [args...]

Every import finder in `sys.meta_path` is wrapped so that it finds no
`tensorflow` or `tensorflow.*`: imports fail with ModuleNotFoundError and
`importlib.util.find_spec('tensorflow')` is None, which is what
tensorflow_datasets and etils check. Nothing is put into `sys.modules`,
since libraries read `'tensorflow' in sys.modules` as "TensorFlow is loaded".

Limits: package metadata (`importlib.metadata.version('tensorflow')`) still
sees the installed distribution, finders added to `sys.meta_path` later are
not wrapped, and spawned child processes start without the hiding.
"""

import os
import runpy
import sys

HIDDEN = 'tensorflow'


def is_hidden(name):
  """Whether the module `name` is hidden: tensorflow or a submodule."""
  return name == HIDDEN or name.startswith(HIDDEN + '.')


class _HidingFinder:
  """Wraps one meta-path finder; finds nothing that `is_hidden`."""

  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    if is_hidden(name):
      return None
    find_spec = getattr(self.finder, 'find_spec', None)
    return find_spec(name, path, target) if find_spec else None

  def __getattr__(self, attr):  # invalidate_caches and the like
    return getattr(self.finder, attr)

  # Code that later removes its own finder (pytest's assertion hook) looks
  # for it with `in` / `remove`, so the wrapper compares equal to it.
  def __eq__(self, other):
    return other is self or other is self.finder

  def __hash__(self):
    return id(self.finder)


def hide_tensorflow():
  """Makes tensorflow look not installed to every later import.

  Returns:
    A function that undoes the hiding.

  Raises:
    RuntimeError: tensorflow is already imported, so it cannot be hidden.
  """
  loaded = sorted(m for m in sys.modules if is_hidden(m))
  if loaded:
    raise RuntimeError(f'already imported, cannot hide: {loaded[:3]}')
  sys.meta_path[:] = [f if isinstance(f, _HidingFinder) else _HidingFinder(f)
                      for f in sys.meta_path]

  def restore():
    sys.meta_path[:] = [f.finder if isinstance(f, _HidingFinder) else f
                        for f in sys.meta_path]
  return restore


def main(argv):
  """Runs `-m module args...` or `script args...` with tensorflow hidden."""
  if len(argv) < 2 or (argv[1] == '-m' and len(argv) < 3):
    sys.exit(__doc__)
  hide_tensorflow()
  if argv[1] == '-m':
    # As `python -m` does: the working directory first on the path, not
    # this file's folder.
    sys.path[0] = os.getcwd()
    sys.argv = argv[2:]
    runpy.run_module(argv[2], run_name='__main__', alter_sys=True)
  else:
    sys.path[0] = os.path.dirname(os.path.abspath(argv[1]))
    sys.argv = argv[1:]
    runpy.run_path(argv[1], run_name='__main__')


if __name__ == '__main__':
  main(sys.argv)
