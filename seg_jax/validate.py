"""Config checks run before any work: each problem is one line naming the
key, its value and what to do (`ConfigError`), and the CLIs print it without
a traceback."""

import os
import tempfile

# The error classes live in the leaf module `errors`; re-exported here.
from seg_jax.errors import (ConfigError, MissingFileError, NonFiniteError,  # noqa: F401
                            UserError)


def _positive_int(config, key, minimum=1):
  value = config
  for part in key.split('.'):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'{key}={value!r}: give an integer >= {minimum}.')
  return value


def _pair(value, key):
  value = (value, value) if isinstance(value, int) else tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                and v > 0 for v in value):
    raise ConfigError(f'{key}={value!r}: give (height, width) in pixels.')
  return value


def _check_numbers(c):
  for key in ('train.num_steps', 'train.global_batch_size',
              'train.log_every_steps', 'eval.global_batch_size',
              'eval.every_steps', 'checkpoint.every_steps',
              'checkpoint.max_to_keep', 'model.num_classes'):
    _positive_int(c, key)
  _positive_int(c, 'train.warmup_steps', 0)
  _positive_int(c, 'data.worker_count', 0)
  _positive_int(c, 'data.num_threads')
  if not c.train.learning_rate > 0:
    raise ConfigError(f'train.learning_rate={c.train.learning_rate!r}: give a '
                      'positive rate.')
  if c.train.warmup_steps >= c.train.num_steps:
    raise ConfigError(f'train.warmup_steps={c.train.warmup_steps} is not '
                      f'below train.num_steps={c.train.num_steps}.')
  for key in ('weight_decay', 'aux_loss_weight', 'grad_clip_norm'):
    if c.train[key] < 0:
      raise ConfigError(f'train.{key}={c.train[key]!r}: give a value >= 0.')
  if not 0 <= c.train.momentum < 1:
    raise ConfigError(f'train.momentum={c.train.momentum!r}: give a value in '
                      '[0, 1).')


def _check_loss(c):
  from seg_jax import losses  # pylint: disable=g-import-not-at-top
  for name in losses.NAMES:
    if c.train.loss[name] < 0:
      raise ConfigError(f'train.loss.{name}={c.train.loss[name]!r}: give a '
                        'weight >= 0 (0 turns it off).')
  if not losses.loss_weights(c):
    raise ConfigError('train.loss: every weight is 0; turn one on, e.g. '
                      '--config.train.loss.cross_entropy=1.')
  binary = [n for n in losses.BINARY if c.train.loss[n]]
  if binary and c.model.num_classes != 2:
    raise ConfigError(
        f'train.loss.{binary[0]} needs model.num_classes=2 (background 0, '
        f'foreground 1), not {c.model.num_classes}; use dice or '
        'cross_entropy for more classes.')
  for key in ('label_smoothing', 'ema_decay'):
    if not 0 <= c.train[key] < 1:
      raise ConfigError(f'train.{key}={c.train[key]!r}: give a value in '
                        '[0, 1).')
  if c.train.focal_gamma < 0:
    raise ConfigError(f'train.focal_gamma={c.train.focal_gamma!r}: give a '
                      'value >= 0.')


def _check_data(c):
  from seg_jax import labels  # pylint: disable=g-import-not-at-top
  labels.ignore_label(c)  # outside the class ids, within uint8
  if not isinstance(c.data.mask_suffix, str) or '/' in c.data.mask_suffix:
    raise ConfigError(f'data.mask_suffix={c.data.mask_suffix!r}: give what a '
                      "mask's file name adds to its image's, e.g. '_mask'.")
  crop = _pair(c.data.crop_size, 'data.crop_size')
  if c.data.eval_pad_size not in ((), None):
    pad = _pair(c.data.eval_pad_size, 'data.eval_pad_size')
    if pad[0] < crop[0] or pad[1] < crop[1]:
      raise ConfigError(
          f'data.crop_size={crop} is larger than data.eval_pad_size={pad}: '
          'evaluation pads images to at least the crop size; raise '
          'data.eval_pad_size or lower data.crop_size.')
  lo, hi = tuple(c.data.scale_range)
  if not 0 < lo <= hi:
    raise ConfigError(f'data.scale_range={tuple(c.data.scale_range)}: give '
                      '0 < low <= high.')
  if not 0 < c.data.cat_max_ratio <= 1:
    raise ConfigError(f'data.cat_max_ratio={c.data.cat_max_ratio!r}: give a '
                      'value in (0, 1].')
  if c.data.label_map:
    if c.data.name != 'folder':
      raise ConfigError(
          f'data.label_map is read by the folder source only, not '
          f'data.name={c.data.name!r} (its mask values are fixed); remove it.')
    from seg_jax.data import sources  # pylint: disable=g-import-not-at-top
    sources.folder_table(c.model.num_classes, c.data.ignore_label,
                         dict(c.data.label_map))
  if len(c.data.mean) != 3 or len(c.data.std) != 3 or min(c.data.std) <= 0:
    raise ConfigError(f'data.mean={tuple(c.data.mean)} / data.std='
                      f'{tuple(c.data.std)}: give 3 values each, std > 0.')


def _check_names(c):
  """Model, dataset, optimizer, schedule, precision and evaluators: built
  (cheaply) by the code that uses them, whose errors name the key."""
  from seg_jax import checkpoint, data, evaluators, optim, state  # pylint: disable=g-import-not-at-top
  if c.data.name not in data.DATASETS:
    raise ConfigError(f'Unknown data.name={c.data.name!r}; choose one of '
                      f'{sorted(data.DATASETS)}.')
  data.class_info(c)  # num_classes against the dataset's class list
  state.create_model(c)  # model.name, model.kwargs, train.precision
  optim.create_optimizer(c.train)
  optim.create_learning_rate_fn(c.train)
  checkpoint.check_on_corrupt(c.checkpoint.on_corrupt)
  for name in c.eval.in_training:
    evaluators.spec_from_config(c, name)
  weights = tuple(c.train.class_weights)
  if weights and len(weights) != c.model.num_classes:
    raise ConfigError(f'train.class_weights has {len(weights)} entries; '
                      f'model.num_classes={c.model.num_classes}.')


def _check_mesh(c):
  from seg_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh(c.mesh.shape, c.mesh.axes)
  sharding.check_batch_size(c.train.global_batch_size, mesh)
  sharding.check_batch_size(c.eval.global_batch_size, mesh,
                            'eval.global_batch_size')
  _positive_int(c, 'mesh.fsdp_min_size', 0)


def check_workdir(workdir):
  """Creates `workdir` if needed; raises unless files can be written there."""
  if not workdir:
    raise ConfigError('--workdir is empty: name a folder for checkpoints and '
                      'logs.')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f'--workdir={workdir} is not writable ({e.strerror}): '
                      'choose a folder you can write to.') from None


def check_config(config, workdir=None):
  """Raises `ConfigError` for the first problem with `config` (and, if
  given, `workdir`): before any data is read or anything is compiled."""
  try:
    _check_numbers(config)
    _check_loss(config)
    _check_data(config)
    _check_names(config)
    _check_mesh(config)
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as e:
    raise ConfigError(str(e).strip('"\'')) from None
  if workdir is not None:
    check_workdir(workdir)
