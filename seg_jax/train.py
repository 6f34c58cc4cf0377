"""The training loop: train, log, evaluate, checkpoint, stop.

Everything the loop runs is built elsewhere: the model and train state in
`state`, the optimizer in `optim`, the jitted step in `steps`, evaluations
in `evaluators`, event files and progress in `writers`.
"""

import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from seg_jax import (checkpoint, data, evaluators, labels, metrics, optim,
                     sharding, state, steps, validate, writers)
from seg_jax.data import pipeline, transforms


class _StopSignal:
  """Turns SIGTERM and SIGINT into a flag the loop checks, to finish the
  step, save and exit.

  A single process handles both itself (orbax's preemption check only works
  under `jax.distributed`); in a multi-process job JAX's preemption notice
  (SIGTERM) is agreed on by all processes through the checkpointer, and
  SIGINT keeps its default. A second signal of the same kind stops at once.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None  # the signal's name, once one arrived
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1:
      for sig in self._SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received == name:
      raise KeyboardInterrupt(f'second {name}')
    logging.warning('%s received: finishing the step, saving a checkpoint, '
                    'then stopping (send it again to stop at once).', name)
    self.received = name

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _eval_prefix(index, name):
  """TensorBoard prefix of the index-th in-training evaluator."""
  return 'eval' if index == 0 else f'eval_{name}'


class Trainer:
  """Holds what one training run needs; `run()` is the loop."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes)
    local_batch = sharding.check_batch_size(config.train.global_batch_size,
                                            self.mesh)
    train_source = data.create_source(config, 'train')
    self.class_names = list(train_source.class_names)
    self.palette = train_source.palette
    self.skips = pipeline.SkipCounter()  # bad records skipped by this host
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
        self.mesh, state.pretrained_init_fn(config),
        fsdp_min_size=config.mesh.fsdp_min_size,
        ema=config.train.ema_decay > 0)
    self.train_step = steps.make_train_step(
        model, tx, config, self.mesh,
        jax.tree.map(lambda x: x.sharding, self.state))
    self.evaluators = evaluators.create_evaluators(
        config, model, self.mesh, data.create_source(config, 'val'),
        tuple(config.eval.in_training), num_shown=config.eval.num_images,
        skip_counter=self.skips)
    self.step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    self._nonfinite = None  # metrics.NonFinite since the last check
    self.best = None  # (step, mIoU) of the best evaluation so far
    self._last_eval = None  # (step, mIoU) of the latest evaluation
    self.skipped_nonfinite = 0
    self.checkpointer = checkpoint.Checkpointer(
        state.checkpoint_dir(workdir),
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
      by SIGTERM, the step reached and no evaluation.
    """
    train_iter = iter(self.train_ds)
    self.state, train_iter = self.checkpointer.restore_or_keep(
        self.state, train_iter)
    start = int(self.state.step)
    self.best = self.checkpointer.best()
    if start:
      logging.info('Resumed from step %d in %s; best mIoU so far: %s',
                   start, self.workdir, 'none' if self.best is None else
                   f'{self.best[1]:.4f} at step {self.best[0]}')
    writer = writers.create_writer(self.workdir,
                                   write_files=jax.process_index() == 0)
    try:
      if not start:
        writer.write_hparams(self.config.to_dict())
      result = self._loop(start, train_iter, writer)
      step = int(self.state.step)
      self.checkpointer.save_final(step, self.state, train_iter,
                                   self._eval_metrics(step))
      if not result:  # resumed from a finished run: report its final metrics
        result = self._maybe_eval(step, None, force=True)
      return result
    finally:
      writer.close()

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
    with _StopSignal() as stop:
      for step in range(start + 1, cfg.train.num_steps + 1):
        batch = sharding.to_global(next(train_iter), self.mesh)
        self.state, m = self.train_step(self.state, batch, self.step_rng)
        train_metrics.add(m, pixels)
        self._nonfinite = (m.nonfinite if self._nonfinite is None
                           else self._nonfinite.merge(m.nonfinite))
        report_progress(step)
        if not stop.received and self.checkpointer.reached_preemption(step):
          stop.received = 'SIGTERM'
        save = bool(stop.received) or step % cfg.checkpoint.every_steps == 0
        if save or step % cfg.train.log_every_steps == 0:
          self._check_finite(writer)  # before a save and at log time
        train_metrics = self._maybe_log(step, train_metrics, writer)
        result = self._maybe_eval(step, writer) or result
        evaluated = self._eval_metrics(step)
        new_best = evaluated is not None and self.best[0] == step
        self.checkpointer.maybe_save(step, self.state, train_iter,
                                     force=bool(stop.received) or new_best,
                                     metrics=evaluated)
        if stop.received:
          return {'step': step, 'stopped': stop.received}
    self._check_finite(writer)
    return result

  def _check_finite(self, writer):
    """Reads the non-finite steps since the last check: stops the run
    (`validate.NonFiniteError`), or with `train.skip_nonfinite` counts them
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
    raise validate.NonFiniteError(
        f'Step {first}: the loss or gradient norm is NaN/Inf; training '
        f'stopped and {where}. Lower train.learning_rate, set '
        'train.grad_clip_norm, check the data, or set '
        'train.skip_nonfinite=True to skip such updates.')

  def _maybe_log(self, step, train_metrics, writer):
    """Writes accumulated train metrics every `log_every_steps`; returns a
    fresh accumulator after writing."""
    every = self.config.train.log_every_steps
    if step % every and step != self.config.train.num_steps:
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
    return metrics.Accumulator(self.config.model.num_classes)

  def _maybe_eval(self, step, writer, force=False):
    """Evaluates every `eval.every_steps` and at the last step; writes every
    score and a few overlays (unless `writer` is None). Returns the first
    evaluator's scalars."""
    every, last = self.config.eval.every_steps, self.config.train.num_steps
    if not force and step % every and step != last:
      return None
    result = None
    for i, evaluator in enumerate(self.evaluators):
      t0 = time.time()
      r = evaluator.run(self.variables())
      scalars = r.scalars(self.class_names)
      if writer is not None:
        self._write_eval(step, writer, _eval_prefix(i, r.name), r, scalars)
      logging.info('eval %s at step %d took %.1fs: mIoU=%.4f', r.name, step,
                   time.time() - t0, scalars['miou'])
      result = result or {'step': step, **scalars}
    self._record_eval(step, result['miou'], writer)
    return result

  def _record_eval(self, step, miou, writer):
    """Keeps the first evaluator's mIoU of `step` for the checkpoint saved
    there, and the best so far (written as eval/best_miou, best_step)."""
    self._last_eval = (step, miou)
    if self.best is None or miou > self.best[1]:
      self.best = (step, miou)
    if writer is not None:
      writer.write_scalars(step, {'eval/best_miou': self.best[1],
                                  'eval/best_step': self.best[0]})

  def _eval_metrics(self, step):
    """{'miou': ...} when `step` was just evaluated, else None."""
    if self._last_eval is None or self._last_eval[0] != step:
      return None
    return {'miou': float(self._last_eval[1])}

  def _write_eval(self, step, writer, prefix, result, scalars):
    writer.write_scalars(step, {f'{prefix}/{k}': v
                                for k, v in scalars.items()})
    panels = evaluators.example_panels(result.examples, self.palette,
                                       labels.ignore_label(self.config))
    writer.write_images(step, {f'{prefix}/example_{j}': p[None]
                               for j, p in enumerate(panels)})
    writer.flush()


def train_and_evaluate(config, workdir):
  """Trains and evaluates as `config` says, checkpointing into `workdir`.

  Starting on a workdir that holds checkpoints resumes from the latest one:
  train state and data iterator both.

  Returns:
    dict with the final 'step' and the first in-training evaluator's
    scalars ('miou', 'pixel_accuracy', 'mean_accuracy', 'fwiou', 'mdice',
    'loss', 'iou/<class>', ...).
  """
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.checkpointer.close()
