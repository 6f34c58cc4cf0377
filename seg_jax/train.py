"""The training loop: train, log, evaluate, checkpoint, stop.

Everything the loop runs is built elsewhere: the model and train state in
`state`, the optimizer in `optim`, the jitted step in `steps`, evaluations
in `evaluators`, event files and progress in `writers`.
"""

import contextlib
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from seg_jax import (checkpoint, data, errors, evaluators, interrupt, labels,
                     metrics, optim, sharding, state, steps, writers)
from seg_jax import workdir as run_folder
from seg_jax.data import pipeline, transforms


def _eval_prefix(index, name):
  """TensorBoard prefix of the index-th in-training evaluator."""
  return 'eval' if index == 0 else f'eval_{name}'


class Trainer:
  """Holds what one training run needs; `run()` is the loop."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.workdir = workdir
    self.mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes)
    local_batch = sharding.check_batch_size(config.train.global_batch_size,
                                            self.mesh)
    # Every split is opened (and its file headers read) before anything is
    # compiled: a bad file or setting stops the run now, not mid-training.
    train_source, _ = data.open_split(config, 'train')
    val_source, val_sizes = (data.open_split(config, 'val')
                             if config.data.val_split else (None, None))
    self.config = config = data.resolved_config(config, train_source,
                                                val_source, val_sizes)
    self.class_names = list(train_source.class_names)
    self.palette = train_source.palette
    self.skips = pipeline.SkipCounter()  # bad records skipped by this host
    for source in (train_source, val_source):
      self.skips.opened(source)
    self.train_ds = pipeline.create_train_dataset(
        train_source, pipeline.train_transform(config), seed=config.seed,
        batch_size=local_batch, worker_count=config.data.worker_count,
        num_threads=config.data.num_threads, prefetch=config.data.prefetch,
        skip_counter=self.skips)
    model = state.create_model(config)
    tx = optim.create_optimizer(config.train)
    self.lr_fn = optim.create_learning_rate_fn(config.train)
    self.state = state.create_train_state(
        model, tx, jax.random.key(config.seed), state.init_input_shape(config),
        self.mesh,
        # Starting weights for a new run; a resume restores its own.
        None if run_folder.has_checkpoints(workdir) else
        checkpoint.initial_weights_fn(config),
        fsdp_min_size=config.mesh.fsdp_min_size,
        ema=config.train.ema_decay > 0)
    self.train_step = steps.make_train_step(
        model, tx, config, self.mesh,
        jax.tree.map(lambda x: x.sharding, self.state))
    self.evaluators = []
    if val_source is None:
      logging.warning("No validation split (data.val_split=''): nothing is "
                      'evaluated and no checkpoint is the best; the final '
                      'line reports the last training batches\' scores.')
    else:
      self.evaluators = evaluators.create_evaluators(
          config, model, self.mesh, val_source,
          tuple(config.eval.in_training), num_shown=config.eval.num_images,
          skip_counter=self.skips)
    self.step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    self._nonfinite = None  # metrics.NonFinite since the last check
    self._last_train = {}  # the latest logged training scalars
    self.skipped_nonfinite = 0
    self.checkpointer = checkpoint.Checkpointer(
        run_folder.checkpoint_dir(workdir),
        every_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        on_corrupt=config.checkpoint.on_corrupt)

  def variables(self):
    """The model variables evaluated: the moving average when kept."""
    return self.state.eval_variables()

  def evaluate(self):
    """Runs every in-training evaluator; returns their `EvalResult`s."""
    return [e.run(self.variables()) for e in self.evaluators]

  def run(self):
    """Trains to `train.num_steps` (resuming if possible); returns metrics.

    Returns:
      dict of the first evaluator's final scalars, plus 'step'; when stopped
      by a signal before the last step, the step reached and the signal's
      name ('stopped'). A signal during the last step finishes the run.
    """
    train_iter = iter(self.train_ds)
    self.state, train_iter = self.checkpointer.restore_or_keep(
        self.state, train_iter)
    start = int(self.state.step)
    past = start > self.config.train.num_steps
    if past:
      logging.warning('The run in %s is at step %d, past train.num_steps=%d: '
                      'nothing to train (its config.json is kept); give a '
                      'larger train.num_steps to train on.', self.workdir,
                      start, self.config.train.num_steps)
    if start and not past:
      self._note_resume_changes(start)
    # Written once the checkpoint took this config: a setting it refused
    # does not end up in the run folder's config.json.
    if jax.process_index() == 0 and not past:
      logging.info('Config written to %s', os.path.abspath(
          run_folder.write_config(self.workdir, self.config)))
    if start:
      best = self.checkpointer.best()
      logging.info('Resumed from step %d in %s; best mIoU so far: %s',
                   start, self.workdir, 'none' if best is None else
                   f'{best[1]:.4f} at step {best[0]}')
    if interrupt.received():  # a stop signal during the restore
      return {'step': start, 'stopped': interrupt.received(),
              'trained': False}
    writer = writers.create_writer(self.workdir,
                                   write_files=jax.process_index() == 0)
    try:
      if not start:
        writer.write_hparams(self.config.to_dict())
      resumed = self._evaluate_unscored(start, train_iter, writer)
      result = self._loop(start, train_iter, writer) or resumed or {}
      step = int(self.state.step)
      self.checkpointer.save_final(step, self.state, train_iter,
                                   _scores_of(result, step))
      if not result:  # resumed from a finished run: report its final metrics
        result = self._maybe_eval(step, None, force=True) or {}
      if not self.evaluators and not result.get('stopped'):
        result = {**self._last_train, 'step': step, 'no_validation': True}
      self.skips.log_total()
      return result
    finally:
      writer.close()

  def _note_resume_changes(self, start):
    """Says what a resume's changed settings do that is easy to miss: a
    new model.init_from is not read (config.json keeps the run's), a new
    train.num_steps stretches the learning-rate schedule, changed data
    settings continue the stored data position in other data; and lists
    every setting that differs from the run's config.json."""
    if jax.process_index() != 0 or not os.path.isfile(
        run_folder.config_path(self.workdir)):
      return
    stored = run_folder.read_config(self.workdir)
    changed = run_folder.differences(stored, self.config,
                                     tuple(self.config.keys()))
    if changed:
      shown = ', '.join(f'{key}: {old!r} -> {new!r}'
                        for key, old, new in changed[:8])
      more = f' and {len(changed) - 8} more' if len(changed) > 8 else ''
      logging.info('This resume changes %d setting(s) of %s: %s%s.',
                   len(changed), run_folder.config_path(self.workdir), shown,
                   more)
    data_keys = [key for key, _, _ in changed
                 if key.startswith(run_folder.DATA_SOURCE_KEYS)]
    if data_keys:
      logging.warning(
          '%s changed since checkpoint %d was written: its data position '
          '(%d batches read) continues in the changed data, so the batches '
          'from here are not those of an uninterrupted run; use a new '
          '--workdir with model.init_from=%s to start over from these '
          'weights instead.', ', '.join(data_keys), start, start,
          self.workdir)
    old_init = stored.get('model', {}).get('init_from', '')
    if self.config.model.init_from != old_init:
      if self.config.model.init_from:
        logging.warning('model.init_from=%s is read by a new run only: this '
                        'resume continues from its checkpoint %d '
                        '(config.json keeps model.init_from=%r).',
                        self.config.model.init_from, start, old_init)
      self.config.model.init_from = old_init
    old_steps = stored.get('train', {}).get('num_steps')
    if (old_steps and old_steps != self.config.train.num_steps and
        self.config.train.schedule != 'constant'):
      logging.warning(
          'train.num_steps %d -> %d: the %s learning-rate schedule is '
          'recomputed over %d steps; step %d trains at learning rate %.3g.',
          old_steps, self.config.train.num_steps, self.config.train.schedule,
          self.config.train.num_steps, start + 1, float(self.lr_fn(start)))

  def _loop(self, start, train_iter, writer):
    """Steps from `start` to the end (or a stop signal); returns the last
    eval, or {'step', 'stopped': signal name} when stopped."""
    cfg = self.config
    report_progress = writers.ProgressReporter(cfg.train.num_steps, writer,
                                               first_step=start)
    pixels = cfg.train.global_batch_size * int(np.prod(
        transforms.pair(cfg.data.crop_size)))
    train_metrics = metrics.Accumulator(cfg.model.num_classes)
    result = {}
    for step in range(start + 1, cfg.train.num_steps + 1):
      batch = self._guarded(step - 1, train_iter,
                            f'Reading the batch of step {step}',
                            lambda: next(train_iter))
      batch = sharding.to_global(batch, self.mesh)
      self.state, m = self.train_step(self.state, batch, self.step_rng)
      train_metrics.add(m, pixels)
      self._nonfinite = (m.nonfinite if self._nonfinite is None
                         else self._nonfinite.merge(m.nonfinite))
      report_progress(step)
      stopped = interrupt.received()
      if not stopped and self.checkpointer.reached_preemption(step):
        stopped = 'SIGTERM'
      save = bool(stopped) or step % cfg.checkpoint.every_steps == 0
      if save or step % cfg.train.log_every_steps == 0:
        self._check_finite(writer)  # before a save and at log time
      evaluated = self._guarded(step, train_iter,
                                f'Evaluation at step {step}',
                                lambda s=step: self._maybe_eval(s, writer))
      result = evaluated or result
      if not stopped and interrupt.received():  # came during the evaluation
        stopped = interrupt.received()
        self._check_finite(writer)
      # A stop logs the steps since the last log: a resume starts afresh.
      train_metrics = self._maybe_log(step, train_metrics, writer,
                                      force=bool(stopped))
      # An evaluation that beats the best kept is saved whatever the step.
      self.checkpointer.maybe_save(step, self.state, train_iter,
                                   force=bool(stopped),
                                   metrics=_scores_of(evaluated, step))
      if evaluated:
        self._write_best(step, writer)
      if stopped and step < cfg.train.num_steps:  # the last step: finished
        return {'step': step, 'stopped': stopped}
    self._check_finite(writer)
    return result

  def _evaluate_unscored(self, start, train_iter, writer):
    """Evaluates the step resumed from when it is an evaluation step whose
    checkpoint has no score (its evaluation failed and the run stopped):
    its scores are written and stored with it, so it can be the best.
    Returns the evaluation's scalars, or None."""
    every, last = self.config.eval.every_steps, self.config.train.num_steps
    if (not start or start > last or (start % every and start != last) or
        not self.evaluators or self.checkpointer.score(start) is not None):
      return None
    logging.info('Checkpoint %d was saved without its evaluation; '
                 'evaluating it now.', start)
    evaluated = self._guarded(start, train_iter, f'Evaluation at step {start}',
                              lambda: self._maybe_eval(start, writer))
    scores = _scores_of(evaluated, start)
    if scores is not None:
      self.checkpointer.add_score(start, scores)
      self._write_best(start, writer)
    return evaluated

  def _write_best(self, step, writer):
    """Logs the best checkpoint's mIoU and step so far at `step`."""
    best_step, best_miou = self.checkpointer.best()
    writer.write_scalars(step, {'eval/best_miou': best_miou,
                                'eval/best_step': best_step})

  def _guarded(self, step, train_iter, what, fn):
    """`fn()`; when it fails, the steps trained so far (`step`) are saved
    first, and an error a user can fix becomes one line that says so."""
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      kept = self._save_on_failure(step, train_iter)
      cause = errors.user_error(e)
      if cause is None:
        logging.error('%s failed; %s', what, kept)
        raise
      hint = (' (`python -m seg_jax.data.check` lists every bad file; '
              "data.on_bad_sample='skip' trains without them)"
              if isinstance(cause, errors.BadSampleError) else '')
      raise errors.StepFailedError(
          f'{what} failed: {cause}{hint} Training stopped; {kept}') from e

  def _save_on_failure(self, step, train_iter):
    """Saves `step` unless saved already; says where the steps are kept."""
    where = self.checkpointer.directory
    try:
      if step > 0:
        self.checkpointer.save_final(step, self.state, train_iter)
    except Exception as e:  # pylint: disable=broad-except
      logging.error('Saving checkpoint %d failed: %s', step, e)
    last = self.checkpointer.latest_step()
    if last is None:
      return 'no step had been trained, nothing was saved.'
    return (f'checkpoint {last} is saved in {where}: fix the problem and run '
            'the same command to resume from it.')

  def _check_finite(self, writer):
    """Reads the non-finite steps since the last check: stops the run
    (`errors.NonFiniteError`), or with `train.skip_nonfinite` counts them
    (their updates were skipped on device)."""
    if self._nonfinite is None:
      return
    count = int(self._nonfinite.count)
    first = int(self._nonfinite.first_step)
    self._nonfinite = None
    if not count:
      return
    if self.config.train.skip_nonfinite:
      self.skipped_nonfinite += count
      logging.warning('%d step(s) with a non-finite loss or gradient norm '
                      '(first: step %d) skipped; %d so far.', count, first,
                      self.skipped_nonfinite)
      writer.write_scalars(first, {'train/skipped_nonfinite_steps':
                                   self.skipped_nonfinite})
      return
    self.checkpointer.wait()
    last = self.checkpointer.latest_step()
    where = (f'the last good checkpoint is step {last} in '
             f'{self.checkpointer.directory}' if last is not None
             else 'no checkpoint was saved before it')
    raise errors.NonFiniteError(
        f'Step {first}: the loss or gradient norm is NaN/Inf; training '
        f'stopped and {where}. Lower train.learning_rate, set '
        'train.grad_clip_norm, check the data, or set '
        'train.skip_nonfinite=True to skip such updates.')

  def _maybe_log(self, step, train_metrics, writer, force=False):
    """Writes accumulated train metrics every `log_every_steps`, at the
    last step and (`force`) when the run stops; returns a fresh
    accumulator after writing."""
    every = self.config.train.log_every_steps
    if not force and step % every and step != self.config.train.num_steps:
      return train_metrics
    confusion, loss = train_metrics.result()
    scores = metrics.flatten_scores(metrics.scores_from_confusion(confusion))
    scalars = {'train/loss': loss}
    scalars.update({f'train/{k}': v for k, v in scores.items()
                    if '/' not in k})
    scalars['train/learning_rate'] = float(self.lr_fn(step - 1))
    if self.skips.count:
      scalars['data/skipped_samples'] = self.skips.count
    writer.write_scalars(step, scalars)
    self._last_train = {'loss': float(loss),
                        'pixel_accuracy': float(scores['pixel_accuracy']),
                        'miou': float(scores['miou'])}
    return metrics.Accumulator(self.config.model.num_classes)

  def _maybe_eval(self, step, writer, force=False):
    """Evaluates every `eval.every_steps` and at the last step; writes every
    score and a few overlays (unless `writer` is None). Returns the first
    evaluator's scalars."""
    every, last = self.config.eval.every_steps, self.config.train.num_steps
    if not self.evaluators or (not force and step % every and step != last):
      return None
    result = None
    for i, evaluator in enumerate(self.evaluators):
      t0 = time.time()
      r = evaluator.run(self.variables())
      scalars = r.scalars(self.class_names)
      if writer is not None:
        r.write(writer, step, _eval_prefix(i, r.name), self.class_names,
                self.palette, labels.ignore_label(self.config))
      logging.info('eval %s at step %d took %.1fs: mIoU=%.4f', r.name, step,
                   time.time() - t0, scalars['miou'])
      if not np.asarray(r.confusion).sum():
        logging.warning(
            'eval %s at step %d scored no pixel, so its scores are nan: '
            "every validation image was skipped (data.on_bad_sample='skip', "
            'reasons above) or is labelled data.ignore_label only.', r.name,
            step)
      result = result or {'step': step, **scalars}
    return result


def _scores_of(result, step):
  """{'miou': ...} of an evaluation result of `step` (for the checkpoint
  saved there), else None."""
  if not result or result.get('step') != step or 'miou' not in result:
    return None
  return {'miou': float(result['miou'])}


def train_and_evaluate(config, workdir):
  """Trains and evaluates as `config` says, checkpointing into `workdir`.

  Starting on a workdir that holds checkpoints resumes from the latest one:
  train state and data iterator both.

  Returns:
    dict with the final 'step' and the first in-training evaluator's
    scalars ('miou', 'pixel_accuracy', 'mean_accuracy', 'fwiou', 'mdice',
    'loss', 'iou/<class>', ...).
  """
  # One run at a time in a folder (process 0 holds the lock for the job).
  with (run_folder.lock(workdir) if jax.process_index() == 0 else
        contextlib.nullcontext()):
    trainer = Trainer(config, workdir)
    try:
      # Setting up is cut short by a stop signal (nothing trained is lost);
      # from the restore on, the step in progress finishes and is saved.
      with interrupt.deferred(enabled=jax.process_count() == 1):
        return trainer.run()
    finally:
      trainer.checkpointer.close()
