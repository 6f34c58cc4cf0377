"""What the measuring scripts in benchmarks/ share: loading a config file,
the timing rule, and the host allocator's settings of seg_jax's CLIs
(`seg_jax.host_memory`, applied on import: each script imports this
before its first JAX computation)."""

import os
import runpy
import statistics
import sys
import time

# configs/*.py import the `configs` package from the repository root, which
# is not on the path of a script run as `python benchmarks/<script>.py`.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from seg_jax import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

host_memory.configure()


def get_config(path):
  """The ConfigDict of a config file (e.g. configs/unet_camvid.py)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  return runpy.run_path(path)['get_config']()


def median_seconds(fn, repeats):
  """Median wall time of `fn()` over `repeats` calls, after one untimed
  call (compilation, caches). `fn` must wait for its own result."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)
