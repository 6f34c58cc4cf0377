"""Datasets by name and the pipelines that feed them to the devices."""

from seg_jax.data import shapes


def _shapes(config, split):
  c = config.data.shapes
  return shapes.ShapesSource(
      split, c.num_train if split == 'train' else c.num_val,
      seed=c.seed, size=c.image_size, max_shapes=c.max_shapes)


# data.name -> builder(config, split) -> random-access source with
# `class_names` and `palette`. A plain dict: no registration on import.
DATASETS = {
    'shapes': _shapes,
}


def create_source(config, split):
  """The random-access source of `split` for `config.data.name`."""
  name = config.data.name
  if name not in DATASETS:
    raise ValueError(f'Unknown data.name={name!r}; choose one of '
                     f'{sorted(DATASETS)}.')
  source = DATASETS[name](config, split)
  if len(source.class_names) != config.model.num_classes:
    raise ValueError(
        f'data.name={name!r} has {len(source.class_names)} classes but '
        f'model.num_classes={config.model.num_classes}; make them equal.')
  return source
