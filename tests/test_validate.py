"""Config validation: each impossible setting is one line naming the key;
a checkpoint of another model is refused naming the parameter."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from seg_jax import errors, train, validate

from conftest import REPO


def _set(config, key, value):
  *parents, last = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[last] = value


@pytest.mark.parametrize('key,value,message', [
    ('train.num_steps', 0, r'^train.num_steps=0: give an integer >= 1.$'),
    ('data.eval_pad_size', (16, 16),
     r'^data.crop_size=\(32, 32\) is larger than data.eval_pad_size='
     r'\(16, 16\): evaluation pads'),
    ('train.global_batch_size', 12,
     r'^train.global_batch_size=12 must be divisible by the 8 devices the '
     r'batch is split over \(data=8\) and by the 1 processes; use a multiple '
     r'of 8.$'),
    ('eval.global_batch_size', 4, r'^eval.global_batch_size=4 must be'),
    ('model.name', 'unet3',
     r"^Unknown model.name='unet3'; choose one of \[.*'fcn8s'.*'unet'"),
    ('data.name', 'pascal',
     r"^Unknown data.name='pascal'; choose one of \['ade20k', 'camvid'"),
    ('model.num_classes', 7,
     r"^data.name='shapes' has 5 classes but model.num_classes=7; make them "
     r'equal.$'),
    ('train.optimizer', 'adam', r"^train.optimizer='adam'; use 'sgd' or"),
    ('train.schedule', 'step', r"^train.schedule='step'; use 'poly'"),
    ('train.precision', 'float16', r"^train.precision='float16'; use one of"),
    ('data.scale_range', (2.0, 1.0),
     r'^data.scale_range=\(2.0, 1.0\): give 0 < low <= high.$'),
    ('train.warmup_steps', 6,
     r'^train.warmup_steps=6 is not below train.num_steps=6: for a short '
     r'run lower it too, e.g. --config.train.warmup_steps=0.$'),
    ('train.learning_rate', -0.1, r'^train.learning_rate=-0.1: give a '),
    ('eval.in_training', ('whole', 'nope'),
     r"^Unknown evaluator 'nope': config.eval.evaluators defines"),
    ('model.kwargs', {'width': 4, 'wings': 2},
     r"^model 'unet' does not take option\(s\) \['wings'\]"),
    ('mesh.shape', (3, 3), r'mesh.shape=\(3, 3\) and mesh.axes=\(.data.,\) '
     'must have equal length'),
    ('checkpoint.max_to_keep', 0,
     r'^checkpoint.max_to_keep=0: give an integer >= 1.$'),
    ('train.loss.binary_dice', 1.0,
     r'^train.loss.binary_dice needs model.num_classes=2 \(background 0, '
     r'foreground 1\), not 5; use dice or cross_entropy for more classes.$'),
    ('train.loss.cross_entropy', 0.0,
     r'^train.loss: every weight is 0; turn one on, e.g. '),
    ('train.loss.dice', -1.0, r'^train.loss.dice=-1.0: give a weight >= 0'),
    ('train.label_smoothing', 1.0,
     r'^train.label_smoothing=1.0: give a value in \[0, 1\).$'),
    ('train.ema_decay', 1.5, r'^train.ema_decay=1.5: give a value in'),
    ('train.class_weights', (1.0, -2.0, 1.0, 1.0, 1.0),
     r'^train.class_weights=\(1.0, -2.0, 1.0, 1.0, 1.0\): give weights >= 0, '
     r'not all 0.$'),
    ('train.class_weights', (1, 2, 3, 4, 'x'),
     r"^train.class_weights=\(1, 2, 3, 4, 'x'\): give 5 numbers >= 0, one "
     r'per class'),
    ('train.class_weights', ('(1,2,3,4,x)',),  # the flag's parse of x
     r"^train.class_weights=\('\(1,2,3,4,x\)',\): give 5 numbers >= 0"),
    ('model.num_classes', 1,
     r'^model.num_classes=1: give an integer >= 2 \(the model scores every '
     r'class, background included'),
])
def test_each_impossible_setting_is_one_line_naming_the_key(
    tiny_config, key, value, message):
  _set(tiny_config, key, value)
  with pytest.raises(errors.ConfigError, match=message) as e:
    validate.check_config(tiny_config)
  assert '\n' not in str(e.value)


def test_an_evaluation_does_not_check_the_training_batch(tiny_config):
  """A run evaluated on a device count its training batch does not split
  over: only eval.global_batch_size is checked."""
  tiny_config.train.global_batch_size = 12
  validate.check_config(tiny_config, training=False)
  tiny_config.eval.global_batch_size = 12
  with pytest.raises(errors.ConfigError,
                     match=r'^eval.global_batch_size=12 must be divisible'):
    validate.check_config(tiny_config, training=False)


def test_unwritable_workdir(tiny_config, tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(errors.ConfigError,
                     match=r'--workdir=.*file/run is not writable \(Not a '
                     r'directory\): choose a folder you can write to.$'):
    validate.check_config(tiny_config, str(tmp_path / 'file' / 'run'))
  with pytest.raises(errors.ConfigError,
                     match=r'^--workdir=.*file is a file, not a folder: name a '
                     r'folder for checkpoints and logs.$'):
    validate.check_config(tiny_config, str(tmp_path / 'file'))
  validate.check_config(tiny_config, str(tmp_path / 'ok'))
  assert os.path.isdir(tmp_path / 'ok')


def test_cli_prints_one_line_and_exits_2_without_a_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'seg_jax.main',
       '--config=configs/unet_shapes_tiny.py', f'--workdir={tmp_path}',
       '--config.data.eval_pad_size=(16,16)'], cwd=REPO,
      capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: data.crop_size=(32, 32) is larger than data.eval_pad_size='
      '(16, 16): evaluation pads images to at least the crop size; raise '
      'data.eval_pad_size or lower data.crop_size.')
  assert not os.listdir(tmp_path)  # nothing was started


def test_checkpoint_of_another_model_is_refused_naming_the_parameter(
    tiny_config, tmp_path):
  tiny_config.train.num_steps = 3
  tiny_config.eval.every_steps = 100
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.model.kwargs.width = 8
  tiny_config.train.num_steps = 6
  with pytest.raises(errors.ConfigError,
                     match=rf'^Checkpoint {tmp_path}/checkpoints/3 stores '
                     r'params/\S+ with shape \(\d+(, \d+)*,?\) but the '
                     r"config's model has \(\d+(, \d+)*,?\): was it trained "
                     r'with another model.num_classes, model.kwargs or '
                     r'data.channels\?'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.model.kwargs = {'width': 4, 'depth': 2, 'batch_norm': False}
  with pytest.raises(errors.ConfigError,
                     match=r'has no params/\S+/bias \(shape \(\d+,\)\) that '
                     r"the config's model needs: was it trained with another "
                     r'model.name or model.kwargs\?'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  _check_init_from_a_run(tmp_path)


def _check_init_from_a_run(run):
  """model.init_from=<run folder or step folder> starts a new model from
  the run's weights; only the class count may differ (those layers stay
  fresh); another model is refused naming the parameter."""
  import flax  # pylint: disable=g-import-not-at-top
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  from seg_jax import checkpoint, state  # pylint: disable=g-import-not-at-top
  stored = checkpoint.read_state(str(run / 'checkpoints'), 3)
  c = unet_shapes_tiny.get_config()
  c.model.num_classes += 2

  def start(init_from, config=c):
    config.model.init_from = str(init_from)
    state.check_config(config)
    state.check_init_from(config)
    model = state.create_model(config)
    fresh = jax.device_get(model.init(
        jax.random.key(7), np.zeros(state.init_input_shape(config)),
        train=False))
    got = checkpoint.initial_weights_fn(config)(fresh)
    return (flax.traverse_util.flatten_dict(fresh),
            flax.traverse_util.flatten_dict(got))

  for source in (run, run / 'checkpoints' / '3'):
    fresh, got = start(source)
    assert sorted(got) == sorted(fresh)
    kept_fresh = 0
    for path, value in got.items():
      old = stored[path[0]]
      for k in path[1:]:
        old = old[k]
      if np.shape(old) == value.shape:
        np.testing.assert_array_equal(value, np.asarray(old))
      else:  # the classifier: its class count differs
        assert np.shape(old)[-1] + 2 == value.shape[-1]
        np.testing.assert_array_equal(value, fresh[path])
        kept_fresh += 1
    assert kept_fresh == 2  # the last convolution's kernel and bias
  c.model.kwargs = dict(c.model.kwargs, width=8)
  with pytest.raises(errors.ConfigError, match=rf'^model.init_from={run} '
                     r'\(step 3\): params/\S+ has shape \(.*\), the '
                     r"config's model \(.*\): was the run another "
                     r'model.kwargs or data.channels\? Only the class count '
                     r'may differ.$'):
    start(run)
  (run / 'plain').mkdir()
  with pytest.raises(errors.ConfigError, match=r'is a folder but not a '
                     r'seg_jax run'):
    start(run / 'plain')
  c.model.kwargs = unet_shapes_tiny.get_config().model.kwargs
  start(run / 'checkpoints')  # the latest step
  with pytest.raises(errors.ConfigError, match=rf'^model.init_from={run}/'
                     rf'checkpoints/99: {run}/checkpoints holds no step 99 '
                     rf'\(steps \[3\]\); name one of them, or the run '
                     rf'folder {run} for its latest.$'):
    start(run / 'checkpoints' / '99')
  # Only a new run reads them: a resume (or an evaluation) of a run that
  # started from weights no longer there is not refused, and the resume
  # does not read them.
  c = unet_shapes_tiny.get_config()
  c.model.init_from = str(run / 'gone')
  validate.check_config(c, str(run))
  validate.check_config(c, training=False)
  with pytest.raises(errors.ConfigError, match='gone.: no such file'):
    validate.check_config(c, str(run / 'new'))
  trainer = train.Trainer(c, str(run))
  trainer.checkpointer.close()


def test_missing_dataset_root_is_a_user_error(tiny_config, tmp_path):
  """A missing dataset folder is printed by the CLIs as one line, exit 2
  (a `UserError`), and is still a FileNotFoundError for callers."""
  from seg_jax import data  # pylint: disable=g-import-not-at-top
  tiny_config.data.name, tiny_config.model.num_classes = 'folder', 2
  tiny_config.data.root = str(tmp_path / 'nowhere')
  with pytest.raises(errors.MissingFileError,
                     match=rf"^folder: dataset folder data.root='{tmp_path}/"
                     r"nowhere' does not exist; it must hold images/ and "
                     r'masks/.$') as e:
    data.create_source(tiny_config, 'train')
  assert isinstance(e.value, FileNotFoundError) and e.value.exit_code == 2
  (tmp_path / 'a_file').write_text('x')
  tiny_config.data.root = str(tmp_path / 'a_file')
  with pytest.raises(errors.MissingFileError,
                     match=rf"^folder: dataset folder data.root='{tmp_path}/"
                     r"a_file' is a file, not a folder; it must hold images/ "
                     r'and masks/.$'):
    data.create_source(tiny_config, 'train')
