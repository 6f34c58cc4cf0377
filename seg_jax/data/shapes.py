"""The built-in synthetic dataset: geometric shapes whose class is their form.

Every record is generated on demand from ``(seed, split, index)``, so the
dataset needs no download, is identical on every host and is random-access
(a grain source). Colours are drawn per instance (flat, softly shaded) and
backgrounds are textured, both noisy, so a per-pixel colour classifier cannot solve it: the
class is decided by shape alone. Object borders carry the ignore label.
"""

import numpy as np

from seg_jax.labels import IGNORE_LABEL

CLASS_NAMES = ('background', 'circle', 'ring', 'triangle', 'cross')
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25]],
    np.uint8)
_SPLIT_IDS = {'train': 0, 'val': 1}


def _inside(kind, y, x, cy, cx, r, angle):
  """Boolean mask of pixel centres inside one shape.  y, x: (H, W) grids."""
  dy, dx = y - cy, x - cx
  c, s = np.cos(angle), np.sin(angle)
  u, v = c * dx + s * dy, -s * dx + c * dy  # coordinates in the shape frame
  if kind == 1:  # circle
    return dx * dx + dy * dy <= r * r
  if kind == 2:  # ring: the background shows through its hole
    d2 = dx * dx + dy * dy
    return (d2 <= r * r) & (d2 >= (0.55 * r)**2)
  if kind == 3:  # equilateral triangle of apothem 0.6 r
    # Three half-planes at 120 degree steps.
    inside = np.ones_like(u, bool)
    for k in range(3):
      a = 2 * np.pi * k / 3
      inside &= (np.cos(a) * u + np.sin(a) * v) <= r * 0.6
    return inside
  if kind == 4:  # cross: two bars of width r * 0.6
    w = r * 0.3
    return (((np.abs(u) <= r) & (np.abs(v) <= w)) |
            ((np.abs(v) <= r) & (np.abs(u) <= w)))
  raise ValueError(f'unknown shape kind {kind}')


def _texture(rng, y, x, size):
  """A random low-frequency colour texture in [0, 1].  Returns (H, W, 3)."""
  base = rng.uniform(0.0, 1.0, 3)
  tint = rng.uniform(-0.25, 0.25, 3)
  fy, fx = rng.uniform(0.5, 4.0, 2) * 2 * np.pi / size
  phase = rng.uniform(0, 2 * np.pi)
  wave = np.sin(fy * y + fx * x + phase)[..., None]  # (H, W, 1)
  return np.clip(base + tint * wave, 0.0, 1.0)


def _shading(rng, y, x, size):
  """A random flat colour under a soft linear light gradient.  (H, W, 3)."""
  colour = rng.uniform(0.0, 1.0, 3)
  gy, gx = rng.uniform(-0.15, 0.15, 2) / size
  light = (gy * (y - size / 2) + gx * (x - size / 2))[..., None]
  return np.clip(colour + light, 0.0, 1.0)


def _border(label):
  """Pixels whose 4-neighbourhood holds another label.  label: (H, W)."""
  edge = np.zeros(label.shape, bool)
  diff_y = label[1:, :] != label[:-1, :]
  diff_x = label[:, 1:] != label[:, :-1]
  edge[1:, :] |= diff_y
  edge[:-1, :] |= diff_y
  edge[:, 1:] |= diff_x
  edge[:, :-1] |= diff_x
  return edge


def make_example(seed, split, index, size=64, max_shapes=4, noise=0.06,
                 ignore_label=IGNORE_LABEL):
  """Generates one example deterministically.

  Args:
    seed: dataset seed.
    split: 'train' or 'val'.
    index: record index within the split.
    size: image side in pixels.
    max_shapes: at most this many instances (at least one).
    noise: standard deviation of the additive Gaussian pixel noise.
    ignore_label: the label of object borders.

  Returns:
    dict with 'image' (size, size, 3) uint8 and 'label' (size, size) uint8
    holding class ids, `ignore_label` on object borders.
  """
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  image = _texture(rng, y, x, size)
  label = np.zeros((size, size), np.uint8)
  for _ in range(rng.integers(1, max_shapes + 1)):
    kind = int(rng.integers(1, len(CLASS_NAMES)))
    r = rng.uniform(0.14, 0.26) * size
    cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
    mask = _inside(kind, y, x, cy, cx, r, rng.uniform(-0.3, 0.3))
    image[mask] = _shading(rng, y, x, size)[mask]
    label[mask] = kind
  image = image + rng.normal(0.0, noise, image.shape)
  label[_border(label)] = ignore_label
  image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
  return {'image': image, 'label': label}


class ShapesSource:
  """Random-access grain source of the synthetic shapes dataset."""

  class_names = CLASS_NAMES
  palette = PALETTE

  def __init__(self, split, num_examples, seed=0, size=64, max_shapes=4,
               ignore_label=IGNORE_LABEL):
    if split not in _SPLIT_IDS:
      raise ValueError(f"shapes: unknown split {split!r}; use 'train' or 'val'")
    if num_examples <= 0:
      raise ValueError(f'shapes: split {split!r} needs num_examples > 0, '
                       f'got {num_examples}')
    self._split, self._n, self._seed = split, int(num_examples), int(seed)
    self.name = f'shapes/{split}'
    self._size, self._max_shapes = int(size), int(max_shapes)
    self._ignore = int(ignore_label)

  def __len__(self):
    return self._n

  def __getitem__(self, index):
    if not 0 <= index < self._n:
      raise IndexError(f'shapes/{self._split}: index {index} out of range '
                       f'[0, {self._n})')
    return make_example(self._seed, self._split, int(index), self._size,
                        self._max_shapes, ignore_label=self._ignore)

  def __repr__(self):
    return (f'ShapesSource(split={self._split!r}, n={self._n}, '
            f'seed={self._seed}, size={self._size})')
