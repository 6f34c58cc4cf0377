"""U-Net for a binary task: grayscale 512x512 images and 0/255 masks.

Cell membranes in electron micrographs (ISBI 2012), retinal vessels, any
single-foreground task exported as 0/255 masks, in the `folder` layout:

  DATA/images/{train,val}/*.png   grayscale, 8 or 16-bit (data.channels=1)
  DATA/masks/{train,val}/*.png    0 background, 255 foreground

`data.label_map={255: 1}` reads 255 as class 1 (without it such masks are
refused: 255 is the ignore label). The loss is binary cross-entropy plus
soft Dice of the foreground, which keeps thin structures from being traded
for background accuracy.

  python -m seg_jax.main --config=configs/unet_membrane.py --workdir=runs/membrane --config.data.root=DATA
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'unet'
  c.model.num_classes = 2
  c.model.kwargs = dict(width=32, depth=4, batch_norm=True)
  c.data.name = 'folder'
  c.data.root = 'data/membrane'
  c.data.label_map = {255: 1}
  c.data.crop_size = (512, 512)
  c.data.eval_pad_size = (512, 512)
  c.data.scale_range = (0.75, 1.5)
  c.data.channels = 1  # grayscale: one input channel
  c.data.photometric.enabled = True  # brightness and contrast (grey)
  c.data.mean = (128.0,)
  c.data.std = (64.0,)
  c.train.loss.cross_entropy = 0.0
  c.train.loss.binary_cross_entropy = 1.0
  c.train.loss.binary_dice = 1.0
  c.train.global_batch_size = 8
  c.train.num_steps = 3000
  c.train.optimizer = 'adamw'
  c.train.learning_rate = 1e-3
  c.train.schedule = 'cosine'
  c.train.warmup_steps = 100
  c.train.end_learning_rate = 0.0
  c.train.weight_decay = 1e-4
  c.train.ema_decay = 0.999
  c.eval.every_steps = 500
  c.eval.global_batch_size = 8
  c.checkpoint.every_steps = 500
  return c
