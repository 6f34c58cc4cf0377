"""Device mesh and the shardings of batches and state.

The batch is split over every batch axis of the mesh ('data', and 'fsdp'
when present). Train state is replicated, except along an 'fsdp' axis:
there each parameter and optimizer-state array of at least
`mesh.fsdp_min_size` elements is split along its largest dimension that the
axis divides (fully sharded data parallelism; XLA gathers the parameters
where a step needs them). Every place that needs to know how arrays are laid
out asks this file.
"""

import math

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seg_jax import errors

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
AXES = (DATA_AXIS, FSDP_AXIS)
FSDP_MIN_SIZE = 1024  # smaller arrays stay replicated: gathering costs more


# (mesh shape, device count) pairs already said to leave devices unused.
_WARNED = set()


class DeviceCountError(ValueError):
  """A mesh that the devices at hand cannot hold."""


def inference_mesh(config, warn=True):
  """The config's mesh, or, where this job's devices cannot hold it (a run
  trained on more devices, evaluated here), every device on the data axis
  (saying so, with `warn`): inference needs no particular mesh, and
  checkpoints restore onto any."""
  try:
    return create_mesh(config.mesh.shape, config.mesh.axes)
  except DeviceCountError:
    if warn:
      logging.warning('mesh.shape=%s does not fit the %d devices here: every '
                      'device on the data axis instead.',
                      tuple(config.mesh.shape), jax.device_count())
    return create_mesh()


def create_mesh(shape=(-1,), axes=(DATA_AXIS,), devices=None):
  """Builds a device mesh.

  Args:
    shape: mesh shape; one entry may be -1 (all remaining devices).
    axes: axis names, one per entry of `shape`: 'data', and optionally
      'fsdp'.
    devices: devices to use (default: all devices of all processes). A
      single-process run may name a mesh smaller than that: it then uses the
      first devices (e.g. `mesh.shape=(1,)` for one device).

  Returns:
    `jax.sharding.Mesh`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape, axes = tuple(shape), tuple(axes)
  if len(shape) != len(axes) or DATA_AXIS not in axes:
    raise ValueError(f'mesh.shape={shape} and mesh.axes={axes} must have equal '
                     f"length and include '{DATA_AXIS}'.")
  unknown = [a for a in axes if a not in AXES]
  if unknown or len(set(axes)) != len(axes):
    raise ValueError(f'mesh.axes={axes}: each axis must be one of {AXES}, '
                     'named once.')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh.shape={shape}: at most one entry may be -1.')
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh.shape={shape}: sizes must be positive (or -1).')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise DeviceCountError(f'mesh.shape={shape}: {len(devices)} devices do '
                             f'not split into groups of {known}.')
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  n = math.prod(shape)
  if n > len(devices) or (n < len(devices) and jax.process_count() > 1):
    raise DeviceCountError(
        f'mesh.shape={shape} needs {n} devices but {len(devices)} are '
        "available: give a mesh of these, e.g. --config.mesh.shape='(-1,)' "
        "--config.mesh.axes=\"('data',)\" (every device on the data axis; "
        'checkpoints restore onto any mesh).')
  if n < len(devices) and (shape, len(devices)) not in _WARNED:
    _WARNED.add((shape, len(devices)))  # once, not per check of the config
    logging.warning('mesh.shape=%s uses %d of the %d devices.', shape, n,
                    len(devices))
  return Mesh(np.asarray(devices[:n]).reshape(shape), axes)


def batch_axes(mesh):
  """The mesh axes the batch dimension is split over, in mesh order."""
  return tuple(a for a in mesh.axis_names if a in AXES)


def data_sharding(mesh):
  """Leading (batch) dimension split over the batch axes."""
  axes = batch_axes(mesh)
  return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def replicated(mesh):
  """Same full copy on every device."""
  return NamedSharding(mesh, P())


def data_parallel_size(mesh):
  """How many ways the batch is split: devices over all batch axes."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def fsdp_spec(shape, n, min_size=FSDP_MIN_SIZE):
  """PartitionSpec of an array of `shape` on an 'fsdp' axis of size n:
  split along its largest dimension that n divides (the last such on a tie),
  or replicated when it is small or nothing divides."""
  if n <= 1 or math.prod(shape) < max(min_size, 1):
    return P()
  candidates = [(d, i) for i, d in enumerate(shape) if d % n == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + [FSDP_AXIS]))


def state_shardings(tree, mesh, min_size=FSDP_MIN_SIZE):
  """`NamedSharding`s for every leaf of a train-state pytree (arrays or
  `jax.ShapeDtypeStruct`s): replicated without an 'fsdp' axis, else as
  `fsdp_spec` says."""
  n = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, min_size)),
      tree)


def to_global(batch, mesh):
  """Places this process's part of a batch onto the mesh as global arrays.

  Args:
    batch: pytree of numpy arrays with leading dim = per-process batch size.
    mesh: the device mesh.

  Returns:
    Pytree of `jax.Array` with leading dim = global batch size, split over
    the batch axes.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_config(config):
  """The mesh section and the evaluation batch it splits (see
  `seg_jax.validate`; the training batch: `check_train_batch`)."""
  errors.config_int(config, 'eval.global_batch_size')
  errors.config_int(config, 'mesh.fsdp_min_size', 0)
  # The mesh evaluation runs on (training checks its own first).
  check_batch_size(config.eval.global_batch_size,
                   inference_mesh(config, warn=False), 'eval.global_batch_size')


def check_train_batch(config):
  """train.global_batch_size splits over the mesh (training only: an
  evaluation of the run on another device count does not use it)."""
  errors.config_int(config, 'train.global_batch_size')
  check_batch_size(config.train.global_batch_size,
                   create_mesh(config.mesh.shape, config.mesh.axes))


def batch_unit(mesh):
  """The least global batch that splits evenly over the processes and the
  mesh's batch axes: every global batch is a multiple of it."""
  return math.lcm(data_parallel_size(mesh), jax.process_count())


def check_batch_size(global_batch_size, mesh, key='train.global_batch_size'):
  """Raises unless the batch splits evenly over processes and the batch
  axes; returns the per-process batch size."""
  n_data = data_parallel_size(mesh)
  n_proc = jax.process_count()
  if global_batch_size % batch_unit(mesh):
    axes = ' x '.join(f'{a}={mesh.shape[a]}' for a in batch_axes(mesh))
    raise ValueError(f'{key}={global_batch_size} must be divisible by the '
                     f'{n_data} devices the batch is split over ({axes}) and '
                     f'by the {n_proc} processes; use a multiple of '
                     f'{batch_unit(mesh)}.')
  return global_batch_size // n_proc
