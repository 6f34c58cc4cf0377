"""Learning-rate schedules and the optax optimizer, from `config.train`."""

import optax


def create_learning_rate_fn(cfg):
  """Learning-rate schedule from `config.train`, warmup included."""
  decay_steps = max(cfg.num_steps - cfg.warmup_steps, 1)
  if cfg.schedule == 'poly':
    decay = optax.polynomial_schedule(cfg.learning_rate, cfg.end_learning_rate,
                                      cfg.poly_power, decay_steps)
  elif cfg.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(
        cfg.learning_rate, decay_steps,
        alpha=cfg.end_learning_rate / cfg.learning_rate)
  elif cfg.schedule == 'constant':
    decay = optax.constant_schedule(cfg.learning_rate)
  else:
    raise ValueError(f"train.schedule={cfg.schedule!r}; use 'poly', 'cosine' "
                     "or 'constant'.")
  if not cfg.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def create_optimizer(cfg):
  """optax optimizer from `config.train`: SGD (coupled L2) or AdamW."""
  lr = create_learning_rate_fn(cfg)
  if cfg.optimizer == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(lr, momentum=cfg.momentum))
  elif cfg.optimizer == 'adamw':
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
  else:
    raise ValueError(f"train.optimizer={cfg.optimizer!r}; use 'sgd' or "
                     "'adamw'.")
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
