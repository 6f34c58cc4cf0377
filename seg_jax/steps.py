"""The jitted steps of training and evaluation, and their preprocessing.

The train step applies the drawn colour distortion and normalises on the
device, computes the configured loss and updates parameters, BatchNorm
statistics and the weight average; the eval step runs the configured
inference (`seg_jax.inference`) and reduces the metrics on the device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seg_jax import host_memory, inference
from seg_jax import labels as seg_labels
from seg_jax import losses, sharding
from seg_jax import state as seg_state
from seg_jax import metrics as seg_metrics
from seg_jax.models import layers


def apply_colour(images, colour):
  """Applies per-example (N, C, C + 1) colour matrices (drawn on the host by
  `data.transforms.Photometric`) to (N, H, W, C) images.

  Works on numpy or jax arrays; returns float values clipped to 0..255.
  """
  xp = np if isinstance(images, np.ndarray) else jnp
  c = images.shape[-1]
  x = images.astype(xp.float32)
  out = xp.einsum('nhwc,ndc->nhwd', x, colour[:, :, :c])
  return xp.clip(out + colour[:, None, None, :, c], 0.0, 255.0)


def preprocess(batch, config):
  """The model input of a batch: colour distortion (when drawn), then
  normalisation."""
  images = batch['image']
  if 'colour' in batch:  # per-example photometric distortion
    images = apply_colour(images, batch['colour'])
  return inference.normalize(images, config.data.mean, config.data.std)


def update_ema(ema, variables, decay, step):
  """The moving average after optimizer step `step` (0-based): decay
  min(`decay`, (1 + step) / (10 + step)), so early weights fade fast."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
  return jax.tree.map(lambda e, v: (d * e + (1.0 - d) * v).astype(e.dtype),
                      ema, variables)


def make_train_step(model, tx, config, mesh, state_sharding=None):
  """Returns jitted `train_step(state, batch, rng) -> (state, TrainMetrics)`.

  The loss is `losses.create_loss_fn(config)` (plus the auxiliary head's,
  weighted). With `train.ema_decay` the state's `ema` follows the new
  variables. The metrics flag a step whose loss or gradient norm is not
  finite; with `train.skip_nonfinite` such a step leaves parameters,
  optimizer state, BatchNorm statistics and the average as they were (only
  the step count moves on).

  The batch is split over the mesh's batch axes; the state is laid out as
  `sharding.state_shardings` says (replicated, or split over 'fsdp') and
  donated (`state_sharding`, when the caller has the state, saves tracing
  the model's initialisation again). BatchNorm statistics under jit are
  global over the sharded batch.
  """
  ignore = seg_labels.ignore_label(config)
  aux_weight = config.train.aux_loss_weight
  loss_of = losses.create_loss_fn(config)
  skip_nonfinite = config.train.skip_nonfinite
  ema_decay = config.train.ema_decay

  def train_step(state, batch, rng):
    images = preprocess(batch, config)
    labels = batch['label'].astype(jnp.int32)
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      outputs, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images,
          train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
      # Models with an auxiliary head return (logits, aux_logits) in training.
      logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
      loss = loss_of(logits, labels)
      if aux is not None:
        loss += aux_weight * loss_of(aux, labels)
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates_tx, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params,
                                                        updates_tx),
        batch_stats=updates.get('batch_stats', {}), opt_state=opt_state)
    if ema_decay:
      new_state = new_state.replace(ema=update_ema(
          state.ema, new_state.variables(), ema_decay, state.step))
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # keep parameters, optimizer and BatchNorm state
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                               new_state, state.replace(step=state.step + 1))
    m = seg_metrics.TrainMetrics.single_from_model_output(
        loss=loss, logits=logits, labels=labels, ignore_label=ignore,
        nonfinite=~finite, step=state.step + 1)
    return new_state, m.replace(loss=type(m.loss)(
        total=jnp.where(finite, loss, 0.0),
        count=finite.astype(jnp.float32)))

  repl, batch_sharding = sharding.replicated(mesh), sharding.data_sharding(mesh)
  if state_sharding is None:
    state_sharding = sharding.state_shardings(
        seg_state.train_state_shapes(model, tx,
                                     seg_state.init_input_shape(config),
                                     ema=bool(ema_decay)),
        mesh, config.mesh.fsdp_min_size)
  return jax.jit(train_step,
                 in_shardings=(state_sharding, batch_sharding, repl),
                 out_shardings=(state_sharding, repl), donate_argnums=0,
                 compiler_options=layers.compiler_options(train=True))


def make_eval_step(model, config, mesh, spec, num_shown=0, with_logits=False):
  """Returns jitted `eval_step(variables, batch) -> (SegMetrics, shown)`.

  `variables` are the model's {'params', 'batch_stats'}; the batch holds
  'image', 'label' and 'size' (see `EvalTransform`). `shown` is the
  (num_shown, H, W) int32 prediction of the batch's first examples, for
  pictures; the metrics are reduced on device. With `with_logits`, the
  (N, H, W, C) float32 logits come third (for CRF refinement on the host).
  """
  ignore = seg_labels.ignore_label(config)

  def eval_step(variables, batch):
    images = inference.normalize(batch['image'], config.data.mean,
                                 config.data.std)
    logits = inference.infer_logits(
        lambda x: model.apply(variables, x, train=False), images,
        batch['size'], spec)
    labels = batch['label'].astype(jnp.int32)
    loss = losses.cross_entropy(logits, labels, ignore_label=ignore)
    metrics = seg_metrics.eval_metrics(loss, logits, labels, ignore)
    shown = jnp.argmax(logits[:num_shown], -1).astype(jnp.int32)
    return (metrics, shown, logits) if with_logits else (metrics, shown)

  # The variables keep the layout they come with (the train state's).
  repl, batch_sharding = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return host_memory.MemoryChecked(jax.jit(
      eval_step, in_shardings=(None, batch_sharding),
      compiler_options=layers.compiler_options(),
      out_shardings=(repl, repl, repl) if with_logits else (repl, repl)))
