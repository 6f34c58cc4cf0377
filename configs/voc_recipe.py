"""The shared Pascal VOC recipe (mmsegmentation's VOC-aug schedule).

train_aug (10,582 SBD-augmented ids), crop 512 (cat_max_ratio 0.75), random
scale 0.5-2.0, flip, photometric distortion, SGD lr 0.01 momentum 0.9 wd 5e-4,
poly 0.9, global batch 16, 20k steps, auxiliary head weight 0.4. Model
configs import this and set the model.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.num_classes = 21
  c.data.name = 'voc'
  c.data.root = 'data/VOCdevkit/VOC2012'  # set to your copy
  c.data.train_split = 'train_aug'  # needs SegmentationClassAug/; or 'train'
  c.data.crop_size = (512, 512)
  c.data.eval_pad_size = (512, 512)  # VOC images are at most 500x500
  c.data.scale_range = (0.5, 2.0)
  c.data.cat_max_ratio = 0.75
  c.data.photometric.enabled = True
  c.data.worker_count = 4
  c.train.global_batch_size = 16
  c.train.num_steps = 20000
  c.train.optimizer = 'sgd'
  c.train.learning_rate = 0.01
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.schedule = 'poly'
  c.train.poly_power = 0.9
  c.train.aux_loss_weight = 0.4
  c.eval.every_steps = 2000
  c.eval.global_batch_size = 16
  c.checkpoint.every_steps = 2000
  return c
