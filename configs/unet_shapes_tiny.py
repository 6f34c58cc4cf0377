"""A seconds-long smoke run: unet_shapes shrunk to 32x32 images, width 4.

Used by the tests; handy to check an installation:
  python -m seg_jax.main --config=configs/unet_shapes_tiny.py --workdir=/tmp/smoke
"""

from configs import unet_shapes


def get_config():
  c = unet_shapes.get_config()
  c.model.kwargs = dict(width=4, depth=2, batch_norm=True)
  c.data.shapes.image_size = 32
  c.data.shapes.num_train = 64
  c.data.shapes.num_val = 21
  c.data.crop_size = (32, 32)
  c.data.num_threads = 1
  c.train.global_batch_size = 8
  c.train.num_steps = 6
  c.train.warmup_steps = 2
  c.train.log_every_steps = 3
  c.eval.every_steps = 6
  c.eval.global_batch_size = 8
  c.checkpoint.every_steps = 3
  return c
