"""Fully connected CRF refinement (Kraehenbuehl & Koltun 2011; DeepLab v1/v2).

Mean-field inference over every pair of pixels with two Gaussian kernels, a
spatial one (smoothness) and a bilateral one over position and colour
(appearance: the image's channels, RGB or however many `data.channels`
gives), and the Potts compatibility. No N^2 pairwise matrix is formed:

- the spatial kernel is an exact separable Gaussian blur on the pixel grid;
- the bilateral kernel is filtered on a permutohedral lattice (Adams, Baek
  and Davis 2010): values are splatted onto the vertices of the simplices
  that enclose each pixel's (x, y, r, g, b) point (x, y, v for a grey
  image, one coordinate per channel in general), blurred along the
  lattice's d + 1 axes, and sliced back, in O(N d) per filtering.

The lattice depends only on the image, so it is built once per image on the
host (numpy: integer keys, a sort, binary searches); the mean-field
iterations, where the time goes, are one jit-compiled JAX function over the
lattice's index arrays. Both kernels are symmetrically normalised, as in
pydensecrf's defaults, so a kernel weight bounds its message.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class CRFParams:
  """Mean-field settings (`config.crf`); pixel and 0..255 colour units.

  Attributes:
    iterations: mean-field iterations.
    gaussian_sxy: spatial kernel's standard deviation in pixels.
    gaussian_weight: its weight.
    bilateral_sxy: bilateral kernel's spatial standard deviation.
    bilateral_srgb: its colour standard deviation (in every channel).
    bilateral_weight: its weight.
  """
  iterations: int = 5
  gaussian_sxy: float = 3.0
  gaussian_weight: float = 3.0
  bilateral_sxy: float = 80.0
  bilateral_srgb: float = 13.0
  bilateral_weight: float = 10.0

  @classmethod
  def from_config(cls, config):
    c = config.crf
    params = cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})
    if params.iterations < 1 or min(params.gaussian_sxy, params.bilateral_sxy,
                                     params.bilateral_srgb) <= 0:
      raise ValueError(f'crf settings {params}: iterations must be >= 1 and '
                       'standard deviations > 0.')
    return params


# --- Permutohedral lattice (host) ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lattice:
  """Where each point's value goes on the lattice and how vertices connect.

  Attributes:
    offsets: (N, d + 1) int32 vertex of each of a point's simplex corners.
    weights: (N, d + 1) float32 barycentric weights (each row sums to 1).
    neighbours: (d + 1, 2, M + 1) int32 the two neighbours of each vertex
      along each lattice axis; M (a zero dummy vertex) where there is none.
    num_vertices: M.
  """
  offsets: np.ndarray
  weights: np.ndarray
  neighbours: np.ndarray
  num_vertices: int


def _canonical(d):
  """(d + 1, d + 1) remainder-k simplex offsets of the canonical simplex."""
  c = np.zeros((d + 1, d + 1), np.int64)
  for k in range(d + 1):
    c[k, :d + 1 - k] = k
    c[k, d + 1 - k:] = k - (d + 1)
  return c


def _embed(features):
  """Elevated points, their remainder-0 vertex and rank (Adams et al.)."""
  n, d = features.shape
  scale = np.sqrt(2.0 / 3.0) * (d + 1) / np.sqrt(
      (np.arange(d) + 1.0) * (np.arange(d) + 2.0))
  cf = features * scale  # (N, d)
  suffix = np.cumsum(cf[:, ::-1], axis=1)[:, ::-1]  # suffix[:, j] = sum cf[j:]
  elevated = np.zeros((n, d + 1))
  elevated[:, 0] = suffix[:, 0]
  j = np.arange(1, d + 1)
  after = np.concatenate([suffix[:, 1:], np.zeros((n, 1))], axis=1)
  elevated[:, 1:] = after - j * cf
  rounded = np.round(elevated / (d + 1))
  rem0 = (rounded * (d + 1)).astype(np.int64)
  diff = elevated - rem0
  # rank[i]: how many coordinates exceed coordinate i (ties by position).
  i_idx, j_idx = np.arange(d + 1)[:, None], np.arange(d + 1)[None, :]
  ahead = np.where(j_idx < i_idx, diff[:, None, :] >= diff[:, :, None],
                   diff[:, None, :] > diff[:, :, None])
  rank = ahead.sum(-1) + rounded.sum(1, keepdims=True).astype(np.int64)
  low, high = rank < 0, rank > d
  rank = np.where(low, rank + d + 1, np.where(high, rank - d - 1, rank))
  rem0 = np.where(low, rem0 + d + 1, np.where(high, rem0 - d - 1, rem0))
  return elevated, rem0, rank


def build_lattice(features):
  """The permutohedral lattice of (N, d) points (features already divided
  by their standard deviations)."""
  features = np.asarray(features, np.float64)
  n, d = features.shape
  elevated, rem0, rank = _embed(features)
  bary = np.zeros((n, d + 2))
  v = (elevated - rem0) / (d + 1)
  rows = np.repeat(np.arange(n), d + 1)
  np.add.at(bary, (rows, (d - rank).ravel()), v.ravel())
  np.add.at(bary, (rows, (d - rank + 1).ravel()), -v.ravel())
  bary[:, 0] += 1.0 + bary[:, d + 1]
  keys = rem0[:, None, :d] + _canonical(d)[:, rank[:, :d]].transpose(1, 0, 2)
  codes, encode = _key_codes(keys.reshape(-1, d), d)
  unique, first, inverse = np.unique(codes, return_index=True,
                                     return_inverse=True)
  m = len(unique)
  vertex_keys = keys.reshape(-1, d)[first]  # (M, d)
  neighbours = np.full((d + 1, 2, m + 1), m, np.int32)
  for axis in range(d + 1):
    for side, sign in enumerate((1, -1)):
      step = np.full(d, sign, np.int64)
      if axis < d:
        step[axis] = -sign * d
      found = np.searchsorted(unique, encode(vertex_keys + step))
      found = np.minimum(found, m - 1)
      hit = unique[found] == encode(vertex_keys + step)
      neighbours[axis, side, :m] = np.where(hit, found, m)
  return Lattice(inverse.reshape(n, d + 1).astype(np.int32),
                 bary[:, :d + 1].astype(np.float32), neighbours, m)


def _key_codes(keys, d):
  """Exact int64 codes of lattice keys (mixed radix), and the encoder,
  which also covers every neighbour of every key."""
  low = keys.min() - d - 1
  radix = int(keys.max() - low) + d + 2
  if radix ** d >= 2 ** 62:
    raise ValueError('CRF lattice keys do not fit in 64 bits: the bilateral '
                     'standard deviations are too small for this image.')
  powers = radix ** np.arange(d, dtype=np.int64)

  def encode(k):
    return ((k - low) * powers).sum(-1)

  return encode(keys), encode


# --- Filtering and mean field (JAX) ----------------------------------------


def _lattice_filter(values, offsets, weights, neighbours, num_vertices):
  """Splat (N, C) values onto the lattice, blur along each axis, slice."""
  n, c = values.shape
  splat = jax.ops.segment_sum(
      (values[:, None, :] * weights[..., None]).reshape(-1, c),
      offsets.reshape(-1), num_segments=num_vertices + 1)
  for axis in range(neighbours.shape[0]):
    splat = 0.5 * splat + 0.25 * (splat[neighbours[axis, 0]] +
                                  splat[neighbours[axis, 1]])
  return jnp.einsum('nk,nkc->nc', weights, splat[offsets])


def _gaussian_blur(x, sigma):
  """Separable Gaussian blur of (H, W, C) over the pixel grid (zero pad)."""
  radius = max(1, int(np.ceil(3 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = jnp.asarray(taps / taps.sum(), jnp.float32)
  h, w, c = x.shape

  def conv(y, axis):  # y: (H, W, C); 1D convolution along `axis`
    moved = jnp.moveaxis(y, axis, -1).reshape(-1, 1, y.shape[axis])
    out = jax.lax.conv_general_dilated(moved, taps[None, None, :], (1,),
                                       [(radius, radius)])
    shape = list(jnp.moveaxis(y, axis, -1).shape)
    return jnp.moveaxis(out.reshape(shape), -1, axis)

  return conv(conv(x, 0), 1).reshape(h, w, c)


@functools.partial(jax.jit, static_argnames=('params', 'num_vertices'))
def _mean_field(logits, offsets, weights, neighbours, *, params,
                num_vertices):
  """Mean-field iterations; returns the (H, W, C) marginals' logs."""
  h, w, c = logits.shape
  bilateral = functools.partial(_lattice_filter, offsets=offsets,
                                weights=weights, neighbours=neighbours,
                                num_vertices=num_vertices)
  ones = jnp.ones((h * w, 1), jnp.float32)
  norm_b = jax.lax.rsqrt(jnp.maximum(bilateral(ones), 1e-20))
  norm_g = jax.lax.rsqrt(jnp.maximum(_gaussian_blur(
      ones.reshape(h, w, 1), params.gaussian_sxy), 1e-20))

  def message(q):
    gauss = norm_g * _gaussian_blur(norm_g * q, params.gaussian_sxy)
    bil = norm_b * bilateral(norm_b * q.reshape(-1, c))
    return (params.gaussian_weight * gauss +
            params.bilateral_weight * bil.reshape(h, w, c))

  def step(_, log_q):
    return jax.nn.log_softmax(logits + message(jnp.exp(log_q)))

  return jax.lax.fori_loop(0, params.iterations, step,
                           jax.nn.log_softmax(logits))


def _bucket(m):
  """Vertex counts rounded up to a power of two: few distinct compiles."""
  return 1 << max(int(np.ceil(np.log2(max(m, 2)))), 10)


def refine(image, logits, params):
  """CRF-refined log-probabilities of one image.

  Args:
    image: (H, W, K) uint8, K = 3 for RGB; the bilateral kernel compares
      pixels over all K channels (grey: K = 1).
    logits: (H, W, C) unary logits (the model's, at the image's size).
    params: `CRFParams`.

  Returns:
    (H, W, C) float32 log marginals; their argmax is the refined labels.
  """
  h, w = image.shape[:2]
  y, x = np.mgrid[0:h, 0:w]
  features = np.concatenate([
      np.stack([x, y], -1).reshape(-1, 2) / params.bilateral_sxy,
      image.reshape(h * w, -1).astype(np.float64) / params.bilateral_srgb],
                            1)
  lattice = build_lattice(features)
  m = _bucket(lattice.num_vertices)
  # Vertices beyond the real ones are zero dummies: pointing every padded
  # slot and missing neighbour at index m keeps them zero.
  neighbours = np.where(lattice.neighbours == lattice.num_vertices, m,
                        lattice.neighbours)
  neighbours = np.pad(neighbours, ((0, 0), (0, 0),
                                   (0, m - lattice.num_vertices)),
                      constant_values=m)
  return _mean_field(jnp.asarray(logits, jnp.float32),
                     jnp.asarray(lattice.offsets),
                     jnp.asarray(lattice.weights), jnp.asarray(neighbours),
                     params=params, num_vertices=m)


class Refiner:
  """The dense CRF as a refinement step composed with any inference: what
  `evaluators.Evaluator` and `predict.Predictor` take as `refiner`."""

  name = 'crf'

  def __init__(self, params):
    self.params = params

  def settings(self):
    return dataclasses.asdict(self.params)

  def __call__(self, image, logits):
    """Log-probabilities (h, w, C) of `logits` refined on `image`."""
    return refine(image, logits, self.params)
