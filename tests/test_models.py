"""Models: parameter counts, output sizes, options."""

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
  x = jnp.ones((2, *hw, 3))
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x).shape == (2, *hw, 3)


def test_unet_same_padding_is_translation_aligned():
  """Output pixel (i, j) depends on input pixel (i, j), not a shifted one."""
  model = models.create_model('unet', 1, width=2, depth=2, batch_norm=False)
  x = jnp.zeros((1, 20, 20, 1))
  variables = model.init(jax.random.key(0), x)
  grad = jax.grad(lambda x: model.apply(variables, x)[0, 7, 11, 0])(x)
  i, j = np.unravel_index(np.argmax(np.abs(grad[0, ..., 0])), (20, 20))
  assert abs(i - 7) <= 1 and abs(j - 11) <= 1


def test_create_model_errors():
  with pytest.raises(ValueError, match="model.name='fcn9s'"):
    models.create_model('fcn9s', 21)
  with pytest.raises(ValueError, match=r"does not take option\(s\) \['widht'\]"):
    models.create_model('unet', 21, widht=3)


def test_pixel_classifier_sees_one_pixel():
  model = models.create_model('pixel_classifier', 4)
  x = jnp.zeros((1, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  grad = jax.grad(lambda x: model.apply(variables, x)[0, 3, 5].sum())(x)
  assert np.count_nonzero(np.abs(grad).sum(-1)) == 1
