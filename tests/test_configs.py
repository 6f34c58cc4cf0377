"""Every shipped config is consistent: known model and dataset, model
options the model accepts, class weights per class, valid transforms."""

import glob
import importlib
import os

import pytest

from seg_jax import data, inference, models
from seg_jax.data import pipeline

from conftest import REPO

SHARED_CAMVID = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'camvid')

CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
    if not os.path.basename(p).startswith('__'))


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_consistent(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.model.name in models.MODELS
  assert config.data.name in data.DATASETS
  models.create_model(config.model.name, config.model.num_classes,
                      **config.model.kwargs)
  weights = tuple(config.train.class_weights)
  assert not weights or len(weights) == config.model.num_classes
  pipeline.train_transform(config)
  pipeline.eval_transform(config)
  for name in config.eval.evaluators:  # every evaluator is well formed
    inference.spec_from_config(config, name)
  assert set(config.eval.in_training) <= set(config.eval.evaluators)
  assert config.data.on_bad_sample in ('raise', 'skip')
  # Dataset roots stay inside the project (data/...): a user's clone and a
  # GPU host have no ../shared.
  assert not os.path.isabs(config.data.root)
  assert not os.path.normpath(config.data.root).startswith('..')


CAMVID_CONFIGS = [n for n in CONFIGS if n.endswith('camvid') or
                  n.endswith('camvid_gpu')]


@pytest.mark.skipif(not os.path.isdir(SHARED_CAMVID),
                    reason='no ../shared/data/camvid (CamVid is not shipped)')
@pytest.mark.parametrize('name', CAMVID_CONFIGS)
def test_camvid_config_reads_camvid(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.data.root = SHARED_CAMVID
  assert len(data.create_source(config, 'val')) == 101
  assert len(data.create_source(config, 'train')) == 367
