"""A training run's folder and the config it remembers.

    DIR/config.json    the run's resolved config: every key, with what the
                       data decided (eval pad size, class names, palette)
    DIR/checkpoints/   orbax steps (seg_jax.checkpoint)
    DIR/eval/          evaluation reports (seg_jax.evaluate)

`main` writes `config.json` before the first step (and again when a resume
changes a setting); `evaluate`, `predict`, `export` and a resumed `main`
read it when `--config` is not given, with `--config.a.b=value` overrides
still applied. This file is also an ml_collections config file:
`--config=seg_jax/workdir.py:DIR` (or `:DIR/config.json`) loads it, which
is how the CLIs pass a stored config to their `--config` flag.

A run training in DIR holds `DIR/.lock` (`lock`): a second run started on
the same folder is refused instead of writing beside it.

Imports only the standard library, ml_collections and seg_jax.errors.
"""

import contextlib
import json
import os
import socket

import ml_collections

from seg_jax import errors

try:
  import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:  # pragma: no cover
  fcntl = None

CONFIG_FILE = 'config.json'

# Keys whose values a checkpoint's model variables depend on: a config
# that differs in one of them cannot run its model.
INFERENCE_KEYS = ('model.name', 'model.num_classes', 'model.kwargs',
                  'data.channels')
# ... and its whole train state (with a weight average or not).
MODEL_KEYS = INFERENCE_KEYS + ('train.ema_decay',)
# ... and what a resumed data stream and optimizer state depend on too
# (gradient clipping on or off: the optimizer state's layout).
RESUME_KEYS = MODEL_KEYS + ('seed', 'train.global_batch_size',
                            'train.optimizer', 'train.grad_clip_norm')

# Keys (prefixes) that decide which examples the training stream reads:
# a resume may change them, and is told that its stored data position then
# continues in other data.
DATA_SOURCE_KEYS = ('data.name', 'data.root', 'data.train_split',
                    'data.mask_suffix', 'data.label_map', 'data.shapes.',
                    'data.tfds.name', 'data.tfds.data_dir',
                    'data.tfds.image_key', 'data.tfds.label_key',
                    'data.tfds.label_offset', 'data.tfds.ignore_values')


LOCK_FILE = '.lock'


@contextlib.contextmanager
def lock(workdir):
  """Holds an exclusive lock on `workdir/.lock` while a run trains there:
  another run started on the same folder meanwhile (on this machine, or on
  a shared file system that supports locks) is refused with a
  `ConfigError` naming the holder, instead of writing checkpoints and
  event files beside the first. The kernel releases the lock when the
  process ends, however it ends: no stale lock survives a crash. The lock
  file of a folder that holds nothing else when the run ends (a start
  refused before anything was written) is removed, so `main` leaves no
  folder behind."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  with open(path, 'a+') as f:
    if fcntl is not None:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        raise errors.ConfigError(
            f'Another run is training in {workdir} ({holder}, holding '
            f'{path}): wait for it to end or stop it, or give another '
            '--workdir.') from None
      except OSError:  # a file system without locks: not locked
        pass
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    try:
      yield
    finally:  # still held: no other run can be using the file
      if os.listdir(workdir) == [LOCK_FILE]:
        os.remove(path)


def config_path(workdir):
  return os.path.join(workdir, CONFIG_FILE)


def enclosing_run(path):
  """The run folder whose checkpoints/ `path` is in (the folder itself or
  a step of it), or None."""
  path = os.path.abspath(path)
  while os.path.dirname(path) != path:
    parent = os.path.dirname(path)
    if (os.path.basename(path) == 'checkpoints' and
        os.path.isfile(config_path(parent))):
      return parent
    path = parent
  return None


def checkpoint_dir(workdir):
  return os.path.join(workdir, 'checkpoints')


def weights_source(path):
  """(checkpoint folder, step, run folder) that `path` names as weights to
  start from: a run folder or its `checkpoints/` (the latest step), or
  `checkpoints/<step>` (that step, which the restore checks exists); None
  when it is none of them."""
  path = os.path.abspath(path)
  if os.path.isdir(checkpoint_dir(path)):
    return checkpoint_dir(path), 'latest', path
  if os.path.basename(path) == 'checkpoints' and os.path.isdir(path):
    return path, 'latest', os.path.dirname(path)
  parent, step = os.path.split(path)
  if (os.path.basename(parent) == 'checkpoints' and step.isdigit() and
      os.path.isdir(parent)):
    return parent, int(step), os.path.dirname(parent)
  return None


def has_checkpoints(workdir):
  """Whether `workdir/checkpoints` holds a finished step folder."""
  folder = checkpoint_dir(workdir)
  return os.path.isdir(folder) and any(d.isdigit()
                                       for d in os.listdir(folder))


def _plain(value):
  """A config value as JSON data (tuples as lists, numpy as Python)."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {str(k): _plain(v) for k, v in dict(value).items()}
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if hasattr(value, 'tolist'):
    return value.tolist()
  return value


def _tuples(value):
  """JSON data back as config values: lists become tuples."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def write_config(workdir, config):
  """Writes `config` to `workdir/config.json` (atomically)."""
  os.makedirs(workdir, exist_ok=True)
  path = config_path(workdir)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(_plain(config.to_dict()), f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)
  return path


def read_config(path):
  """The ConfigDict stored at `path` (a run folder or its config.json)."""
  if os.path.isdir(path):
    path = config_path(path)
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def get_config(path):
  """ml_collections' config-file entry point: `--config=THIS_FILE:DIR`."""
  return read_config(path)


def loader_argument(path):
  """The `--config` value that loads the config stored at `path`."""
  return f'{os.path.abspath(__file__)}:{path}'


def _get(config, key):
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return None
    node = node[part]
  return node


def _leaves(key, value):
  """{'a.b.c': leaf} of a config value (a dict's leaves under `key`)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, dict) and value:
    out = {}
    for k, v in value.items():
      out.update(_leaves(f'{key}.{k}', v))
    return out
  return {key: value}


def _comparable(key, value):
  # On or off is what the state's layout depends on: an average kept or
  # not, the optimizer chain with clipping or without (its value may
  # change).
  if key in ('train.ema_decay', 'train.grad_clip_norm'):
    return value is not None and value > 0
  if key == 'data.channels' and value is None:  # runs from before the key
    value = 3
  return json.dumps(_plain(value), sort_keys=True)


def differences(stored, config, keys):
  """[(key, stored value, config's value)] of `keys` that differ; a key
  holding a dict (model.kwargs) is compared leaf by leaf."""
  found = []
  for key in keys:
    old, new = _leaves(key, _get(stored, key)), _leaves(key, _get(config, key))
    for leaf in sorted(set(old) | set(new)):
      a, b = old.get(leaf), new.get(leaf)
      if _comparable(key, a) != _comparable(key, b):
        found.append((leaf, a, b))
  return found
