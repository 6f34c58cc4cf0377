"""Segmentation losses; every one of them skips the ignore label."""

import jax.numpy as jnp
import optax

from seg_jax.labels import IGNORE_LABEL


def cross_entropy(logits, labels, class_weights=None,
                  ignore_label=IGNORE_LABEL):
  """Pixel-wise softmax cross-entropy, averaged over non-ignored pixels.

  Args:
    logits: (N, H, W, C) any float dtype; computed in float32.
    labels: (N, H, W) int; `ignore_label` pixels contribute nothing.
    class_weights: optional (C,) weights; the mean is then weighted
      (normalised by the summed weights of valid pixels, as torch does).
    ignore_label: label value to skip.

  Returns:
    Scalar float32 loss; 0 when no pixel is valid.
  """
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe)
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe]
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1e-8)
