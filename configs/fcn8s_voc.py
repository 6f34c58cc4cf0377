"""FCN-8s (VGG16) on Pascal VOC, Long et al. 2015.

Start from ImageNet VGG16 weights (torchvision's vgg16 state dict):
  --config.model.init_from=/path/to/vgg16.pth
The final upsampling stays fixed at bilinear, as in the paper.
"""

from configs import voc_recipe


def get_config():
  c = voc_recipe.get_config()
  c.model.name = 'fcn8s'
  c.model.kwargs = dict(fixed_upsample=True)
  c.model.init_format = 'vgg16'
  # conv1_1 pads by 100, so a 512 crop becomes a 710 input: a lower rate and
  # heavier momentum, after the paper's "heavy learning" recipe.
  c.train.learning_rate = 1e-3
  c.train.momentum = 0.99
  return c
