"""Evaluation of a whole split, as the config names it.

`config.eval.evaluators` maps names to settings (mode 'whole' or 'slide',
window, stride, scales, flip, average); the training loop runs the ones in
`config.eval.in_training` and `python -m seg_jax.evaluate` any of them. An
`Evaluator` streams the split once: every example counts exactly once
(padding blanks are all ignore), the confusion matrix is reduced on device
and added into an int64 host matrix before int32 could overflow, and no
prediction is kept beyond the few shown as pictures.
"""

import dataclasses
import math

import jax
import numpy as np

from seg_jax import errors, inference, labels, metrics, sharding, steps
from seg_jax.data import pipeline

def check_config(config):
  """The eval section's own check (see `seg_jax.validate`): intervals,
  batch size, and every evaluator training runs."""
  errors.config_int(config, 'eval.every_steps')
  errors.config_int(config, 'eval.global_batch_size')
  errors.config_int(config, 'eval.num_images', 0)
  for name in config.eval.in_training:
    inference.spec_from_config(config, name)


@dataclasses.dataclass
class EvalResult:
  """What one evaluation measured, and every view of it: scalars for the
  writers, the per-class table, example pictures and the JSON report. A
  new score or picture is added here, and every caller has it.

  Attributes:
    name: evaluator name ('<name>+<refiner>' when refined, e.g. 'whole+crf').
    confusion: (C, C) int64, rows = true class, columns = prediction.
    loss: mean cross-entropy of the merged logits over the batches.
    scores: `metrics.scores_from_confusion(confusion)`.
    examples: (image, label, prediction) of the first examples, cropped to
      their original size, for pictures.
    settings: the inference settings (and the refiner's) that produced it.
  """
  name: str
  confusion: np.ndarray
  loss: float
  scores: dict
  examples: list
  settings: dict = dataclasses.field(default_factory=dict)

  def scalars(self, class_names):
    """Flat {name: float} for writers: 'loss', means, per-class values."""
    return {'loss': self.loss,
            **metrics.flatten_scores(self.scores, class_names)}

  def table(self, class_names):
    """The per-class table and the means, as printed by `evaluate`."""
    return metrics.format_table(self.scores, class_names)

  def panels(self, palette, ignore_label):
    """One picture per example: image | ground truth | prediction."""
    return example_panels(self.examples, palette, ignore_label)

  def write(self, writer, step, prefix, class_names, palette, ignore_label):
    """Writes the scalars and pictures under `prefix` (e.g. 'eval')."""
    writer.write_scalars(step, {f'{prefix}/{k}': v for k, v in
                                self.scalars(class_names).items()})
    writer.write_images(step, {
        f'{prefix}/example_{j}': p[None]
        for j, p in enumerate(self.panels(palette, ignore_label))})
    writer.flush()

  def report(self, class_names, *, split, step):
    """Everything measured, as a JSON-ready dict (NaN: null)."""
    s = self.scores
    per_class = {
        name: {'iou': s['iou'][i], 'acc': s['class_accuracy'][i],
               'dice': s['dice'][i], 'precision': s['precision'][i],
               'recall': s['recall'][i], 'fscore': s['fscore'][i],
               'label_pixels': int(s['label_count'][i]),
               'predicted_pixels': int(s['pred_count'][i])}
        for i, name in enumerate(class_names)}
    means = {'aAcc': s['pixel_accuracy'], 'mAcc': s['mean_accuracy'],
             'mIoU': s['miou'], 'fwIoU': s['fwiou'], 'mDice': s['mdice'],
             'mFscore': s['mfscore'], 'mPrecision': s['mprecision'],
             'mRecall': s['mrecall'], 'loss': self.loss}
    return {
        'step': int(step), 'split': split, 'evaluator': self.name,
        'settings': _plain(self.settings),
        **{k: _json_number(v) for k, v in means.items()},
        'per_class': {n: {k: (_json_number(v) if isinstance(v, float) else v)
                          for k, v in d.items()}
                      for n, d in per_class.items()},
        'class_names': list(class_names),
        'confusion_matrix': self.confusion.tolist(),
    }


def _json_number(value):
  value = float(value)
  return None if math.isnan(value) else value


def _plain(settings):
  """Settings as JSON data: tuples as lists, nested dicts kept."""
  return {k: (list(v) if isinstance(v, tuple) else
              _plain(v) if isinstance(v, dict) else v)
          for k, v in settings.items()}


class Evaluator:
  """Evaluates variables on a split with one evaluator's settings.

  Args:
    name: a key of `config.eval.evaluators`.
    config: the run's config.
    model: the flax module.
    mesh: device mesh; the batch is split over its 'data' axis.
    source: the split's random-access source.
    num_shown: examples of the first batch kept for pictures.
    skip_counter: counts bad records skipped by the source.
    refiner: an optional refinement step composed with the inference, run
      on the host on each example: an object with `name`, `settings()` and
      `__call__(image (h, w, 3) uint8, logits (h, w, C)) -> log-probabilities
      (h, w, C)` (e.g. `crf.Refiner`). One process only.
  """

  def __init__(self, name, config, model, mesh, source, num_shown=0,
               skip_counter=None, refiner=None):
    self.config, self.mesh, self.source = config, mesh, source
    self.spec = inference.spec_from_config(config, name)
    self.name = name if refiner is None else f'{name}+{refiner.name}'
    self.settings = dataclasses.asdict(self.spec)
    if refiner is not None:
      self.settings[refiner.name] = refiner.settings()
    self.num_classes = config.model.num_classes
    sharding.check_batch_size(config.eval.global_batch_size, mesh,
                              'eval.global_batch_size')
    self.global_batch = split_batch_size(config.eval.global_batch_size, mesh,
                                         len(source))
    self.num_shown = min(num_shown, self.global_batch // jax.process_count())
    self.skips = skip_counter or pipeline.SkipCounter()
    self.refiner = refiner
    if refiner is not None and jax.process_count() > 1:
      raise errors.ConfigError(f'Evaluation with {refiner.name} runs in one '
                               'process.')
    self.eval_step = steps.make_eval_step(model, config, mesh, self.spec,
                                          self.num_shown,
                                          with_logits=refiner is not None)

  def run(self, variables, progress=None):
    """Evaluates `variables` ({'params', 'batch_stats'}) on the split.

    Args:
      variables: model variables, replicated on the mesh.
      progress: optional callable(batches_done, num_batches).

    Returns:
      `EvalResult`.
    """
    ds, num_batches = pipeline.create_eval_dataset(
        self.source, pipeline.eval_transform(self.config),
        global_batch_size=self.global_batch,
        num_threads=self.config.data.num_threads, skip_counter=self.skips)
    acc = metrics.Accumulator(self.num_classes)
    examples = []
    for i, batch in enumerate(ds):
      inputs = sharding.to_global(
          {k: batch[k] for k in ('image', 'label', 'size')}, self.mesh)
      try:
        if self.refiner is None:
          m, shown = self.eval_step(variables, inputs)
          acc.add(m, pixels=batch['label'].size * jax.process_count())
          shown = np.asarray(shown) if i == 0 else None
        else:
          _, _, logits = self.eval_step(variables, inputs)
          shown = self._refine_and_count(batch, np.asarray(logits), acc)
      except jax.errors.JaxRuntimeError as e:
        if not errors.out_of_memory(e):
          raise
        raise errors.ConfigError(self._out_of_memory(batch)) from e
      if i == 0 and self.num_shown:
        examples = _examples(batch, shown[:self.num_shown])
      if progress is not None:
        progress(i + 1, num_batches)
    confusion, loss = acc.result()
    return EvalResult(self.name, confusion, loss,
                      metrics.scores_from_confusion(confusion), examples,
                      self.settings)

  def _out_of_memory(self, batch):
    """What to say when a batch did not fit: a smaller batch, or where the
    batch is already one image a device, smaller images."""
    size = f'{batch["image"].shape[1]}x{batch["image"].shape[2]}'
    unit = sharding.batch_unit(self.mesh)
    fix = (f'set --config.eval.global_batch_size below {self.global_batch} '
           f'(a multiple of {unit})' if self.global_batch > unit else
           'the batch is one image a device already: evaluate in windows '
           "(the 'slide' evaluator: --evaluator=slide, in training "
           '--config.eval.in_training=slide)')
    return (f'Evaluation {self.name} ran out of memory on a batch of '
            f'{self.global_batch} images of {size} (HxW): {fix}.')

  def _refine_and_count(self, batch, logits, acc):
    """Refines each example's logits and adds its confusion matrix and
    cross-entropy to `acc` on the host; returns the refined predictions."""
    ignore = labels.ignore_label(self.config)
    predictions = np.zeros(batch['label'].shape, np.int64)
    for j in np.flatnonzero(batch['index'] >= 0):
      h, w = batch['size'][j]
      log_q = np.asarray(self.refiner(batch['image'][j, :h, :w],
                                      logits[j, :h, :w]))
      predictions[j, :h, :w] = log_q.argmax(-1)
      label = batch['label'][j, :h, :w].astype(np.int64)
      valid = label != ignore
      acc.add_host(metrics.confusion_matrix_np(
          predictions[j, :h, :w][valid], label[valid], self.num_classes),
                   -np.take_along_axis(log_q[valid], label[valid][:, None],
                                       -1).sum(), int(valid.sum()))
    return predictions


def split_batch_size(global_batch_size, mesh, num_examples):
  """`eval.global_batch_size`, or fewer when the split is smaller: the
  least multiple of the devices and processes the batch is split over that
  holds every example (a 5-image split on one device: 5, not 64 images of
  padding)."""
  unit = sharding.batch_unit(mesh)
  return min(global_batch_size, max(unit, -(-num_examples // unit) * unit))


def _examples(batch, predictions):
  """[(image, label, prediction)] of a host batch's first examples, each
  cropped to its original size; padding blanks are left out."""
  out = []
  for j, pred in enumerate(predictions):
    if batch['index'][j] < 0:
      continue
    h, w = batch['size'][j]
    out.append((batch['image'][j, :h, :w], batch['label'][j, :h, :w],
                pred[:h, :w]))
  return out


def example_panels(examples, palette, ignore_label):
  """One picture per example: image | ground truth overlay | prediction
  overlay, side by side, (H, 3W, 3) uint8."""
  return [np.concatenate([
      labels.display_rgb(image), labels.overlay(image, label, palette,
                            ignore_label_value=ignore_label),
      labels.overlay(image, pred, palette, ignore_label_value=ignore_label)],
                         axis=1) for image, label, pred in examples]


def create_evaluators(config, model, mesh, source, names, num_shown=0,
                      skip_counter=None):
  """`Evaluator`s for `names` (keys of `config.eval.evaluators`), in order."""
  if not names:
    raise errors.ConfigError('No evaluator named: set eval.in_training to one or '
                     f'more of {sorted(config.eval.evaluators)}.')
  return [Evaluator(n, config, model, mesh, source, num_shown, skip_counter)
          for n in names]

