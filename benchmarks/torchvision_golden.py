"""Golden logits of torchvision segmentation models on seeded weights
(`MODELS`: fcn_resnet50, deeplabv3_resnet50, deeplabv3_mobilenet_v3_large,
lraspp_mobilenet_v3_large).

    python benchmarks/torchvision_golden.py [--out=tests/golden]

Needs torch and torchvision (not seg_jax): run by hand, in an environment
with them, whenever the golden files must be rebuilt (a new model, a new
seed rule). `tests/test_golden_torchvision.py` then checks, without torch,
that `seg_jax.models.from_torchvision` + seg_jax's model reproduce these
logits.

Every tensor of the torchvision state dict is drawn by `seeded_state_dict`
from its key, shape and dtype alone, so the test regenerates the same
weights from the manifest stored in the golden file. The rule (version
`RULE_VERSION`; change the version when changing the rule):

- each key gets its own generator, `numpy.random.RandomState([SEED,
  crc32(key)])`: the values do not depend on the keys' order or number,
  and RandomState's streams are frozen across numpy versions (NEP 19),
  which `default_rng`'s are not promised to be;
- a BatchNorm (a prefix `p` with `p.running_var` in the state dict):
  `weight` ~ U(0.5, 1.5), `bias` ~ N(0, 0.1^2), `running_mean` ~
  N(0, 0.1^2), `running_var` ~ U(0.5, 1.5) (positive), as after training,
  so that every statistic changes the eval-mode output;
- any other `weight` (convolutions): N(0, 1 / fan_in) (LeCun), so
  activations stay O(1) through the 50 layers (the stem's and every
  stage's output std 0.8-2.0, measured). He's 2 / fan_in counts on each
  BatchNorm to re-normalise; eval-mode BatchNorms with these fixed
  statistics do not, and the residual sums then grow to std ~1300 by
  layer4 (measured). A depthwise kernel (C, 1, k, k) has fan_in k * k;
- any other `bias`: N(0, 0.1^2);
- integer tensors (`num_batches_tracked`): zeros, as torch leaves them
  (seg_jax ignores them).

Values are drawn in float64 and rounded to float32 (IEEE: the same on every
platform). The manifest also stores each tensor's float64 sum, so the test
can tell weights that no longer regenerate (the rule edited without new
golden files) from a broken mapping.

Each `<out>/<name>.npz` holds:
  input: (1, 37, 45, 3) float32 NHWC, N(0, 1) from `INPUT_SEED` (odd sizes:
    every stride and the bilinear upsampling meet a ragged edge);
  out: torchvision's eval-mode logits, (1, 37, 45, 21) float32 NHWC;
  aux: the aux head's logits, same shape (models built with aux_loss only);
  manifest: JSON [[key, shape, dtype, sum], ...] in state-dict order;
  meta: JSON {name, num_classes, aux_loss, rule_version, seed, input_seed,
    torch, torchvision}.
"""

import json
import os
import sys
import zlib

import numpy as np

RULE_VERSION = 1
SEED = 20240229
INPUT_SEED = 7
INPUT_SHAPE = (1, 37, 45, 3)
NUM_CLASSES = 21
# (torchvision constructor, aux_loss). The deeplabv3 models carry the aux
# head so the 'aux_classifier.*' mapping, and which features it reads
# (ResNet's layer3, MobileNetV3's stride-8 block 4), are checked too; fcn
# without it keeps the file small (its head is the same FCNHead); lraspp
# has none.
MODELS = (('fcn_resnet50', False), ('deeplabv3_resnet50', True),
          ('deeplabv3_mobilenet_v3_large', True),
          ('lraspp_mobilenet_v3_large', False))


def seeded_tensor(key, shape, dtype, bn_prefixes, seed=SEED):
  """The value of one state-dict entry under rule `RULE_VERSION`.

  Args:
    key: the state-dict key, e.g. 'backbone.layer1.0.bn1.running_var'.
    shape: its shape (tuple of ints).
    dtype: its numpy dtype name, e.g. 'float32' or 'int64'.
    bn_prefixes: the set of BatchNorm module prefixes (see `bn_prefixes`).
    seed: the global seed.

  Returns:
    A numpy array of `shape` and `dtype`.
  """
  shape = tuple(int(s) for s in shape)
  if not np.issubdtype(np.dtype(dtype), np.floating):
    return np.zeros(shape, dtype)
  rng = np.random.RandomState([seed, zlib.crc32(key.encode())])
  prefix, leaf = key.rsplit('.', 1)
  if prefix in bn_prefixes and leaf in ('weight', 'running_var'):
    value = rng.uniform(0.5, 1.5, shape)
  elif leaf == 'weight':
    fan_in = int(np.prod(shape[1:]))
    value = rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)
  elif leaf in ('bias', 'running_mean'):
    value = rng.standard_normal(shape) * 0.1
  else:
    raise ValueError(f'seeded_tensor: no rule for {key!r}.')
  return value.astype(dtype)


def bn_prefixes(keys):
  """Module prefixes that are BatchNorms: those with a running variance."""
  suffix = '.running_var'
  return {k[:-len(suffix)] for k in keys if k.endswith(suffix)}


def seeded_state_dict(manifest, seed=SEED):
  """{key: numpy array} for a manifest [(key, shape, dtype, ...), ...]."""
  prefixes = bn_prefixes(k for k, *_ in manifest)
  return {k: seeded_tensor(k, shape, dtype, prefixes, seed)
          for k, shape, dtype, *_ in manifest}


def seeded_input(shape=INPUT_SHAPE, seed=INPUT_SEED):
  """The NHWC float32 input image batch."""
  return np.random.default_rng(seed).standard_normal(shape).astype(
      np.float32)


def load_golden(path):
  """(input, {'out': ..., ['aux': ...]}, manifest, meta) of a golden file.

  The manifest comes back as [(key, shape tuple, dtype name, float64 sum),
  ...].
  """
  with np.load(path, allow_pickle=False) as f:
    manifest = [(k, tuple(s), d, total)
                for k, s, d, total in json.loads(str(f['manifest']))]
    meta = json.loads(str(f['meta']))
    outputs = {k: f[k] for k in ('out', 'aux') if k in f.files}
    return f['input'], outputs, manifest, meta


def _generate(name, aux, out_dir):
  """Writes `<out_dir>/<name>.npz`; returns its path."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision.models import segmentation  # pylint: disable=g-import-not-at-top
  tmodel = getattr(segmentation, name)(
      weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
      **({'aux_loss': True} if aux else {})).eval()  # lraspp takes none
  sd = tmodel.state_dict()
  shapes = [(k, list(v.shape), str(v.numpy().dtype)) for k, v in sd.items()]
  values = seeded_state_dict(shapes)
  manifest = [(k, shape, dtype, float(values[k].sum(dtype=np.float64)))
              for k, shape, dtype in shapes]
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in values.items()})
  # The load is exact: what torch now holds is what the test regenerates.
  for k, v in tmodel.state_dict().items():
    assert np.array_equal(v.numpy(), values[k]), k
  x = seeded_input()
  torch.use_deterministic_algorithms(True)
  with torch.no_grad():
    result = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2))
  arrays = {k: v.permute(0, 2, 3, 1).numpy().astype(np.float32)
            for k, v in result.items()}
  stats = {k: (float(np.abs(v).max()), float(v.std())) for k, v in
           arrays.items()}
  meta = {'name': name, 'num_classes': NUM_CLASSES, 'aux_loss': aux,
          'rule_version': RULE_VERSION, 'seed': SEED,
          'input_seed': INPUT_SEED, 'torch': torch.__version__,
          'torchvision': torchvision.__version__}
  path = os.path.join(out_dir, f'{name}.npz')
  np.savez_compressed(path, input=x, manifest=np.array(json.dumps(manifest)),
                      meta=np.array(json.dumps(meta)), **arrays)
  print(f'{path}: {os.path.getsize(path) / 1024:.0f} KB, {len(manifest)} '
        f'tensors, logits max|.|/std {stats}')
  return path


def main(argv):
  out_dir = 'tests/golden'
  for arg in argv[1:]:
    if arg.startswith('--out='):
      out_dir = arg[len('--out='):]
    else:
      raise SystemExit(f'usage: {argv[0]} [--out=DIR]')
  os.makedirs(out_dir, exist_ok=True)
  for name, aux in MODELS:
    _generate(name, aux, out_dir)


if __name__ == '__main__':
  main(sys.argv)
