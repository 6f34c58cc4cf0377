"""DeepLab v3 on the dilated MobileNetV3-Large, CamVid (11 classes, 360x480).

The CamVid setting of configs/segnet_camvid.py (SegNet's 367/101 split,
full-resolution 360x480 crops, batch 8, 20k steps, SGD lr 0.01, poly) with
torchvision's MobileNetV3 choices (references/segmentation: weight decay
1e-6, aux loss weight 0.5, random rescale 0.5-2.0 and flip), and the
milder square roots of SegNet's class weights that configs/unet_camvid.py
uses (the aux head and the main head share them). Evaluation pads frames
to 368x480, a multiple of the output stride 16. Start from ImageNet
MobileNetV3-Large weights:
--config.model.init_from=/path/mobilenet_v3_large.pth
"""

from configs import default
from configs.unet_camvid import CAMVID_SQRT_WEIGHTS


def get_config():
  c = default.get_config()
  c.model.name = 'deeplabv3_mobilenet_v3_large'
  c.model.num_classes = 11
  c.model.kwargs = dict(aux_head=True)
  c.model.init_format = 'mobilenet_v3_large'
  c.data.name = 'camvid'
  c.data.root = 'data/camvid'  # SegNet's CamVid/ folder (docs/datasets.md)
  c.data.crop_size = (360, 480)
  c.data.eval_pad_size = (368, 480)
  c.data.scale_range = (0.5, 2.0)
  c.data.worker_count = 4
  c.train.global_batch_size = 8
  c.train.num_steps = 20000
  c.train.optimizer = 'sgd'
  c.train.learning_rate = 0.01
  c.train.weight_decay = 1e-6
  c.train.aux_loss_weight = 0.5
  c.train.class_weights = CAMVID_SQRT_WEIGHTS
  c.eval.every_steps = 1000
  c.eval.global_batch_size = 8
  c.checkpoint.every_steps = 1000
  return c
