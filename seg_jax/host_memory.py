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

`SEG_JAX_HOST_MEMORY=default` keeps the C library's defaults; where the C
library is not glibc (macOS, musl) nothing changes. A program of your own
that runs seg_jax's steps gets the same by starting Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment.
"""

import ctypes
import os
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
