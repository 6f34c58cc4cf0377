"""Segmentation metrics as clu metrics: a confusion matrix and what follows.

No `from __future__ import annotations` here: clu's `Collection` reads the
class annotations at runtime.
"""

import flax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

IGNORE_LABEL = 255


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


def scores_from_confusion(matrix):
  """mIoU, per-class IoU, mean and pixel accuracy from a confusion matrix.

  Classes that appear neither in the labels nor in the predictions have an
  undefined IoU (NaN) and are left out of the mean; a class present in the
  labels but never predicted counts as 0.

  Args:
    matrix: (C, C) counts, rows = true class, columns = predicted class.

  Returns:
    dict with 'miou', 'iou' (C,), 'mean_accuracy', 'class_accuracy' (C,),
    'pixel_accuracy' as numpy float64.
  """
  m = np.asarray(matrix, np.float64)
  tp = np.diag(m)
  label_count, pred_count = m.sum(1), m.sum(0)
  union = label_count + pred_count - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, tp / union, np.nan)
    class_acc = np.where(label_count > 0, tp / label_count, np.nan)
  total = m.sum()
  nanmean = lambda a: float(np.nanmean(a)) if np.any(~np.isnan(a)) else np.nan
  return {
      'miou': nanmean(iou),
      'iou': iou,
      'mean_accuracy': nanmean(class_acc),
      'class_accuracy': class_acc,
      'pixel_accuracy': float(tp.sum() / total) if total > 0 else np.nan,
  }


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """Confusion matrix accumulated on device; `compute()` gives the scores."""
  matrix: jnp.ndarray  # (C, C) int32

  @classmethod
  def from_model_output(cls, *, logits, labels, **_):
    preds = jnp.argmax(logits, axis=-1)
    return cls(matrix=confusion_matrix(preds, labels, logits.shape[-1]))

  def merge(self, other):
    return type(self)(matrix=self.matrix + other.matrix)

  def compute(self):
    return scores_from_confusion(self.matrix)


@flax.struct.dataclass
class SegMetrics(clu_metrics.Collection):
  """Loss (mean over steps) and the confusion matrix of a train or eval run."""
  loss: clu_metrics.Average.from_output('loss')
  confusion: ConfusionMatrix


def summarize(metrics, class_names=None):
  """Flattens a computed `SegMetrics` into scalars for writers and logs.

  Returns:
    dict: loss, miou, mean_accuracy, pixel_accuracy, and iou/<class name>.
  """
  scores = metrics.confusion.compute()
  out = {'loss': float(metrics.loss.compute())}
  out.update({k: scores[k] for k in ('miou', 'mean_accuracy', 'pixel_accuracy')})
  names = class_names or [str(i) for i in range(len(scores['iou']))]
  out.update({f'iou/{n}': float(v) for n, v in zip(names, scores['iou'])})
  return out


def format_iou_table(iou, class_names):
  """Per-class IoU as a Markdown table (percent, NaN shown as '-')."""
  rows = ['| class | IoU % |', '|---|---|']
  for name, value in zip(class_names, iou):
    rows.append(f'| {name} | {"-" if np.isnan(value) else f"{100 * value:.2f}"} |')
  return '\n'.join(rows)
