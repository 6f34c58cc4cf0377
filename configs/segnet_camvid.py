"""SegNet on CamVid (11 classes, 360x480), Badrinarayanan et al. 2017.

Median-frequency class balancing with SegNet's published weights; SGD with
momentum, full-resolution crops. SegNet reports 46.4 test mIoU (11 classes).
"""

from configs import default

# SegNet's class-balancing weights (median frequency), classes 0..10.
CAMVID_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446,
                  1.8418, 0.6823, 6.2478, 7.3614)


def get_config():
  c = default.get_config()
  c.model.name = 'segnet'
  c.model.num_classes = 11
  c.model.init_format = 'vgg16'
  c.data.name = 'camvid'
  c.data.root = 'data/camvid'  # SegNet's CamVid/ folder (README: Datasets)
  c.data.crop_size = (360, 480)
  c.data.eval_pad_size = (384, 480)
  c.data.scale_range = (1.0, 1.0)
  c.train.global_batch_size = 8
  c.train.num_steps = 20000
  c.train.optimizer = 'sgd'
  c.train.learning_rate = 0.01
  c.train.class_weights = CAMVID_WEIGHTS
  c.eval.every_steps = 1000
  c.eval.global_batch_size = 8
  c.checkpoint.every_steps = 1000
  return c
