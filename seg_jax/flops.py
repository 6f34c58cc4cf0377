"""Model FLOPs of a JAX function, counted from its jaxpr.

Counts 2 x multiply-adds of every convolution and matrix product, the
convention of `torch.utils.flop_counter` and of MFU figures: a convolution
counts every kernel tap of every output position, padding included, and the
input gradient of a strided convolution (a convolution over the
zero-dilated output gradient) counts as much as the forward pass, not the
products with inserted zeros; a grouped (depthwise) convolution counts
each output channel's own group of input channels, in both gradients too.
Elementwise work (BatchNorm, activations, the optimizer) is not counted,
nor is bilinear resizing: `jax.image.resize` runs as one matrix product
per axis, which torch's counter, counting its upsampling as 0, does not
see (LR-ASPP's 21 class maps upsampled from stride 8 to 512x512 would
add 19% to its forward FLOPs).

Unlike XLA's cost analysis, which counts the body of a loop once, the body
of a `scan` counts `length` times, so a model with scanned layers gets the
FLOPs of its unrolled twin.
"""

import math

import jax
from jax.extend import core as jex_core

# Names of jitted computations whose products are interpolation, not model
# FLOPs: `jax.image.resize`'s core (its forward and its transpose).
_NOT_COUNTED = ('_resize',)


def _conv_flops(eqn):
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  # (out feature, in feature, spatial...)
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec
  kernel_spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
  in_per_group = rhs.shape[rhs_spec[1]]
  zeros_inserted = math.prod(eqn.params.get('lhs_dilation') or (1,))
  return 2 * math.prod(out.shape) * kernel_spatial * in_per_group // (
      zeros_inserted)


def _dot_flops(eqn):
  lhs, _ = (v.aval for v in eqn.invars)
  (contract, _), _ = eqn.params['dimension_numbers']
  return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
      lhs.shape[d] for d in contract)


def _sub_jaxprs(eqn):
  """(jaxpr, multiplicity) of the computations an equation calls."""
  params = eqn.params
  if params.get('name') in _NOT_COUNTED:
    return []
  if eqn.primitive.name == 'scan':
    return [(params['jaxpr'], params['length'])]
  if eqn.primitive.name == 'cond':
    # One branch runs; count the costliest.
    return [(max(params['branches'], key=jaxpr_flops), 1)]
  if eqn.primitive.name == 'while':
    raise ValueError('count_flops: a while loop has no static trip count; '
                     'use scan or count the body yourself.')
  subs = []
  for value in params.values():
    for v in (value if isinstance(value, (list, tuple)) else (value,)):
      if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
        subs.append((v, 1))
  return subs


def jaxpr_flops(jaxpr):
  """FLOPs of a (closed) jaxpr, nested computations included."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'dot_general':
      total += _dot_flops(eqn)
    else:
      total += sum(n * jaxpr_flops(sub) for sub, n in _sub_jaxprs(eqn))
  return total


def count_flops(fn, *args, **kwargs):
  """FLOPs of one call `fn(*args, **kwargs)`; arguments may be arrays or
  `jax.ShapeDtypeStruct`s (nothing is computed). A jitted `fn` is traced
  as it is (its compiler options cannot be nested in another trace)."""
  if hasattr(fn, 'trace'):
    return jaxpr_flops(fn.trace(*args, **kwargs).jaxpr)
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
