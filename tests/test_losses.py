"""seg_jax.losses against independent float64 numpy references.

Each loss's value and its gradient w.r.t. the logits (jax.grad, float32) are
compared with a numpy float64 reference written from the losses' definitions
(torch's cross_entropy, softmax focal, segmentation_models_pytorch's
multi-class Dice, Berman et al.'s Lovasz-softmax, binary cross-entropy and
Dice) and with central finite differences of it over every logit. Inputs
have ~20% ignored pixels, a class absent from the labels, or every pixel
ignored (loss 0, gradient 0). Also: ignored pixels' logits change nothing,
focal with gamma=0 is cross_entropy, binary_cross_entropy with pos_weight=1
is cross_entropy over 2 classes, create_loss_fn's weighted sum, and
bfloat16 logits give finite float32 losses.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import losses

IGNORE = 255
SHAPE = (2, 4, 5)  # N, H, W
FD_EPS = 1e-6
RTOL, ATOL = 1e-3, 1e-5


# ---------------------------------------------------------------------------
# numpy float64 references.


def _log_softmax(x):
  s = x - x.max(-1, keepdims=True)
  return s - np.log(np.exp(s).sum(-1, keepdims=True))


def _flat_valid(logits, labels, ignore_label):
  """Flattened (P, C) logits and (P,) labels of the valid pixels."""
  c = logits.shape[-1]
  x = logits.reshape(-1, c)
  t = labels.reshape(-1)
  v = t != ignore_label
  return x[v], t[v]


def _weights(class_weights, c):
  if class_weights is None:
    return np.ones(c)
  return np.asarray(class_weights, np.float64)


def ref_cross_entropy(logits, labels, class_weights=None, ignore_label=IGNORE,
                      label_smoothing=0.0):
  """torch cross_entropy(weight, ignore_index, label_smoothing), mean."""
  c = logits.shape[-1]
  x, t = _flat_valid(logits, labels, ignore_label)
  if t.size == 0:
    return 0.0
  w = _weights(class_weights, c)
  logp = _log_softmax(x)
  nll = -np.sum(w[t] * logp[np.arange(t.size), t])
  smooth = -np.sum(logp * w[None, :])
  norm = np.sum(w[t])
  eps = label_smoothing
  return ((1 - eps) * nll + eps / c * smooth) / norm


def ref_focal(logits, labels, gamma=2.0, class_weights=None,
              ignore_label=IGNORE):
  """Softmax focal loss, class-weighted mean over valid pixels."""
  c = logits.shape[-1]
  x, t = _flat_valid(logits, labels, ignore_label)
  if t.size == 0:
    return 0.0
  w = _weights(class_weights, c)
  logpt = _log_softmax(x)[np.arange(t.size), t]
  pt = np.exp(logpt)
  return np.sum(-w[t] * (1 - pt) ** gamma * logpt) / np.sum(w[t])


def ref_dice(logits, labels, ignore_label=IGNORE, smooth=0.0, eps=1e-7):
  """smp DiceLoss(mode='multiclass', from_logits=True)."""
  c = logits.shape[-1]
  t = labels.reshape(-1)
  mask = (t != ignore_label).astype(np.float64)[:, None]
  p = np.exp(_log_softmax(logits.reshape(-1, c))) * mask
  y = (t[:, None] == np.arange(c)[None, :]).astype(np.float64) * mask
  inter = np.sum(p * y, 0)
  card = np.sum(p + y, 0)
  score = (2 * inter + smooth) / np.maximum(card + smooth, eps)
  loss = (1 - score) * (y.sum(0) > 0)
  return np.mean(loss)


def _lovasz_grad(fg_sorted):
  gts = fg_sorted.sum()
  intersection = gts - np.cumsum(fg_sorted)
  union = gts + np.cumsum(1 - fg_sorted)
  jaccard = 1 - intersection / union
  jaccard[1:] = jaccard[1:] - jaccard[:-1]
  return jaccard


def ref_lovasz_softmax(logits, labels, ignore_label=IGNORE):
  """Berman et al.'s lovasz_softmax, classes='present', per_image=False."""
  c = logits.shape[-1]
  x, t = _flat_valid(logits, labels, ignore_label)
  p = np.exp(_log_softmax(x))
  per_class = []
  for k in range(c):
    fg = (t == k).astype(np.float64)
    if fg.sum() == 0:
      continue
    errors = np.abs(fg - p[:, k])
    perm = np.argsort(-errors, kind='stable')
    per_class.append(np.dot(errors[perm], _lovasz_grad(fg[perm])))
  return float(np.mean(per_class)) if per_class else 0.0


def ref_binary_cross_entropy(logits, labels, ignore_label=IGNORE,
                             pos_weight=1.0):
  """Foreground (class 1) BCE on z = l1 - l0, mean over valid pixels."""
  x, t = _flat_valid(logits, labels, ignore_label)
  if t.size == 0:
    return 0.0
  z = x[:, 1] - x[:, 0]
  y = (t == 1).astype(np.float64)
  log_sig = -np.logaddexp(0.0, -z)
  log_one_minus_sig = -np.logaddexp(0.0, z)
  return np.mean(-(pos_weight * y * log_sig + (1 - y) * log_one_minus_sig))


def ref_binary_dice(logits, labels, ignore_label=IGNORE, smooth=0.0,
                    eps=1e-7):
  """Foreground soft Dice over the valid pixels of the whole batch."""
  x, t = _flat_valid(logits, labels, ignore_label)
  p = 1 / (1 + np.exp(-(x[:, 1] - x[:, 0])))
  y = (t == 1).astype(np.float64)
  if y.sum() == 0:
    return 0.0
  score = (2 * np.sum(p * y) + smooth) / np.maximum(
      p.sum() + y.sum() + smooth, eps)
  return 1 - score


def _finite_difference(f, x, eps=FD_EPS):
  """Central differences of scalar f at every coordinate of x (float64)."""
  x = np.array(x, np.float64)  # a copy: x is changed in place below
  g = np.zeros_like(x)
  flat, gflat = x.reshape(-1), g.reshape(-1)
  for i in range(flat.size):
    old = flat[i]
    flat[i] = old + eps
    up = f(x)
    flat[i] = old - eps
    down = f(x)
    flat[i] = old
    gflat[i] = (up - down) / (2 * eps)
  return g


# ---------------------------------------------------------------------------
# Inputs and the JAX side.


def _inputs(num_classes, case, seed=0):
  """Logits (N, H, W, C) float64 and labels (N, H, W) int32 for a case.

  Cases: 'random' (every class, ~20% ignored); 'absent' (class 2, or for 2
  classes class 1, never appears); 'no_background' (2 classes: class 0
  never appears); 'all_ignored'.
  """
  rng = np.random.default_rng(seed)
  logits = 2.0 * rng.standard_normal(SHAPE + (num_classes,))
  if case == 'absent':
    absent = 2 if num_classes > 2 else 1
    allowed = [k for k in range(num_classes) if k != absent]
  elif case == 'no_background':
    allowed = list(range(1, num_classes))
  else:
    allowed = list(range(num_classes))
  labels = rng.choice(allowed, size=SHAPE)
  labels[rng.random(SHAPE) < 0.2] = IGNORE
  if case == 'random':  # make sure every class is there
    labels.reshape(-1)[:num_classes] = np.arange(num_classes)
  if case == 'all_ignored':
    labels[...] = IGNORE
  return logits, labels.astype(np.int32)


@functools.cache
def _jax_value_and_grad(name, kwargs):
  """Jitted value_and_grad of losses.<name>(logits, labels, **kwargs)."""
  fn = functools.partial(getattr(losses, name), **dict(kwargs))
  return jax.jit(jax.value_and_grad(fn))


def _jax(name, logits, labels, **kwargs):
  """(value, gradient) of losses.<name> at float32 logits."""
  # Defaults left out, so that equal calls share one compiled program.
  key = tuple(sorted((k, v) for k, v in kwargs.items() if v is not None))
  return _jax_value_and_grad(name, key)(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels))


def _check(name, ref, logits, labels, **kwargs):
  """JAX value and gradient of `name` against `ref` and its differences."""
  value, grad = _jax(name, logits, labels, **kwargs)
  assert value.shape == () and value.dtype == jnp.float32
  expected = ref(logits, labels, **kwargs)
  expected_grad = _finite_difference(lambda x: ref(x, labels, **kwargs),
                                     logits)
  np.testing.assert_allclose(float(value), expected, rtol=RTOL, atol=ATOL)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, expected_grad, rtol=RTOL, atol=ATOL)
  # Ignored pixels: no gradient, and their logits do not change the value.
  ignored = labels == IGNORE
  assert np.all(grad[ignored] == 0)
  other = logits.copy()
  other[ignored] = 5.0 * np.random.default_rng(1).standard_normal(
      other[ignored].shape)
  np.testing.assert_allclose(float(_jax(name, other, labels, **kwargs)[0]),
                             float(value), rtol=1e-6, atol=1e-7)
  if not np.any(~ignored):
    assert float(value) == 0.0 and np.all(grad == 0)
  return float(value), grad


MULTI_CASES = ('random', 'absent', 'all_ignored')
BINARY_CASES = ('random', 'absent', 'no_background', 'all_ignored')
WEIGHTS = (0.5, 1.0, 2.0, 1.5)


# ---------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize('case', MULTI_CASES)
@pytest.mark.parametrize('kwargs', [
    {},
    {'class_weights': WEIGHTS},
    {'class_weights': WEIGHTS, 'label_smoothing': 0.1},
], ids=['plain', 'weights', 'weights_smoothing'])
def test_cross_entropy(case, kwargs):
  """torch.nn.functional.cross_entropy(weight, ignore_index=255,
  label_smoothing), mean reduction."""
  logits, labels = _inputs(4, case)
  _check('cross_entropy', ref_cross_entropy, logits, labels, **kwargs)


@pytest.mark.parametrize('case', MULTI_CASES)
@pytest.mark.parametrize('kwargs', [
    {},
    {'gamma': 1.5, 'class_weights': WEIGHTS},
], ids=['plain', 'gamma1.5_weights'])
def test_focal(case, kwargs):
  """Softmax focal loss: -w_t (1 - p_t)^gamma log p_t, weighted mean."""
  logits, labels = _inputs(4, case)
  _check('focal', ref_focal, logits, labels, **kwargs)


def test_focal_with_gamma_0_is_cross_entropy():
  """gamma=0: the focal loss and its gradient are cross_entropy's."""
  logits, labels = _inputs(4, 'random', seed=3)
  focal = _jax('focal', logits, labels, gamma=0.0, class_weights=WEIGHTS)
  ce = _jax('cross_entropy', logits, labels, class_weights=WEIGHTS)
  np.testing.assert_allclose(float(focal[0]), float(ce[0]), rtol=1e-6)
  np.testing.assert_allclose(focal[1], ce[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('case', MULTI_CASES)
@pytest.mark.parametrize('smooth', [None, 1.0])
def test_dice(case, smooth):
  """smp DiceLoss(mode='multiclass'): mean over all classes, absent ones 0."""
  logits, labels = _inputs(4, case)
  kwargs = {} if smooth is None else {'smooth': smooth}
  _check('dice', ref_dice, logits, labels, **kwargs)


@pytest.mark.parametrize('case', MULTI_CASES)
def test_lovasz_softmax(case):
  """Berman et al.'s Lovasz-softmax over present classes, whole batch."""
  logits, labels = _inputs(4, case)
  _check('lovasz_softmax', ref_lovasz_softmax, logits, labels)


@pytest.mark.parametrize('case', BINARY_CASES)
@pytest.mark.parametrize('pos_weight', [None, 2.5])
def test_binary_cross_entropy(case, pos_weight):
  """Foreground BCE on l1 - l0 with pos_weight, mean over valid pixels."""
  logits, labels = _inputs(2, case)
  kwargs = {} if pos_weight is None else {'pos_weight': pos_weight}
  _check('binary_cross_entropy', ref_binary_cross_entropy, logits, labels,
         **kwargs)


@pytest.mark.parametrize('case', ['random', 'absent'])
def test_binary_cross_entropy_is_two_class_cross_entropy(case):
  """pos_weight=1: binary_cross_entropy equals cross_entropy with C=2."""
  logits, labels = _inputs(2, case, seed=5)
  bce = _jax('binary_cross_entropy', logits, labels)
  ce = _jax('cross_entropy', logits, labels)
  np.testing.assert_allclose(float(bce[0]), float(ce[0]), rtol=1e-5)
  np.testing.assert_allclose(bce[1], ce[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('case', BINARY_CASES)
@pytest.mark.parametrize('smooth', [None, 1.0])
def test_binary_dice(case, smooth):
  """Foreground soft Dice; 0 when no valid pixel is foreground."""
  logits, labels = _inputs(2, case)
  kwargs = {} if smooth is None else {'smooth': smooth}
  _check('binary_dice', ref_binary_dice, logits, labels, **kwargs)


def _config(num_classes, **weights):
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.model.num_classes = num_classes
  for k in ('cross_entropy', 'dice', 'focal', 'lovasz',
            'binary_cross_entropy', 'binary_dice'):
    c.train.loss[k] = weights.get(k, 0.0)
  return c


def _check_loss_fn(c, ref, logits, labels):
  fn = losses.create_loss_fn(c)
  value, grad = jax.jit(jax.value_and_grad(fn))(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(float(value), ref(logits), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad, _finite_difference(ref, logits),
                             rtol=RTOL, atol=ATOL)


def test_create_loss_fn_multiclass_weighted_sum():
  """CE (weights, smoothing) + 0.5 Dice + 0.25 focal + 0.75 Lovasz."""
  c = _config(4, cross_entropy=1.0, dice=0.5, focal=0.25, lovasz=0.75)
  c.train.class_weights = WEIGHTS
  c.train.label_smoothing = 0.1
  c.train.focal_gamma = 1.5
  logits, labels = _inputs(4, 'absent', seed=7)

  def ref(x):
    return (ref_cross_entropy(x, labels, class_weights=WEIGHTS,
                              label_smoothing=0.1)
            + 0.5 * ref_dice(x, labels)
            + 0.25 * ref_focal(x, labels, gamma=1.5, class_weights=WEIGHTS)
            + 0.75 * ref_lovasz_softmax(x, labels))

  _check_loss_fn(c, ref, logits, labels)


def test_create_loss_fn_binary_weighted_sum_and_ignore_label():
  """0.7 BCE + 1.3 binary Dice, with the config's ignore label (7)."""
  c = _config(2, binary_cross_entropy=0.7, binary_dice=1.3)
  c.data.ignore_label = 7
  logits, labels = _inputs(2, 'random', seed=8)
  labels = np.where(labels == IGNORE, 7, labels).astype(np.int32)

  def ref(x):
    return (0.7 * ref_binary_cross_entropy(x, labels, ignore_label=7)
            + 1.3 * ref_binary_dice(x, labels, ignore_label=7))

  _check_loss_fn(c, ref, logits, labels)


def test_bfloat16_logits():
  """bfloat16 logits (computed in float32): every loss is a finite float32
  near its float64 reference, with a finite gradient."""
  multi, multi_labels = _inputs(4, 'random', seed=11)
  binary, binary_labels = _inputs(2, 'random', seed=12)
  names = {'cross_entropy': ref_cross_entropy, 'focal': ref_focal,
           'dice': ref_dice, 'lovasz_softmax': ref_lovasz_softmax,
           'binary_cross_entropy': ref_binary_cross_entropy,
           'binary_dice': ref_binary_dice}

  @jax.jit
  def all_losses(multi, multi_labels, binary, binary_labels):
    out = {}
    for name in names:
      x, y = ((binary, binary_labels) if name.startswith('binary')
              else (multi, multi_labels))
      out[name] = jax.value_and_grad(getattr(losses, name))(x, y)
    return out

  out = all_losses(jnp.asarray(multi, jnp.bfloat16), jnp.asarray(multi_labels),
                   jnp.asarray(binary, jnp.bfloat16),
                   jnp.asarray(binary_labels))
  for name, ref in names.items():
    value, grad = out[name]
    assert value.dtype == jnp.float32, name
    assert np.isfinite(float(value)), name
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
    x, y = ((binary, binary_labels) if name.startswith('binary')
            else (multi, multi_labels))
    np.testing.assert_allclose(float(value), ref(x, y), rtol=0.05, atol=0.02,
                               err_msg=name)


# ---------------------------------------------------------------------------
# Against segmentation_models_pytorch itself (skipped without torch and smp).
#
# smp 0.6.0 definitions, read from its source: DiceLoss(mode='multiclass')
# and LovaszLoss(mode='multiclass', per_image=False) agree with `dice` and
# `lovasz_softmax` (absent classes: Dice counts them as 0 in the mean over
# all C classes, Lovasz averages over the present ones; ignored pixels are
# masked out / dropped). DiceLoss(mode='binary') on the foreground logit
# logits[..., 1] - logits[..., 0] agrees with `binary_dice`. One difference:
# smp 0.6.0 computes the Dice score as a Tversky score with alpha = beta =
# 0.5, (I + smooth) / (0.5 * (sum p + sum y) + smooth), i.e. (2 I + 2 smooth)
# / (sum p + sum y + 2 smooth): its `smooth` is seg_jax's `smooth` / 2
# (same for eps). smp's FocalLoss(mode='multiclass') is a mean over classes
# of one-vs-rest sigmoid focal losses, not the softmax focal of `focal`, so
# it is not compared.

SMP_SHAPE = (2, 8, 9)  # N, H, W


def _smp_inputs(num_classes, absent, seed):
  """float32 logits (N, H, W, C) and int64 labels with ~20% ignored and class
  `absent` (None: none) never labelled."""
  rng = np.random.default_rng(seed)
  logits = (2.0 * rng.standard_normal(SMP_SHAPE + (num_classes,))).astype(
      np.float32)
  allowed = [k for k in range(num_classes) if k != absent]
  labels = rng.choice(allowed, size=SMP_SHAPE)
  labels[rng.random(SMP_SHAPE) < 0.2] = IGNORE
  return logits, labels.astype(np.int64)


def _compare_with_torch(jax_fn, torch_fn, logits, labels, dtype='float64'):
  """Value and gradient w.r.t. the logits of jax_fn(logits NHWC, labels) at
  float32 against torch_fn(logits NCHW, labels) under torch autograd at
  `dtype` (the same float32 logits)."""
  torch = pytest.importorskip('torch')
  value, grad = jax.jit(jax.value_and_grad(jax_fn))(jnp.asarray(logits),
                                                     jnp.asarray(labels))
  x = torch.tensor(np.moveaxis(logits, -1, 1).astype(dtype),
                   requires_grad=True)
  expected = torch_fn(x, torch.from_numpy(labels))
  expected.backward()
  expected_grad = np.moveaxis(x.grad.numpy(), 1, -1)
  np.testing.assert_allclose(float(value), float(expected.detach()),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4,
                             atol=1e-6)
  assert np.all(np.asarray(grad)[labels == IGNORE] == 0)


@pytest.mark.parametrize('smooth', (0.0, 1.0))
@pytest.mark.parametrize('seed', (0, 1))
def test_dice_matches_smp(seed, smooth):
  pytest.importorskip('torch')
  smp_losses = pytest.importorskip('segmentation_models_pytorch.losses')
  logits, labels = _smp_inputs(5, absent=3, seed=seed)
  # smp's smooth s is seg_jax's 2 s (see above); eps only clamps a
  # denominator far from 0 here.
  loss = smp_losses.DiceLoss(mode='multiclass', from_logits=True,
                             ignore_index=IGNORE, smooth=smooth, eps=1e-7)
  _compare_with_torch(
      functools.partial(losses.dice, ignore_label=IGNORE, smooth=2 * smooth,
                        eps=1e-7), loss, logits, labels)


@pytest.mark.parametrize('seed', (0, 1))
def test_lovasz_softmax_matches_smp(seed):
  pytest.importorskip('torch')
  smp_losses = pytest.importorskip('segmentation_models_pytorch.losses')
  logits, labels = _smp_inputs(5, absent=3, seed=seed)
  loss = smp_losses.LovaszLoss(mode='multiclass', per_image=False,
                               ignore_index=IGNORE, from_logits=True)
  # float32: smp's _lovasz_grad casts to float32, so float64 fails in dot.
  _compare_with_torch(
      functools.partial(losses.lovasz_softmax, ignore_label=IGNORE), loss,
      logits, labels, dtype='float32')


@pytest.mark.parametrize('smooth', (0.0, 1.0))
@pytest.mark.parametrize('absent', (None, 1))
def test_binary_dice_matches_smp(absent, smooth):
  pytest.importorskip('torch')
  smp_losses = pytest.importorskip('segmentation_models_pytorch.losses')
  logits, labels = _smp_inputs(2, absent=absent, seed=2)
  loss = smp_losses.DiceLoss(mode='binary', from_logits=True,
                             ignore_index=IGNORE, smooth=smooth, eps=1e-7)

  def smp_binary_dice(x, y):  # x (N, 2, H, W): the foreground score logit
    return loss((x[:, 1] - x[:, 0])[:, None], y[:, None])

  _compare_with_torch(
      functools.partial(losses.binary_dice, ignore_label=IGNORE,
                        smooth=2 * smooth, eps=1e-7), smp_binary_dice, logits,
      labels)
