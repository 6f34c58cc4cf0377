"""Segmentation losses; every one of them skips the ignore label.

All take logits (N, H, W, C) of any float dtype (computed in float32) and
integer labels (N, H, W), and return a float32 scalar that is 0 (with zero
gradient) when no pixel is valid. `create_loss_fn` combines them with the
weights of `config.train.loss`.

Multi-class: `cross_entropy` (class weights, label smoothing), `focal`
(softmax focal), `dice` (soft Dice), `lovasz_softmax`. Single-foreground
tasks (num_classes=2, class 1 the foreground): `binary_cross_entropy` and
`binary_dice` on the foreground score logits[..., 1] - logits[..., 0],
whose sigmoid is the softmax probability of class 1, so prediction stays an
argmax over two classes.
"""

import numbers

import jax
import jax.numpy as jnp
import optax

from seg_jax import errors
from seg_jax import labels as seg_labels
from seg_jax.labels import IGNORE_LABEL

# config.train.loss keys, in the order they are summed.
NAMES = ('cross_entropy', 'dice', 'focal', 'lovasz', 'binary_cross_entropy',
         'binary_dice')
BINARY = ('binary_cross_entropy', 'binary_dice')


def _valid(logits, labels, ignore_label):
  """float32 logits, the (N, H, W) valid mask and labels with ignore -> 0."""
  labels = jnp.asarray(labels)
  valid = labels != ignore_label
  return logits.astype(jnp.float32), valid, jnp.where(valid, labels, 0)


def _weighted_mean(values, weights):
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def _pixel_weights(valid, safe, class_weights):
  """Each pixel's weight: 0 if ignored, else its class's weight (or 1)."""
  weights = valid.astype(jnp.float32)
  if class_weights is None:
    return weights
  return weights * jnp.asarray(class_weights, jnp.float32)[safe]


def cross_entropy(logits, labels, class_weights=None,
                  ignore_label=IGNORE_LABEL, label_smoothing=0.0):
  """Pixel-wise softmax cross-entropy over non-ignored pixels, as torch's
  `cross_entropy(weight=, ignore_index=, label_smoothing=)` computes it.

  Args:
    logits: (N, H, W, C).
    labels: (N, H, W) int; `ignore_label` pixels contribute nothing.
    class_weights: optional (C,) weights; the mean is then normalised by the
      summed weights of the valid pixels' classes.
    ignore_label: label value to skip.
    label_smoothing: eps; the target is (1 - eps) one-hot + eps / C.

  Returns:
    Scalar float32 loss.
  """
  logits, valid, safe = _valid(logits, labels, ignore_label)
  weights = _pixel_weights(valid, safe, class_weights)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  if label_smoothing:
    logp = jax.nn.log_softmax(logits)
    per_class = -logp if class_weights is None else -logp * jnp.asarray(
        class_weights, jnp.float32)
    smooth = jnp.sum(per_class, -1) * valid / logits.shape[-1]
    total = ((1.0 - label_smoothing) * jnp.sum(nll * weights) +
             label_smoothing * jnp.sum(smooth))
    return total / jnp.maximum(jnp.sum(weights), 1e-8)
  return _weighted_mean(nll, weights)


def focal(logits, labels, gamma=2.0, class_weights=None,
          ignore_label=IGNORE_LABEL):
  """Softmax focal loss (Lin et al. 2017): -(1 - p_t)^gamma log p_t.

  Down-weights pixels the model already gets right; gamma=0 is
  `cross_entropy`. Class weights act as the paper's alpha_t and normalise
  the mean as in `cross_entropy`.
  """
  logits, valid, safe = _valid(logits, labels, ignore_label)
  logp_t = jnp.take_along_axis(jax.nn.log_softmax(logits), safe[..., None],
                               -1)[..., 0]
  modulation = (-jnp.expm1(logp_t)) ** gamma if gamma else 1.0
  return _weighted_mean(-modulation * logp_t,
                        _pixel_weights(valid, safe, class_weights))


def dice(logits, labels, ignore_label=IGNORE_LABEL, smooth=0.0, eps=1e-7):
  """Soft multi-class Dice loss over the batch, as segmentation_models_
  pytorch's `DiceLoss(mode='multiclass')` (whose `smooth=s` is this
  function's `smooth=2*s`; equal at the default 0).

  Per class c, over every valid pixel of the batch: dice_c = (2 sum p_c y_c
  + smooth) / (sum p_c + sum y_c + smooth). A class no valid pixel is
  labelled with contributes 0; the loss is the mean of 1 - dice_c over all
  C classes.
  """
  logits, valid, safe = _valid(logits, labels, ignore_label)
  mask = valid[..., None].astype(jnp.float32)
  probs = jax.nn.softmax(logits) * mask
  onehot = jax.nn.one_hot(safe, logits.shape[-1]) * mask
  axes = (0, 1, 2)
  intersection = jnp.sum(probs * onehot, axes)
  cardinality = jnp.sum(probs + onehot, axes)
  score = (2.0 * intersection + smooth) / jnp.maximum(cardinality + smooth,
                                                      eps)
  present = jnp.sum(onehot, axes) > 0
  return jnp.mean((1.0 - score) * present)


def _lovasz_grad(fg_sorted):
  """Gradient of the Lovász extension of the Jaccard loss at sorted errors
  (Berman et al. 2018, Alg. 1); `fg_sorted` (P,) float 0/1."""
  gts = jnp.sum(fg_sorted)
  intersection = gts - jnp.cumsum(fg_sorted)
  union = gts + jnp.cumsum(1.0 - fg_sorted)
  jaccard = 1.0 - intersection / jnp.maximum(union, 1e-8)
  return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(logits, labels, ignore_label=IGNORE_LABEL):
  """Lovász-softmax loss (Berman et al. 2018), a surrogate of 1 - IoU.

  Over the batch's valid pixels, averaged over the classes present in the
  labels (the reference's classes='present', per_image=False). Ignored
  pixels sort after every valid one (error -1) and are zeroed, so the sort
  keeps static shapes and they change neither value nor gradient.
  """
  logits, valid, safe = _valid(logits, labels, ignore_label)
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits).reshape(-1, num_classes)
  valid, safe = valid.reshape(-1), safe.reshape(-1)

  def one_class(c):
    fg = ((safe == c) & valid).astype(jnp.float32)
    errors = jnp.abs(fg - probs[:, c])
    order = jnp.argsort(-jnp.where(valid, errors, -1.0))
    errors_sorted = errors[order] * valid[order]
    return jnp.dot(errors_sorted, _lovasz_grad(fg[order])), jnp.sum(fg) > 0

  losses, present = jax.vmap(one_class)(jnp.arange(num_classes))
  return _weighted_mean(losses, present.astype(jnp.float32))


def _foreground(logits, labels, ignore_label, name):
  if logits.shape[-1] != 2:
    raise ValueError(f'{name} needs 2 classes (background 0, foreground 1); '
                     f'the logits have {logits.shape[-1]}.')
  logits, valid, safe = _valid(logits, labels, ignore_label)
  z = logits[..., 1] - logits[..., 0]  # sigmoid(z) = softmax prob of 1
  return z, valid.astype(jnp.float32), (safe == 1).astype(jnp.float32)


def binary_cross_entropy(logits, labels, ignore_label=IGNORE_LABEL,
                         pos_weight=1.0):
  """Binary cross-entropy of the foreground (class 1) over valid pixels.

  Args:
    logits: (N, H, W, 2); the foreground logit is logits[..., 1] -
      logits[..., 0].
    labels: (N, H, W) int, 0 background, 1 foreground, or ignore.
    ignore_label: label value to skip.
    pos_weight: weight of the foreground term (>1 favours recall).
  """
  z, valid, y = _foreground(logits, labels, ignore_label,
                            'binary_cross_entropy')
  per_pixel = -(pos_weight * y * jax.nn.log_sigmoid(z) +
                (1.0 - y) * jax.nn.log_sigmoid(-z))
  return _weighted_mean(per_pixel, valid)


def binary_dice(logits, labels, ignore_label=IGNORE_LABEL, smooth=0.0,
                eps=1e-7):
  """Soft Dice loss of the foreground (class 1) over the batch's valid
  pixels; 0 when no valid pixel is foreground."""
  z, valid, y = _foreground(logits, labels, ignore_label, 'binary_dice')
  p = jax.nn.sigmoid(z) * valid
  y = y * valid
  score = (2.0 * jnp.sum(p * y) + smooth) / jnp.maximum(
      jnp.sum(p) + jnp.sum(y) + smooth, eps)
  return jnp.where(jnp.sum(y) > 0, 1.0 - score, 0.0)


def check_config(c):
  """The loss's part of `config.train` (see `seg_jax.validate`): weights,
  smoothing, focal exponent, class weights, the auxiliary head's weight."""
  for name in NAMES:
    if c.train.loss[name] < 0:
      raise errors.ConfigError(f'train.loss.{name}={c.train.loss[name]!r}: '
                               'give a weight >= 0 (0 turns it off).')
  if not loss_weights(c):
    raise errors.ConfigError('train.loss: every weight is 0; turn one on, '
                             'e.g. --config.train.loss.cross_entropy=1.')
  binary = [n for n in BINARY if c.train.loss[n]]
  if binary and c.model.num_classes != 2:
    raise errors.ConfigError(
        f'train.loss.{binary[0]} needs model.num_classes=2 (background 0, '
        f'foreground 1), not {c.model.num_classes}; use dice or '
        'cross_entropy for more classes.')
  if not 0 <= c.train.label_smoothing < 1:
    raise errors.ConfigError(
        f'train.label_smoothing={c.train.label_smoothing!r}: give a value in '
        '[0, 1).')
  if c.train.focal_gamma < 0:
    raise errors.ConfigError(f'train.focal_gamma={c.train.focal_gamma!r}: '
                             'give a value >= 0.')
  if c.train.aux_loss_weight < 0:
    raise errors.ConfigError(
        f'train.aux_loss_weight={c.train.aux_loss_weight!r}: give a value '
        '>= 0.')
  given = c.train.class_weights
  weights = tuple(given) if isinstance(given, (list, tuple)) else (given,)
  if any(isinstance(w, bool) or not isinstance(w, numbers.Real)
         for w in weights):
    raise errors.ConfigError(
        f'train.class_weights={given!r}: give {c.model.num_classes} numbers '
        '>= 0, one per class, e.g. --config.train.class_weights="(1.0, '
        '2.0, ...)", or () for none.')
  if weights and len(weights) != c.model.num_classes:
    raise errors.ConfigError(
        f'train.class_weights has {len(weights)} entries; '
        f'model.num_classes={c.model.num_classes}.')
  if any(not w >= 0 for w in weights) or (weights and not any(weights)):
    raise errors.ConfigError(
        f'train.class_weights={weights}: give weights >= 0, not all 0.')


def loss_weights(config):
  """{name: weight} of the losses `config.train.loss` turns on (> 0)."""
  return {name: float(config.train.loss[name]) for name in NAMES
          if config.train.loss[name]}


def create_loss_fn(config):
  """`fn(logits, labels) -> scalar`: the sum of the losses of
  `config.train.loss`, each times its weight.

  `train.class_weights` apply to cross_entropy and focal,
  `train.label_smoothing` to cross_entropy, `train.focal_gamma` to focal.
  """
  ignore = seg_labels.ignore_label(config)
  class_weights = tuple(config.train.class_weights) or None
  terms = {
      'cross_entropy': lambda x, y: cross_entropy(
          x, y, class_weights, ignore, config.train.label_smoothing),
      'dice': lambda x, y: dice(x, y, ignore),
      'focal': lambda x, y: focal(x, y, config.train.focal_gamma,
                                  class_weights, ignore),
      'lovasz': lambda x, y: lovasz_softmax(x, y, ignore),
      'binary_cross_entropy': lambda x, y: binary_cross_entropy(x, y, ignore),
      'binary_dice': lambda x, y: binary_dice(x, y, ignore),
  }
  weights = loss_weights(config)

  def loss_fn(logits, labels):
    return sum(w * terms[name](logits, labels) for name, w in weights.items())

  return loss_fn
