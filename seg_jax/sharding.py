"""Device mesh and the shardings of batches and state.

The batch is split along the mesh's 'data' axis; train state is replicated.
Every place that needs to know how arrays are laid out asks this file.
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(shape=(-1,), axes=(DATA_AXIS,), devices=None):
  """Builds a device mesh.

  Args:
    shape: mesh shape; one entry may be -1 (all remaining devices).
    axes: axis names, one per entry of `shape`; must include 'data'.
    devices: devices to use (default: all devices of all processes).

  Returns:
    `jax.sharding.Mesh`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape, axes = tuple(shape), tuple(axes)
  if len(shape) != len(axes) or DATA_AXIS not in axes:
    raise ValueError(f'mesh.shape={shape} and mesh.axes={axes} must have equal '
                     f"length and include '{DATA_AXIS}'.")
  if shape.count(-1) > 1:
    raise ValueError(f'mesh.shape={shape}: at most one entry may be -1.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f'mesh.shape={shape} needs {math.prod(shape)} devices but '
                     f'{len(devices)} are available.')
  return Mesh(np.asarray(devices).reshape(shape), axes)


def data_sharding(mesh):
  """Leading (batch) dimension split over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
  """Same full copy on every device."""
  return NamedSharding(mesh, P())


def data_parallel_size(mesh):
  return mesh.shape[DATA_AXIS]


def to_global(batch, mesh):
  """Places this process's part of a batch onto the mesh as global arrays.

  Args:
    batch: pytree of numpy arrays with leading dim = per-process batch size.
    mesh: the device mesh.

  Returns:
    Pytree of `jax.Array` with leading dim = global batch size, sharded
    along 'data'.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_batch_size(global_batch_size, mesh, key='train.global_batch_size'):
  """Raises unless the batch splits evenly over processes and the data axis."""
  n_data = data_parallel_size(mesh)
  n_proc = jax.process_count()
  if global_batch_size % n_data or global_batch_size % n_proc:
    raise ValueError(f'{key}={global_batch_size} must be divisible by the '
                     f"{n_data} devices of the mesh's data axis and by the "
                     f'{n_proc} processes.')
  return global_batch_size // n_proc
