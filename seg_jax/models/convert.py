"""torchvision weights -> seg_jax variables, so the same weights give the
same logits.

Supported: the segmentation models `fcn_resnet50/101`,
`deeplabv3_resnet50/101`, `deeplabv3_mobilenet_v3_large` (with or without
their aux heads), `lraspp_mobilenet_v3_large`, and the ImageNet backbones
`resnet50/101`, `mobilenet_v3_large` and `vgg16`, whose variables land
under our models' 'backbone' (and, for VGG16, FCN's fc6/fc7).
"""

import numpy as np

from seg_jax.models import mobilenet_v3
from seg_jax.models.resnet import STAGE_SIZES
from seg_jax.models.vgg import VGG16_BLOCKS

_IGNORED_SUFFIXES = ('num_batches_tracked',)


def _conv(w):
  return np.transpose(w, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)


def _bn(ours, key):
  yield ('params', *ours, 'scale'), f'{key}.weight', None
  yield ('params', *ours, 'bias'), f'{key}.bias', None
  yield ('batch_stats', *ours, 'mean'), f'{key}.running_mean', None
  yield ('batch_stats', *ours, 'var'), f'{key}.running_var', None


def _conv_bn(ours, conv_key, bn_key):
  yield ('params', *ours, 'conv', 'kernel'), f'{conv_key}.weight', _conv
  yield from _bn((*ours, 'bn'), bn_key)


def _conv_bias(ours, key):
  yield ('params', *ours, 'kernel'), f'{key}.weight', _conv
  yield ('params', *ours, 'bias'), f'{key}.bias', None


def _stacked(mapping):
  """Turns per-block triples into one triple per leaf whose torch key is the
  list of the blocks' keys (stacked on a leading axis, as nn.scan holds)."""
  first, *_ = mapping
  return [(path, [m[i][1] for m in mapping], fn)
          for i, (path, _, fn) in enumerate(first)]


def _resnet(depth, prefix, scan_blocks):
  ours = ('backbone',)
  yield from _conv_bn((*ours, 'conv1'), f'{prefix}conv1', f'{prefix}bn1')

  def block(o, t, downsample):
    for j in (1, 2, 3):
      yield from _conv_bn((*o, f'conv{j}'), f'{t}conv{j}', f'{t}bn{j}')
    if downsample:
      yield from _conv_bn((*o, 'downsample'), f'{t}downsample.0',
                          f'{t}downsample.1')

  for i, blocks in enumerate(STAGE_SIZES[depth]):
    t = f'{prefix}layer{i + 1}.'
    yield from block((*ours, f'layer{i + 1}_0'), f'{t}0.', True)
    if not scan_blocks:
      for b in range(1, blocks):
        yield from block((*ours, f'layer{i + 1}_{b}'), f'{t}{b}.', False)
      continue
    rest = (*ours, f'layer{i + 1}_rest', 'block')
    yield from _stacked([list(block(rest, f'{t}{b}.', False))
                         for b in range(1, blocks)])


def _fcn_head(ours, key):
  yield from _conv_bn((ours, 'conv'), f'{key}.0', f'{key}.1')
  yield from _conv_bias((ours, 'classifier'), f'{key}.4')


def _deeplab_head():
  a = 'classifier.0.'
  yield from _conv_bn(('aspp', 'conv0'), f'{a}convs.0.0', f'{a}convs.0.1')
  for i in (1, 2, 3):
    yield from _conv_bn(('aspp', f'conv{i}'), f'{a}convs.{i}.0',
                        f'{a}convs.{i}.1')
  yield from _conv_bn(('aspp', 'pool'), f'{a}convs.4.1', f'{a}convs.4.2')
  yield from _conv_bn(('aspp', 'project'), f'{a}project.0', f'{a}project.1')
  yield from _conv_bn(('head',), 'classifier.1', 'classifier.2')
  yield from _conv_bias(('classifier',), 'classifier.4')


def _mobilenet_v3(prefix):
  """torchvision's MobileNetV3-Large `features` (`prefix` + index), width
  1: one `Conv2dNormActivation` (conv .0, BatchNorm .1) per layer, and
  per block the sequence `.block.{j}` of those present."""
  ours = ('backbone',)
  yield from _conv_bn((*ours, 'stem'), f'{prefix}0.0', f'{prefix}0.1')
  configs = mobilenet_v3.block_configs()
  for i, c in enumerate(configs, 1):
    layers = (['expand'] if c.expanded != c.input else []) + ['depthwise'] + (
        ['se'] if c.squeeze_excite else []) + ['project']
    for j, layer in enumerate(layers):
      o, t = (*ours, f'block{i}', layer), f'{prefix}{i}.block.{j}'
      if layer == 'se':
        yield from _conv_bias((*o, 'fc1'), f'{t}.fc1')
        yield from _conv_bias((*o, 'fc2'), f'{t}.fc2')
      else:
        yield from _conv_bn(o, f'{t}.0', f'{t}.1')
  last = len(configs) + 1
  yield from _conv_bn((*ours, 'last_conv'), f'{prefix}{last}.0',
                      f'{prefix}{last}.1')


def _lraspp_head():
  c = ('classifier',)
  yield from _conv_bn((*c, 'cbr'), 'classifier.cbr.0', 'classifier.cbr.1')
  yield ('params', *c, 'scale', 'kernel'), 'classifier.scale.1.weight', _conv
  for side in ('low', 'high'):
    yield from _conv_bias((*c, f'{side}_classifier'),
                          f'classifier.{side}_classifier')


def _fc_as_conv(k, in_channels):
  def convert(w):  # Linear (O, I*k*k) -> conv (k, k, I, O)
    return _conv(w.reshape(w.shape[0], in_channels, k, k))
  return convert


def _vgg16():
  index = 0
  for b, block in enumerate(VGG16_BLOCKS):
    for c in range(len(block)):
      yield ('params', 'backbone', f'conv{b + 1}_{c + 1}', 'kernel'), \
          f'features.{index}.weight', _conv
      yield ('params', 'backbone', f'conv{b + 1}_{c + 1}', 'bias'), \
          f'features.{index}.bias', None
      index += 2
    index += 1  # the pooling layer
  yield ('params', 'fc6', 'kernel'), 'classifier.0.weight', _fc_as_conv(7, 512)
  yield ('params', 'fc6', 'bias'), 'classifier.0.bias', None
  yield ('params', 'fc7', 'kernel'), 'classifier.3.weight', _fc_as_conv(1, 4096)
  yield ('params', 'fc7', 'bias'), 'classifier.3.bias', None


def _mapping(name, has_aux, scan_blocks):
  """(our path, torch key, converter) triples for a torchvision model."""
  depth = 101 if name.endswith('101') else 50
  if name in ('resnet50', 'resnet101'):
    return list(_resnet(depth, '', scan_blocks)), ('fc.',)
  if name == 'vgg16':
    return list(_vgg16()), ('classifier.6.',)
  if name == 'mobilenet_v3_large':  # its ImageNet classifier is not ours
    return list(_mobilenet_v3('features.')), ('classifier.',)
  backbone = (_mobilenet_v3('backbone.') if 'mobilenet' in name else
              _resnet(depth, 'backbone.', scan_blocks))
  if name in ('fcn_resnet50', 'fcn_resnet101'):
    head = list(_fcn_head('head', 'classifier'))
  elif name in ('deeplabv3_resnet50', 'deeplabv3_resnet101',
                'deeplabv3_mobilenet_v3_large'):
    head = list(_deeplab_head())
  elif name == 'lraspp_mobilenet_v3_large':
    head = list(_lraspp_head())
  else:
    raise ValueError(f'from_torchvision: unsupported name {name!r}; use one '
                     f'of {SUPPORTED}.')
  aux = list(_fcn_head('aux', 'aux_classifier')) if has_aux else []
  return list(backbone) + head + aux, ()


SUPPORTED = ('fcn_resnet50', 'fcn_resnet101', 'deeplabv3_resnet50',
             'deeplabv3_resnet101', 'deeplabv3_mobilenet_v3_large',
             'lraspp_mobilenet_v3_large', 'resnet50', 'resnet101',
             'mobilenet_v3_large', 'vgg16')


def from_torchvision(name, state_dict, scan_blocks=False):
  """Maps a torchvision state dict onto seg_jax variables.

  Args:
    name: one of `SUPPORTED` (the torchvision constructor's name).
    state_dict: {key: tensor or numpy array}, as `model.state_dict()`
      (MobileNetV3 models: width multiplier 1, as torchvision builds them).
    scan_blocks: the layout of the target model's ResNet stages: one module
      per block (`layer3_1`, ...; the default) or, for a model built with
      `scan_blocks=True`, each stage's blocks after the first stacked in
      `layer{i}_rest`.

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of numpy float32 arrays;
    for backbones, only the backbone's (and VGG16's fc6/fc7) variables.

  Raises:
    ValueError: naming missing or unexpected keys.
  """
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v)
        for k, v in state_dict.items()}
  has_aux = any(k.startswith('aux_classifier.') for k in sd)
  mapping, ignored_prefixes = _mapping(name, has_aux, scan_blocks)
  keys = lambda t: t if isinstance(t, list) else [t]
  missing = [k for _, t, _ in mapping for k in keys(t) if k not in sd]
  if missing:
    raise ValueError(f'{name}: state dict lacks {len(missing)} keys, e.g. '
                     f'{missing[:3]}; is it really a torchvision {name}?')
  used = {k for _, t, _ in mapping for k in keys(t)}
  unexpected = [k for k in sd if k not in used and
                not k.endswith(_IGNORED_SUFFIXES) and
                not k.startswith(ignored_prefixes)]
  if unexpected:
    raise ValueError(f'{name}: state dict has {len(unexpected)} keys this '
                     f'mapping does not use, e.g. {unexpected[:3]}.')
  variables = {}
  for path, key, fn in mapping:
    fn = fn or (lambda x: x)
    value = np.stack([fn(sd[k].astype(np.float32)) for k in key]) if (
        isinstance(key, list)) else fn(sd[key].astype(np.float32))
    node = variables
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return variables


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, 'items'):
      yield from _flatten(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def load_pretrained(variables, pretrained, source='pretrained weights'):
  """Copies `pretrained` leaves into `variables` (same nested structure).

  Every pretrained leaf must exist in the model with the same shape, except
  a 'classifier' layer whose class count differs (fine-tuning to another
  dataset), which keeps its fresh initialisation.

  Returns:
    (new variables as nested dicts, number of leaves loaded, skipped paths).
  """
  import flax  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  loaded, skipped = 0, []
  for path, value in _flatten(pretrained):
    if path not in flat:
      raise ValueError(f'{source}: {"/".join(path)} has no counterpart in the '
                       'model; check model.name and model.init_format.')
    if tuple(flat[path].shape) != tuple(value.shape):
      if 'classifier' in path:
        skipped.append('/'.join(path))
        continue
      raise ValueError(f'{source}: {"/".join(path)} has shape {value.shape}, '
                       f'the model expects {flat[path].shape}.')
    flat[path] = np.asarray(value, flat[path].dtype)
    loaded += 1
  return flax.traverse_util.unflatten_dict(flat), loaded, skipped
