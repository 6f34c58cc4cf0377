"""Test set-up: 8 forced CPU devices, so sharding is really exercised."""

import os
import sys

# Must happen before jax is imported anywhere. The tests' programs are tiny:
# LLVM's optimisation level 0 halves XLA's CPU compile time, which is most
# of the suite's time, and does not change results.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8'
    ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One XLA compilation cache for the whole run, made by the main pytest
# process and inherited by both xdist workers and every CLI process a test
# starts: the same tiny programs are compiled by many tests. It starts empty
# (no state from earlier runs or from ~/.cache) and is removed at the end.
_OWN_CACHE = None
if ('PYTEST_XDIST_WORKER' not in os.environ and
    'JAX_COMPILATION_CACHE_DIR' not in os.environ):
  import tempfile  # pylint: disable=g-import-not-at-top
  _OWN_CACHE = tempfile.mkdtemp(prefix='seg_jax_tests_xla_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

from absl import flags  # noqa: E402

# grain worker processes read absl flags: parse them outside absl.app.run.
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  """A fresh copy of configs/unet_shapes_tiny.py (tests may change it)."""
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  return unet_shapes_tiny.get_config()


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
