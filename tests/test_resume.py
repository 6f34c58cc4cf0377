"""Exact resume: a run killed again and again (also mid-save) and restarted
ends with the same parameters (and moving average), bit for bit, as a run
that was never interrupted, and trains every step on the same batches;
SIGTERM/SIGINT save and stop cleanly."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from seg_jax import checkpoint, data
from seg_jax.data import pipeline

from conftest import REPO

NUM_STEPS = 60
EVERY = 10
ARGS = [
    '--config=configs/unet_shapes_tiny.py',
    f'--config.train.num_steps={NUM_STEPS}',
    f'--config.checkpoint.every_steps={EVERY}',
    '--config.checkpoint.max_to_keep=1000',
    f'--config.eval.every_steps={NUM_STEPS}',
    '--config.train.log_every_steps=1',
    '--config.train.ema_decay=0.99',  # the average resumes exactly too
]
LOSS_LINE = re.compile(r'\[(\d+)\] train/loss=([^,\s]+)')


def _main(workdir):
  return subprocess.Popen(
      [sys.executable, '-m', 'seg_jax.main', f'--workdir={workdir}', *ARGS],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def _finish(proc):
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  return out


def _complete_steps(ckpt_dir):
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _saving(ckpt_dir):
  return os.path.isdir(ckpt_dir) and any(
      'orbax-checkpoint-tmp' in d for d in os.listdir(ckpt_dir))


def _kill_once(workdir, rng, mid_save):
  """Starts the run and SIGKILLs it once it has saved a checkpoint beyond
  the one it resumed from: at the next moment a save is in flight
  (`mid_save`), or after a random 0-0.4 s. Returns (output, whether a
  half-written step folder was left)."""
  ckpt = os.path.join(workdir, 'checkpoints')
  before = max(_complete_steps(ckpt), default=0)
  proc = _main(workdir)
  try:
    return _kill_when(proc, ckpt, before, rng, mid_save)
  finally:  # never leave the run going when an assertion fails
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _kill_when(proc, ckpt, before, rng, mid_save):
  deadline = time.time() + 240
  while max(_complete_steps(ckpt), default=0) <= before:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.01)
  if mid_save:
    while not _saving(ckpt) and proc.poll() is None:
      time.sleep(0.001)
  else:
    time.sleep(rng.uniform(0.0, 0.4))
  assert proc.poll() is None, 'the run finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return proc.stdout.read(), _saving(ckpt)


def _losses(out):
  """{step: loss as printed} of one process's output."""
  return {int(s): v for s, v in LOSS_LINE.findall(out)}


def test_random_sigkills_end_bit_identical(tmp_path):
  """Fault injection: SIGKILL at 3 moments (1 random, 2 aimed at a
  checkpoint write, at least one of which must cut one short), restarting
  each time. Each restart resumes from the newest
  complete checkpoint; every step trained (some twice) saw the same data
  and gave the same loss as the uninterrupted run; the final state and
  every later checkpoint equal it bit for bit."""
  rng = random.Random(0)
  ref_dir, cut_dir = str(tmp_path / 'ref'), str(tmp_path / 'cut')
  ref = _main(ref_dir)
  outputs, cut_mid_save = [], 0
  for i in range(3):
    out, half_written = _kill_once(cut_dir, rng, mid_save=i > 0)
    outputs.append(out)
    cut_mid_save += half_written
  assert cut_mid_save >= 1, 'no kill landed during a checkpoint write'
  complete = _complete_steps(f'{cut_dir}/checkpoints')
  out = _finish(_main(cut_dir))
  outputs.append(out)
  ref_out = _finish(ref)
  resumed = int(re.search(r'Resumed from step (\d+)', out).group(1))
  assert resumed == max(complete) and 0 < resumed < NUM_STEPS
  assert f'step={NUM_STEPS}' in out.splitlines()[-1]

  want = _losses(ref_out)
  assert sorted(want) == list(range(1, NUM_STEPS + 1))
  trained = 0
  for run in outputs:
    got = _losses(run)
    trained += len(got)
    assert {s: want[s] for s in got} == got  # same data, same loss
  assert trained > NUM_STEPS  # steps after a checkpoint ran again

  ref_ckpt, cut_ckpt = f'{ref_dir}/checkpoints', f'{cut_dir}/checkpoints'
  # Every checkpoint written after the last resume equals the uninterrupted
  # run's: parameters, BatchNorm statistics, optimizer state, step, data
  # position.
  later = list(range(resumed, NUM_STEPS + 1, EVERY))
  assert later[-1] == NUM_STEPS and len(later) >= 2
  for step in later:
    a = checkpoint.read_state(ref_ckpt, step)
    b = checkpoint.read_state(cut_ckpt, step)
    assert int(b['step']) == step
    paths = jax.tree_util.tree_leaves_with_path(a)
    assert len(paths) == len(jax.tree.leaves(b)) > 10
    for (path, x), y in zip(paths, jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x),
                                    err_msg=f'step {step} {path}')
    assert (checkpoint.data_position(cut_ckpt, step) ==
            checkpoint.data_position(ref_ckpt, step))


def test_restored_iterator_yields_the_uninterrupted_batches(tiny_config,
                                                            tmp_path):
  """The data position a checkpoint stores continues the same batch stream."""
  ds = pipeline.create_train_dataset(
      data.create_source(tiny_config, 'train'),
      pipeline.train_transform(tiny_config), seed=0, batch_size=8,
      num_threads=1)
  reference = iter(ds)
  expected = [next(reference) for _ in range(9)]

  it = iter(ds)
  for _ in range(5):
    next(it)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=5, max_to_keep=2)
  state = {'w': np.arange(3.0)}
  assert ckpt.maybe_save(5, state, it)
  next(it)  # the loop runs ahead while the save is written asynchronously
  ckpt.close()

  fresh = iter(ds)
  _, restored = checkpoint.Checkpointer(str(tmp_path), 5, 2).restore_or_keep(
      {'w': np.zeros(3)}, fresh)
  for want in expected[5:]:
    got = next(restored)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  # The one reader of the position: this process's file through grain's
  # handler; another topology's first-process file; an older raw state.
  folder = tmp_path / '5' / 'data_iter'
  want = {'position': 5, 'global_batch_size': 8, 'seed': 0,
          'process_count': 1}
  assert checkpoint.data_position(str(tmp_path), 5) == want
  os.replace(folder / 'process_0-of-1.json', folder / 'process_0-of-2.json')
  assert checkpoint.data_position(str(tmp_path), 5) == want
  (folder / 'process_0-of-2.json').write_text('{"last_seen_indices": {}}')
  assert checkpoint.data_position(str(tmp_path), 5) == {'position': 5}


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_current_step_and_exits_cleanly(tmp_path, sig):
  """SIGTERM (preemption) or SIGINT (Ctrl-C): the step finishes, its
  checkpoint (state and data position) is written, a line names the step,
  and the exit status is 128 + the signal (the run is not finished); well
  within a step plus a save."""
  workdir = str(tmp_path)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'seg_jax.main', f'--workdir={workdir}',
       '--config=configs/unet_shapes_tiny.py',
       '--config.train.num_steps=100000', '--config.checkpoint.every_steps=7',
       '--config.eval.every_steps=100000'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _signal_after_step_7(proc, workdir, sig)
  finally:  # never leave the run going when an assertion fails
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _signal_after_step_7(proc, workdir, sig):
  deadline = time.time() + 240
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '7')):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  sent = time.time()
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  assert time.time() - sent < 20
  assert proc.returncode == 128 + sig, out[-3000:]
  name = signal.Signals(sig).name
  match = re.search(rf'Stopped by {name} at step (\d+): checkpoint (\d+) '
                    rf'saved in {workdir}/checkpoints; run the same command '
                    'to resume.', out)
  stopped = int(match.group(1))
  assert int(match.group(2)) == stopped and 7 <= stopped < 100000
  steps = checkpoint.Checkpointer(f'{workdir}/checkpoints', 7, 3).all_steps()
  assert max(steps) == stopped  # the step it stopped at is saved
  assert int(checkpoint.read_state(f'{workdir}/checkpoints',
                                   stopped)['step']) == stopped
  assert checkpoint.data_position(f'{workdir}/checkpoints',
                                 stopped)['position'] == stopped
  assert not [f for f in os.listdir(f'{workdir}/checkpoints') if 'tmp' in f]


def test_checkpoint_saved_before_the_ema_field_resumes(tiny_config, tmp_path):
  """A train state saved without the `ema` field (seg_jax before weight
  averaging) restores into today's TrainState: every array by name."""
  import flax  # pylint: disable=g-import-not-at-top
  from seg_jax import train  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class OldTrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple

  trainer = train.Trainer(tiny_config, str(tmp_path))
  new = trainer.state
  old = OldTrainState(step=new.step + 3,
                      params=jax.tree.map(lambda x: x + 1, new.params),
                      batch_stats=new.batch_stats, opt_state=new.opt_state)
  it = iter(trainer.train_ds)
  next(it)
  assert trainer.checkpointer.maybe_save(3, old, it, force=True)
  trainer.checkpointer.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), 3, 3)
  restored, _ = ckpt.restore_or_keep(new, iter(trainer.train_ds))
  ckpt.close()
  assert type(restored) is type(new) and restored.ema == {}
  assert int(restored.step) == 3
  for want, got in zip(jax.tree.leaves((old.params, old.batch_stats,
                                        old.opt_state)),
                       jax.tree.leaves((restored.params, restored.batch_stats,
                                        restored.opt_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
