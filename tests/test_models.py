"""Models: parameter counts, output sizes, options."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import models
from seg_jax.models import unet


def _count(model, shape):
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      variables['params']))


def test_unet_paper_parameter_count():
  model = models.create_model('unet', 2, padding='VALID', batch_norm=False)
  assert _count(model, (1, 572, 572, 1)) == 31_030_658


def test_unet_paper_valid_geometry():
  assert unet.valid_input_size(388, 4) == (572, 388)


@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
@pytest.mark.parametrize('upsample', ['transpose', 'bilinear'])
@pytest.mark.parametrize('hw', [(37, 50), (64, 64), (33, 17)])
def test_unet_output_matches_input_size(padding, upsample, hw):
  model = models.create_model('unet', 3, width=2, depth=3, padding=padding,
                              upsample=upsample)
  x = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert out.shape == (2, *hw, 3)


@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
def test_unet_output_is_aligned_with_input(padding):
  """Shifting the input by 4 pixels shifts the output by exactly 4 pixels
  away from the borders: output pixel (i, j) belongs to input pixel (i, j)."""
  model = models.create_model('unet', 2, width=2, depth=2, batch_norm=False,
                              padding=padding)
  x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  full = model.apply(variables, x)
  shifted = model.apply(variables, x[:, 4:, 4:])
  np.testing.assert_allclose(shifted[:, 20:36, 20:36], full[:, 24:40, 24:40],
                             rtol=1e-4, atol=1e-4)


def test_create_model_errors():
  with pytest.raises(ValueError, match="model.name='fcn9s'"):
    models.create_model('fcn9s', 21)
  with pytest.raises(ValueError, match=r"does not take option\(s\) \['widht'\]"):
    models.create_model('unet', 21, widht=3)


def test_pixel_classifier_sees_one_pixel():
  model = models.create_model('pixel_classifier', 4)
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  grad = jax.grad(lambda x: model.apply(variables, x)[0, 3, 5].sum())(x)
  nonzero = np.abs(grad[0]).sum(-1) > 0
  assert nonzero[3, 5] and nonzero.sum() == 1


@pytest.mark.parametrize('name,kwargs,message', [
    ('unet', {'width': 0},
     r'^unet: model.kwargs.width=0; give an integer >= 1.$'),
    ('unet', {'depth': 0},
     r'^unet: model.kwargs.depth=0; give an integer >= 1.$'),
    ('unet', {'width': 2.5},
     r'^unet: model.kwargs.width=2.5; give an integer >= 1.$'),
    ('lraspp_mobilenet_v3_large', {'width': 0},
     r'^model.kwargs.width=0: the MobileNetV3 width multiplier must be > 0 '),
    ('deeplabv3_mobilenet_v3_large', {'width': -1.0},
     r'^model.kwargs.width=-1.0: the MobileNetV3 width multiplier must be'),
])
def test_a_width_or_depth_that_builds_no_model_is_refused(name, kwargs,
                                                         message):
  """Not a model of a handful of parameters (MobileNetV3's channel rounding
  made width=0 one of 20,594): a one-line error naming the option."""
  from seg_jax import errors  # pylint: disable=g-import-not-at-top
  model = models.create_model(name, 3, **kwargs)
  with pytest.raises(errors.ConfigError) as e:
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # (jax appends a note on its filtered traceback after the first line)
  assert re.match(message, str(e.value).splitlines()[0])
