"""Segmentation models by name: `create_model(name, num_classes, **kwargs)`."""

import functools
import inspect

from seg_jax.models import baseline, deeplab, fcn, lraspp, segnet, unet
from seg_jax.models.convert import from_torchvision

__all__ = ['MODELS', 'create_model', 'from_torchvision']

_p = functools.partial

# Name -> constructor taking (num_classes, **kwargs). A plain dict: adding a
# model is one line here, and an unknown name fails at config time.
MODELS = {
    'fcn32s': _p(fcn.FCNVGG, stride=32),
    'fcn16s': _p(fcn.FCNVGG, stride=16),
    'fcn8s': _p(fcn.FCNVGG, stride=8),
    'fcn_resnet50': _p(fcn.FCNResNet, depth=50),
    'fcn_resnet101': _p(fcn.FCNResNet, depth=101),
    'unet': unet.UNet,
    'deeplabv3_resnet50': _p(deeplab.DeepLabV3, depth=50),
    'deeplabv3_resnet101': _p(deeplab.DeepLabV3, depth=101),
    'deeplabv3plus_resnet50': _p(deeplab.DeepLabV3, depth=50, plus=True,
                                 output_stride=16),
    'deeplabv3plus_resnet101': _p(deeplab.DeepLabV3, depth=101, plus=True,
                                  output_stride=16),
    'deeplabv3_mobilenet_v3_large': deeplab.DeepLabV3MobileNetV3,
    'lraspp_mobilenet_v3_large': lraspp.LRASPP,
    'segnet': segnet.SegNet,
    'pixel_classifier': baseline.PixelClassifier,
}


def create_model(name, num_classes, **kwargs):
  """Builds a segmentation model.

  Args:
    name: one of `MODELS`.
    num_classes: number of output classes.
    **kwargs: model options (e.g. `width`, `padding` for `unet`).

  Returns:
    A `flax.linen.Module`; `apply(variables, x, train=bool)` maps NHWC float
    images to logits (N, H, W, num_classes) at input resolution. Built with
    `aux_head=True`, training returns (logits, aux_logits).
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model.name={name!r}; choose one of '
                     f'{sorted(MODELS)}.')
  ctor = MODELS[name]
  fields = inspect.signature(ctor).parameters
  # What the name itself fixes (ResNet depth, FCN stride, v3+) is not an
  # option; defaults such as output_stride are.
  fixed = ({'depth', 'stride', 'plus'} & set(ctor.keywords)
           if isinstance(ctor, functools.partial) else set())
  # The class count and the compute dtype are arguments, not options.
  options = set(fields) - fixed - {'parent', 'name', 'num_classes', 'dtype'}
  unknown = sorted(set(kwargs) - options - {'dtype'})
  if unknown:
    raise ValueError(f'model {name!r} does not take option(s) {unknown}; it '
                     f'takes {sorted(options)}.')
  return ctor(num_classes=num_classes, **kwargs)
