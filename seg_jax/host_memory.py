"""The host allocator's settings for a process that runs compiled steps.

On CPU, XLA allocates each execution's buffers (the step's temporaries,
its outputs) with the C library's `malloc` and frees them after it. With
glibc's defaults every block above its mmap threshold (at most 32 MiB,
raised only for blocks that were freed) is a fresh `mmap` of zeroed 4 KiB
pages, unmapped again when freed: each step faults every page of its
buffers in again, and its kernels then run through 4 KiB pages' address
translations. Measured on the project's 2-core CPU (`bench`, one process
each, interleaved; BENCHMARKS.md): `lraspp_mobilenet_v3_large`'s predict
step at 512x512 made 9,800 page faults a step (15 ms of kernel time in a
33 ms step), the U-Net recipe's train step 195,000.

`configure()`, which every seg_jax CLI calls first (before JAX is
imported), applies the first of these that the machine has:

- Transparent huge pages (2 MiB) for the heap and for mapped blocks,
  where the kernel gives them on request
  (`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise`, the common
  default) and glibc >= 2.35 can ask for them (its `glibc.malloc.hugetlb=1`
  tunable). A tunable is read when a process starts, so the CLI starts
  again in the same process (`execv`: same PID, same arguments) with it
  added to `GLIBC_TUNABLES`, once, before anything else has run. Measured:
  the U-Net recipe's step 713 -> 507-529 ms, `lraspp_mobilenet_v3_large`'s
  predict step 33.6 -> 25.3-27.0 ms.
- Where the kernel uses huge pages anyway (`always`): nothing.
- Otherwise (`never`, an older glibc): `keep_freed_memory()`, glibc's
  `mallopt` set so that freed memory stays in the process for the next
  step: one arena (a thread's own arena is limited to 64 MiB a heap and
  maps larger blocks anyway), blocks up to 2 GiB from the heap, no
  trimming below 2 GiB free at its top. Resident memory then stays at its
  peak. Measured with huge pages off: the U-Net step 713 -> 619 ms, the
  LR-ASPP predict step 33.6 -> 25.0-30.0 ms.

`MemoryChecked` wraps the inference steps (the predict and evaluation
steps): on a CPU backend each new compilation is checked before it first
runs (its buffers against the host memory available, its convolutions'
patch matrices against the largest block the kernel grants), because
XLA's CPU runtime aborts the whole process (`std::bad_alloc`) where an
allocation fails, where on a GPU it raises `RESOURCE_EXHAUSTED`. A
program that cannot fit raises that same error instead: `predict` then
takes that image size one image at a time, and `evaluate` stops with one
line saying what to lower.

`SEG_JAX_HOST_MEMORY=default` keeps the C library's defaults; where the C
library is not glibc (macOS, musl) nothing changes. A program of your own
that runs seg_jax's steps gets the same by starting Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment.
"""

import ctypes
import math
import os
import re
import sys

ENV = 'SEG_JAX_HOST_MEMORY'
HUGE_PAGES = 'glibc.malloc.hugetlb=1'
THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'

# glibc's malloc.h parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# What this process runs with, once `configure()` ran (see there).
MODE = 'default'

# The largest value mallopt takes (an int): blocks above 2 GiB are mapped.
_LARGEST = 2**31 - 1
# Older glibc versions refuse an mmap threshold above half a heap (32 MiB).
_HALF_HEAP = 32 << 20


def _disabled(environ):
  return environ.get(ENV, '').strip().lower() in ('default', '0', 'off')


def _libc():
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
  except (OSError, AttributeError):  # musl, or no C library by that name
    return None
  return libc


def glibc_version():
  """(major, minor) of the process's glibc, or None (not glibc)."""
  libc = _libc()
  if libc is None:
    return None
  major, minor = libc.gnu_get_libc_version().decode().split('.')[:2]
  return int(major), int(minor)


def keep_freed_memory(environ=None):
  """Keeps freed host memory in the process for reuse (see the module doc).

  Returns True where the settings were applied (glibc, and not disabled
  by SEG_JAX_HOST_MEMORY=default), else False. Idempotent. Call it before
  the first JAX computation: threads that have allocated already keep
  their own arenas.
  """
  environ = os.environ if environ is None else environ
  libc = None if _disabled(environ) else _libc()
  if libc is None:
    return False
  if not libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST):
    libc.mallopt(_M_MMAP_THRESHOLD, _HALF_HEAP)
  return bool(libc.mallopt(_M_ARENA_MAX, 1) and
              libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST))


def _thp_mode(path=THP_MODE):
  """The kernel's transparent-huge-page mode ('always', 'madvise',
  'never'), or '' where it cannot be read."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ''
  chosen = [w[1:-1] for w in text.split() if w.startswith('[')]
  return chosen[0] if chosen else ''


def huge_pages_argv(environ, orig_argv, executable, version, thp_mode):
  """(argv, environment) to start this process again with glibc's huge-page
  tunable, or None where that would change nothing: disabled by
  SEG_JAX_HOST_MEMORY=default, a C library other than glibc >= 2.35
  (`version`), a kernel without transparent huge pages on request
  (`thp_mode` 'always' gives them anyway, 'never' not at all), or the
  tunable already set (then this is the process started again)."""
  if (_disabled(environ) or version is None or version < (2, 35) or
      thp_mode != 'madvise' or not executable or not orig_argv):
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGES}' if tunables else (
      HUGE_PAGES)
  return [executable, *orig_argv[1:]], env


def configure():
  """What every seg_jax CLI does first, before importing JAX (see the
  module doc): start again with huge pages where they apply
  (`huge_pages_argv`; this call then does not return); else, where the
  kernel gives none, keep freed memory (`keep_freed_memory`).

  Returns 'huge pages', 'huge pages (always)', 'kept' or 'default': what
  the process runs with."""
  version, mode = glibc_version(), _thp_mode()
  plan = huge_pages_argv(os.environ, getattr(sys, 'orig_argv', None),
                         sys.executable, version, mode)
  if plan is not None:
    argv, env = plan
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
  global MODE
  MODE = _mode(os.environ, version, mode)
  if MODE == 'kept' and not keep_freed_memory():
    MODE = 'default'
  return MODE


def _mode(environ, version, thp_mode):
  """What `configure()` leaves a process with, once started with
  `environ` (after its start again with huge pages, if any)."""
  if _disabled(environ) or version is None:
    return 'default'
  if thp_mode == 'madvise' and HUGE_PAGES in environ.get('GLIBC_TUNABLES',
                                                         ''):
    return 'huge pages'
  if thp_mode == 'always':
    return 'huge pages (always)'
  return 'kept'


# The kernel's memory figures and the cgroup (v2) limits.
MEMINFO = '/proc/meminfo'
CGROUP = '/sys/fs/cgroup'


def _meminfo(path):
  """{field: bytes} of /proc/meminfo's kB lines; {} where unreadable."""
  fields = {}
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(':')
        parts = value.split()
        if parts and parts[0].isdigit():
          fields[key] = int(parts[0]) * 1024  # kB
  except OSError:
    pass
  return fields


def available_bytes(meminfo=MEMINFO, cgroup=CGROUP):
  """The memory this process can still take (bytes): the kernel's
  MemAvailable, lowered to what is left under the cgroup's limit if it
  has one; None where neither can be read (not Linux)."""
  available = _meminfo(meminfo).get('MemAvailable')
  try:
    with open(os.path.join(cgroup, 'memory.max')) as f:
      limit = f.read().strip()
    with open(os.path.join(cgroup, 'memory.current')) as f:
      left = int(limit) - int(f.read())
    available = left if available is None else min(available, left)
  except (OSError, ValueError):  # no cgroup v2 limit ('max'), not Linux
    pass
  return available


def buffers_bytes(compiled):
  """Host memory a compiled program's execution fills (bytes): its
  temporaries and outputs (arguments exist already), on each of this
  process's devices it runs on; None where XLA gives no estimate."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  shardings = [s for s in jax.tree.leaves(compiled.input_shardings)
               if hasattr(s, 'addressable_devices')]
  devices = max((len(s.addressable_devices) for s in shardings), default=1)
  return devices * (stats.temp_size_in_bytes + stats.output_size_in_bytes -
                    stats.alias_size_in_bytes)


def largest_allocation_bytes(meminfo=MEMINFO):
  """The largest single allocation the kernel's default (heuristic)
  overcommit grants: about its memory and swap together (bytes); None
  where /proc/meminfo cannot be read."""
  fields = _meminfo(meminfo)
  if 'MemTotal' not in fields:
    return None
  return fields['MemTotal'] + fields.get('SwapTotal', 0)


_DEFINITION = re.compile(r'%([\w.-]+) = (\w+)\[([\d,]*)\]')
_CONVOLUTION = re.compile(
    r'= (\w+)\[([\d,]*)\]\S* convolution\(%[\w.-]+, %([\w.-]+)\).*'
    r'window=\{size=([\dx]+)[^}]*\}, dim_labels=b01f_01io->b01f')
_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 'f64': 8}


def patch_matrix_bytes(hlo_text):
  """The largest patch matrix (im2col) among a compiled CPU program's
  convolutions (bytes): XLA's own (Eigen) convolutions ask for it as one
  block, outside the program's buffers that `memory_analysis` counts, and
  the process aborts where the kernel refuses it (measured: a 3x3
  convolution from 8 channels on 8 images of 3000x4000 asked for 27.6 GB,
  8 x 3000 x 4000 x 72 floats, on a 24 GiB machine; the program's own
  buffers were 12.3 GB; one such image alone ran in 2 GB resident)."""
  shapes = {name: [int(d) for d in dims.split(',') if d]
            for name, _, dims in _DEFINITION.findall(hlo_text)}
  largest = 0
  for line in hlo_text.splitlines():
    found = _CONVOLUTION.search(line)
    kernel = shapes.get(found.group(3)) if found else None
    if not kernel or len(kernel) != 4:
      continue
    out = [int(d) for d in found.group(2).split(',') if d]
    taps = math.prod(int(k) for k in found.group(4).split('x'))
    largest = max(largest, math.prod(out[:-1]) * taps * kernel[2] *
                  _BYTES.get(found.group(1), 4))
  return largest


class MemoryChecked:
  """A `jax.jit` function whose compilation for each new argument
  signature is checked, on a CPU backend, before it first runs: its
  buffers against the host memory available (`available_bytes`), its
  largest convolution's patch matrix against the largest allocation the
  kernel grants (`largest_allocation_bytes`). One that cannot fit
  raises `jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: ...')`, the
  error a GPU raises (`errors.out_of_memory` is true for it), instead of
  XLA's CPU runtime aborting the process. The check compiles through
  `jitted.lower(...).compile()`, which the jitted function then reuses.
  Other attributes are the jitted function's (`lower`, ...)."""

  def __init__(self, jitted):
    self.jitted = jitted
    self._fits = set()

  def __call__(self, *args):
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() == 'cpu':
      leaves, tree = jax.tree.flatten(args)
      key = (tree, tuple((getattr(x, 'shape', ()),
                          str(getattr(x, 'dtype', type(x))),
                          getattr(x, 'sharding', None)) for x in leaves))
      if key not in self._fits:
        compiled = self.jitted.lower(*args).compile()
        need, available = buffers_bytes(compiled), available_bytes()
        if need is not None and available is not None and need > available:
          raise jax.errors.JaxRuntimeError(
              f'RESOURCE_EXHAUSTED: the compiled step needs '
              f'{need / 2**30:.1f} GiB of host memory for its buffers, '
              f'{available / 2**30:.1f} GiB are available.')
        block = patch_matrix_bytes(compiled.as_text())
        largest = largest_allocation_bytes()
        if largest is not None and block > largest:
          raise jax.errors.JaxRuntimeError(
              f'RESOURCE_EXHAUSTED: a convolution of the compiled step '
              f'allocates {block / 2**30:.1f} GiB at once, more than this '
              f"machine's memory and swap ({largest / 2**30:.1f} GiB).")
        self._fits.add(key)
    return self.jitted(*args)

  def __getattr__(self, name):
    return getattr(self.jitted, name)
