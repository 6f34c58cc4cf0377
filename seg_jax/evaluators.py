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

import jax
import numpy as np

from seg_jax import labels, metrics, sharding, steps
from seg_jax.data import pipeline, transforms

EVAL_KEYS = ('mode', 'window', 'stride', 'scales', 'flip', 'average')


def _size(value, key):
  """() -> (); an int or a pair of positive ints -> (height, width)."""
  if isinstance(value, int) and not isinstance(value, bool):
    value = (value, value)
  value = tuple(value) if isinstance(value, (tuple, list)) else value
  if value == () or (isinstance(value, tuple) and len(value) == 2 and
                     all(isinstance(v, int) and v > 0 for v in value)):
    return value
  raise ValueError(f'{key}={value!r}: give (height, width) in pixels, one '
                   'int, or () for the default.')


def _scales(value, key):
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (float(value),)
  if isinstance(value, (tuple, list)) and all(
      isinstance(v, (int, float)) for v in value):
    return tuple(float(v) for v in value)
  raise ValueError(f'{key}={value!r}: give a scale or a tuple of scales, '
                   'e.g. (0.5, 1.0, 1.5).')


def spec_from_config(config, name):
  """The `steps.InferenceSpec` of evaluator `name` in `config.eval`.

  An empty window is the training crop (`data.crop_size`); an empty stride
  two thirds of the window, as mmsegmentation's slide recipes use. Errors
  name the key (`eval.evaluators.<name>.<key>`).
  """
  evaluators = config.eval.evaluators
  if name not in evaluators:
    raise ValueError(f'Unknown evaluator {name!r}: config.eval.evaluators '
                     f'defines {sorted(evaluators)}.')
  e, where = evaluators[name], f'eval.evaluators.{name}'
  unknown = sorted(set(e) - set(EVAL_KEYS))
  if unknown:
    raise ValueError(f'{where} has unknown key(s) {unknown}; the keys are '
                     f'{list(EVAL_KEYS)}.')
  window = (_size(e.get('window', ()), f'{where}.window') or
            transforms.pair(config.data.crop_size))
  stride = _size(e.get('stride', ()), f'{where}.stride') or tuple(
      max(1, w * 2 // 3) for w in window)
  try:
    return steps.InferenceSpec(
        mode=e.get('mode', 'whole'), window=window, stride=stride,
        scales=_scales(e.get('scales', (1.0,)), f'{where}.scales'),
        flip=bool(e.get('flip', False)), average=e.get('average', 'logits'))
  except ValueError as err:
    raise ValueError(f'{where}: {err}') from None


@dataclasses.dataclass
class EvalResult:
  """What one evaluation measured.

  Attributes:
    name: evaluator name.
    confusion: (C, C) int64, rows = true class, columns = prediction.
    loss: mean cross-entropy of the merged logits over the batches.
    scores: `metrics.scores_from_confusion(confusion)`.
    examples: (image, label, prediction) of the first examples, cropped to
      their original size, for pictures.
  """
  name: str
  confusion: np.ndarray
  loss: float
  scores: dict
  examples: list

  def scalars(self, class_names):
    """Flat {name: float} for writers: 'loss', means, per-class values."""
    return {'loss': self.loss,
            **metrics.flatten_scores(self.scores, class_names)}


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
    crf_params: a `crf.CRFParams` to refine every prediction with the dense
      CRF on the host (one process only), or None.
  """

  def __init__(self, name, config, model, mesh, source, num_shown=0,
               skip_counter=None, crf_params=None):
    self.name, self.config, self.mesh, self.source = name, config, mesh, source
    self.spec = spec_from_config(config, name)
    self.num_classes = config.model.num_classes
    self.global_batch = config.eval.global_batch_size
    sharding.check_batch_size(self.global_batch, mesh,
                              'eval.global_batch_size')
    self.num_shown = min(num_shown, self.global_batch // jax.process_count())
    self.skips = skip_counter or pipeline.SkipCounter()
    self.crf_params = crf_params
    if crf_params is not None and jax.process_count() > 1:
      raise ValueError('CRF evaluation runs in one process.')
    self.eval_step = steps.make_eval_step(model, config, mesh, self.spec,
                                          self.num_shown,
                                          with_logits=crf_params is not None)

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
      if self.crf_params is None:
        m, shown = self.eval_step(variables, inputs)
        acc.add(m, pixels=batch['label'].size * jax.process_count())
        shown = np.asarray(shown) if i == 0 else None
      else:
        _, _, logits = self.eval_step(variables, inputs)
        shown = self._refine_and_count(batch, np.asarray(logits), acc)
      if i == 0 and self.num_shown:
        examples = _examples(batch, shown[:self.num_shown])
      if progress is not None:
        progress(i + 1, num_batches)
    confusion, loss = acc.result()
    return EvalResult(self.name, confusion, loss,
                      metrics.scores_from_confusion(confusion), examples)


  def _refine_and_count(self, batch, logits, acc):
    """CRF-refines each example's logits and adds its confusion matrix and
    cross-entropy to `acc` on the host; returns the refined predictions."""
    from seg_jax import crf  # pylint: disable=g-import-not-at-top
    ignore = labels.ignore_label(self.config)
    predictions = np.zeros(batch['label'].shape, np.int64)
    for j in np.flatnonzero(batch['index'] >= 0):
      h, w = batch['size'][j]
      log_q = np.asarray(crf.refine(batch['image'][j, :h, :w],
                                    logits[j, :h, :w], self.crf_params))
      predictions[j, :h, :w] = log_q.argmax(-1)
      label = batch['label'][j, :h, :w].astype(np.int64)
      valid = label != ignore
      acc.add_host(metrics.confusion_matrix_np(
          predictions[j, :h, :w][valid], label[valid], self.num_classes),
                   -np.take_along_axis(log_q[valid], label[valid][:, None],
                                       -1).sum(), int(valid.sum()))
    return predictions


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
      image, labels.overlay(image, label, palette,
                            ignore_label_value=ignore_label),
      labels.overlay(image, pred, palette, ignore_label_value=ignore_label)],
                         axis=1) for image, label, pred in examples]


def create_evaluators(config, model, mesh, source, names, num_shown=0,
                      skip_counter=None):
  """`Evaluator`s for `names` (keys of `config.eval.evaluators`), in order."""
  if not names:
    raise ValueError('No evaluator named: set eval.in_training to one or '
                     f'more of {sorted(config.eval.evaluators)}.')
  return [Evaluator(n, config, model, mesh, source, num_shown, skip_counter)
          for n in names]

