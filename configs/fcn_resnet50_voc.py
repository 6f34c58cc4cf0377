"""torchvision-style FCN on a dilated ResNet-50 (output stride 8), Pascal VOC.

mmsegmentation's FCN R50-D8 on VOC-aug (512x512, 20k) reports 67.08 mIoU.
Start from ImageNet ResNet-50 weights: --config.model.init_from=/path/resnet50.pth
"""

from configs import voc_recipe


def get_config():
  c = voc_recipe.get_config()
  c.model.name = 'fcn_resnet50'
  c.model.kwargs = dict(output_stride=8, aux_head=True)
  c.model.init_format = 'resnet50'
  return c
