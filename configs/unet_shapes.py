"""U-Net (BatchNorm, width 16) on the built-in synthetic shapes dataset.

Runs on a laptop CPU in a few minutes, with no download:
  python -m seg_jax.main --config=configs/unet_shapes.py --workdir=runs/unet_shapes
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'unet'
  c.model.num_classes = 5
  c.model.kwargs = dict(width=16, depth=3, batch_norm=True)
  c.data.name = 'shapes'
  c.data.crop_size = 64
  c.data.scale_range = (1.0, 1.0)
  c.train.global_batch_size = 16
  c.train.num_steps = 1000
  c.train.optimizer = 'adamw'
  c.train.learning_rate = 3e-3
  c.train.schedule = 'cosine'
  c.train.warmup_steps = 50
  c.train.end_learning_rate = 0.0
  c.train.weight_decay = 1e-4
  c.eval.every_steps = 500
  c.eval.global_batch_size = 64
  c.checkpoint.every_steps = 500
  return c
