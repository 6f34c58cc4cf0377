"""ONNX export: seg_jax's own jaxpr -> ONNX converter; a loader on ONNX Runtime.

    python -m seg_jax.export --format=onnx --workdir=DIR --out=FILE.onnx

writes the function `export` serialises as StableHLO (uint8 images
(b, H, W, 3) -> normalisation -> the model with the checkpoint's weights
-> the configured inference -> argmax -> int32 label maps (b, H, W)) as an
ONNX model (opset 17) that ONNX Runtime runs.

Why a converter of our own: jax2onnx (0.17.1, the current release)
requires orbax-checkpoint < 0.11.37 while seg_jax needs 0.12, so it cannot
even be an optional extra; jax2tf + tf2onnx would need TensorFlow, which
seg_jax keeps out (the `[tf]` extra is for dataset preparation only). The
jaxprs of seg_jax's inference use a few dozen primitives (`SUPPORTED`), so
this module converts them with the `onnx` package alone (the `[onnx]`
extra; `onnxruntime` only to load).

How:
- `jax.make_jaxpr` traces the export's predict function for ONE image, the
  weights as constants. The ONNX graph runs that per-image graph in a
  `Scan` over the batch axis, so b stays free as in the StableHLO export
  (there too each image's labels depend on that image only).
- Call-like primitives (jit, closed_call, custom_jvp_call, custom_vjp_call,
  remat) are inlined; `scan` is unrolled (the sliding window's `fori_loop`
  has a static trip count: one copy of the model per window in the graph,
  sharing the weights); `cond` is taken on its constant branch.
- Every equation whose inputs are all known at conversion time is
  evaluated then (in numpy where that is exact, else by the primitive
  itself): BatchNorm folding, the windows' offsets, the resize weight
  matrices, the flip indices end up as constants.
- gather / scatter / dynamic_slice / dynamic_update_slice must then have
  constant indices. Their effect is read off by running the primitive on
  an iota and becomes, where it is one (as every gather and scatter of the
  zoo's inference is), a Slice or one-axis Gather per axis, a Concat of
  slices around the updated box, or a Pad + Add; otherwise a flat Gather
  or ScatterND. Indices computed from the image are refused.
- An unsupported primitive is a one-line `UserError` naming it and the
  model / evaluator converted.

Labels come out int32, as jax's argmax gives them (ONNX's ArgMax gives
int64; it is cast back). Convolutions run NCHW in ONNX, between
transposes; measured on this 2-core CPU, deeplabv3_resnet50 (512x512, one
image) ran 1.5 s in ONNX Runtime, 2.1 s in the jitted predict step.
"""

import hashlib
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from seg_jax import errors

try:  # the optional [onnx] extra
  import onnx
  from onnx import helper, numpy_helper
except ImportError:  # pragma: no cover - exercised where onnx is absent
  onnx = helper = numpy_helper = None

OPSET = 17
# scans longer than this are refused rather than unrolled.
MAX_UNROLL = 1024
# Constants this large that hold one value are written as Expand(scalar).
_UNIFORM_MIN = 64
_INSTALL = 'pip install "seg_jax[onnx]" (or: pip install onnx onnxruntime)'

# Parameter holding the sub-jaxpr of each primitive that is inlined.
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr',
          'core_call': 'call_jaxpr', 'custom_jvp_call': 'call_jaxpr',
          'custom_vjp_call': 'call_jaxpr', 'custom_vjp_call_jaxpr':
          'fun_jaxpr', 'remat': 'jaxpr', 'checkpoint': 'jaxpr'}

_BINARY = {'add': 'Add', 'sub': 'Sub', 'mul': 'Mul', 'div': 'Div',
           'max': 'Max', 'min': 'Min', 'pow': 'Pow', 'eq': 'Equal',
           'lt': 'Less', 'le': 'LessOrEqual', 'gt': 'Greater',
           'ge': 'GreaterOrEqual', 'and': 'And', 'or': 'Or', 'xor': 'Xor'}
_UNARY = {'neg': 'Neg', 'abs': 'Abs', 'sign': 'Sign', 'floor': 'Floor',
          'ceil': 'Ceil', 'exp': 'Exp', 'log': 'Log', 'sqrt': 'Sqrt',
          'tanh': 'Tanh', 'logistic': 'Sigmoid', 'erf': 'Erf', 'not': 'Not',
          'sin': 'Sin', 'cos': 'Cos'}
_IDENTITY = ('stop_gradient', 'copy', 'copy_p', 'reduce_precision',
             'optimization_barrier', 'sharding_constraint')


def _check_installed():
  if onnx is None:
    raise errors.UserError(f'ONNX export needs the onnx package: {_INSTALL}.')


class _T:
  """A tensor computed by the ONNX graph: its name, static shape, dtype.

  Values known at conversion time are numpy arrays instead."""
  __slots__ = ('name', 'shape', 'dtype')

  def __init__(self, name, shape, dtype):
    self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)


def _known(v):
  return isinstance(v, np.ndarray)


def _shape(v):
  return tuple(v.shape)


def _uniform(a):
  return a.size > 0 and bool(np.all(a == a.reshape(-1)[0]))


def _affine_step(idx):
  """The step of an arithmetic progression of indices, else None."""
  if len(idx) == 1:
    return 1
  steps = np.diff(idx)
  return int(steps[0]) if steps[0] != 0 and np.all(steps == steps[0]) \
      else None


def _separable(flat, shape):
  """How a flat index map into an array of `shape` splits by axis.

  Args:
    flat: int array; element i of a result reads (or writes) element
      flat[i] of the array.
    shape: the array's shape.

  Returns:
    [(result axis or None, 1-D indices)] per array axis, such that the
    array's coordinate on axis d is indices_d[i_j] at result index i (or
    the one index, None); None when the map does not split so.
  """
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  origin = (0,) * flat.ndim
  maps, used = [], set()
  for d, n in enumerate(shape):
    axis, idx = None, np.array([flat[origin] // strides[d] % n])
    for j in range(flat.ndim):
      line = flat[origin[:j] + (slice(None),) + origin[j + 1:]]
      coord = line // strides[d] % n
      if np.any(coord != coord[0]):
        if axis is not None:
          return None
        axis, idx = j, coord
    if axis is not None and axis in used:
      return None
    used.add(axis)
    maps.append((axis, idx.astype(np.int64)))
  expected = np.zeros((1,) * flat.ndim, np.int64)
  for d, (axis, idx) in enumerate(maps):
    shape_d = [1] * flat.ndim
    if axis is not None:
      shape_d[axis] = len(idx)
    expected = expected + idx.reshape(shape_d) * strides[d]
  if not np.array_equal(np.broadcast_to(expected, flat.shape), flat):
    return None
  return maps


class _Graph:
  """The ONNX nodes and constants of one traced function."""

  def __init__(self, where):
    self.where = where  # names the model and evaluator in errors
    self.nodes, self.initializers = [], []
    self._count = itertools.count()
    self._consts, self._by_id = {}, {}

  # --- tensors and nodes ---------------------------------------------------

  def fresh(self, hint):
    return f'{hint}_{next(self._count)}'

  def name(self, v):
    """The graph name of a value (a constant is written once)."""
    if v is None:
      return ''
    return v.name if isinstance(v, _T) else self._constant(np.asarray(v))

  def _constant(self, a):
    """A constant's name; equal constants share one initializer (each
    pass of the model, each window, recomputes its folded weights)."""
    if id(a) in self._by_id:
      return self._by_id[id(a)][0]
    a_c = np.ascontiguousarray(a).reshape(a.shape)  # 0-d stays 0-d
    uniform = a.size >= _UNIFORM_MIN and _uniform(a)
    if uniform:
      key = ('uniform', a.dtype.str, a.shape, a_c.reshape(-1)[:1].tobytes())
    else:
      key = ('array', a.dtype.str, a.shape,
             hashlib.blake2b(a_c.data, digest_size=16).digest())
    if key not in self._consts:
      if uniform:
        self._consts[key] = self.op(
            'Expand', [a_c.reshape(-1)[0:1].reshape(()),
                       np.array(a.shape, np.int64)], a.shape, a.dtype).name
      else:
        self._consts[key] = self.fresh('const')
        self.initializers.append(numpy_helper.from_array(
            a_c, self._consts[key]))
    self._by_id[id(a)] = (self._consts[key], a)  # a kept: its id stays its
    return self._consts[key]

  def op(self, op_type, inputs, shape, dtype, **attrs):
    """Emits one node; returns its output."""
    if np.dtype(dtype) == np.dtype(jnp.bfloat16):
      raise errors.UserError(
          f'ONNX export of {self.where}: bfloat16 computation; ONNX Runtime '
          'lacks bfloat16 kernels on CPU: export with '
          '--config.train.precision=float32 (the weights are float32 '
          'either way).')
    out = self.fresh(op_type.lower())
    self.nodes.append(helper.make_node(
        op_type, [self.name(v) for v in inputs], [out], **attrs))
    return _T(out, shape, dtype)

  def unsupported(self, primitive, detail=''):
    return errors.UserError(
        f'ONNX export of {self.where}: primitive {primitive!r}{detail} is '
        'not supported by seg_jax.to_onnx (see to_onnx.SUPPORTED).')

  # --- shape helpers: numpy on constants, nodes otherwise ------------------

  def reshape(self, x, shape):
    shape = tuple(int(s) for s in shape)
    if _shape(x) == shape:
      return x
    if _known(x):
      return x.reshape(shape)
    return self.op('Reshape', [x, np.array(shape, np.int64)], shape,
                   x.dtype)

  def transpose(self, x, perm):
    perm = [int(p) for p in perm]
    if perm == list(range(len(perm))):
      return x
    if _known(x):
      return np.transpose(x, perm)
    return self.op('Transpose', [x], [x.shape[p] for p in perm], x.dtype,
                   perm=perm)

  def cast(self, x, dtype):
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
      return x
    if _known(x):
      return np.asarray(jnp.asarray(x).astype(dtype))  # jax's conversion
    return self.op('Cast', [x], x.shape, dtype,
                   to=helper.np_dtype_to_tensor_dtype(dtype))

  def expand(self, x, shape):
    shape = tuple(shape)
    if _shape(x) == shape:
      return x
    if _known(x):
      return np.broadcast_to(x, shape)
    return self.op('Expand', [x, np.array(shape, np.int64)], shape, x.dtype)

  def slice(self, x, axes, starts, stops, steps=None):
    """x[start:stop:step] on each axis (python semantics, non-negative
    indices; a stop of -1 with a negative step runs through index 0)."""
    steps = steps or [1] * len(axes)
    shape = list(_shape(x))
    keep = [(a, b, e, s) for a, b, e, s in zip(axes, starts, stops, steps)
            if not (b == 0 and e == shape[a] and s == 1)]
    if not keep:
      return x
    index = [slice(None)] * len(shape)
    for a, b, e, s in keep:
      index[a] = slice(b, e if e >= 0 else None, s)
      shape[a] = len(range(b, e, s))
    if _known(x):
      return x[tuple(index)]
    ends = [e if e >= 0 else -(2**62) for _, _, e, _ in keep]
    as64 = lambda v: np.array(v, np.int64)
    return self.op('Slice', [x, as64([k[1] for k in keep]), as64(ends),
                             as64([k[0] for k in keep]),
                             as64([k[3] for k in keep])], shape, x.dtype)

  def take(self, x, axis, idx):
    """x's elements `idx` along `axis`: a Slice where they are evenly
    spaced, else a Gather."""
    idx = np.asarray(idx, np.int64)
    step = _affine_step(idx)
    if step is not None:
      stop = int(idx[0]) + step * len(idx)
      return self.slice(x, [axis], [int(idx[0])], [stop], [step])
    if _known(x):
      return np.take(x, idx, axis)
    shape = list(x.shape)
    shape[axis] = len(idx)
    return self.op('Gather', [x, idx], shape, x.dtype, axis=axis)

  def concat(self, parts, axis):
    if len(parts) == 1:
      return parts[0]
    if all(_known(p) for p in parts):
      return np.concatenate(parts, axis)
    shape = list(_shape(parts[0]))
    shape[axis] = sum(_shape(p)[axis] for p in parts)
    return self.op('Concat', parts, shape, parts[0].dtype, axis=axis)

  def pad(self, x, pads, value):
    """Pads with `value` (lo, hi) per axis, both non-negative."""
    if not any(lo or hi for lo, hi in pads):
      return x
    if _known(x) and _known(value):
      return np.pad(x, pads, constant_values=value)
    shape = [n + lo + hi for n, (lo, hi) in zip(_shape(x), pads)]
    value = self.reshape(value, ()) if not _known(value) else np.asarray(
        value, x.dtype)
    return self.op('Pad', [x, np.array([p[0] for p in pads] +
                                       [p[1] for p in pads], np.int64),
                           value], shape, x.dtype, mode='constant')

  def place(self, x, box, starts):
    """x with the box of its elements from `starts` replaced by `box`: a
    Concat of slices of x around it on each axis it does not span."""
    xs, bs = _shape(x), _shape(box)
    for d, (a, n) in enumerate(zip(starts, bs)):
      if a == 0 and n == xs[d]:
        continue
      inner = self.place(self.slice(x, [d], [a], [a + n]), box,
                         [0 if k == d else s for k, s in enumerate(starts)])
      parts = ([self.slice(x, [d], [0], [a])] if a else []) + [inner] + (
          [self.slice(x, [d], [a + n], [xs[d]])] if a + n < xs[d] else [])
      return self.concat(parts, d)
    return box

  def select(self, x, maps, out_shape):
    """The result of a separable index map (`_separable`) read from x."""
    for d, (_, idx) in enumerate(maps):
      x = self.take(x, d, idx)
    order = sorted((j, d) for d, (j, _) in enumerate(maps) if j is not None)
    perm = [d for _, d in order] + [d for d, (j, _) in enumerate(maps)
                                    if j is None]
    x = self.transpose(x, perm)
    shape = [1] * len(out_shape)
    for j, d in order:
      shape[j] = len(maps[d][1])
    return self.expand(self.reshape(x, shape), out_shape)

  # --- jaxprs ----------------------------------------------------------------

  def run(self, jaxpr, consts, args):
    """Converts `jaxpr` applied to `args`; returns its outputs."""
    env = {}

    def read(v):
      if isinstance(v, jex_core.Literal):
        return np.asarray(v.val, v.aval.dtype)
      return env[v]

    for var, val in itertools.chain(zip(jaxpr.constvars, consts),
                                    zip(jaxpr.invars, args)):
      env[var] = val
    for eqn in jaxpr.eqns:
      outs = self.equation(eqn, [read(v) for v in eqn.invars])
      for var, val in zip(eqn.outvars, outs):
        env[var] = val
    return [read(v) for v in jaxpr.outvars]

  def inline(self, jaxpr, args):
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
      return self.run(jaxpr.jaxpr, [np.asarray(c) for c in jaxpr.consts],
                      args)
    return self.run(jaxpr, [], args)

  def equation(self, eqn, vals):
    name = eqn.primitive.name
    if name in _CALLS:
      return self.inline(eqn.params[_CALLS[name]], vals)
    if name in _CONTROL:
      return _CONTROL[name](self, eqn, vals)
    if all(_known(v) for v in vals):
      return self._fold(eqn, vals)
    if name in _IDENTITY:
      return vals
    if name not in _HANDLERS:
      raise self.unsupported(name)
    out = _HANDLERS[name](self, eqn, *vals)
    outs = out if eqn.primitive.multiple_results else [out]
    for v, var in zip(outs, eqn.outvars):
      assert _shape(v) == tuple(var.aval.shape), (name, _shape(v),
                                                  var.aval.shape)
    return [self.cast(v, var.aval.dtype) for v, var in zip(outs,
                                                           eqn.outvars)]

  def _fold(self, eqn, vals):
    """Evaluates an equation of constants now: in numpy where that is
    exact (elementwise IEEE arithmetic, integers, shapes, selections;
    compiling each little primitive with jax took most of the time), else
    with jax itself."""
    name = eqn.primitive.name
    aval = eqn.outvars[0].aval
    fold = _NUMPY_FOLD.get(name)
    if fold is not None and not eqn.primitive.multiple_results and all(
        np.dtype(v.dtype) != np.dtype(jnp.bfloat16) for v in vals):
      out = fold(vals, eqn.params, aval)
      if out is not None:
        out = np.asarray(out, aval.dtype)
        assert out.shape == tuple(aval.shape), (name, out.shape, aval.shape)
        return [out]
    out = eqn.primitive.bind(*vals, **eqn.params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [np.asarray(o) for o in outs]


# --- Folding in numpy: only where it computes what XLA computes -------------


def _np_elementwise(fn):
  return lambda vals, params, aval: fn(*vals)


def _np_div(vals, params, aval):
  x, y = vals
  if np.issubdtype(aval.dtype, np.floating):
    return np.divide(x, y)
  if np.any(y == 0):
    return None  # jax's own answer
  q = np.abs(x) // np.abs(y)  # rounded toward zero, as lax.div
  return np.where((x < 0) != (y < 0), -q, q)


def _np_convert(vals, params, aval):
  x, = vals
  if np.issubdtype(x.dtype, np.floating) and not np.issubdtype(
      aval.dtype, np.floating):
    return None  # float -> int/bool: jax's rounding and saturation
  return x.astype(aval.dtype)


def _np_select_n(vals, params, aval):
  which, *cases = vals
  if which.dtype == np.bool_:
    which = which.astype(np.int32)
  return np.choose(which, np.broadcast_arrays(*cases))


def _np_broadcast_in_dim(vals, params, aval):
  x = vals[0]
  if len(vals) > 1:
    return None
  ranked = [1] * len(aval.shape)
  for axis, n in zip(params['broadcast_dimensions'], x.shape):
    ranked[axis] = n
  return np.broadcast_to(x.reshape(ranked), aval.shape)


def _np_iota(vals, params, aval):
  shape = [1] * len(aval.shape)
  shape[params['dimension']] = aval.shape[params['dimension']]
  return np.broadcast_to(np.arange(aval.shape[params['dimension']],
                                   dtype=aval.dtype).reshape(shape),
                         aval.shape)


def _np_slice(vals, params, aval):
  strides = params['strides'] or [1] * len(aval.shape)
  return vals[0][tuple(slice(b, e, s) for b, e, s in zip(
      params['start_indices'], params['limit_indices'], strides))]


def _np_pad(vals, params, aval):
  x, value = vals
  config = params['padding_config']
  if any(lo < 0 or hi < 0 or interior for lo, hi, interior in config):
    return None
  return np.pad(x, [(lo, hi) for lo, hi, _ in config],
                constant_values=value)


def _np_exact_reduce(fn):
  def reduce(vals, params, aval):
    x, = vals
    if fn is np.sum and np.issubdtype(x.dtype, np.floating):
      return None  # the order of a float sum is XLA's
    return fn(x, axis=tuple(params['axes']))
  return reduce


# IEEE-exact in numpy as in XLA (rem: C's fmod, the sign of x, as lax.rem).
_NP_ELEMENTWISE = {
    'add': np.add, 'sub': np.subtract, 'mul': np.multiply, 'max': np.maximum,
    'min': np.minimum, 'eq': np.equal, 'ne': np.not_equal, 'lt': np.less,
    'le': np.less_equal, 'gt': np.greater, 'ge': np.greater_equal,
    'and': np.bitwise_and, 'or': np.bitwise_or, 'xor': np.bitwise_xor,
    'rem': np.fmod, 'not': np.invert, 'neg': np.negative, 'abs': np.abs,
    'sign': np.sign, 'floor': np.floor, 'ceil': np.ceil}

_NUMPY_FOLD = {
    **{name: _np_elementwise(fn) for name, fn in _NP_ELEMENTWISE.items()},
    'div': _np_div,
    'convert_element_type': _np_convert, 'select_n': _np_select_n,
    'broadcast_in_dim': _np_broadcast_in_dim, 'iota': _np_iota,
    'reshape': lambda vals, params, aval: (
        vals[0].reshape(aval.shape) if len(vals) == 1 else None),
    'squeeze': lambda vals, params, aval: vals[0].reshape(aval.shape),
    'transpose': lambda vals, params, aval: np.transpose(
        vals[0], params['permutation']),
    'rev': lambda vals, params, aval: np.flip(vals[0],
                                              tuple(params['dimensions'])),
    'concatenate': lambda vals, params, aval: np.concatenate(
        vals, params['dimension']),
    'slice': _np_slice, 'pad': _np_pad,
    'reduce_max': _np_exact_reduce(np.max),
    'reduce_min': _np_exact_reduce(np.min),
    'reduce_sum': _np_exact_reduce(np.sum),
    'argmax': lambda vals, params, aval: np.argmax(vals[0],
                                                   params['axes'][0]),
    'stop_gradient': lambda vals, params, aval: vals[0],
    'copy': lambda vals, params, aval: vals[0],
    'copy_p': lambda vals, params, aval: vals[0],
}


# --- Control flow -----------------------------------------------------------


def _scan(g, eqn, vals):
  """Unrolled: each step's body converted in turn (a loop counter in the
  carry stays a constant, so each step's indices are constants)."""
  p = eqn.params
  if p['length'] > MAX_UNROLL:
    raise g.unsupported('scan', f' of {p["length"]} steps (at most '
                        f'{MAX_UNROLL} are unrolled)')
  n_consts, n_carry = p['num_consts'], p['num_carry']
  consts, carry = vals[:n_consts], vals[n_consts:n_consts + n_carry]
  xs = vals[n_consts + n_carry:]
  steps = range(p['length'])
  ys = {}
  for t in reversed(steps) if p['reverse'] else steps:
    x_t = [g.reshape(g.slice(x, [0], [t], [t + 1]), _shape(x)[1:])
           for x in xs]
    out = g.inline(p['jaxpr'], list(consts) + list(carry) + x_t)
    carry, ys[t] = out[:n_carry], out[n_carry:]
  stacked = [g.concat([g.reshape(ys[t][i], (1, *_shape(ys[t][i])))
                       for t in steps], 0)
             for i in range(len(eqn.outvars) - n_carry)]
  return list(carry) + stacked


def _cond(g, eqn, vals):
  index, args = vals[0], vals[1:]
  if not _known(index):
    raise g.unsupported('cond', ' on a value computed from the image')
  branches = eqn.params['branches']
  return g.inline(branches[int(np.clip(index, 0, len(branches) - 1))], args)


def _while(g, eqn, vals):
  if all(_known(v) for v in vals):
    return g._fold(eqn, vals)  # pylint: disable=protected-access
  raise g.unsupported('while', ' (a loop whose trip count is not static)')


_CONTROL = {'scan': _scan, 'cond': _cond, 'while': _while}


# --- Primitives -------------------------------------------------------------

_HANDLERS = {}


def _handles(*names):
  def register(fn):
    for n in names:
      _HANDLERS[n] = fn
    return fn
  return register


def _out(eqn, i=0):
  aval = eqn.outvars[i].aval
  return tuple(aval.shape), aval.dtype


def _is_const(v, value):
  return _known(v) and v.size > 0 and bool(np.all(v == value))


@_handles(*_BINARY)
def _binary(g, eqn, x, y):
  name = eqn.primitive.name
  shape, dtype = _out(eqn)
  if name in ('and', 'or', 'xor') and np.dtype(dtype) != np.bool_:
    raise g.unsupported(name, ' on integers')
  # x + 0, x - 0, x * 1, x / 1: no node.
  neutral = {'add': 0, 'sub': 0, 'mul': 1, 'div': 1}.get(name)
  if neutral is not None and _is_const(y, neutral) and _shape(x) == shape:
    return x
  if name in ('add', 'mul') and _is_const(x, neutral) and _shape(y) == shape:
    return y
  if (name == 'max' and _is_const(y, 0) and _shape(x) == shape and
      np.issubdtype(dtype, np.floating)):
    return g.op('Relu', [x], shape, dtype)  # fused into the Conv before it
  return g.op(_BINARY[name], [x, y], shape, dtype)


@_handles('ne')
def _ne(g, eqn, x, y):
  shape, _ = _out(eqn)
  return g.op('Not', [g.op('Equal', [x, y], shape, np.bool_)], shape,
              np.bool_)


@_handles('rem')
def _rem(g, eqn, x, y):
  return g.op('Mod', [x, y], *_out(eqn), fmod=1)  # sign of x, as lax.rem


@_handles(*_UNARY)
def _unary(g, eqn, x):
  return g.op(_UNARY[eqn.primitive.name], [x], *_out(eqn))


@_handles('rsqrt')
def _rsqrt(g, eqn, x):
  shape, dtype = _out(eqn)
  return g.op('Reciprocal', [g.op('Sqrt', [x], shape, dtype)], shape, dtype)


@_handles('square')
def _square(g, eqn, x):
  return g.op('Mul', [x, x], *_out(eqn))


@_handles('integer_pow')
def _integer_pow(g, eqn, x):
  y = eqn.params['y']
  if y == 2:
    return g.op('Mul', [x, x], *_out(eqn))
  return g.op('Pow', [x, np.asarray(y, x.dtype)], *_out(eqn))


@_handles('round')
def _round(g, eqn, x):
  shape, dtype = _out(eqn)
  if int(eqn.params['rounding_method']) == 1:  # to nearest even
    return g.op('Round', [x], shape, dtype)
  # Half away from zero: sign(x) * floor(|x| + 0.5).
  up = g.op('Floor', [g.op('Add', [g.op('Abs', [x], shape, dtype),
                                   np.asarray(0.5, dtype)], shape, dtype)],
            shape, dtype)
  return g.op('Mul', [g.op('Sign', [x], shape, dtype), up], shape, dtype)


@_handles('exp2')
def _exp2(g, eqn, x):
  return g.op('Pow', [np.asarray(2, x.dtype), x], *_out(eqn))


@_handles('log1p')
def _log1p(g, eqn, x):
  shape, dtype = _out(eqn)
  return g.op('Log', [g.op('Add', [x, np.asarray(1, dtype)], shape, dtype)],
              shape, dtype)


@_handles('expm1')
def _expm1(g, eqn, x):
  shape, dtype = _out(eqn)
  return g.op('Sub', [g.op('Exp', [x], shape, dtype), np.asarray(1, dtype)],
              shape, dtype)


@_handles('is_finite')
def _is_finite(g, eqn, x):
  shape, _ = _out(eqn)
  bad = g.op('Or', [g.op('IsInf', [x], shape, np.bool_),
                    g.op('IsNaN', [x], shape, np.bool_)], shape, np.bool_)
  return g.op('Not', [bad], shape, np.bool_)


@_handles('convert_element_type')
def _convert(g, eqn, x):
  return g.cast(x, eqn.params['new_dtype'])


@_handles('clamp')
def _clamp(g, eqn, lo, x, hi):
  shape, dtype = _out(eqn)
  return g.op('Min', [g.op('Max', [x, lo], shape, dtype), hi], shape, dtype)


@_handles('select_n')
def _select_n(g, eqn, which, *cases):
  shape, dtype = _out(eqn)
  if len(cases) == 1:
    return cases[0]
  if which.dtype == np.bool_:
    return g.op('Where', [which, cases[1], cases[0]], shape, dtype)
  out = cases[0]
  for i, case in enumerate(cases[1:], 1):
    pick = g.op('Equal', [which, np.asarray(i, which.dtype)], _shape(which),
                np.bool_)
    out = g.op('Where', [pick, case, out], shape, dtype)
  return out


# --- Shapes -----------------------------------------------------------------


@_handles('reshape', 'squeeze', 'expand_dims')
def _reshape(g, eqn, x, *dynamic):
  if dynamic:
    raise g.unsupported(eqn.primitive.name, ' with dynamic shapes')
  return g.reshape(x, _out(eqn)[0])


@_handles('broadcast_in_dim')
def _broadcast_in_dim(g, eqn, x, *dynamic):
  if dynamic:
    raise g.unsupported('broadcast_in_dim', ' with dynamic shapes')
  shape, _ = _out(eqn)
  ranked = [1] * len(shape)
  for axis, n in zip(eqn.params['broadcast_dimensions'], _shape(x)):
    ranked[axis] = n
  return g.expand(g.reshape(x, ranked), shape)


@_handles('transpose')
def _transpose(g, eqn, x):
  return g.transpose(x, eqn.params['permutation'])


@_handles('slice')
def _slice(g, eqn, x):
  p = eqn.params
  rank = len(_shape(x))
  return g.slice(x, range(rank), p['start_indices'], p['limit_indices'],
                 p['strides'] or [1] * rank)


@_handles('rev')
def _rev(g, eqn, x):
  axes = list(eqn.params['dimensions'])
  return g.slice(x, axes, [_shape(x)[a] - 1 for a in axes], [-1] * len(axes),
                 [-1] * len(axes))


@_handles('concatenate')
def _concatenate(g, eqn, *xs):
  return g.concat(list(xs), eqn.params['dimension'])


@_handles('split')
def _split(g, eqn, x):
  axis, start, outs = eqn.params['axis'], 0, []
  for n in eqn.params['sizes']:
    outs.append(g.slice(x, [axis], [start], [start + n]))
    start += n
  return outs


@_handles('pad')
def _pad(g, eqn, x, value):
  config = eqn.params['padding_config']
  if any(interior for _, _, interior in config):
    raise g.unsupported('pad', ' with interior padding')
  shape = _shape(x)
  x = g.slice(x, range(len(shape)), [max(-lo, 0) for lo, _, _ in config],
              [n - max(-hi, 0) for n, (_, hi, _) in zip(shape, config)])
  return g.pad(x, [(max(lo, 0), max(hi, 0)) for lo, hi, _ in config], value)


def _static_starts(g, eqn, starts, sizes, shape):
  """dynamic_slice's start indices, clamped as lax clamps them."""
  if not all(_known(s) for s in starts):
    raise g.unsupported(eqn.primitive.name,
                        ' at offsets computed from the image')
  return [int(np.clip(int(s), 0, n - k))
          for s, n, k in zip(starts, shape, sizes)]


@_handles('dynamic_slice')
def _dynamic_slice(g, eqn, x, *starts):
  sizes = eqn.params['slice_sizes']
  starts = _static_starts(g, eqn, starts, sizes, _shape(x))
  return g.slice(x, range(len(sizes)), starts,
                 [s + k for s, k in zip(starts, sizes)])


@_handles('dynamic_update_slice')
def _dynamic_update_slice(g, eqn, x, update, *starts):
  starts = _static_starts(g, eqn, starts, _shape(update), _shape(x))
  return g.place(x, update, starts)


@_handles('gather')
def _gather(g, eqn, x, indices):
  if not _known(indices):
    raise g.unsupported('gather', ' at indices computed from the image')
  shape, _ = _out(eqn)
  size = math.prod(_shape(x))
  params = dict(eqn.params)
  if params['mode'] == jax.lax.GatherScatterMode.FILL_OR_DROP:
    params['fill_value'] = -1  # marks reads out of bounds
  flat = np.asarray(eqn.primitive.bind(
      jnp.arange(size, dtype=jnp.int32).reshape(_shape(x)),
      jnp.asarray(indices), **params)).astype(np.int64)
  if np.any(flat < 0):
    raise g.unsupported('gather', ' reading out of bounds')
  maps = _separable(flat, _shape(x))
  if maps is not None:
    return g.select(x, maps, shape)
  return g.op('Gather', [g.reshape(x, (size,)), flat], shape, x.dtype,
              axis=0)


@_handles('scatter', 'scatter-add')
def _scatter(g, eqn, x, indices, updates):
  """Replaces (or adds) `updates` at constant indices, where each update
  lands on its own element."""
  name = eqn.primitive.name
  if not _known(indices):
    raise g.unsupported(name, ' at indices computed from the image')
  kw = {k: eqn.params[k] for k in ('dimension_numbers', 'indices_are_sorted',
                                   'unique_indices', 'mode')}
  n = math.prod(_shape(updates))
  landed = np.asarray(jax.lax.scatter_add(
      jnp.zeros(_shape(x), jnp.int32), jnp.asarray(indices),
      jnp.arange(1, n + 1, dtype=jnp.int32).reshape(_shape(updates)), **kw))
  hits = np.asarray(jax.lax.scatter_add(
      jnp.zeros(_shape(x), jnp.int32), jnp.asarray(indices),
      jnp.ones(_shape(updates), jnp.int32), **kw))
  if hits.max(initial=0) > 1 or hits.sum() != n:
    raise g.unsupported(name, ' with overlapping or out-of-bounds updates')
  dest = np.empty(n, np.int64)
  where = np.flatnonzero(landed)
  dest[landed.reshape(-1)[where] - 1] = where
  dest = dest.reshape(_shape(updates))
  maps = _separable(dest, _shape(x))
  if maps is not None:
    box = _box(g, updates, maps)
    if box is not None:
      values, starts = box
      if name == 'scatter':
        return g.place(x, values, starts)
      pads = [(a, m - a - k) for a, k, m in zip(starts, _shape(values),
                                                  _shape(x))]
      return g.op('Add', [x, g.pad(values, pads, np.asarray(0, x.dtype))],
                  _shape(x), x.dtype)
  coords = np.stack(np.unravel_index(dest, _shape(x)), -1).astype(np.int64)
  return g.op('ScatterND', [x, coords, updates], _shape(x), x.dtype,
              reduction='add' if name == 'scatter-add' else 'none')


def _box(g, updates, maps):
  """The updates laid out as the box of the target they fill, and its
  starts; None when they do not fill a box."""
  order = sorted((j, d) for d, (j, _) in enumerate(maps) if j is not None)
  placed = [j for j, _ in order]
  rest = [j for j in range(len(_shape(updates))) if j not in placed]
  values = g.transpose(updates, placed + rest)
  box = [len(idx) for _, idx in maps]
  values = g.reshape(values, [box[d] for _, d in order] +
                     [1] * (len(maps) - len(order)))
  # axes in the updates' order, then the constant ones: to the target's.
  perm = [d for _, d in order] + [d for d, (j, _) in enumerate(maps)
                                  if j is None]
  values = g.transpose(values, np.argsort(perm))
  starts = []
  for d, (_, idx) in enumerate(maps):
    order_d = np.argsort(idx, kind='stable')
    values = g.take(values, d, order_d)
    idx = idx[order_d]
    if _affine_step(idx) != 1:
      return None
    starts.append(int(idx[0]))
  return values, starts


# --- Reductions, products, convolutions -------------------------------------


@_handles('reduce_sum')
def _reduce_sum(g, eqn, x):
  return g.op('ReduceSum', [x, np.array(eqn.params['axes'], np.int64)],
              *_out(eqn), keepdims=0)


@_handles('reduce_max', 'reduce_min', 'reduce_prod')
def _reduce(g, eqn, x):
  op = {'reduce_max': 'ReduceMax', 'reduce_min': 'ReduceMin',
        'reduce_prod': 'ReduceProd'}[eqn.primitive.name]
  return g.op(op, [x], *_out(eqn), axes=list(eqn.params['axes']),
              keepdims=0)


@_handles('reduce_or', 'reduce_and')
def _reduce_bool(g, eqn, x):
  shape, _ = _out(eqn)
  op = 'ReduceMax' if eqn.primitive.name == 'reduce_or' else 'ReduceMin'
  y = g.op(op, [g.cast(x, np.int32)], shape, np.int32,
           axes=list(eqn.params['axes']), keepdims=0)
  return g.cast(y, np.bool_)


@_handles('argmax', 'argmin')
def _argmax(g, eqn, x):
  shape, dtype = _out(eqn)
  axis, = eqn.params['axes']
  op = 'ArgMax' if eqn.primitive.name == 'argmax' else 'ArgMin'
  # The first of equal maxima, as jax picks it.
  y = g.op(op, [x], shape, np.int64, axis=int(axis), keepdims=0,
           select_last_index=0)
  return g.cast(y, dtype)


@_handles('dot_general')
def _dot_general(g, eqn, x, y):
  """A MatMul, batch axes first (as dot_general's output has them)."""
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lc, rc, lb, rb = (list(map(int, a)) for a in (lc, rc, lb, rb))
  shape, dtype = _out(eqn)
  xs, ys = _shape(x), _shape(y)
  lf = [a for a in range(len(xs)) if a not in lc + lb]
  rf = [a for a in range(len(ys)) if a not in rc + rb]
  if not lb and lc == [len(xs) - 1] and len(ys) == 2:
    # (..., K) @ (K, N): the 1x1 convolutions' product, as it is.
    y = g.transpose(y, [rc[0], rf[0]])
    return g.cast(g.op('MatMul', [x, y], shape, x.dtype), dtype)
  size = lambda s, axes: math.prod(s[a] for a in axes)
  b, m, k, n = size(xs, lb), size(xs, lf), size(xs, lc), size(ys, rf)
  lead = (b,) if lb else ()
  x = g.reshape(g.transpose(x, lb + lf + lc), lead + (m, k))
  y = g.reshape(g.transpose(y, rb + rc + rf), lead + (k, n))
  out = g.op('MatMul', [x, y], lead + (m, n), x.dtype)
  return g.cast(g.reshape(out, shape), dtype)


def _crop_negative_padding(g, x, padding, spatial):
  """Applies negative (lo, hi) padding as a crop; returns x and the rest."""
  shape = _shape(x)
  x = g.slice(x, spatial, [max(-lo, 0) for lo, _ in padding],
              [shape[a] - max(-hi, 0) for a, (_, hi) in zip(spatial,
                                                            padding)])
  return x, [(max(lo, 0), max(hi, 0)) for lo, hi in padding]


@_handles('conv_general_dilated')
def _conv(g, eqn, x, k):
  """ONNX Conv (NCHW, OIHW) between transposes; input dilation (a
  transposed convolution) as ConvTranspose."""
  p = eqn.params
  dn = p['dimension_numbers']
  if p['batch_group_count'] != 1:
    raise g.unsupported('conv_general_dilated', ' with batch_group_count')
  x = g.transpose(x, dn.lhs_spec)  # (N, C, spatial...)
  k = g.transpose(k, dn.rhs_spec)  # (O, I, spatial...)
  spatial = list(range(2, len(_shape(x))))
  x, padding = _crop_negative_padding(g, x, list(p['padding']), spatial)
  shape, dtype = _out(eqn)
  logical = tuple(shape[a] for a in dn.out_spec)
  groups = p['feature_group_count']
  rhs_dilation = list(p['rhs_dilation'] or [1] * len(spatial))
  if all(d == 1 for d in p['lhs_dilation'] or [1]):
    y = g.op('Conv', [x, k], logical, x.dtype,
             strides=list(p['window_strides']), dilations=rhs_dilation,
             group=groups, pads=[lo for lo, _ in padding] +
             [hi for _, hi in padding])
  else:
    y = _conv_transpose(g, x, k, logical, padding, rhs_dilation, p, groups)
  return g.cast(g.transpose(y, np.argsort(dn.out_spec)), dtype)


def _conv_transpose(g, x, k, logical, padding, rhs_dilation, p, groups):
  """A convolution of the input dilated by s (zeros between its pixels)
  is ConvTranspose with stride s and the kernel flipped, (I, O, ...)."""
  sizes = _shape(k)[2:]
  effective = [d * (n - 1) + 1 for d, n in zip(rhs_dilation, sizes)]
  pads = [e - 1 - lo for e, (lo, _) in zip(effective, padding)] + [
      e - 1 - hi for e, (_, hi) in zip(effective, padding)]
  if (groups != 1 or any(s != 1 for s in p['window_strides']) or
      min(pads) < 0):
    raise g.unsupported('conv_general_dilated',
                        ' with input dilation of this form')
  w = g.transpose(k, [1, 0] + list(range(2, len(_shape(k)))))
  for axis, n in enumerate(sizes, 2):
    w = g.take(w, axis, np.arange(n - 1, -1, -1))
  return g.op('ConvTranspose', [x, w], logical, x.dtype,
              strides=list(p['lhs_dilation']), dilations=rhs_dilation,
              pads=pads)


@_handles('reduce_window_max', 'reduce_window_min', 'reduce_window_sum')
def _reduce_window(g, eqn, x):
  """MaxPool (sum: a grouped Conv with a kernel of ones) over the axes the
  window moves along, the others folded into ONNX's N and C."""
  p = eqn.params
  name = eqn.primitive.name
  if any(d != 1 for d in p['base_dilation']):
    raise g.unsupported(name, ' with base dilation')
  shape, dtype = _out(eqn)
  rank = len(_shape(x))
  spatial = [a for a in range(rank) if p['window_dimensions'][a] > 1 or
             p['window_strides'][a] > 1 or tuple(p['padding'][a]) != (0, 0)]
  other = [a for a in range(rank) if a not in spatial]
  perm = other + spatial
  x = g.transpose(x, perm)
  lead = [_shape(x)[i] for i in range(len(other))]
  x = g.reshape(x, [1, math.prod(lead)] + [_shape(x)[i] for i in
                                           range(len(other), rank)])
  window = [p['window_dimensions'][a] for a in spatial]
  attrs = dict(kernel_shape=window,
               strides=[p['window_strides'][a] for a in spatial],
               dilations=[p['window_dilation'][a] for a in spatial],
               pads=[p['padding'][a][0] for a in spatial] +
               [p['padding'][a][1] for a in spatial])
  out_spatial = [shape[a] for a in spatial]
  out = (1, math.prod(lead), *out_spatial)
  if name == 'reduce_window_sum':
    ones = np.ones((out[1], 1, *window), x.dtype)
    y = g.op('Conv', [x, ones], out, x.dtype, group=out[1], **attrs)
  elif name == 'reduce_window_max':
    y = g.op('MaxPool', [x], out, x.dtype, **attrs)
  else:
    neg = g.op('Neg', [x], _shape(x), x.dtype)
    y = g.op('Neg', [g.op('MaxPool', [neg], out, x.dtype, **attrs)], out,
             x.dtype)
  y = g.reshape(y, lead + out_spatial)
  return g.cast(g.transpose(y, np.argsort(perm)), dtype)


# A `while` is evaluated only when all its inputs are constants.
SUPPORTED = tuple(sorted(set(_HANDLERS) | set(_CALLS) | set(_IDENTITY) |
                         {'scan', 'cond', 'iota'}))


# --- The model --------------------------------------------------------------


def convert(predict, image_shape, where='the model'):
  """The ONNX model of a per-image predict function, over any batch.

  Args:
    predict: uint8 (1, H, W, 3) -> int32 (1, H, W), traceable by jax,
      weights closed over (they become the graph's initializers).
    image_shape: (H, W, 3).
    where: what is converted, for errors (e.g. 'model unet, evaluator
      whole').

  Returns:
    An `onnx.ModelProto` (opset `OPSET`): input 'images' uint8
    (b, H, W, 3), output 'labels' (b, H, W) of predict's dtype, b free.
  """
  _check_installed()
  image_shape = tuple(int(n) for n in image_shape)
  closed = jax.make_jaxpr(predict)(
      jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8))
  g = _Graph(where)
  image = _T('image', image_shape, np.uint8)
  out, = g.run(closed.jaxpr, [np.asarray(c) for c in closed.consts],
               [g.reshape(image, (1, *image_shape))])
  if _known(out):  # a constant prediction still needs a node
    out = g.expand(g.op('Identity', [out], _shape(out), out.dtype),
                   _shape(out))
  label = g.reshape(out, _shape(out)[1:])
  elem = lambda dtype: helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
  body = helper.make_graph(
      g.nodes, 'predict_one',
      [helper.make_tensor_value_info('image', elem(np.uint8), image_shape)],
      [helper.make_tensor_value_info(label.name, elem(label.dtype),
                                     label.shape)])
  graph = helper.make_graph(
      [helper.make_node('Scan', ['images'], ['labels'], num_scan_inputs=1,
                        body=body)],
      'seg_jax',
      [helper.make_tensor_value_info('images', elem(np.uint8),
                                     ('b', *image_shape))],
      [helper.make_tensor_value_info('labels', elem(label.dtype),
                                     ('b', *label.shape))],
      initializer=g.initializers)
  model = helper.make_model(graph, producer_name='seg_jax',
                            opset_imports=[helper.make_opsetid('', OPSET)])
  model.ir_version = 8  # opset 17's
  onnx.checker.check_model(model)
  return model


def save(model, path):
  """Writes an `onnx.ModelProto` to `path`."""
  _check_installed()
  onnx.save_model(model, path)


def load_onnx(path, providers=None):
  """The ONNX model at `path` (with FILE.json) on ONNX Runtime.

  Needs onnxruntime and numpy only (no jax, no seg_jax training code).

  Args:
    path: a file written by `python -m seg_jax.export --format=onnx`.
    providers: ONNX Runtime execution providers (default: all available,
      e.g. CUDA before CPU).

  Returns:
    (predict, meta): `predict(images)` maps uint8 (b, H, W, C) to int32
    label maps (b, H, W) for any b; `meta` is FILE.json as a dict. Smaller
    images are mirror-filled to (H, W) and their labels cropped back, as
    `export.load` does.
  """
  from seg_jax import mirror  # pylint: disable=g-import-not-at-top
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.UserError(f'load_onnx needs onnxruntime: {_INSTALL}.') \
        from None
  session = onnxruntime.InferenceSession(
      path, providers=providers or onnxruntime.get_available_providers())
  with open(path + '.json') as f:
    meta = json.load(f)
  height, width = meta['input_size']
  channels = meta.get('channels', 3)

  warned = set()

  def predict(images):
    return mirror.predict_on_canvas(
        lambda canvas: session.run(None, {'images': canvas})[0], images,
        height, width, channels, path, meta, warned)

  return predict, meta
