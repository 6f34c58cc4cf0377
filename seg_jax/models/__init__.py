"""Segmentation models by name: `create_model(name, num_classes, **kwargs)`."""

import inspect

from seg_jax.models import baseline, unet

# Name -> constructor taking (num_classes, **kwargs). A plain dict: adding a
# model is one line here, and an unknown name fails at config time.
MODELS = {
    'unet': unet.UNet,
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
    images to logits (N, H, W, num_classes) at input resolution.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model.name={name!r}; choose one of '
                     f'{sorted(MODELS)}.')
  ctor = MODELS[name]
  fields = inspect.signature(ctor).parameters
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f'model {name!r} does not take option(s) {unknown}; it '
                     f'takes {sorted(set(fields) - {"num_classes", "parent", "name"})}.')
  return ctor(num_classes=num_classes, **kwargs)
