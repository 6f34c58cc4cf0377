"""DeepLab v3+ on a dilated ResNet-101 (output stride 16), Cityscapes.

mmsegmentation's Cityscapes schedule: 512x1024 crops (cat_max_ratio 0.75),
scale 0.5-2.0, flip, photometric distortion, batch 8,
SGD lr 0.01 poly, 80k steps; evaluation on the full 1024x2048 images.
Start from ImageNet ResNet-101 weights: --config.model.init_from=/path/resnet101.pth
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'deeplabv3plus_resnet101'
  c.model.num_classes = 19
  c.model.kwargs = dict(output_stride=16)
  c.model.init_format = 'resnet101'
  c.data.name = 'cityscapes'
  c.data.root = 'data/cityscapes'  # holds leftImg8bit/ and gtFine/
  c.data.crop_size = (512, 1024)
  c.data.eval_pad_size = (1024, 2048)
  c.data.scale_range = (0.5, 2.0)
  c.data.cat_max_ratio = 0.75
  c.data.photometric.enabled = True
  c.data.worker_count = 4
  c.train.global_batch_size = 8
  c.train.num_steps = 80000
  c.train.learning_rate = 0.01
  c.train.schedule = 'poly'
  c.eval.every_steps = 8000
  c.eval.global_batch_size = 8
  c.checkpoint.every_steps = 4000
  return c
