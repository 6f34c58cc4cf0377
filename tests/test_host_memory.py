"""host_memory: freed host memory stays in the process and the CLIs start
with transparent huge pages, so a compiled step does not fault its
buffers' pages in again every call."""

import ast
import json
import os
import subprocess
import sys
import types

import pytest

from seg_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc = pytest.mark.skipif(
    host_memory.glibc_version() is None,
    reason="mallopt and the tunables are glibc's (Linux); elsewhere nothing "
    'is set')
huge_pages = pytest.mark.skipif(
    (host_memory.glibc_version() or (0, 0)) < (2, 35) or
    host_memory._thp_mode() != 'madvise',  # pylint: disable=protected-access
    reason='glibc >= 2.35 and a kernel that gives transparent huge pages on '
    'request (madvise) are needed')

# A program whose output (64 MiB) and temporaries are far above glibc's
# default mmap threshold: 16,384 pages of 4 KiB each call. It reports the
# page faults per call and glibc's own count of mapped blocks (mallinfo2)
# while an output is alive.
_PROGRAM = r'''
import ctypes, json, resource, sys
from seg_jax import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp

class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
      'uordblks', 'fordblks', 'keepcost')]

mallinfo2 = ctypes.CDLL('libc.so.6').mallinfo2
mallinfo2.restype = MallInfo2
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: (jnp.sin(x) + 1.0)[::-1] * jnp.cos(x))
for _ in range(10):  # the heap settles
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
y = f(x).block_until_ready()
info = mallinfo2()
print(json.dumps({'applied': applied, 'faults': faults,
                  'mapped_blocks': info.hblks, 'mapped_bytes': info.hblkhd}))
'''


def _run(code, **env):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **env)
  env.pop('GLIBC_TUNABLES', None)
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()


@glibc
def test_a_step_reuses_its_freed_buffers_without_page_faults():
  kept = json.loads(_run(_PROGRAM)[-1])
  default = json.loads(_run(_PROGRAM, **{host_memory.ENV: 'default'})[-1])
  assert kept['applied'] is True and default['applied'] is False
  # By default the live 64 MiB output is a mapped block of its own, and
  # 16,384 pages of output alone are faulted in every call.
  assert default['mapped_blocks'] >= 1, default
  assert default['mapped_bytes'] >= 64 << 20, default
  assert default['faults'] >= 16384, default
  # Kept, no buffer of the program is mapped (what is, under 1 MiB, was
  # allocated at start-up before the settings): every buffer comes from the
  # heap, which keeps what was freed. (Calls then fault only where the heap
  # grows, which depends on the threads' timing: 0 in most runs, up to 4
  # calls of 10 on a loaded machine; not asserted.)
  assert kept['mapped_bytes'] < 1 << 20, kept
  assert kept['faults'] < default['faults'], (kept, default)


@huge_pages
def test_configure_starts_the_process_again_once_with_huge_pages():
  """configure() re-executes the same command (same PID) with glibc's
  huge-page tunable, once; XLA's buffers are then on huge pages."""
  code = r'''
import os
print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True)
from seg_jax import host_memory
host_memory.configure()
import jax, jax.numpy as jnp
y = jax.jit(lambda x: x * 2.0)(jnp.ones((4096, 4096))).block_until_ready()
huge = [l for l in open('/proc/self/smaps_rollup') if 'AnonHugePages' in l]
print('configured', os.getpid(), os.environ.get('GLIBC_TUNABLES'),
      int(huge[0].split()[1]))
'''
  lines = _run(code)
  assert [l.split()[0] for l in lines] == ['start', 'start', 'configured']
  pids = {l.split()[1] for l in lines}
  assert len(pids) == 1
  assert lines[0].split()[2] == 'None'
  assert lines[1].split()[2] == host_memory.HUGE_PAGES
  assert lines[2].split()[2] == host_memory.HUGE_PAGES
  assert int(lines[2].split()[3]) >= 2048  # kB: at least one 2 MiB page
  # Disabled: no second start, no tunable.
  lines = _run(code, **{host_memory.ENV: 'default'})
  assert [l.split()[:1] + l.split()[2:3] for l in lines] == [
      ['start', 'None'], ['configured', 'None']]


def test_huge_pages_argv_only_where_it_changes_something():
  argv = ['/usr/bin/python3', '-m', 'seg_jax.main', '--workdir=w']
  plan = host_memory.huge_pages_argv({'A': '1'}, argv, '/venv/bin/python',
                                     (2, 36), 'madvise')
  assert plan == (['/venv/bin/python', '-m', 'seg_jax.main', '--workdir=w'],
                  {'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'})
  # Other tunables are kept.
  _, env = host_memory.huge_pages_argv(
      {'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'}, argv, 'py',
      (2, 36), 'madvise')
  assert env['GLIBC_TUNABLES'] == ('glibc.malloc.tcache_count=0:'
                                   'glibc.malloc.hugetlb=1')
  for environ, version, mode in [
      ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, (2, 36), 'madvise'),
      ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, (2, 36), 'madvise'),
      ({host_memory.ENV: 'default'}, (2, 36), 'madvise'),
      ({}, (2, 34), 'madvise'),  # the tunable is glibc 2.35's
      ({}, None, 'madvise'),  # not glibc
      ({}, (2, 36), 'always'),  # huge pages anyway
      ({}, (2, 36), 'never'),
      ({}, (2, 36), '')]:
    assert host_memory.huge_pages_argv(environ, argv, 'py', version,
                                       mode) is None, (environ, version, mode)
  assert host_memory.huge_pages_argv({}, [], 'py', (2, 36), 'madvise') is None


def test_thp_mode_reads_the_kernels_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory._thp_mode(str(path)) == 'madvise'  # pylint: disable=protected-access
  path.write_text('[always] madvise never\n')
  assert host_memory._thp_mode(str(path)) == 'always'  # pylint: disable=protected-access
  assert host_memory._thp_mode(str(tmp_path / 'missing')) == ''  # pylint: disable=protected-access


def test_keep_freed_memory_sets_glibcs_largest_values(monkeypatch):
  calls = []

  def fake(accept):
    def mallopt(param, value):
      calls.append((param, value))
      return int(accept(param, value))
    return types.SimpleNamespace(mallopt=mallopt)

  monkeypatch.setattr(host_memory, '_libc', lambda: fake(lambda p, v: True))
  assert host_memory.keep_freed_memory({}) is True
  # M_MMAP_THRESHOLD, M_ARENA_MAX, M_TRIM_THRESHOLD (malloc.h).
  assert calls == [(-3, 2**31 - 1), (-8, 1), (-1, 2**31 - 1)]
  # An older glibc refuses a threshold above half a heap: 32 MiB then.
  calls.clear()
  monkeypatch.setattr(host_memory, '_libc', lambda: fake(
      lambda p, v: p != -3 or v <= 32 << 20))
  assert host_memory.keep_freed_memory({}) is True
  assert calls == [(-3, 2**31 - 1), (-3, 32 << 20), (-8, 1),
                   (-1, 2**31 - 1)]
  calls.clear()
  for value in ('default', 'DEFAULT', '0', 'off'):
    assert host_memory.keep_freed_memory({host_memory.ENV: value}) is False
  assert not calls
  monkeypatch.setattr(host_memory, '_libc', lambda: None)  # not glibc
  assert host_memory.keep_freed_memory({}) is False


@pytest.mark.parametrize('cli', ['main', 'evaluate', 'predict', 'export',
                                 'bench'])
def test_every_cli_configures_the_host_memory_before_importing_jax(cli):
  with open(os.path.join(REPO, 'seg_jax', f'{cli}.py')) as f:
    tree = ast.parse(f.read())
  configure = jax_import = None
  for node in tree.body:
    if isinstance(node, ast.If) and configure is None:
      calls = [ast.unparse(n) for n in ast.walk(node)
               if isinstance(n, ast.Call)]
      if 'host_memory.configure()' in calls:
        assert ast.unparse(node.test) == "__name__ == '__main__'"
        configure = node.lineno
    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
             else [node.module] if isinstance(node, ast.ImportFrom) else [])
    if jax_import is None and any(n and n.split('.')[0] in ('jax', 'flax')
                                  for n in names):
      jax_import = node.lineno
  assert configure is not None and jax_import is not None
  assert configure < jax_import


def test_configure_keeps_freed_memory_only_where_no_huge_pages_are_given(
    monkeypatch):
  calls = []
  monkeypatch.setattr(host_memory, '_libc', lambda: types.SimpleNamespace(
      mallopt=lambda p, v: calls.append((p, v)) or 1))
  monkeypatch.setattr(host_memory, 'glibc_version', lambda: (2, 36))
  monkeypatch.delenv(host_memory.ENV, raising=False)
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.setattr(host_memory, '_thp_mode', lambda: 'never')
  assert host_memory.configure() == 'kept' == host_memory.MODE
  assert len(calls) == 3
  calls.clear()
  monkeypatch.setattr(host_memory, '_thp_mode', lambda: 'always')
  assert host_memory.configure() == 'huge pages (always)'
  monkeypatch.setattr(host_memory, '_thp_mode', lambda: 'madvise')
  monkeypatch.setenv('GLIBC_TUNABLES', host_memory.HUGE_PAGES)
  assert host_memory.configure() == 'huge pages'  # started again already
  monkeypatch.setenv(host_memory.ENV, 'default')
  assert host_memory.configure() == 'default'
  assert not calls
  monkeypatch.setattr(host_memory, 'MODE', 'default')


def test_available_bytes_reads_meminfo_and_the_cgroup_limit(tmp_path):
  """MemAvailable (kB) from /proc/meminfo, lowered to what the cgroup's
  memory.max leaves above memory.current; no limit ('max') or no file
  leaves it; nothing readable gives None."""
  meminfo = tmp_path / 'meminfo'
  meminfo.write_text('MemTotal:       24000 kB\nMemFree:  100 kB\n'
                     'MemAvailable:    1000 kB\nBuffers: 5 kB\n')
  cgroup = tmp_path / 'cgroup'
  cgroup.mkdir()
  read = lambda: host_memory.available_bytes(str(meminfo), str(cgroup))
  assert read() == 1_024_000
  (cgroup / 'memory.max').write_text('max\n')
  (cgroup / 'memory.current').write_text('1500000\n')
  assert read() == 1_024_000
  (cgroup / 'memory.max').write_text('2000000\n')
  assert read() == 500_000
  meminfo.unlink()
  assert read() == 500_000
  (cgroup / 'memory.max').unlink()
  assert read() is None


def test_buffers_bytes_counts_each_device_a_program_runs_on():
  """A compiled program's temporaries and outputs, times the devices its
  inputs are sharded over (8 simulated CPU devices: 8 copies of the
  per-device buffers in the one host memory)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seg_jax import sharding  # pylint: disable=g-import-not-at-top
  step = jax.jit(lambda x: (x * 2).sum(0) + x)
  x = np.ones((8, 1000), np.float32)
  one = step.lower(x).compile()
  stats = one.memory_analysis()
  assert host_memory.buffers_bytes(one) == (
      stats.temp_size_in_bytes + stats.output_size_in_bytes -
      stats.alias_size_in_bytes) >= 8 * 1000 * 4
  mesh = sharding.create_mesh()
  placed = jax.device_put(x, sharding.replicated(mesh))
  eight = step.lower(placed).compile()
  stats = eight.memory_analysis()
  assert host_memory.buffers_bytes(eight) == 8 * (
      stats.temp_size_in_bytes + stats.output_size_in_bytes -
      stats.alias_size_in_bytes)


def test_patch_matrix_of_xla_convolutions_and_the_largest_block(tmp_path,
                                                                monkeypatch):
  """The patch matrix of XLA's CPU convolution (pixels x taps x input
  channels: the second's, 2 x 9 x 11 x 9 x 7 floats, the larger);
  MemTotal + SwapTotal as the largest block; a step whose patch matrix
  exceeds it is refused before it runs with XLA's out-of-memory error."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seg_jax import errors  # pylint: disable=g-import-not-at-top
  from seg_jax.models import layers  # pylint: disable=g-import-not-at-top

  def conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  step = jax.jit(lambda x, k, j: conv(conv(x, k), j),
                 compiler_options=layers.compiler_options())
  x = np.ones((2, 9, 11, 5), np.float32)
  k, j = np.ones((3, 3, 5, 7), np.float32), np.ones((3, 3, 7, 2), np.float32)
  text = step.lower(x, k, j).compile().as_text()
  assert text.count(' convolution(') == 2
  assert host_memory.patch_matrix_bytes(text) == 2 * 9 * 11 * 9 * 7 * 4
  meminfo = tmp_path / 'meminfo'
  meminfo.write_text('MemTotal: 1000 kB\nSwapTotal: 24 kB\n'
                     'MemAvailable: 900 kB\n')
  assert host_memory.largest_allocation_bytes(str(meminfo)) == 1024 * 1024
  assert host_memory.largest_allocation_bytes(str(tmp_path / 'no')) is None

  checked = host_memory.MemoryChecked(step)
  monkeypatch.setattr(host_memory, 'largest_allocation_bytes',
                      lambda: 2 * 9 * 11 * 9 * 7 * 4 - 1)
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=r'^RESOURCE_EXHAUSTED: a convolution of the '
                     r'compiled step allocates 0.0 GiB at once, more than '
                     r"this machine's memory and swap \(0.0 GiB\)\.$") as e:
    checked(x, k, j)
  assert errors.out_of_memory(e.value)
  monkeypatch.setattr(host_memory, 'largest_allocation_bytes',
                      lambda: 2 * 9 * 11 * 9 * 7 * 4)
  np.testing.assert_array_equal(checked(x, k, j), step(x, k, j))
