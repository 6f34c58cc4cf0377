"""Several processes and topologies: a 2-process job launched by
launch/local_multiprocess.sh equals one process on as many devices; FSDP
really shards the state and equals data parallelism; checkpoints restore
across device counts, mesh shapes and process counts; the launch scripts
lint clean."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from seg_jax import checkpoint, data, errors, evaluate, train

import tb_events
from conftest import REPO

LAUNCH = os.path.join(REPO, 'launch')


def _config(tiny_config, num_steps=6, **mesh):
  c = tiny_config
  c.train.optimizer, c.train.learning_rate = 'sgd', 0.05  # no Adam noise
  # A constant rate: a run to step 9 passes through the same states as one
  # to step 6 that is then resumed to 9.
  c.train.schedule, c.train.warmup_steps = 'constant', 0
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
          '--config.train.schedule=constant', '--config.train.warmup_steps=0',
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
  assert len(paths) == len(leaves) > 5
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

  # The reference goes on to step 9 in one go (evaluating at 6 and 9).
  config.mesh.shape, config.train.num_steps = (4,), 9
  _run(config, single)
  want, got = _losses(single), _losses(multi)
  assert sorted(got) == [1, 2, 3, 4, 5, 6] and len(want) == 9
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got],
                             rtol=1e-5)
  _assert_close_trees(checkpoint.read_state(str(multi / 'checkpoints'), 6),
                      checkpoint.read_state(str(single / 'checkpoints'), 6))
  multi_eval = tb_events.scalars_by_tag(tb_events.read_events(multi))
  single_eval = tb_events.scalars_by_tag(tb_events.read_events(single))
  for key in ('eval/miou', 'eval/loss'):
    np.testing.assert_allclose(dict(multi_eval[key])[6],
                               dict(single_eval[key])[6], rtol=1e-5)

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

  # The 2-process run resumed in one process to step 9: the data position
  # is re-split, and it stays with the reference. Resuming is bit-exact on
  # either side, but the step-6 states differ by float noise (<= 1.2e-7,
  # measured), which the next three steps amplify to ~1.6e-5 in the
  # parameters (optimizer momentum is left out: its entries for weights that
  # feed BatchNorm are float noise themselves).
  _run(config, multi)
  want, got = _losses(single), _losses(multi)
  np.testing.assert_allclose([got[s] for s in (7, 8, 9)],
                             [want[s] for s in (7, 8, 9)], rtol=1e-5)
  for part in ('params', 'batch_stats'):
    _assert_close_trees(
        checkpoint.read_state(str(multi / 'checkpoints'), 9)[part],
        checkpoint.read_state(str(single / 'checkpoints'), 9)[part],
        atol=5e-5)
  assert checkpoint.data_position(str(multi / 'checkpoints'), 9) \
      == {'position': 9, 'global_batch_size': 8, 'seed': 0,
          'process_count': 1}


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


def test_multi_gpu_launch_without_a_cuda_jax_is_one_line(tmp_path):
  """launch/multi_gpu.sh asks for CUDA: a JAX without its plugin (this
  machine's) is named with the install command, exit 2, nothing started."""
  from seg_jax import cli  # pylint: disable=g-import-not-at-top
  try:
    cli.check_platforms({'JAX_PLATFORMS': 'cuda'})
    pytest.skip('this JAX has a CUDA plugin')
  except errors.ConfigError:
    pass
  proc = subprocess.run(
      [os.path.join(LAUNCH, 'multi_gpu.sh'), '--config=configs/unet_shapes_tiny.py',
       f'--workdir={tmp_path}/run'], cwd=REPO,
      env={**{k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'},
           'PYTHON': sys.executable}, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines == [
      f'error: JAX_PLATFORMS=cuda: this JAX ({jax.__version__}) has no CUDA '
      "backend installed (pip install -U 'jax[cuda12]'); or unset "
      'JAX_PLATFORMS to run on the devices it has.'], lines
  assert not os.path.exists(tmp_path / 'run')
  # One process per GPU on a machine without NVIDIA's tools: one line too.
  if not shutil.which('nvidia-smi'):
    proc = subprocess.run(
        [os.path.join(LAUNCH, 'multi_gpu.sh'),
         '--config=configs/unet_shapes_tiny.py', f'--workdir={tmp_path}/run'],
        cwd=REPO, env={**os.environ, 'PROCESSES': 'per-gpu'},
        capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (1, (
        f"{os.path.join(LAUNCH, 'multi_gpu.sh')}: nvidia-smi not found: "
        'PROCESSES=per-gpu needs NVIDIA GPUs and their driver.\n'))
  cli.check_platforms({'JAX_PLATFORMS': 'cpu'})
  cli.check_platforms({})
  with pytest.raises(errors.ConfigError, match=r"^JAX_PLATFORMS=rocm: .* no "
                     r"ROCM backend installed \(pip install -U 'jax\[rocm\]'\)"):
    cli.check_platforms({'JAX_PLATFORMS': 'rocm'})


def test_local_launch_stops_the_others_when_one_process_fails(tmp_path):
  """Process 1 fails at once while process 0 would wait a minute for it:
  the launcher stops process 0 and exits with process 1's status."""
  fake = tmp_path / 'python'
  zero = tmp_path / 'zero.txt'
  fake.write_text('#!/usr/bin/env bash\n'
                  'if [[ $JAX_PROCESS_ID == 1 ]]; then\n'
                  f'  while [[ ! -s {zero} ]]; do sleep 0.05; done\n'
                  '  exit 3\n'
                  'fi\n'
                  'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $*" '
                  f'> {zero}.part && mv {zero}.part {zero}\n'
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
  address, n, *args = zero.read_text().split()
  assert address == '127.0.0.1:4567' and n == '2'
  assert args == ['-m', 'seg_jax.evaluate', '--workdir=x']


def _settings(environ, **flag_values):
  from seg_jax import cli  # pylint: disable=g-import-not-at-top
  f = types.SimpleNamespace(distributed=None, coordinator_address=None,
                            num_processes=None, process_id=None)
  vars(f).update(flag_values)
  return cli.distributed_settings(f, environ)


def test_when_a_job_joins_jax_distributed():
  """One process: no; JAX_* or flags with more than one: yes, with their
  values; a Slurm step or a multi-host TPU slice: yes, JAX detects the
  rest; --distributed / --nodistributed win."""
  assert _settings({}) == (False, None, None, None)
  assert _settings({'JAX_NUM_PROCESSES': '1'}) == (False, None, 1, None)
  assert _settings({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234',
                    'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}) == (
                        True, '10.0.0.1:1234', 4, 3)
  assert _settings({'JAX_NUM_PROCESSES': '4'}, num_processes=2,
                   process_id=1, coordinator_address='h:1') == (
                       True, 'h:1', 2, 1)
  slurm = {'SLURM_NTASKS': '16', 'SLURM_STEP_NODELIST': 'gpu[01-02]'}
  assert _settings(slurm) == (True, None, None, None)
  assert _settings({'SLURM_NTASKS': '16'})[0] is False  # sbatch, not srun
  assert _settings({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'})[0] is True
  assert _settings({'TPU_WORKER_HOSTNAMES': 'w0'})[0] is False
  assert _settings({}, distributed=True) == (True, None, None, None)
  assert _settings(slurm, distributed=False)[0] is False
  with pytest.raises(ValueError, match=r'process_id=2 is outside 0..1'):
    _settings({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'})
  with pytest.raises(ValueError, match=r"\$JAX_PROCESS_ID='one'"):
    _settings({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': 'one'})


# A release check (27 s): the default run stops single-process runs by
# SIGINT and SIGTERM (test_resume, test_own_images) and checks 2-process
# training, evaluation and resume.
@pytest.mark.slow
def test_ctrl_c_to_one_process_stops_the_job_at_one_step(tmp_path):
  """SIGINT (Ctrl-C) to process 1 of 2: sent on as SIGTERM, JAX's
  preemption notice, whose sync makes both stop after the same step and
  save it together (process 0 received nothing); the launcher exits 143
  (128 + SIGTERM) without calling it a failure."""
  env = {**os.environ, 'PYTHON': sys.executable, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2 '
                      '--xla_backend_optimization_level=0'}
  proc = subprocess.Popen(
      [os.path.join(LAUNCH, 'local_multiprocess.sh'), '2',
       '--config=configs/unet_shapes_tiny.py', f'--workdir={tmp_path}',
       '--config.train.num_steps=100000', '--config.checkpoint.every_steps=5',
       '--config.eval.every_steps=100000', '--config.compilation_cache_dir='],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, start_new_session=True)
  try:
    _stop_one_of_two(proc, tmp_path)
  finally:  # never leave the job running when an assertion fails
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def _stop_one_of_two(proc, tmp_path):
  deadline = time.time() + 240
  while not os.path.isdir(tmp_path / 'checkpoints' / '5'):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  ids = {}  # JAX process id -> pid of the python process
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmdline = f.read().split(b'\0')
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environ = dict(v.split(b'=', 1) for v in f.read().split(b'\0')
                       if b'=' in v)
    except OSError:
      continue
    if (f'--workdir={tmp_path}'.encode() in cmdline and
        b'seg_jax.main' in cmdline and b'JAX_PROCESS_ID' in environ):
      ids[int(environ[b'JAX_PROCESS_ID'])] = int(pid)
  assert sorted(ids) == [0, 1]
  os.kill(ids[1], signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out[-3000:]
  assert 'stopping the others' not in out, out[-3000:]
  stopped = re.findall(r'Stopped by SIGTERM at step (\d+)', out)
  assert len(stopped) == 1, out[-3000:]  # printed by process 0 only
  step = int(stopped[0])
  assert max(_complete(tmp_path / 'checkpoints')) == step
  assert sorted(glob.glob('process_*', root_dir=tmp_path / 'checkpoints' /
                          str(step) / 'data_iter')) == [
                              'process_0-of-2.json', 'process_1-of-2.json']


def _complete(folder):
  return [int(d) for d in os.listdir(folder) if d.isdigit()]
