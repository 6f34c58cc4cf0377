"""DeepLab v3 on the dilated MobileNetV3-Large (output stride 16), Pascal VOC.

torchvision's `deeplabv3_mobilenet_v3_large` (11.0M parameters; 60.3 mIoU
on COCO-val2017 with VOC labels, torchvision's weights). The schedule is
the shared VOC recipe (configs/voc_recipe.py: crop 512, batch 16, 20k
steps, poly 0.9) with torchvision's MobileNetV3 choices
(references/segmentation, README: `--aux-loss --wd 0.000001`, the default
SGD lr 0.01 at batch 32; its criterion weighs the aux loss 0.5): weight
decay 1e-6, aux head weight 0.5, lr 0.01 (mmsegmentation's rate at this
batch of 16, also torchvision's 0.02-at-32 ResNet rate scaled linearly).
Start from ImageNet MobileNetV3-Large weights (torchvision's
`mobilenet_v3_large` state dict):
--config.model.init_from=/path/mobilenet_v3_large.pth
"""

from configs import voc_recipe


def get_config():
  c = voc_recipe.get_config()
  c.model.name = 'deeplabv3_mobilenet_v3_large'
  c.model.kwargs = dict(aux_head=True)
  c.model.init_format = 'mobilenet_v3_large'
  c.train.weight_decay = 1e-6
  c.train.aux_loss_weight = 0.5
  return c
