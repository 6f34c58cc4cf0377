"""Reading weight files without executing code: safetensors and torch
state-dict files (`torch.save` zip archives), into numpy arrays.

A torch file is a pickle; `torch.load` without `weights_only` runs whatever
the pickle names. Here the pickle may only name tensors, storages and
ordered dicts; anything else is refused with the name it asked for.
"""

import collections
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_TORCH_STORAGES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


def load_safetensors(path):
  """{name: numpy array} from a .safetensors file; ValueError naming the
  file for one that is empty, cut short or not safetensors."""
  with open(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(_not_safetensors(
        path, f'it has {len(raw)} bytes, fewer than the 8 of the header '
        'length that starts the format'))
  (n,) = struct.unpack('<Q', raw[:8])
  if n > len(raw) - 8:
    raise ValueError(_not_safetensors(
        path, f'its first 8 bytes give a header of {n} bytes, but only '
        f'{len(raw) - 8} follow'))
  try:
    header = json.loads(raw[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(_not_safetensors(
        path, f'its header is not valid JSON ({e})')) from None
  if not isinstance(header, dict):
    raise ValueError(_not_safetensors(
        path, f'its header is a JSON {type(header).__name__}, not an object '
        'of tensors'))
  data = memoryview(raw)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    out[name] = _safetensors_tensor(path, name, info, data)
  return out


def _not_safetensors(path, why):
  return (f'{path}: not a valid safetensors file: {why}; the file is '
          'damaged or of another format: save or download it again.')


def _safetensors_tensor(path, name, info, data):
  """The numpy array of header entry `name` over the file's data bytes."""
  try:
    dtype, shape, (start, end) = (info['dtype'], info['shape'],
                                  info['data_offsets'])
    shape, start, end = tuple(int(d) for d in shape), int(start), int(end)
  except (KeyError, TypeError, ValueError):
    raise ValueError(_not_safetensors(
        path, f'tensor {name!r} has no dtype, shape and two data_offsets '
        f'({info!r})')) from None
  if dtype not in _SAFETENSORS_DTYPES:
    raise ValueError(f'{path}: tensor {name!r} has unsupported dtype '
                     f'{dtype}.')
  size = int(np.prod(shape)) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
  if not 0 <= start <= end <= len(data) or end - start != size:
    raise ValueError(_not_safetensors(
        path, f'tensor {name!r} ({dtype}, shape {list(shape)}: {size} bytes) '
        f'has data_offsets [{start}, {end}] in {len(data)} bytes of data'))
  return np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[dtype]).reshape(
      shape).copy()


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  if not size:
    return storage[offset].copy()
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[offset:], tuple(size), tuple(s * item for s in stride)).copy()


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict; refuses every other global."""

  def __init__(self, file, archive, prefix, path):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path

  def find_class(self, module, name):
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch' and name in _TORCH_STORAGES:
      return _TORCH_STORAGES[name]
    raise pickle.UnpicklingError(
        f'{self._path}: refusing to load {module}.{name}; only tensors and '
        'dicts are read. Save a plain state_dict or use safetensors.')

  def persistent_load(self, pid):
    _, dtype, key, _, numel = pid
    raw = self._archive.read(f'{self._prefix}/data/{key}')
    return np.frombuffer(raw, dtype)[:numel]


def load_torch_state_dict(path):
  """{name: numpy array} from a `torch.save(model.state_dict(), path)` file."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path}: not a torch zip archive (torch >= 1.6 format); '
                     're-save it or convert it to safetensors.')
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist() if n.endswith('/data.pkl')]
    if len(pkl) != 1:
      raise ValueError(f'{path}: expected one data.pkl in the archive.')
    prefix = pkl[0][:-len('/data.pkl')]
    with archive.open(pkl[0]) as f:
      obj = _StateDictUnpickler(f, archive, prefix, path).load()
  if isinstance(obj, dict) and 'state_dict' in obj:
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: holds a {type(obj).__name__}, not a state dict.')
  return {k: np.asarray(v) for k, v in obj.items()}


def load_weights(path):
  """{name: numpy array} from a .safetensors or torch state-dict file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'model.init_from={path!r}: no such file.')
  if path.endswith('.safetensors'):
    return load_safetensors(path)
  return load_torch_state_dict(path)


def adapt_input_channels(kernel, channels):
  """A stem kernel (kh, kw, 3, out) trained on RGB, for `channels` inputs.

  timm's rule (`adapt_input_conv`): for 1 channel the RGB taps are summed
  (a grey image's response equals the RGB model's on that grey repeated);
  for more than 3 they are repeated (R, G, B, R, ...) and scaled by
  3 / channels, so an input whose channels all equal x responds as the RGB
  model does to (x, x, x). 3 channels: unchanged.
  """
  kernel = np.asarray(kernel)
  if channels == kernel.shape[2]:
    return kernel
  if kernel.shape[2] != 3:
    raise ValueError(f'the stem takes {kernel.shape[2]} channels; only an '
                     'RGB stem (3) is adapted to another channel count')
  if channels == 1:
    return kernel.sum(2, keepdims=True)
  repeats = -(-channels // 3)
  return (np.tile(kernel, (1, 1, repeats, 1))[:, :, :channels] *
          (3.0 / channels)).astype(kernel.dtype)


def adapt_stem(pretrained, variables, channels, source):
  """`pretrained` (nested dicts) with every 4-D kernel that takes 3 input
  channels where the model's takes `channels` adapted
  (`adapt_input_channels`); a stem that fits neither is a ValueError naming
  the weights, the model and data.channels."""
  if channels == 3:
    return pretrained

  def walk(p, v, path):
    if isinstance(p, dict):
      return {k: walk(p[k], v.get(k, {}) if isinstance(v, dict) else {},
                      path + (k,)) for k in p}
    shape = getattr(v, 'shape', None)
    if (shape is not None and np.ndim(p) == 4 and len(shape) == 4 and
        tuple(np.shape(p)) != tuple(shape) and shape[2] == channels and
        np.shape(p)[:2] + np.shape(p)[3:] == tuple(shape[:2] + shape[3:])):
      try:
        return adapt_input_channels(p, channels)
      except ValueError as e:
        raise ValueError(
            f'{source}: {"/".join(path)}: {e}, and data.channels={channels} '
            f'(the model\'s input); the weights\' stem has {np.shape(p)[2]}.'
        ) from None
    return p

  return walk(pretrained, variables, ())
