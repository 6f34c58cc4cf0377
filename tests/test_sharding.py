"""A train step sharded 8 ways equals the same step on one device."""

import jax
import numpy as np
import pytest

from seg_jax import optim, sharding, state, steps
from seg_jax.data import pipeline
from seg_jax.models import layers
from seg_jax import data


def _one_step(config, devices):
  mesh = sharding.create_mesh((-1,), ('data',), devices=devices)
  model = state.create_model(config)
  tx = optim.create_optimizer(config.train)
  train_state = state.create_train_state(model, tx, jax.random.key(0),
                                         (1, 32, 32, 3), mesh)
  ds = pipeline.create_train_dataset(
      data.create_source(config, 'train'), pipeline.train_transform(config),
      seed=0, batch_size=config.train.global_batch_size, num_threads=1)
  batch = next(iter(ds))
  step = steps.make_train_step(model, tx, config, mesh)
  new_state, metrics = step(train_state, sharding.to_global(batch, mesh),
                            jax.random.key(1))
  return jax.device_get(new_state), float(metrics.loss.compute()), mesh


def test_mesh_uses_all_eight_devices(tiny_config):
  assert jax.device_count() == 8
  mesh = sharding.create_mesh(tiny_config.mesh.shape, tiny_config.mesh.axes)
  assert mesh.shape == {'data': 8}


@pytest.mark.parametrize('width, winograd', [(4, False), (8, True)])
def test_sharded_step_matches_single_device(tiny_config, width, winograd,
                                            monkeypatch):
  """With `winograd`, the 3x3 convolutions run as Winograd's F(2x2, 3x3)
  (in a train step from `WINOGRAD_MIN_TRAIN_CHANNELS`, here lowered to
  the model's width), whose products merge the batch (split over the
  devices) with the tiles."""
  tiny_config.train.learning_rate = 0.05  # a visible update
  tiny_config.model.kwargs.width = width
  if winograd:
    monkeypatch.setattr(layers, 'WINOGRAD_MIN_TRAIN_CHANNELS', width)
  calls = []
  real = layers.winograd_conv
  monkeypatch.setattr(layers, 'winograd_conv',
                      lambda *a: calls.append(1) or real(*a))
  one, loss1, _ = _one_step(tiny_config, jax.devices()[:1])
  eight, loss8, mesh8 = _one_step(tiny_config, jax.devices())
  assert mesh8.shape == {'data': 8}
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  leaves1 = jax.tree_util.tree_leaves_with_path(one)
  leaves8 = jax.tree.leaves(eight)
  assert len(leaves1) == len(leaves8)
  stats = [p for p, _ in leaves1 if 'batch_stats' in jax.tree_util.keystr(p)]
  assert len(stats) > 0  # BatchNorm running statistics are compared too
  for (path, a), b in zip(leaves1, leaves8):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  assert bool(calls) == winograd


def test_batch_is_split_over_data_axis(tiny_config):
  mesh = sharding.create_mesh((-1,), ('data',))
  batch = {'image': np.zeros((8, 4, 4, 3), np.uint8)}
  arr = sharding.to_global(batch, mesh)['image']
  assert arr.shape == (8, 4, 4, 3)
  assert {s.data.shape for s in arr.addressable_shards} == {(1, 4, 4, 3)}


def test_a_mesh_of_fewer_devices_is_said_once(caplog, monkeypatch):
  """A mesh that leaves devices unused says so once, however many times
  the config is checked."""
  monkeypatch.setattr(sharding, '_WARNED', set())
  with caplog.at_level('WARNING'):
    for _ in range(3):
      assert sharding.create_mesh((3,), ('data',)).shape == {'data': 3}
  assert caplog.text.count('mesh.shape=(3,) uses 3 of the 8 devices.') == 1


@pytest.mark.parametrize('shape,axes,msg', [
    ((16,), ('data',), 'needs 16 devices'),
    ((3, -1), ('data', 'fsdp'), 'do not split into groups of 3'),
    ((-1, -1), ('data', 'fsdp'), 'at most one entry'),
    ((-1,), ('batch',), "include 'data'"),
    ((2, 4), ('data', 'model'), "one of \\('data', 'fsdp'\\)"),
    ((0,), ('data',), 'must be positive'),
])
def test_bad_mesh_config_errors(shape, axes, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.create_mesh(shape, axes)


def test_a_mesh_too_large_names_the_way_out_and_inference_takes_its_devices(
    tiny_config, caplog):
  """A run trained on a (2, 8) mesh, evaluated on these 8 devices: the
  error says how to give a mesh that fits; inference takes every device on
  the data axis instead (checkpoints restore onto any mesh)."""
  with pytest.raises(sharding.DeviceCountError, match=(
      r"^mesh.shape=\(2, 8\) needs 16 devices but 8 are available: give a "
      r"mesh of these, e.g. --config.mesh.shape='\(-1,\)' "
      r'--config.mesh.axes="\(\'data\',\)"')):
    sharding.create_mesh((2, 8), ('data', 'fsdp'))
  tiny_config.mesh.shape, tiny_config.mesh.axes = (2, 8), ('data', 'fsdp')
  with caplog.at_level('WARNING'):
    mesh = sharding.inference_mesh(tiny_config)
  assert mesh.shape == {'data': 8}
  assert ('mesh.shape=(2, 8) does not fit the 8 devices here: every device '
          'on the data axis instead.') in caplog.text
  tiny_config.mesh.shape, tiny_config.mesh.axes = (4, 2), ('data', 'fsdp')
  assert sharding.inference_mesh(tiny_config).shape == {'data': 4, 'fsdp': 2}


def test_batch_not_divisible_errors():
  mesh = sharding.create_mesh((-1,), ('data',))
  with pytest.raises(ValueError, match='train.global_batch_size=12'):
    sharding.check_batch_size(12, mesh)
