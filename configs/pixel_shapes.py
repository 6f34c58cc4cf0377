"""Baseline: a per-pixel colour classifier (1x1 convolutions) on shapes.

The same data, schedule and budget as unet_shapes.py, with a model that sees
one pixel at a time. It shows the shapes dataset is not solvable by colour:
  python -m seg_jax.main --config=configs/pixel_shapes.py --workdir=runs/pixel_shapes
"""

from configs import unet_shapes


def get_config():
  c = unet_shapes.get_config()
  c.model.name = 'pixel_classifier'
  c.model.kwargs = dict(width=64, depth=2)
  return c
