"""Several processes and topologies: a 2-process job launched by
launch/local_multiprocess.sh equals one process on as many devices; FSDP
really shards the state and equals data parallelism; checkpoints restore
across device counts, mesh shapes and process counts; the launch scripts
lint clean."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from seg_jax import checkpoint, data, evaluate, train

import tb_events
from conftest import REPO

LAUNCH = os.path.join(REPO, 'launch')


def _config(tiny_config, num_steps=6, **mesh):
  c = tiny_config
  c.train.optimizer, c.train.learning_rate = 'sgd', 0.05  # no Adam noise
  c.train.num_steps, c.train.log_every_steps = num_steps, 1
  c.eval.every_steps = 6
  c.compilation_cache_dir = ''
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def _overrides(config):
  """Command-line overrides that turn configs/unet_shapes_tiny.py into
  `config` (the keys `_config` sets)."""
  return [f'--config.train.optimizer={config.train.optimizer}',
          f'--config.train.learning_rate={config.train.learning_rate}',
          f'--config.train.num_steps={config.train.num_steps}',
          '--config.train.log_every_steps=1', '--config.eval.every_steps=6',
          '--config.compilation_cache_dir=']


def _launch(n, args, devices_per_process=2):
  env = {**os.environ, 'PYTHON': sys.executable, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count='
                      f'{devices_per_process} '
                      '--xla_backend_optimization_level=0'}
  return subprocess.run([os.path.join(LAUNCH, 'local_multiprocess.sh'),
                         str(n), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_close_trees(a, b, rtol=2e-5, atol=1e-6):
  paths = jax.tree_util.tree_leaves_with_path(a)
  leaves = jax.tree.leaves(b)
  assert len(paths) == len(leaves) > 10
  for (path, x), y in zip(paths, leaves):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=rtol,
                               atol=atol, err_msg=jax.tree_util.keystr(path))


def _losses(workdir):
  scalars = tb_events.scalars_by_tag(tb_events.read_events(workdir))
  return dict(scalars['train/loss'])


def _run(config, workdir):
  trainer = train.Trainer(config, str(workdir))
  try:
    return trainer, trainer.run()
  finally:
    trainer.checkpointer.close()


def test_two_processes_equal_one_process_on_four_devices(tiny_config,
                                                         tmp_path):
  """2 processes x 2 CPU devices (gloo) against 1 process x 4 devices:
  same losses, parameters and evaluation (21 val examples: the eval batch
  of 8 does not divide them); only process 0 writes; the 2-process
  checkpoint resumes in one process with the stream re-split."""
  config = _config(tiny_config)
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  proc = _launch(2, ['--config=configs/unet_shapes_tiny.py',
                     f'--workdir={multi}', *_overrides(config)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count('Finished: step=6') == 1, proc.stdout
  assert 'JAX process 0 of 2; 2 local / 4 global devices.' in proc.stderr
  assert len(glob.glob(str(multi / 'events.out.tfevents.*'))) == 1
  assert sorted(glob.glob('process_*', root_dir=multi / 'checkpoints' / '6' /
                          'data_iter')) == ['process_0-of-2.json',
                                            'process_1-of-2.json']

  config.mesh.shape = (4,)
  _, result = _run(config, single)
  want, got = _losses(single), _losses(multi)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([got[s] for s in want], list(want.values()),
                             rtol=1e-5)
  _assert_close_trees(checkpoint.read_state(str(multi / 'checkpoints'), 6),
                      checkpoint.read_state(str(single / 'checkpoints'), 6))
  multi_eval = tb_events.scalars_by_tag(tb_events.read_events(multi))
  np.testing.assert_allclose(multi_eval['eval/miou'][6], result['miou'],
                             rtol=1e-5)

  # Evaluating the 2-process checkpoint with 2 processes counts every
  # example once: the same confusion matrix as one process.
  proc = _launch(2, ['seg_jax.evaluate', '--config=configs/unet_shapes_tiny.py',
                     f'--workdir={multi}', f'--out={tmp_path / "eval2"}',
                     *_overrides(config)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  [(one, _)] = evaluate.evaluate(config, str(multi),
                                 out=str(tmp_path / 'eval1'))
  with open(tmp_path / 'eval2' / 'val_whole_step6.json') as f:
    two = json.load(f)
  # Row sums are the label pixels of each class: a missing or repeated
  # example would change them. The loss depends on every logit.
  np.testing.assert_array_equal(np.asarray(two['confusion_matrix']),
                                one.confusion)
  source = data.create_source(config, 'val')
  assert len(source) == 21
  labels = np.concatenate([source[i]['label'].ravel() for i in range(21)])
  np.testing.assert_array_equal(one.confusion.sum(1),
                                np.bincount(labels[labels < 5], minlength=5))
  np.testing.assert_allclose(two['loss'], one.loss, rtol=1e-5)

  # Resume both runs in one process to step 9: the 2-process data position
  # is re-split, and the two stay equal.
  config.train.num_steps = 9
  _run(config, multi)
  _run(config, single)
  _assert_close_trees(checkpoint.read_state(str(multi / 'checkpoints'), 9),
                      checkpoint.read_state(str(single / 'checkpoints'), 9))
  assert checkpoint.read_data_iterator_state(str(multi / 'checkpoints'), 9) \
      == [{'position': 9, 'global_batch_size': 8, 'seed': 0,
           'process_count': 1}]


@pytest.fixture(scope='module')
def data8_run(tmp_path_factory):
  """6 steps on data=8 with checkpoints at 3 and 6: the reference."""
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('data8')
  _run(_config(unet_shapes_tiny.get_config()), workdir)
  return workdir


def _fsdp_config(tiny_config, num_steps=6):
  return _config(tiny_config, num_steps, shape=(2, 4), axes=('data', 'fsdp'),
                 fsdp_min_size=0)


def _bytes(tree, per_device):
  return sum(x.addressable_shards[0].data.nbytes if per_device else x.nbytes
             for x in jax.tree.leaves(tree))


def test_fsdp_shards_state_and_equals_data_parallel(tiny_config, tmp_path,
                                                    data8_run):
  trainer, _ = _run(_fsdp_config(tiny_config), tmp_path)
  for part in ('params', 'opt_state'):
    tree = getattr(trainer.state, part)
    ratio = _bytes(tree, True) / _bytes(tree, False)
    assert 0.24 < ratio < 0.3, (part, ratio)  # 1/4, plus the odd small leaf
  kernel = trainer.state.params['DoubleConv_2']['Conv_1']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None,
                                                          'fsdp')
  assert kernel.addressable_shards[0].data.shape == (3, 3, 16, 4)
  _assert_close_trees(checkpoint.read_state(str(tmp_path / 'checkpoints'), 6),
                      checkpoint.read_state(str(data8_run / 'checkpoints'), 6))
  np.testing.assert_allclose(list(_losses(tmp_path).values()),
                             list(_losses(data8_run).values()), rtol=1e-5)


def _resume_from_step3(source, workdir, config):
  """Copies `source`'s step-3 checkpoint into `workdir`, resumes to 6."""
  shutil.copytree(source / 'checkpoints' / '3', workdir / 'checkpoints' / '3')
  return _run(config, workdir)


@pytest.mark.parametrize('target', ['one_device', 'fsdp'])
def test_restore_from_eight_devices_onto_another_topology(
    tiny_config, tmp_path, data8_run, target):
  """data=8 -> 1 device, and data=8 -> data=2 x fsdp=4: training continues
  to the uninterrupted run's parameters."""
  config = (_config(tiny_config, shape=(1,)) if target == 'one_device'
            else _fsdp_config(tiny_config))
  trainer, _ = _resume_from_step3(data8_run, tmp_path, config)
  assert len(trainer.mesh.devices.flat) == (1 if target == 'one_device'
                                            else 8)
  _assert_close_trees(checkpoint.read_state(str(tmp_path / 'checkpoints'), 6),
                      checkpoint.read_state(str(data8_run / 'checkpoints'), 6))


def test_restore_from_one_device_onto_eight(tiny_config, tmp_path, data8_run):
  one = tmp_path / 'one'
  _run(_config(tiny_config, num_steps=3, shape=(1,)), one)
  _resume_from_step3(one, tmp_path / 'eight', _config(tiny_config))
  _assert_close_trees(
      checkpoint.read_state(str(tmp_path / 'eight' / 'checkpoints'), 6),
      checkpoint.read_state(str(data8_run / 'checkpoints'), 6))


def test_global_batch_not_divisible_over_the_mesh(tiny_config, tmp_path):
  config = _fsdp_config(tiny_config)
  config.train.global_batch_size = 12
  with pytest.raises(ValueError, match=r'train.global_batch_size=12 must be '
                     r'divisible by the 8 devices the batch is split over '
                     r'\(data=2 x fsdp=4\).*use a multiple of 8'):
    train.Trainer(config, str(tmp_path))


@pytest.mark.parametrize('script', ['local_multiprocess.sh', 'multi_gpu.sh',
                                    'slurm.sbatch', 'tpu_vm.sh'])
def test_launch_scripts_pass_bash_n_and_shellcheck(script):
  path = os.path.join(LAUNCH, script)
  assert os.access(path, os.X_OK)
  subprocess.run(['bash', '-n', path], check=True)
  shellcheck = shutil.which('shellcheck') or os.path.join(
      os.path.dirname(sys.executable), 'shellcheck')
  proc = subprocess.run([shellcheck, '--shell=bash', path],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def test_local_launch_stops_the_others_when_one_process_fails(tmp_path):
  """Process 1 fails at once while process 0 would wait a minute for it:
  the launcher stops process 0 and exits with process 1's status."""
  fake = tmp_path / 'python'
  fake.write_text('#!/usr/bin/env bash\n'
                  'if [[ $JAX_PROCESS_ID == 1 ]]; then exit 3; fi\n'
                  'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $*" '
                  f'> {tmp_path}/zero.txt\n'
                  'exec sleep 60\n')
  fake.chmod(0o755)
  start = time.time()
  proc = subprocess.run(
      [os.path.join(LAUNCH, 'local_multiprocess.sh'), '2', 'seg_jax.evaluate',
       '--workdir=x'],
      env={**os.environ, 'PYTHON': str(fake), 'PORT': '4567'},
      capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3
  assert time.time() - start < 30
  assert 'a process exited with status 3; stopping the others' in proc.stderr
  address, n, *args = (tmp_path / 'zero.txt').read_text().split()
  assert address == '127.0.0.1:4567' and n == '2'
  assert args == ['-m', 'seg_jax.evaluate', '--workdir=x']
