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
