"""Learning-rate schedules and the optax optimizer, from `config.train`."""

import optax

from seg_jax import errors


def check_config(config):
  """The optimizer's part of `config.train` (see `seg_jax.validate`)."""
  c = config.train
  errors.config_int(config, 'train.num_steps')
  errors.config_int(config, 'train.warmup_steps', 0)
  if not c.learning_rate > 0:
    raise errors.ConfigError(f'train.learning_rate={c.learning_rate!r}: give '
                             'a positive rate.')
  if c.warmup_steps >= c.num_steps:
    raise errors.ConfigError(
        f'train.warmup_steps={c.warmup_steps} is not below train.num_steps='
        f'{c.num_steps}: for a short run lower it too, e.g. '
        f'--config.train.warmup_steps={c.num_steps // 10}.')
  for key in ('weight_decay', 'grad_clip_norm'):
    if c[key] < 0:
      raise errors.ConfigError(f'train.{key}={c[key]!r}: give a value >= 0.')
  if not 0 <= c.momentum < 1:
    raise errors.ConfigError(f'train.momentum={c.momentum!r}: give a value '
                             'in [0, 1).')
  create_optimizer(c)  # optimizer and schedule names


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
    raise errors.ConfigError(f"train.schedule={cfg.schedule!r}; use 'poly', "
                             "'cosine' or 'constant'.")
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
    raise errors.ConfigError(f"train.optimizer={cfg.optimizer!r}; use 'sgd' "
                             "or 'adamw'.")
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
