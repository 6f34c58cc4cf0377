"""Segmentation metrics as clu metrics: a confusion matrix and what follows.

No `from __future__ import annotations` here: clu's `Collection` reads the
class annotations at runtime.
"""

import flax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from seg_jax.labels import IGNORE_LABEL


def confusion_matrix(preds, labels, num_classes, ignore_label=IGNORE_LABEL):
  """Counts (label, prediction) pairs on device.

  Args:
    preds: int predictions, any shape.
    labels: int labels of the same shape; `ignore_label` pixels are skipped.
    num_classes: C.
    ignore_label: label value that is not counted.

  Returns:
    (C, C) int32 matrix, rows = true class, columns = predicted class.
  """
  valid = labels != ignore_label
  index = jnp.where(valid, labels * num_classes + preds, 0).reshape(-1)
  return jnp.bincount(index, weights=valid.reshape(-1).astype(jnp.int32),
                      length=num_classes * num_classes).reshape(
                          num_classes, num_classes).astype(jnp.int32)


def confusion_matrix_np(preds, labels, num_classes):
  """`confusion_matrix` on the host (int64) for already-filtered pixels."""
  index = np.asarray(labels, np.int64) * num_classes + np.asarray(preds)
  return np.bincount(index.ravel(), minlength=num_classes**2).reshape(
      num_classes, num_classes)


def _nanmean(a):
  return float(np.nanmean(a)) if np.any(~np.isnan(a)) else np.nan


def _ratio(num, den):
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def scores_from_confusion(matrix, beta=1.0):
  """Every standard segmentation score of one dataset-level confusion matrix.

  Per class c, with TP its diagonal entry, L its row sum (labelled c) and P
  its column sum (predicted c): IoU = TP / (L + P - TP), accuracy (recall)
  = TP / L, precision = TP / P, Dice = 2 TP / (L + P), F-score =
  (1 + beta^2) precision recall / (beta^2 precision + recall). A ratio whose
  denominator is 0 is undefined (NaN) and left out of its mean: a class that
  appears neither in the labels nor in the predictions has no IoU; one that
  is labelled but never predicted has IoU 0 and no precision.

  Args:
    matrix: (C, C) counts, rows = true class, columns = predicted class.
    beta: the F-score's recall weight (1: F1).

  Returns:
    dict of numpy float64: 'pixel_accuracy' (aAcc), 'mean_accuracy' (mAcc),
    'miou', 'fwiou' (IoU weighted by each class's share of labelled pixels),
    'mdice', 'mfscore', 'mprecision', 'mrecall', and per class (C,) arrays
    'iou', 'class_accuracy', 'dice', 'precision', 'recall', 'fscore',
    'label_count', 'pred_count'.
  """
  m = np.asarray(matrix, np.float64)
  tp = np.diag(m)
  label_count, pred_count = m.sum(1), m.sum(0)
  iou = _ratio(tp, label_count + pred_count - tp)
  recall = _ratio(tp, label_count)
  precision = _ratio(tp, pred_count)
  dice = _ratio(2 * tp, label_count + pred_count)
  b2 = beta * beta
  fscore = _ratio((1 + b2) * precision * recall, b2 * precision + recall)
  total = m.sum()
  freq = label_count / total if total > 0 else np.zeros_like(label_count)
  return {
      'pixel_accuracy': float(tp.sum() / total) if total > 0 else np.nan,
      'mean_accuracy': _nanmean(recall),
      'miou': _nanmean(iou),
      'fwiou': float(np.sum(freq[freq > 0] * iou[freq > 0]))
               if total > 0 else np.nan,
      'mdice': _nanmean(dice),
      'mfscore': _nanmean(fscore),
      'mprecision': _nanmean(precision),
      'mrecall': _nanmean(recall),
      'iou': iou, 'class_accuracy': recall, 'dice': dice,
      'precision': precision, 'recall': recall, 'fscore': fscore,
      'label_count': label_count, 'pred_count': pred_count,
  }


MEAN_SCORES = ('pixel_accuracy', 'mean_accuracy', 'miou', 'fwiou', 'mdice',
               'mfscore', 'mprecision', 'mrecall')
# Per-class scores written to TensorBoard as '<name>/<class>'.
CLASS_SCORES = {'iou': 'iou', 'acc': 'class_accuracy', 'dice': 'dice'}


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """Confusion matrix accumulated on device; `compute()` gives the scores."""
  matrix: jnp.ndarray  # (C, C) int32

  @classmethod
  def from_model_output(cls, *, logits, labels, ignore_label=IGNORE_LABEL,
                        **_):
    preds = jnp.argmax(logits, axis=-1)
    return cls(matrix=confusion_matrix(preds, labels, logits.shape[-1],
                                       ignore_label))

  def merge(self, other):
    return type(self)(matrix=self.matrix + other.matrix)

  def compute(self):
    return scores_from_confusion(self.matrix)


@flax.struct.dataclass
class SegMetrics(clu_metrics.Collection):
  """Loss (mean over steps) and the confusion matrix of a train or eval run."""
  loss: clu_metrics.Average.from_output('loss')
  confusion: ConfusionMatrix


@flax.struct.dataclass
class NonFinite(clu_metrics.Metric):
  """How many train steps had a non-finite loss or gradient norm, and the
  first of them (int32 max when none)."""
  count: jnp.ndarray
  first_step: jnp.ndarray

  @classmethod
  def from_model_output(cls, *, nonfinite, step, **_):
    return cls(count=nonfinite.astype(jnp.int32),
               first_step=jnp.where(nonfinite, step,
                                    jnp.iinfo(jnp.int32).max).astype(
                                        jnp.int32))

  def merge(self, other):
    return type(self)(count=self.count + other.count,
                      first_step=jnp.minimum(self.first_step,
                                             other.first_step))

  def compute(self):
    return self.count


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """`SegMetrics` of train steps (the loss of finite steps only), plus the
  non-finite steps."""
  loss: clu_metrics.Average.from_output('loss')
  confusion: ConfusionMatrix
  nonfinite: NonFinite


def eval_metrics(loss, logits, labels, ignore_label=IGNORE_LABEL):
  """`SegMetrics` of an evaluation batch, the loss weighted by the batch's
  labelled pixels: merged over a split, it is the mean over its pixels, and
  a batch of padding blanks adds nothing."""
  pixels = jnp.sum(labels != ignore_label).astype(jnp.float32)
  m = SegMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=labels, ignore_label=ignore_label)
  return m.replace(loss=type(m.loss)(total=loss * pixels, count=pixels))


class Accumulator:
  """Adds up the `SegMetrics` of many steps.

  They are merged on device; before the device's int32 confusion matrix
  could overflow, the sum moves into an int64 matrix on the host.

  Args:
    num_classes: C.
  """

  def __init__(self, num_classes):
    self.num_classes = num_classes
    self.confusion = np.zeros((num_classes, num_classes), np.int64)
    self._loss_total, self._loss_count = 0.0, 0.0
    self._pending, self._pixels = None, 0

  def add(self, m, pixels):
    """Adds step metrics `m` that counted at most `pixels` label pixels."""
    if self._pixels + pixels > np.iinfo(np.int32).max:
      self._flush()
    self._pending = m if self._pending is None else self._pending.merge(m)
    self._pixels += pixels

  def add_host(self, confusion, loss_sum, pixels):
    """Adds counts computed on the host: a (C, C) matrix and the summed
    loss of `pixels` labelled pixels."""
    self.confusion += np.asarray(confusion, np.int64)
    self._loss_total += float(loss_sum)
    self._loss_count += float(pixels)

  def _flush(self):
    if self._pending is None:
      return
    self.confusion += np.asarray(self._pending.confusion.matrix, np.int64)
    self._loss_total += float(self._pending.loss.total)
    self._loss_count += float(self._pending.loss.count)
    self._pending, self._pixels = None, 0

  def result(self):
    """(confusion matrix (C, C) int64, mean loss) of everything added."""
    self._flush()
    loss = (self._loss_total / self._loss_count if self._loss_count
            else float('nan'))
    return self.confusion, loss


def summarize(metrics, class_names=None):
  """Flattens a `SegMetrics` into scalars for writers and logs.

  Returns:
    dict: 'loss', every score of `MEAN_SCORES`, and per class
    'iou/<name>', 'acc/<name>', 'dice/<name>'.
  """
  out = {'loss': float(metrics.loss.compute())}
  out.update(flatten_scores(metrics.confusion.compute(), class_names))
  return out


def flatten_scores(scores, class_names=None):
  """Scalars of `scores_from_confusion`: means and per-class values."""
  out = {k: float(scores[k]) for k in MEAN_SCORES}
  names = class_names or [str(i) for i in range(len(scores['iou']))]
  for prefix, key in CLASS_SCORES.items():
    out.update({f'{prefix}/{n}': float(v)
                for n, v in zip(names, scores[key])})
  return out


def format_table(scores, class_names):
  """Per-class and mean scores as a Markdown table (percent, NaN as '-')."""
  pct = lambda v: '-' if np.isnan(v) else f'{100 * v:.2f}'
  rows = ['| class | IoU | Acc | Dice | Precision | Recall | F-score |',
          '|---|---|---|---|---|---|---|']
  for i, name in enumerate(class_names):
    rows.append(f'| {name} | ' + ' | '.join(
        pct(scores[k][i]) for k in ('iou', 'class_accuracy', 'dice',
                                    'precision', 'recall', 'fscore')) + ' |')
  rows.append('| **mean** | ' + ' | '.join(
      f'**{pct(scores[k])}**' for k in ('miou', 'mean_accuracy', 'mdice',
                                         'mprecision', 'mrecall',
                                         'mfscore')) + ' |')
  rows.append('')
  rows.append(f'aAcc {pct(scores["pixel_accuracy"])}  mAcc '
              f'{pct(scores["mean_accuracy"])}  mIoU {pct(scores["miou"])}  '
              f'fwIoU {pct(scores["fwiou"])}  mDice {pct(scores["mdice"])}  '
              f'mFscore {pct(scores["mfscore"])}')
  return '\n'.join(rows)
