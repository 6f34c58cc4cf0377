"""Confusion-matrix metric and loss against independent numpy computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import losses, metrics


def _numpy_scores(preds, labels, num_classes):
  """Reference written from the definitions, pixel by pixel."""
  keep = labels != 255
  p, l = preds[keep], labels[keep]
  ious, accs = [], []
  for c in range(num_classes):
    tp = np.sum((p == c) & (l == c))
    fp = np.sum((p == c) & (l != c))
    fn = np.sum((p != c) & (l == c))
    if tp + fp + fn:
      ious.append(tp / (tp + fp + fn))
    if tp + fn:
      accs.append(tp / (tp + fn))
  return np.mean(ious), np.mean(accs), np.mean(p == l), len(ious)


def test_confusion_matrix_counts_match_numpy():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (3, 17, 11))
  labels[rng.random(labels.shape) < 0.2] = 255
  preds = rng.integers(0, 4, labels.shape)
  m = np.asarray(metrics.confusion_matrix(jnp.asarray(preds),
                                          jnp.asarray(labels), 4))
  keep = labels != 255
  expected = np.zeros((4, 4), np.int64)
  np.add.at(expected, (labels[keep], preds[keep]), 1)
  np.testing.assert_array_equal(m, expected)
  assert m.sum() == keep.sum()


def test_scores_exclude_classes_absent_from_labels_and_predictions():
  rng = np.random.default_rng(1)
  num_classes = 7
  # Classes 5 and 6 appear nowhere; class 4 only in predictions.
  labels = rng.integers(0, 4, (2, 31, 29))
  labels[rng.random(labels.shape) < 0.25] = 255
  preds = rng.integers(0, 5, labels.shape)
  logits = np.eye(num_classes)[preds]
  metric = metrics.ConfusionMatrix.from_model_output(
      logits=jnp.asarray(logits), labels=jnp.asarray(labels))
  scores = metric.compute()
  miou, macc, pacc, n_defined = _numpy_scores(preds, labels, num_classes)
  assert n_defined == 5
  assert np.isnan(scores['iou'][5]) and np.isnan(scores['iou'][6])
  assert scores['iou'][4] == 0.0  # predicted, never labelled: counts as 0
  np.testing.assert_allclose(scores['miou'], miou, rtol=1e-12)
  np.testing.assert_allclose(scores['mean_accuracy'], macc, rtol=1e-12)
  np.testing.assert_allclose(scores['pixel_accuracy'], pacc, rtol=1e-12)


def test_merge_equals_metric_of_concatenation():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, (4, 8, 8))
  labels[0, :2] = 255
  logits = rng.normal(size=(4, 8, 8, 3))
  parts = [metrics.SegMetrics.single_from_model_output(
      loss=jnp.float32(i), logits=jnp.asarray(logits[i:i + 2]),
      labels=jnp.asarray(labels[i:i + 2])) for i in (0, 2)]
  merged = parts[0].merge(parts[1])
  whole = metrics.ConfusionMatrix.from_model_output(
      logits=jnp.asarray(logits), labels=jnp.asarray(labels))
  np.testing.assert_array_equal(merged.confusion.matrix, whole.matrix)
  assert float(merged.loss.compute()) == 1.0


def test_summarize_names_classes():
  m = metrics.SegMetrics.single_from_model_output(
      loss=jnp.float32(0.5), logits=jnp.asarray(np.eye(2)[[[0, 1], [1, 1]]]),
      labels=jnp.asarray([[0, 1], [0, 255]]))
  s = metrics.summarize(m, ['bg', 'fg'])
  assert s['iou/bg'] == 0.5 and s['iou/fg'] == 0.5
  assert s['acc/bg'] == 0.5 and s['acc/fg'] == 1.0
  assert s['dice/bg'] == pytest.approx(2 / 3)
  assert s['pixel_accuracy'] == pytest.approx(2 / 3)
  assert s['loss'] == 0.5


def test_cross_entropy_ignores_255_and_weights_like_torch():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 5, 6))
  labels[:, 0] = 255
  weights = np.array([0.5, 1.0, 2.0], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  keep = labels != 255
  nll = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None],
                            -1)[..., 0]
  plain = nll[keep].mean()
  w = weights[labels[keep]]
  weighted = (nll[keep] * w).sum() / w.sum()
  np.testing.assert_allclose(
      losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), plain,
      rtol=1e-5)
  np.testing.assert_allclose(
      losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weights),
      weighted, rtol=1e-5)
  all_ignored = np.full_like(labels, 255)
  assert float(losses.cross_entropy(jnp.asarray(logits),
                                    jnp.asarray(all_ignored))) == 0.0


def _reference_scores(preds, labels, num_classes, ignore=255, beta=1.0):
  """Every score from its definition, class by class over kept pixels."""
  keep = labels != ignore
  p, l = preds[keep], labels[keep]
  per = {k: [] for k in ('iou', 'acc', 'dice', 'precision', 'recall',
                         'fscore')}
  fw = 0.0
  for c in range(num_classes):
    tp = np.sum((p == c) & (l == c))
    fp = np.sum((p == c) & (l != c))
    fn = np.sum((p != c) & (l == c))
    iou = tp / (tp + fp + fn) if tp + fp + fn else np.nan
    rec = tp / (tp + fn) if tp + fn else np.nan
    prec = tp / (tp + fp) if tp + fp else np.nan
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan
    f = ((1 + beta**2) * prec * rec / (beta**2 * prec + rec)
         if not np.isnan(prec) and not np.isnan(rec) and prec + rec > 0
         else np.nan)
    for k, v in zip(per, (iou, rec, dice, prec, rec, f)):
      per[k].append(v)
    if tp + fn:
      fw += (tp + fn) / len(l) * iou
  means = {'pixel_accuracy': np.mean(p == l)}
  for k, name in (('iou', 'miou'), ('acc', 'mean_accuracy'),
                  ('dice', 'mdice'), ('precision', 'mprecision'),
                  ('recall', 'mrecall'), ('fscore', 'mfscore')):
    means[name] = np.nanmean(per[k])
  means['fwiou'] = fw
  return means, {k: np.array(v) for k, v in per.items()}


@pytest.mark.parametrize('beta', [1.0, 2.0])
def test_every_score_matches_numpy_with_ignore_and_absent_classes(beta):
  rng = np.random.default_rng(4)
  num_classes = 8
  # Class 5 is only predicted, 6 only labelled, 7 nowhere; 0 and 1 are
  # predicted but never correctly (F-score undefined: precision = recall = 0).
  labels = rng.choice([1, 2, 3, 4, 6], (3, 23, 19))
  labels[rng.random(labels.shape) < 0.2] = 255
  preds = rng.choice([0, 2, 3, 4, 5], labels.shape)
  preds = np.where((labels == 0) | (labels == 1), 2, preds)
  preds[0, 0, :3] = 1
  labels[0, 0, :3] = 3
  matrix = np.asarray(metrics.confusion_matrix(
      jnp.asarray(preds), jnp.asarray(labels), num_classes))
  got = metrics.scores_from_confusion(matrix, beta=beta)
  want, per_class = _reference_scores(preds, labels, num_classes, beta=beta)
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-12, err_msg=k)
  for k, key in (('iou', 'iou'), ('acc', 'class_accuracy'), ('dice', 'dice'),
                 ('precision', 'precision'), ('recall', 'recall'),
                 ('fscore', 'fscore')):
    np.testing.assert_allclose(got[key], per_class[k], rtol=1e-12,
                               equal_nan=True, err_msg=k)
  assert np.isnan(got['iou'][7]) and np.isnan(got['dice'][7])
  assert got['iou'][5] == 0.0 and np.isnan(got['class_accuracy'][5])
  assert got['iou'][6] == 0.0 and np.isnan(got['precision'][6])
  assert np.isnan(got['fscore'][0]) and np.isnan(got['fscore'][1])
  assert got['label_count'].sum() == np.sum(labels != 255)


def test_confusion_with_another_ignore_value_counts_the_same():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, (2, 9, 13))
  labels[rng.random(labels.shape) < 0.3] = 255
  preds = rng.integers(0, 4, labels.shape)
  relabelled = np.where(labels == 255, 254, labels)
  a = metrics.confusion_matrix(jnp.asarray(preds), jnp.asarray(labels), 4)
  b = metrics.confusion_matrix(jnp.asarray(preds), jnp.asarray(relabelled),
                               4, ignore_label=254)
  np.testing.assert_array_equal(a, b)
  assert int(np.asarray(a).sum()) == np.sum(labels != 255)


def test_table_names_every_class():
  m = np.array([[5, 1, 0], [2, 7, 0], [0, 0, 0]])
  scores = metrics.scores_from_confusion(m)
  table = metrics.format_table(scores, ['road', 'car', 'sky'])
  assert '| road | 62.50 | 83.33 |' in table
  assert '| sky | - | - | - |' in table
  assert 'mIoU 66.25  fwIoU 67.00' in table  # (5/8 + 7/10) / 2; .4 .625 + .6 .7
