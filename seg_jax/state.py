"""The train state: what it holds, the model it is of, and how it is built
from a config (initialisation, pretrained weights)."""

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
from absl import logging

from seg_jax import errors, models, optim, sharding
from seg_jax import workdir as run_folder
from seg_jax.data import transforms


@flax.struct.dataclass
class TrainState:
  """Everything a resume needs besides the data iterator; a plain pytree.

  `ema` is the moving average of {'params', 'batch_stats'} when
  `train.ema_decay` > 0, else {}.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any = flax.struct.field(default_factory=dict)

  def variables(self):
    """The model's {'params', 'batch_stats'} (the trained, not averaged)."""
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def eval_variables(self):
    """The variables evaluation and inference use: the average if kept."""
    return self.ema or self.variables()


# What a setting a field's presence follows, for messages about states
# saved with other settings.
FIELD_SETTINGS = {'ema': 'train.ema_decay > 0 keeps it'}


def inference_fields(state):
  """The fields of a (possibly abstract) train state that inference reads,
  with 'step': the weight average when kept, else the model's variables."""
  return ('ema', 'step') if state.ema else ('params', 'batch_stats', 'step')


def inference_variables(fields):
  """{'params', 'batch_stats'} of the fields `inference_fields` named."""
  variables = fields['ema'] if 'ema' in fields else fields
  return {'params': variables['params'],
          'batch_stats': variables['batch_stats']}


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_config(config):
  """The model section's own check, with what the state depends on
  (train.precision, train.ema_decay); see `seg_jax.validate`."""
  num = config.model.num_classes
  if isinstance(num, bool) or not isinstance(num, int) or num < 2:
    raise errors.ConfigError(
        f'model.num_classes={num!r}: give an integer >= 2 (the model scores '
        'every class, background included: binary masks are 2 classes, '
        'with data.label_map={255: 1} for 0/255 ones).')
  if not 0 <= config.train.ema_decay < 1:
    raise errors.ConfigError(f'train.ema_decay={config.train.ema_decay!r}: '
                             'give a value in [0, 1).')
  create_model(config)  # model.name, model.kwargs, train.precision


def check_init_from(config):
  """`model.init_from` names weights a training start can read: a weights
  file with a known `model.init_format`, or a seg_jax run (see
  `workdir.weights_source`). Only a new run reads them (not a resume, not
  inference)."""
  path = config.model.init_from
  if path and run_folder.weights_source(path) is not None:
    return
  if path and os.path.isdir(path):
    raise errors.ConfigError(
        f'model.init_from={path!r} is a folder but not a seg_jax run (one '
        'holding checkpoints/) or one of its checkpoints/<step> folders; '
        'give a run, a step of one, or a weights file.')
  if path:
    from seg_jax.models import convert  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise errors.ConfigError(f'model.init_from={path!r}: no such file; give '
                               'a .pth or .safetensors weights file, or a '
                               'seg_jax run folder.')
    if config.model.init_format not in convert.SUPPORTED:
      raise errors.ConfigError(
          f'model.init_format={config.model.init_format!r}: use the '
          f'torchvision name of the weights, one of '
          f'{", ".join(convert.SUPPORTED)}.')


def create_model(config):
  """The model of `config.model`, computing in `config.train.precision`."""
  dtypes = DTYPES
  if config.train.precision not in dtypes:
    raise errors.ConfigError(f'train.precision={config.train.precision!r}; '
                             f'use one of {sorted(dtypes)}.')
  for key, where in (('num_classes', 'model.num_classes'),
                     ('dtype', 'train.precision')):
    if key in config.model.kwargs:
      raise errors.ConfigError(f'model.kwargs.{key}: not a model option; '
                               f'set {where} instead.')
  return models.create_model(config.model.name, config.model.num_classes,
                             dtype=dtypes[config.train.precision],
                             **config.model.kwargs)


def init_input_shape(config):
  """(1, H, W, C): the example input parameters are initialised with (C:
  `data.channels`)."""
  return (1, *transforms.pair(config.data.crop_size), config.data.channels)


def train_state_shapes(model, tx, input_shape, ema=False):
  """`jax.ShapeDtypeStruct`s of the train state; nothing is computed."""
  return jax.eval_shape(lambda: _state_of(
      model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32),
                 train=False), tx, ema))


def create_train_state(model, tx, rng, input_shape, mesh, init_fn=None,
                       fsdp_min_size=sharding.FSDP_MIN_SIZE, ema=False):
  """Initialises parameters and optimizer state, laid out on the mesh as
  `sharding.state_shardings` says (replicated, or split over 'fsdp').

  Args:
    model: the flax module.
    tx: the optax optimizer.
    rng: initialisation key.
    input_shape: (1, H, W, 3) example input shape.
    mesh: device mesh.
    init_fn: optional host function variables -> variables applied after
      initialisation (e.g. loading pretrained weights).
    fsdp_min_size: arrays smaller than this stay replicated on 'fsdp'.
    ema: keep a moving average of the variables (starting equal to them).
  """
  shardings = sharding.state_shardings(
      train_state_shapes(model, tx, input_shape, ema), mesh, fsdp_min_size)

  def init(rng):
    return model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)

  if init_fn is None:
    return jax.jit(lambda rng: _state_of(init(rng), tx, ema),
                   out_shardings=shardings)(rng)
  variables = init_fn(jax.device_get(
      jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)))
  return jax.jit(lambda v: _state_of(v, tx, ema), out_shardings=shardings)(
      variables)


def _state_of(variables, tx, ema=False):
  params = variables['params']
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables.get('batch_stats', {}),
                     opt_state=tx.init(params))
  return state.replace(ema=state.variables()) if ema else state


def pretrained_init_fn(config):
  """The `init_fn` loading the weights file `config.model.init_from`, or
  None (a run folder there is read by `checkpoint.initial_weights_fn`)."""
  path, fmt = config.model.init_from, config.model.init_format
  if not path or os.path.isdir(path):
    return None
  from seg_jax.models import convert, weights  # pylint: disable=g-import-not-at-top

  def init_fn(variables):
    try:
      tensors = weights.load_weights(path)
      pretrained = convert.from_torchvision(
          fmt, tensors,
          scan_blocks=config.model.kwargs.get('scan_blocks', False))
      # An RGB stem for another data.channels: adapted as timm does.
      pretrained = weights.adapt_stem(pretrained, variables,
                                      config.data.channels,
                                      f'model.init_from={path}')
      variables, n, skipped = convert.load_pretrained(
          variables, pretrained, f'model.init_from={path}')
    except (ValueError, OSError) as e:  # the file's, named in the message
      message = str(e)
      if 'model.init_from' not in message:
        message = (f'model.init_from={path} (model.init_format={fmt}): '
                   f'{message}')
      raise errors.ConfigError(message) from None
    logging.info('Loaded %d tensors from %s (%s); kept fresh: %s', n, path,
                 fmt, skipped or 'none')
    return variables

  return init_fn


def abstract_train_state(config, mesh):
  """Shapes, dtypes and shardings (`sharding.state_shardings`) of the train
  state of `config`, computed without initialising anything."""
  shapes = train_state_shapes(create_model(config),
                              optim.create_optimizer(config.train),
                              init_input_shape(config),
                              ema=config.train.ema_decay > 0)
  shardings = sharding.state_shardings(shapes, mesh,
                                       config.mesh.fsdp_min_size)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
