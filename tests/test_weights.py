"""Weight files are read without executing code."""

import io
import json
import pickle
import re
import struct
import zipfile

import numpy as np
import pytest

from seg_jax.models import convert, weights


def test_safetensors_roundtrip(tmp_path):
  tensors = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
             'b': np.array([1, -2], np.int64)}
  header, blobs, offset = {}, [], 0
  for name, arr in tensors.items():
    raw = arr.tobytes()
    header[name] = {'dtype': {np.float32: 'F32', np.int64: 'I64'}[
        arr.dtype.type], 'shape': list(arr.shape),
                    'data_offsets': [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  path = tmp_path / 'w.safetensors'
  path.write_bytes(struct.pack('<Q', len(head)) + head + b''.join(blobs))
  out = weights.load_weights(str(path))
  for k, v in tensors.items():
    np.testing.assert_array_equal(out[k], v)


def test_pickle_with_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ('owned',))
  buf = io.BytesIO()
  pickle.dump({'x': Evil()}, buf)
  path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', buf.getvalue())
  with pytest.raises(pickle.UnpicklingError, match='refusing to load builtins.print'):
    weights.load_weights(str(path))


def test_missing_file_and_wrong_names(tmp_path):
  with pytest.raises(FileNotFoundError, match='model.init_from'):
    weights.load_weights(str(tmp_path / 'nope.pth'))
  with pytest.raises(ValueError, match='lacks'):
    convert.from_torchvision('resnet50', {'conv1.weight': np.zeros((64, 3, 7, 7))})
  with pytest.raises(ValueError, match='unsupported name'):
    convert.from_torchvision('alexnet', {})


def test_init_from_problems_are_config_errors_naming_the_key(tiny_config,
                                                             tmp_path):
  """Found by the config check before anything runs (a missing file, an
  unknown format), or, for the file's contents, one `ConfigError` naming
  model.init_from when the weights are loaded."""
  from seg_jax import errors, state, validate  # pylint: disable=g-import-not-at-top
  c = tiny_config
  c.model.init_from = str(tmp_path / 'nope.pth')
  with pytest.raises(errors.ConfigError, match=r"^model.init_from='.*nope.pth"
                     r"': no such file"):
    validate.check_config(c)
  (tmp_path / 'notes.pth').write_text('not weights')
  c.model.init_from, c.model.init_format = str(tmp_path / 'notes.pth'), 'foo'
  with pytest.raises(errors.ConfigError, match=r"^model.init_format='foo': "
                     r'use the torchvision name .* resnet50, resnet101'):
    validate.check_config(c)
  c.model.init_format = 'resnet50'
  validate.check_config(c)
  with pytest.raises(errors.ConfigError, match=r'^model.init_from=.*notes.pth '
                     r'\(model.init_format=resnet50\): .*not a torch zip'):
    state.pretrained_init_fn(c)({})


def _safetensors_bytes(header, data=b''):
  head = json.dumps(header).encode()
  return struct.pack('<Q', len(head)) + head + data


_F32 = {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}


@pytest.mark.parametrize('content,why', [
    (b'', r'it has 0 bytes, fewer than the 8 of the header length that '
          r'starts the format'),
    (b'abc', r'it has 3 bytes'),
    (struct.pack('<Q', 100) + b'{}', r'its first 8 bytes give a header of '
                                     r'100 bytes, but only 2 follow'),
    (struct.pack('<Q', 5) + b'{"a":', r'its header is not valid JSON '),
    (_safetensors_bytes([1, 2]), r'its header is a JSON list, not an object '
                                 r'of tensors'),
    (_safetensors_bytes({'w': {'dtype': 'F32', 'shape': [2]}}),
     r"tensor 'w' has no dtype, shape and two data_offsets"),
    (_safetensors_bytes({'w': _F32}, b'\0' * 4),
     r"tensor 'w' \(F32, shape \[2\]: 8 bytes\) has data_offsets \[0, 8\] "
     r'in 4 bytes of data'),
])
def test_a_damaged_safetensors_file_is_one_value_error_naming_it(
    tmp_path, content, why):
  path = tmp_path / 'w.safetensors'
  path.write_bytes(content)
  with pytest.raises(ValueError) as e:
    weights.load_weights(str(path))
  assert re.fullmatch(
      rf'{re.escape(str(path))}: not a valid safetensors file: {why}.*; the '
      r'file is damaged or of another format: save or download it again.',
      str(e.value)), str(e.value)
  # The valid file those headers were cut from.
  path.write_bytes(_safetensors_bytes({'w': _F32}, b'\0' * 8))
  np.testing.assert_array_equal(weights.load_weights(str(path))['w'],
                                np.zeros(2, np.float32))


def test_a_damaged_init_from_file_is_a_config_error(tiny_config, tmp_path):
  """What `main` prints as one `error:` line (it was a struct.error
  traceback for an empty file)."""
  from seg_jax import errors, state  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'empty.safetensors'
  path.write_bytes(b'')
  tiny_config.model.init_from = str(path)
  with pytest.raises(errors.ConfigError, match=(
      rf'^model.init_from={re.escape(str(path))} \(model.init_format='
      rf'resnet50\): {re.escape(str(path))}: not a valid safetensors file: '
      r'it has 0 bytes')):
    state.pretrained_init_fn(tiny_config)({})


def _write_safetensors(path, tensors):
  header, blobs, offset = {}, [], 0
  for name, arr in tensors.items():
    raw = np.ascontiguousarray(arr, np.float32).tobytes()
    header[name] = {'dtype': 'F32', 'shape': list(arr.shape),
                    'data_offsets': [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(head)) + head + b''.join(blobs))


@pytest.mark.slow  # a full-width DeepLab on 8 devices: ~45 s here
def test_init_from_resnet50_file_reaches_the_train_state(tiny_config, tmp_path):
  """A torchvision-layout ImageNet ResNet-50 file lands in the backbone of a
  DeepLab model through `model.init_from`; the head keeps its init."""
  import jax  # pylint: disable=g-import-not-at-top
  from seg_jax import optim, sharding, state  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  mapping, _ = convert._mapping('resnet50', False, False)  # pylint: disable=protected-access
  tiny_config.model.name, tiny_config.model.kwargs = 'deeplabv3_resnet50', {}
  model = state.create_model(tiny_config)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
  tensors, expected = {}, {}
  for path, key, fn in mapping:
    node = shapes
    for p in path:
      node = node[p]
    value = rng.normal(size=node.shape).astype(np.float32)
    expected[path] = value
    to_torch = (lambda w: w.transpose(3, 2, 0, 1)) if fn else (lambda w: w)
    if isinstance(key, list):
      for i, k in enumerate(key):
        tensors[k] = to_torch(value[i])
    else:
      tensors[key] = to_torch(value)
  tensors['fc.weight'] = np.zeros((1000, 2048), np.float32)  # ignored
  path = str(tmp_path / 'resnet50.safetensors')
  _write_safetensors(path, tensors)
  tiny_config.model.init_from, tiny_config.model.init_format = path, 'resnet50'
  mesh = sharding.create_mesh((-1,), ('data',))
  train_state = state.create_train_state(
      model, optim.create_optimizer(tiny_config.train), jax.random.key(0),
      (1, 32, 32, 3), mesh, state.pretrained_init_fn(tiny_config))
  got = {'params': train_state.params,
         'batch_stats': train_state.batch_stats}
  # torchvision's ResNet-50: 53 convs + 53 BatchNorms x 4 tensors (+ fc).
  assert len(tensors) == 265 + 1
  for p, value in expected.items():
    node = got
    for k in p:
      node = node[k]
    np.testing.assert_array_equal(np.asarray(node), value, err_msg=str(p))
  assert 'aspp' in train_state.params and 'aspp' not in expected


def test_from_torchvision_is_public_in_models():
  from seg_jax import models  # pylint: disable=g-import-not-at-top
  assert models.from_torchvision is convert.from_torchvision
  assert 'from_torchvision' in models.__all__
