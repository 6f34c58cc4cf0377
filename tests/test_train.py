"""The training loop end to end on the tiny config, and config errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from seg_jax import checkpoint, errors, optim, sharding, state, train

from conftest import REPO


def test_train_and_evaluate_end_to_end(tiny_config, tmp_path):
  tiny_config.train.num_steps = 9
  trainer = train.Trainer(tiny_config, str(tmp_path))
  try:
    result = trainer.run()
  finally:
    trainer.checkpointer.close()
  assert result['step'] == 9
  # 9 steps, checkpoints at 3, 6 and 9, evaluations at 6 and 9, metrics
  # logged at 3, 6 and 9: the train and eval steps each compiled once.
  assert trainer.train_step._cache_size() == 1  # pylint: disable=protected-access
  assert [e.eval_step._cache_size() for e in trainer.evaluators] == [1]  # pylint: disable=protected-access
  assert 0.0 <= result['miou'] <= 1.0
  assert set(result) >= {'loss', 'pixel_accuracy', 'mean_accuracy',
                         'iou/circle'}
  steps = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), 3,
                                  3).all_steps()
  assert steps == [3, 6, 9]
  saved = checkpoint.read_state(str(tmp_path / 'checkpoints'), 9)
  assert int(saved['step']) == 9
  assert 'process_0-of-1.json' in os.listdir(
      tmp_path / 'checkpoints' / '9' / 'data_iter')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))

  # A finished workdir resumes at its end and reports the same evaluation.
  again = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert again['step'] == 9
  np.testing.assert_allclose(again['miou'], result['miou'], rtol=1e-6)


def test_loss_decreases(tiny_config, tmp_path):
  tiny_config.train.num_steps = 40
  tiny_config.train.log_every_steps = 40
  tiny_config.eval.every_steps = 40
  tiny_config.checkpoint.every_steps = 40
  trainer = train.Trainer(tiny_config, str(tmp_path))
  it = iter(trainer.train_ds)
  from seg_jax import sharding  # pylint: disable=g-import-not-at-top
  losses = []
  for _ in range(40):
    batch = sharding.to_global(next(it), trainer.mesh)
    trainer.state, m = trainer.train_step(trainer.state, batch,
                                          trainer.step_rng)
    losses.append(float(m.loss.compute()))
  trainer.checkpointer.close()
  assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])


def test_bad_precision_and_optimizer(tiny_config):
  tiny_config.train.precision = 'float8'
  with pytest.raises(ValueError, match="train.precision='float8'"):
    state.create_model(tiny_config)
  tiny_config.train.optimizer = 'lamb'
  with pytest.raises(ValueError, match="train.optimizer='lamb'"):
    optim.create_optimizer(tiny_config.train)


def test_schedules(tiny_config):
  cfg = tiny_config.train
  cfg.num_steps, cfg.warmup_steps, cfg.learning_rate = 110, 10, 0.1
  cfg.schedule, cfg.poly_power, cfg.end_learning_rate = 'poly', 0.9, 0.0
  lr = optim.create_learning_rate_fn(cfg)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(lr(60)), 0.1 * 0.5**0.9, rtol=1e-5)
  np.testing.assert_allclose(float(lr(110)), 0.0, atol=1e-9)


def test_cli_rejects_unknown_config_key(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'seg_jax.main',
       '--config=configs/unet_shapes_tiny.py', f'--workdir={tmp_path}',
       '--config.train.num_stepz=3'], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      'error: --config.train.num_stepz: configs/unet_shapes_tiny.py has no '
      'such key; every key is listed, with its meaning, in '
      'configs/default.py.')


def test_cli_config_file_of_wrong_type_is_one_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from configs import unet_shapes_tiny\n'
                 'def get_config():\n'
                 '  c = unet_shapes_tiny.get_config()\n'
                 "  c.train.num_steps = '100'\n"
                 '  return c\n')
  out = subprocess.run(
      [sys.executable, '-m', 'seg_jax.main', f'--config={bad}',
       f'--workdir={tmp_path}/run', '--config.train.num_steps=abc'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': REPO})
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: --config={bad}: Could not override field 'num_steps' "
      "(reference). 100 is of original type <class 'str'> and cannot be "
      "casted to type <class 'int'>")


def test_relative_workdir(tiny_config, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tiny_config.train.num_steps = 3
  result = train.train_and_evaluate(tiny_config, 'runs/rel')
  assert result['step'] == 3
  assert checkpoint.Checkpointer('runs/rel/checkpoints', 3, 3).all_steps() == [3]


def test_identity_colour_matrix_leaves_the_step_unchanged(tiny_config,
                                                          tmp_path):
  """The photometric path on device: identity matrices change nothing, a
  brightness offset changes the loss."""
  from seg_jax import sharding  # pylint: disable=g-import-not-at-top
  trainer = train.Trainer(tiny_config, str(tmp_path))
  batch = next(iter(trainer.train_ds))
  n = batch['image'].shape[0]
  plain = sharding.to_global(batch, trainer.mesh)
  eye = np.tile(np.eye(3, 4, dtype=np.float32), (n, 1, 1))
  bright = eye.copy()
  bright[:, :, 3] = 60.0
  state0 = trainer.state
  outs = []
  for b in (plain, {**plain, 'colour': eye}, {**plain, 'colour': bright}):
    state = jax.tree.map(lambda x: x.copy(), state0)  # the step donates it
    state, m = trainer.train_step(state, sharding.to_global(b, trainer.mesh),
                                  trainer.step_rng)
    outs.append((float(m.loss.compute()), state.params))
  trainer.checkpointer.close()
  assert outs[0][0] == outs[1][0]
  jax.tree.map(np.testing.assert_array_equal, outs[0][1], outs[1][1])
  assert outs[2][0] != outs[0][0]


def test_eval_at_half_scale_scores_every_full_resolution_pixel(tiny_config,
                                                              tmp_path):
  """An evaluator with scales=(0.5,) runs the model on 16x16 images
  (tests/test_evaluators.py checks that) but counts every pixel of the
  32x32 labels."""
  tiny_config.eval.evaluators.whole.scales = (0.5,)
  trainer = train.Trainer(tiny_config, str(tmp_path))
  trainer.checkpointer.close()
  result, = trainer.evaluate()
  source = trainer.evaluators[0].source
  labelled = sum(int(np.sum(source[i]['label'] != 255))
                 for i in range(len(source)))
  assert int(result.confusion.sum()) == labelled


class _Poisoned:
  """Wraps a train dataset; batch `at` (1-based) gets a NaN colour matrix,
  as a corrupt float input would make it."""

  def __init__(self, ds, at):
    self._ds, self._at = ds, at

  def __iter__(self):
    it = iter(self._ds)
    outer = self

    class _It:
      def __next__(self):
        batch = next(it)
        if it.position == outer._at:
          batch = {**batch, 'colour': np.full_like(batch['colour'], np.nan)}
        return batch

      def get_state(self):
        return it.get_state()

      def set_state(self, state):
        it.set_state(state)

    return _It()


def _poisoned_trainer(config, workdir, at):
  config.data.photometric.enabled = True  # batches carry a colour matrix
  config.eval.every_steps = 100
  trainer = train.Trainer(config, str(workdir))
  trainer.train_ds = _Poisoned(trainer.train_ds, at)
  return trainer


def test_nonfinite_step_stops_naming_it_and_the_last_checkpoint(tiny_config,
                                                                tmp_path):
  tiny_config.train.num_steps, tiny_config.train.log_every_steps = 9, 1
  trainer = _poisoned_trainer(tiny_config, tmp_path, at=5)
  with pytest.raises(errors.NonFiniteError,
                     match=rf'^Step 5: the loss or gradient norm is NaN/Inf; '
                     rf'training stopped and the last good checkpoint is step '
                     rf'3 in {tmp_path}/checkpoints. Lower '):
    trainer.run()
  trainer.checkpointer.close()
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), 3,
                                 3).all_steps() == [3]


def test_nonfinite_step_is_skipped_and_counted(tiny_config, tmp_path):
  """With train.skip_nonfinite the poisoned step changes nothing but the
  step count: state after step 4 (poisoned) equals state after step 3,
  the moving average included. The average (train.ema_decay) follows
  e_t = d_t e_(t-1) + (1 - d_t) v_t, d_t = min(decay, t / (9 + t)), and is
  what inference restores."""
  tiny_config.train.skip_nonfinite = True
  tiny_config.train.ema_decay = 0.5
  tiny_config.train.num_steps, tiny_config.checkpoint.every_steps = 4, 1
  tiny_config.checkpoint.max_to_keep = 5
  trainer = _poisoned_trainer(tiny_config, tmp_path, at=4)
  try:
    trainer.run()
  finally:
    trainer.checkpointer.close()
  assert trainer.skipped_nonfinite == 1
  ckpt = str(tmp_path / 'checkpoints')
  before, after = checkpoint.read_state(ckpt, 3), checkpoint.read_state(ckpt, 4)
  assert int(after['step']) == 4
  for part in ('params', 'batch_stats', 'opt_state', 'ema'):
    for a, b in zip(jax.tree.leaves(before[part]),
                    jax.tree.leaves(after[part])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _check_moving_average(tiny_config, ckpt, tmp_path)
  changed = checkpoint.read_state(ckpt, 2)['params']
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(changed), jax.tree.leaves(before['params'])))
  from tb_events import read_events, scalars_by_tag  # pylint: disable=g-import-not-at-top
  assert dict(scalars_by_tag(read_events(str(tmp_path)))[
      'train/skipped_nonfinite_steps']) == {4: 1}


def _check_moving_average(config, ckpt, workdir):
  """The stored average of steps 2 and 3 against numpy, and inference
  restores the average."""
  for t in (2, 3):
    decay = min(0.5, t / (9 + t))
    prev, now = checkpoint.read_state(ckpt, t - 1), checkpoint.read_state(
        ckpt, t)
    for part in ('params', 'batch_stats'):
      for e0, v, e in zip(jax.tree.leaves(prev['ema'][part]),
                          jax.tree.leaves(now[part]),
                          jax.tree.leaves(now['ema'][part])):
        np.testing.assert_allclose(
            np.asarray(e), decay * np.asarray(e0) + (1 - decay) * np.asarray(v),
            rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(now['ema']['params']),
                 jax.tree.leaves(now['params'])))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  _, variables, step = checkpoint.restore_for_inference(config, str(workdir), mesh,
                                                   step=3)
  assert step == 3
  for a, b in zip(jax.tree.leaves(variables),
                  jax.tree.leaves(now['ema'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # train.ema_decay=0 reads the raw weights of the same checkpoint, and
  # the inference CLIs' check lets it (a run without an average cannot be
  # asked for one).
  raw = config.copy_and_resolve_references()
  raw.train.ema_decay = 0.0
  _, variables, _ = checkpoint.restore_for_inference(raw, str(workdir), mesh,
                                                     step=3)
  for a, b in zip(jax.tree.leaves(variables),
                  jax.tree.leaves({'params': now['params'],
                                   'batch_stats': now['batch_stats']})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  from seg_jax import cli, workdir as run_folder  # pylint: disable=g-import-not-at-top
  run_folder.write_config(str(workdir), config)
  cli.check_run_config(raw, str(workdir))
  # evaluate names the raw weights' reports apart: the average's stay.
  from seg_jax import evaluate, inference  # pylint: disable=g-import-not-at-top
  name = inference.default_name(config)
  for cfg, tag, weights in ((config, '', 'average'), (raw, '_raw', 'raw')):
    (_, report), = evaluate.evaluate(cfg, str(workdir), checkpoint=3)
    with open(workdir / 'eval' / f'val_{name}{tag}_step3.json') as f:
      assert json.load(f) == json.loads(json.dumps(report))
    assert report['weights'] == weights
  assert len(os.listdir(workdir / 'eval')) == 4  # two .json, two .png
  with pytest.raises(errors.ConfigError, match=r'train.ema_decay=0.0 '
                     r'contradicts the run in .* train.ema_decay=0.5'):
    cli.check_run_config(raw, str(workdir), run_folder.MODEL_KEYS)
  run_folder.write_config(str(workdir), raw)
  with pytest.raises(errors.ConfigError, match=r'train.ema_decay=0.5 asks '
                     r'for the weight average, but the run in .* kept none'):
    cli.check_run_config(config, str(workdir))
  # Gradient clipping turned on for a resume: refused by name (its value
  # may change); had it got through, the optimizer state's layout is
  # refused as such, not taken for damage (nothing is set aside).
  run_folder.write_config(str(workdir), config)
  clipped = config.copy_and_resolve_references()
  clipped.train.grad_clip_norm = 1.0
  with pytest.raises(errors.ConfigError, match=r'^train.grad_clip_norm=1.0 '
                     r'contradicts the run in .*, whose checkpoints were '
                     r'trained with train.grad_clip_norm=0.0 '):
    cli.check_run_config(clipped, str(workdir), run_folder.RESUME_KEYS)
  run_folder.write_config(str(workdir), clipped)
  clipped.train.grad_clip_norm = 2.0
  cli.check_run_config(clipped, str(workdir), run_folder.RESUME_KEYS)
  keeper = checkpoint.Checkpointer(ckpt, 3, 3)
  steps = keeper.all_steps()
  with pytest.raises(errors.ConfigError, match=r'holds a train state laid out '
                     r'differently .* gradient clipping turned on or off'):
    keeper.restore_or_keep(state.abstract_train_state(clipped, mesh), None)
  assert keeper.all_steps() == steps
  keeper.close()


def test_one_run_at_a_time_in_a_folder(tiny_config, tmp_path):
  """A second run started on a folder where one trains is refused in one
  line naming the holder, before it writes anything; once the first ends
  the folder is free, and a folder that got nothing else keeps no lock
  file."""
  from seg_jax import workdir as run_folder  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / 'run')
  with run_folder.lock(run):
    with pytest.raises(errors.ConfigError, match=(
        r'^Another run is training in .*run \(process \d+ on .+, holding '
        r'.*run/\.lock\): wait for it to end or stop it, or give another '
        r'--workdir\.$')):
      train.train_and_evaluate(tiny_config, run)
    assert os.listdir(run) == ['.lock']
  with run_folder.lock(run):
    pass
  assert os.listdir(run) == []


def test_evaluate_warns_before_replacing_a_report_of_other_settings(
    tmp_path, caplog):
  from seg_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'val_slide_step4.json'
  path.write_text(json.dumps({'settings': {'window': [16, 16]}}))
  with caplog.at_level('WARNING'):
    evaluate._warn_if_settings_change(str(path), {'window': [16, 16]})
    assert not caplog.text  # the same settings: replaced silently
    evaluate._warn_if_settings_change(str(path), {'window': [32, 32]})
  assert (f"Replacing {path}, written with other settings {{'window': "
          "[16, 16]}; now {'window': [32, 32]}: give --out to keep both."
          ) in caplog.text
  evaluate._warn_if_settings_change(str(tmp_path / 'new.json'), {})
  # The same settings on other images (another data.root) warn too.
  mine = {'name': 'folder', 'root': '/data/a'}
  path.write_text(json.dumps({'settings': {}, 'data': mine}))
  caplog.clear()
  with caplog.at_level('WARNING'):
    evaluate._warn_if_settings_change(str(path), {}, mine)
    assert not caplog.text
    evaluate._warn_if_settings_change(str(path), {}, {**mine, 'root': '/b'})
  assert (f"Replacing {path}, written with other data {mine}; now "
          f"{{'name': 'folder', 'root': '/b'}}: give --out to keep both."
          ) in caplog.text


class _FakeEvaluator:
  """Reports the given mIoUs in turn (5 classes, perfect diagonal plus a
  uniform error chosen to give that mIoU), without running the model."""

  def __init__(self, mious):
    self._mious = list(mious)

  def run(self, variables):
    del variables
    from seg_jax import evaluators, metrics  # pylint: disable=g-import-not-at-top
    miou = self._mious.pop(0)
    if isinstance(miou, Exception):
      raise miou
    # IoU of each class = d / (d + 8 e) for diagonal d and off-diagonal e.
    e = 0.0 if miou == 1.0 else 100 * (1 - miou) / (8 * miou)
    confusion = np.full((5, 5), e) + np.eye(5) * (100 - e)
    scores = metrics.scores_from_confusion(confusion)
    np.testing.assert_allclose(scores['miou'], miou)
    return evaluators.EvalResult('whole', confusion, 0.5, scores, [])


def _run_with_mious(config, workdir, mious):
  trainer = train.Trainer(config, str(workdir))
  trainer.evaluators = [_FakeEvaluator(mious)]
  try:
    trainer.run()
  finally:
    trainer.checkpointer.close()
  return trainer


def test_a_tied_best_is_the_later_step_in_training_and_in_restore(
    tiny_config, tmp_path, caplog):
  """Equal mIoU at two saved steps: training, a new reader and
  `restore(step='best')` all name the later one (the one orbax keeps). A
  resume with fewer train.num_steps than the run reached says so and keeps
  the run's config.json."""
  c = tiny_config
  c.train.num_steps, c.eval.every_steps = 6, 2
  c.checkpoint.every_steps, c.checkpoint.max_to_keep = 3, 1
  trainer = _run_with_mious(c, tmp_path, [0.5, 0.9, 0.9])
  assert trainer.checkpointer.best() == (6, pytest.approx(0.9))
  ckpt = str(tmp_path / 'checkpoints')
  kept = checkpoint.Checkpointer(ckpt, 3, 1)
  assert kept.best() == (6, pytest.approx(0.9)) and kept.all_steps() == [6]
  kept.close()
  assert checkpoint.restore(ckpt, 'best')[1] == 6
  c.train.num_steps = 4
  with caplog.at_level('WARNING'):
    _run_with_mious(c, tmp_path, [0.9])
  assert 'is at step 6, past train.num_steps=4: nothing to train' in (
      caplog.text)
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['train']['num_steps'] == 6


def test_a_failed_evaluation_runs_on_resume_and_its_step_can_be_best(
    tiny_config, tmp_path):
  """The evaluation of step 4 fails: step 4 is saved without a score. The
  resume evaluates it first (0.9, the best) and stores the score with it;
  a new reader and restore(step='best') name step 4."""
  c = tiny_config
  c.train.num_steps, c.eval.every_steps = 6, 2
  c.checkpoint.every_steps, c.checkpoint.max_to_keep = 2, 1
  with pytest.raises(RuntimeError, match='evaluation broke'):
    _run_with_mious(c, tmp_path, [0.5, RuntimeError('evaluation broke')])
  ckpt = str(tmp_path / 'checkpoints')
  kept = checkpoint.Checkpointer(ckpt, 2, 1)
  assert kept.score(4) is None and kept.best() == (2, 0.5)
  kept.close()
  trainer = _run_with_mious(c, tmp_path, [0.9, 0.6])
  assert trainer.checkpointer.best() == (4, pytest.approx(0.9))
  kept = checkpoint.Checkpointer(ckpt, 2, 1)
  assert kept.best() == (4, pytest.approx(0.9))
  assert kept.all_steps() == [4, 6]
  kept.close()
  assert checkpoint.restore(ckpt, 'best')[1] == 4
  # The same at the last step: the resume's evaluation is the run's result.
  c.train.num_steps = 8
  with pytest.raises(RuntimeError, match='evaluation broke'):
    _run_with_mious(c, tmp_path, [RuntimeError('evaluation broke')])
  trainer = train.Trainer(c, str(tmp_path))
  trainer.evaluators = [_FakeEvaluator([0.95])]
  try:
    result = trainer.run()
  finally:
    trainer.checkpointer.close()
  assert result['step'] == 8 and result['miou'] == pytest.approx(0.95)
  assert trainer.checkpointer.best() == (8, pytest.approx(0.95))


def test_a_stop_signal_during_an_evaluation_saves_that_step(tiny_config,
                                                            tmp_path):
  """SIGINT while step 2 is being evaluated: the run saves step 2 (with
  its score) and stops there, no step more. At the last step the run has
  finished: its result is the evaluation's, not a stop to resume from."""
  c = tiny_config
  c.train.num_steps, c.eval.every_steps = 6, 2
  c.checkpoint.every_steps = 5
  assert _run_interrupted(c, tmp_path, 0.5) == {'step': 2, 'stopped': 'SIGINT'}
  assert _kept_scores(tmp_path) == {2: pytest.approx(0.5)}
  # The steps trained since the last log (none: train.log_every_steps=50)
  # are logged at the stop, not lost to the resume's fresh window.
  from tb_events import read_events, scalars_by_tag  # pylint: disable=g-import-not-at-top
  assert list(scalars_by_tag(read_events(str(tmp_path)))['train/loss']) == [2]
  c.train.num_steps = 4
  result = _run_interrupted(c, tmp_path, 0.75)
  assert 'stopped' not in result, result
  assert result['step'] == 4 and result['miou'] == pytest.approx(0.75)
  assert _kept_scores(tmp_path) == {2: pytest.approx(0.5),
                                    4: pytest.approx(0.75)}


def _run_interrupted(config, workdir, miou):
  """Runs the trainer, sending SIGINT at its first evaluation (scored
  `miou`); returns its result."""
  import signal  # pylint: disable=g-import-not-at-top
  from seg_jax import interrupt  # pylint: disable=g-import-not-at-top

  class Interrupted(_FakeEvaluator):
    def run(self, variables):
      os.kill(os.getpid(), signal.SIGINT)
      return super().run(variables)

  trainer = train.Trainer(config, str(workdir))
  trainer.evaluators = [Interrupted([miou])]
  try:
    with interrupt.deferred():
      return trainer.run()
  finally:
    trainer.checkpointer.close()


def _kept_scores(workdir):
  kept = checkpoint.Checkpointer(str(workdir / 'checkpoints'), 5, 3)
  try:
    return {step: kept.score(step) for step in kept.all_steps()}
  finally:
    kept.close()


def test_best_and_latest_checkpoints_both_survive_and_resume(tiny_config,
                                                             tmp_path, caplog):
  """The best (an early step, evaluated between saves) and the newest
  `max_to_keep` are all kept; a resume knows the best and keeps it;
  'best' restores it. The resume lists the settings it changes, and says
  that more steps stretch the schedule, that a new model.init_from is not
  read and that the data position continues in changed data."""
  c = tiny_config
  c.train.num_steps, c.eval.every_steps = 10, 2
  c.checkpoint.every_steps, c.checkpoint.max_to_keep = 3, 2
  ckpt = str(tmp_path / 'checkpoints')
  trainer = _run_with_mious(c, tmp_path, [1.0, 0.9, 0.8, 0.7, 0.6])
  assert trainer.checkpointer.best() == (2, 1.0)
  assert checkpoint.Checkpointer(ckpt, 3, 2).all_steps() == [2, 9, 10]
  c.train.num_steps = 14
  trainer = train.Trainer(c, str(tmp_path))
  trainer.evaluators = [_FakeEvaluator([0.5, 0.4])]
  it = iter(trainer.train_ds)
  trainer.state, it = trainer.checkpointer.restore_or_keep(trainer.state, it)
  assert trainer.checkpointer.best() == (2, 1.0)
  trainer.checkpointer.close()
  c.model.init_from = str(tmp_path / 'elsewhere')
  c.data.shapes.num_train, c.train.weight_decay = 48, 0.0
  with caplog.at_level('INFO'):
    trainer = _run_with_mious(c, tmp_path, [0.5, 0.4])
  assert (f'This resume changes 4 setting(s) of {tmp_path}/config.json: '
          'data.shapes.num_train: 64 -> 48, model.init_from: '
          f"'' -> '{tmp_path}/elsewhere', train.num_steps: 10 -> 14, "
          'train.weight_decay: 0.0001 -> 0.0.') in caplog.text
  assert ('data.shapes.num_train changed since checkpoint 10 was written: '
          'its data position (10 batches read) continues in the changed '
          'data, so the batches from here are not those of an uninterrupted '
          f'run; use a new --workdir with model.init_from={tmp_path} to '
          'start over from these weights instead.') in caplog.text
  rate = float(optim.create_learning_rate_fn(c.train)(10))
  assert (f'train.num_steps 10 -> 14: the cosine learning-rate schedule is '
          f'recomputed over 14 steps; step 11 trains at learning rate '
          f'{rate:.3g}.') in caplog.text
  assert (f'model.init_from={tmp_path}/elsewhere is read by a new run only: '
          "this resume continues from its checkpoint 10 (config.json keeps "
          "model.init_from='').") in caplog.text
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['model']['init_from'] == ''
  assert trainer.checkpointer.best() == (2, 1.0)
  kept = checkpoint.Checkpointer(ckpt, 3, 2)
  assert kept.all_steps() == [2, 12, 14] and kept.best() == (2, 1.0)
  from tb_events import read_events, scalars_by_tag  # pylint: disable=g-import-not-at-top
  scalars = scalars_by_tag(read_events(str(tmp_path)))
  assert dict(scalars['eval/best_miou'])[14] == 1.0
  assert dict(scalars['eval/best_step'])[14] == 2
  abstract = state.abstract_train_state(
      c, jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)))
  _, step = checkpoint.restore(ckpt, 'best', abstract, fields=('params',))
  assert step == 2


def test_damaged_checkpoint_is_reported_by_path(tiny_config, tmp_path):
  """A file of the latest checkpoint whose bytes changed (size kept), that
  was cut short or is missing is named; the run falls back to the previous
  step only with checkpoint.on_corrupt set. A file list written before
  checksums existed (sizes only) still restores."""
  c = tiny_config
  c.eval.every_steps = 100
  train.train_and_evaluate(c, str(tmp_path))
  ckpt = tmp_path / 'checkpoints'
  assert (ckpt / '3' / 'FILES.json').exists()
  listed = json.loads((ckpt / '6' / 'FILES.json').read_text())
  assert any(name.startswith('state/') for name in listed)
  name = max((n for n in listed if n.startswith('state/')),
             key=lambda n: listed[n]['size'])
  size = listed[name]['size']
  path = ckpt / '6' / name
  good = path.read_bytes()
  flipped = bytearray(good)
  flipped[size // 2] ^= 0x01
  path.write_bytes(bytes(flipped))
  c.train.num_steps = 9
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf'^Checkpoint {ckpt}/6 is damaged: the bytes of '
                     rf'{path} changed since they were written \(CRC-32 '
                     rf'mismatch\). Move {ckpt}/6 away to resume from the '
                     r"previous checkpoint, or set checkpoint.on_corrupt="):
    train.train_and_evaluate(c, str(tmp_path))
  path.write_bytes(good)
  sizes_only = {n: entry['size'] for n, entry in listed.items()}
  (ckpt / '6' / 'FILES.json').write_text(json.dumps(sizes_only))
  assert int(checkpoint.read_state(str(ckpt), 6)['step']) == 6
  path.write_bytes(good[:size // 2])
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf'^Checkpoint {ckpt}/6 is damaged: {path} has '
                     rf'{size // 2} bytes, {size} were '
                     rf'written. Move {ckpt}/6 away to resume from the '
                     r"previous checkpoint, or set checkpoint.on_corrupt="):
    train.train_and_evaluate(c, str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError, match=rf'{path} has'):
    checkpoint.restore(str(ckpt), 'latest')
  # evaluate, predict and export name the steps they can read instead.
  mesh = sharding.create_mesh(c.mesh.shape, c.mesh.axes)
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf'^Checkpoint {ckpt}/6 is damaged: {path} has {size // 2} bytes, '
      rf'{size} were written. Read another checkpoint of the run with '
      r'--checkpoint=STEP \(kept: 3\).$')):
    checkpoint.restore_for_inference(c, str(tmp_path), mesh)
  path.unlink()
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf'^Checkpoint {ckpt}/6 is damaged: {path} is '
                     'missing.'):
    train.train_and_evaluate(c, str(tmp_path))
  # The byte flip again (size kept), with the checksums listed: the run
  # falls back past it as past a truncated file.
  path.write_bytes(bytes(flipped))
  (ckpt / '6' / 'FILES.json').write_text(json.dumps(listed))
  c.checkpoint.on_corrupt = 'previous'
  trainer = train.Trainer(c, str(tmp_path))
  it = iter(trainer.train_ds)
  restored, it = trainer.checkpointer.restore_or_keep(trainer.state, it)
  assert int(restored.step) == 3 and it.position == 3
  trainer.checkpointer.close()
  assert (ckpt / 'damaged_6' / 'FILES.json').exists()  # set aside, kept
  assert train.train_and_evaluate(c, str(tmp_path))['step'] == 9
  assert checkpoint.Checkpointer(str(ckpt), 3, 3).all_steps() == [3, 6, 9]
