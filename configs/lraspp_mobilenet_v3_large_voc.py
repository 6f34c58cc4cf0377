"""Lite R-ASPP on the dilated MobileNetV3-Large, Pascal VOC.

torchvision's `lraspp_mobilenet_v3_large` (3.2M parameters; 57.9 mIoU on
COCO-val2017 with VOC labels, torchvision's weights), no aux head. The
schedule is the shared VOC recipe (configs/voc_recipe.py: crop 512, batch
16, 20k steps, SGD lr 0.01, poly 0.9) with torchvision's weight decay for
it (references/segmentation, README: `--wd 0.000001`). Start from
ImageNet MobileNetV3-Large weights:
--config.model.init_from=/path/mobilenet_v3_large.pth
"""

from configs import voc_recipe


def get_config():
  c = voc_recipe.get_config()
  c.model.name = 'lraspp_mobilenet_v3_large'
  c.model.kwargs = dict()
  c.model.init_format = 'mobilenet_v3_large'
  c.train.weight_decay = 1e-6
  return c
