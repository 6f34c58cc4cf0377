"""Lite R-ASPP on the dilated MobileNetV3-Large, CamVid (11 classes, 360x480).

The CamVid recipe of configs/deeplabv3_mobilenet_v3_large_camvid.py
(SegNet's split and crops, batch 8, 20k steps, SGD lr 0.01, poly,
torchvision's weight decay 1e-6, square-root class weights) for
torchvision's `lraspp_mobilenet_v3_large`, which has no aux head. Start
from ImageNet MobileNetV3-Large weights:
--config.model.init_from=/path/mobilenet_v3_large.pth
"""

from configs import deeplabv3_mobilenet_v3_large_camvid


def get_config():
  c = deeplabv3_mobilenet_v3_large_camvid.get_config()
  c.model.name = 'lraspp_mobilenet_v3_large'
  c.model.kwargs = dict()
  return c
