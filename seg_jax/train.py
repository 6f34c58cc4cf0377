"""Training: state, jitted train/eval steps, and the train_and_evaluate loop."""

import functools
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from seg_jax import checkpoint, data, losses, sharding
from seg_jax import metrics as seg_metrics
from seg_jax import models
from seg_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
  """Everything a resume needs besides the data iterator; a plain pytree."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_model(config):
  """The model of `config.model`, computing in `config.train.precision`."""
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if config.train.precision not in dtypes:
    raise ValueError(f'train.precision={config.train.precision!r}; use one '
                     f'of {sorted(dtypes)}.')
  return models.create_model(config.model.name, config.model.num_classes,
                             dtype=dtypes[config.train.precision],
                             **config.model.kwargs)


def create_learning_rate_fn(cfg):
  """Learning-rate schedule from `config.train`, warmup included."""
  decay_steps = max(cfg.num_steps - cfg.warmup_steps, 1)
  if cfg.schedule == 'poly':
    decay = optax.polynomial_schedule(cfg.learning_rate, cfg.end_learning_rate,
                                      cfg.poly_power, decay_steps)
  elif cfg.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(
        cfg.learning_rate, decay_steps,
        alpha=cfg.end_learning_rate / cfg.learning_rate)
  elif cfg.schedule == 'constant':
    decay = optax.constant_schedule(cfg.learning_rate)
  else:
    raise ValueError(f"train.schedule={cfg.schedule!r}; use 'poly', 'cosine' "
                     "or 'constant'.")
  if not cfg.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def create_optimizer(cfg):
  """optax optimizer from `config.train`: SGD (coupled L2) or AdamW."""
  lr = create_learning_rate_fn(cfg)
  if cfg.optimizer == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(lr, momentum=cfg.momentum))
  elif cfg.optimizer == 'adamw':
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
  else:
    raise ValueError(f"train.optimizer={cfg.optimizer!r}; use 'sgd' or "
                     "'adamw'.")
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx


def create_train_state(model, tx, rng, input_shape, mesh, init_fn=None):
  """Initialises parameters and optimizer state, replicated on the mesh.

  Args:
    model: the flax module.
    tx: the optax optimizer.
    rng: initialisation key.
    input_shape: (1, H, W, 3) example input shape.
    mesh: device mesh.
    init_fn: optional host function variables -> variables applied after
      initialisation (e.g. loading pretrained weights).
  """
  repl = sharding.replicated(mesh)
  variables = jax.jit(
      lambda rng: model.init(rng, jnp.zeros(input_shape, jnp.float32),
                             train=False), out_shardings=repl)(rng)
  if init_fn is not None:
    variables = init_fn(jax.device_get(variables))

  def build(variables):
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params))

  return jax.jit(build, out_shardings=repl)(variables)


def pretrained_init_fn(config):
  """The `init_fn` loading `config.model.init_from`, or None."""
  path, fmt = config.model.init_from, config.model.init_format
  if not path:
    return None
  from seg_jax.models import convert, weights  # pylint: disable=g-import-not-at-top

  def init_fn(variables):
    tensors = weights.load_weights(path)
    pretrained = convert.from_torchvision(fmt, tensors)
    variables, n, skipped = convert.load_pretrained(
        variables, pretrained, f'model.init_from={path}')
    logging.info('Loaded %d tensors from %s (%s); kept fresh: %s', n, path,
                 fmt, skipped or 'none')
    return variables

  return init_fn


def _normalize(images, mean, std):
  """uint8 (N, H, W, 3) -> float32, per-channel standardised, on device."""
  return (images.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)


def make_train_step(model, tx, config, mesh):
  """Returns jitted `train_step(state, batch, rng) -> (state, SegMetrics)`.

  The batch is sharded over 'data', the state replicated and donated;
  BatchNorm statistics under jit are global over the sharded batch.
  """
  mean, std, ignore = config.data.mean, config.data.std, config.data.ignore_label
  aux_weight = config.train.aux_loss_weight
  weights = tuple(config.train.class_weights) or None
  if weights and len(weights) != config.model.num_classes:
    raise ValueError(f'train.class_weights has {len(weights)} entries; '
                     f'model.num_classes={config.model.num_classes}.')
  ce = functools.partial(losses.cross_entropy, class_weights=weights,
                         ignore_label=ignore)

  def train_step(state, batch, rng):
    images = batch['image']
    if 'colour' in batch:  # per-example photometric distortion
      images = pipeline.transforms.apply_colour(images, batch['colour'])
    images = _normalize(images, mean, std)
    labels = batch['label'].astype(jnp.int32)
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      outputs, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images,
          train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
      # Models with an auxiliary head return (logits, aux_logits) in training.
      logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
      loss = ce(logits, labels)
      if aux is not None:
        loss += aux_weight * ce(aux, labels)
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates_tx, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params,
                                                        updates_tx),
        batch_stats=updates.get('batch_stats', {}), opt_state=opt_state)
    return new_state, seg_metrics.SegMetrics.single_from_model_output(
        loss=loss, logits=logits, labels=labels)

  repl, batch_sharding = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(train_step, in_shardings=(repl, batch_sharding, repl),
                 out_shardings=(repl, repl), donate_argnums=0)


def make_eval_step(model, config, mesh):
  """Returns jitted `eval_step(state, batch) -> SegMetrics` (no update)."""
  mean, std, ignore = config.data.mean, config.data.std, config.data.ignore_label

  def eval_step(state, batch):
    images = _normalize(batch['image'], mean, std)
    labels = batch['label'].astype(jnp.int32)
    logits = model.apply({'params': state.params,
                          'batch_stats': state.batch_stats}, images,
                         train=False)
    if logits.shape[1:3] != labels.shape[1:]:  # data.eval_scale != 1
      logits = jax.image.resize(
          logits, (*labels.shape, logits.shape[-1]), 'bilinear')
    loss = losses.cross_entropy(logits, labels, ignore_label=ignore)
    return seg_metrics.SegMetrics.single_from_model_output(
        loss=loss, logits=logits, labels=labels)

  repl, batch_sharding = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(repl, batch_sharding),
                 out_shardings=repl)


def evaluate(eval_step, state, eval_ds, mesh):
  """Runs `eval_step` over every batch of `eval_ds`; returns merged metrics."""
  merged = None
  for batch in eval_ds:
    batch = sharding.to_global({k: batch[k] for k in ('image', 'label')},
                               mesh)
    m = eval_step(state, batch)
    merged = m if merged is None else merged.merge(m)
  return merged


class _LoggingWriter:
  """Console-only metric writer for machines without tensorflow."""

  def write_scalars(self, step, scalars):
    logging.info('[%d] %s', step, ', '.join(
        f'{k}={v:.5g}' for k, v in scalars.items()))

  def flush(self):
    pass

  def close(self):
    pass


def create_writer_and_progress(workdir, num_steps):
  """clu metric writer (TensorBoard + console) and a progress/ETA reporter.

  clu's writers import tensorflow; where it is absent (accelerator hosts)
  metrics go to the console only and progress is not reported.
  """
  try:
    from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning('clu metric writers unavailable (%s): logging to the '
                    'console only.', e)
    return _LoggingWriter(), lambda step: None
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps,
                                           writer=writer, every_secs=30)
  return writer, report


class _StopSignal:
  """Turns SIGTERM into a flag the loop checks, to save before exiting.

  orbax's own preemption check only works under `jax.distributed`; a
  single-process job needs this.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint, then stopping.')
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Trainer:
  """Holds what one training run needs; `run()` is the loop."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes)
    local_batch = sharding.check_batch_size(config.train.global_batch_size,
                                            self.mesh)
    sharding.check_batch_size(config.eval.global_batch_size, self.mesh,
                              'eval.global_batch_size')
    train_source = data.create_source(config, 'train')
    self.eval_source = data.create_source(config, 'val')
    self.class_names = list(train_source.class_names)
    self.skips = pipeline.SkipCounter()  # bad records skipped by this host
    self.train_ds = pipeline.create_train_dataset(
        train_source, pipeline.train_transform(config), seed=config.seed,
        batch_size=local_batch, worker_count=config.data.worker_count,
        num_threads=config.data.num_threads, prefetch=config.data.prefetch,
        skip_counter=self.skips)
    model = create_model(config)
    tx = create_optimizer(config.train)
    crop = pipeline.transforms.pair(config.data.crop_size)
    self.state = create_train_state(
        model, tx, jax.random.key(config.seed), (1, *crop, 3), self.mesh,
        pretrained_init_fn(config))
    self.train_step = make_train_step(model, tx, config, self.mesh)
    self.eval_step = make_eval_step(model, config, self.mesh)
    self.step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    self.checkpointer = checkpoint.Checkpointer(
        f'{workdir}/checkpoints', every_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep)

  def evaluate(self):
    """Metrics over the whole val split, each example exactly once."""
    eval_ds, _ = pipeline.create_eval_dataset(
        self.eval_source, pipeline.eval_transform(self.config),
        global_batch_size=self.config.eval.global_batch_size,
        skip_counter=self.skips)
    merged = evaluate(self.eval_step, self.state, eval_ds, self.mesh)
    return seg_metrics.summarize(merged, self.class_names)

  def run(self):
    """Trains to `train.num_steps` (resuming if possible); returns metrics.

    Returns:
      dict of the final evaluation's scalars, plus 'step'; when stopped by
      SIGTERM, the step reached and no evaluation.
    """
    cfg = self.config
    train_iter = iter(self.train_ds)
    self.state, train_iter = self.checkpointer.restore_or_keep(
        self.state, train_iter)
    start = int(self.state.step)
    if start:
      logging.info('Resumed from step %d in %s', start, self.workdir)
    writer, report_progress = create_writer_and_progress(
        self.workdir, cfg.train.num_steps)
    train_metrics, result = None, {}
    with _StopSignal() as stop:
      for step in range(start + 1, cfg.train.num_steps + 1):
        batch = sharding.to_global(next(train_iter), self.mesh)
        self.state, m = self.train_step(self.state, batch, self.step_rng)
        train_metrics = m if train_metrics is None else train_metrics.merge(m)
        report_progress(step)
        train_metrics = self._maybe_log(step, train_metrics, writer)
        result = self._maybe_eval(step, writer) or result
        self.checkpointer.maybe_save(step, self.state, train_iter,
                                     force=stop.received)
        if stop.received:
          result = {'step': step}
          break
    self.checkpointer.save_final(int(self.state.step), self.state, train_iter)
    if not result:  # resumed from a finished run: report its final metrics
      result = {'step': int(self.state.step), **self.evaluate()}
    writer.flush()
    return result

  def _maybe_log(self, step, train_metrics, writer):
    """Writes accumulated train metrics every `log_every_steps`; resets them."""
    every = self.config.train.log_every_steps
    if step % every and step != self.config.train.num_steps:
      return train_metrics
    scalars = seg_metrics.summarize(train_metrics)
    scalars = {f'train/{k}': v for k, v in scalars.items()
               if not k.startswith('iou/')}
    scalars['train/learning_rate'] = float(
        create_learning_rate_fn(self.config.train)(step - 1))
    if self.skips.count:
      scalars['data/skipped_samples'] = self.skips.count
    writer.write_scalars(step, scalars)
    return None

  def _maybe_eval(self, step, writer):
    """Evaluates every `eval.every_steps` and at the last step."""
    if step % self.config.eval.every_steps and step != self.config.train.num_steps:
      return None
    t0 = time.time()
    scalars = self.evaluate()
    writer.write_scalars(step, {f'eval/{k}': v for k, v in scalars.items()})
    writer.flush()
    logging.info('eval at step %d took %.1fs: mIoU=%.4f', step,
                 time.time() - t0, scalars['miou'])
    return {'step': step, **scalars}


def train_and_evaluate(config, workdir):
  """Trains and evaluates as `config` says, checkpointing into `workdir`.

  Starting on a workdir that holds checkpoints resumes from the latest one:
  train state and data iterator both.

  Returns:
    dict with the final 'step' and the last evaluation's scalars
    ('miou', 'pixel_accuracy', 'mean_accuracy', 'loss', 'iou/<class>').
  """
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.checkpointer.close()
