"""Weight files are read without executing code."""

import io
import json
import pickle
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
